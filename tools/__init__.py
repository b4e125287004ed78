"""Tools: the in-process tool registry (Python tools with validated arguments) and the
knowledge base. The tool gateway (``gateway``) wraps every tool call; the shipped catalog of
HTTP tools for the sample CRM and ERP services is ``tools/catalog``."""

from .registry import Tool, ToolCall, ToolRegistry

__all__ = ["Tool", "ToolCall", "ToolRegistry"]
