"""Tools: the registry every tool call goes through, and the sample CRM/ERP connectors."""

from .registry import Tool, ToolCall, ToolRegistry

__all__ = ["Tool", "ToolCall", "ToolRegistry", "default_registry"]


def default_registry() -> ToolRegistry:
    """A registry holding the shipped sample connectors."""
    from .connectors import accounts, erp

    registry = ToolRegistry()
    accounts.register(registry)
    erp.register(registry)
    return registry
