"""Agents: workflow definitions (YAML, versioned), the step kinds and the engine that runs them."""

from .engine import Engine
from .loader import load_workflow, load_workflows, parse_workflow
from .workflow import Workflow, WorkflowSet

__all__ = ["Engine", "Workflow", "WorkflowSet", "load_workflow", "load_workflows",
           "parse_workflow"]
