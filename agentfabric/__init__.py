"""agentfabric: event-driven agent workflows over Kafka.

The composition package: settings, the CLI and the wiring of ``streams``, ``agents``,
``tools`` and ``schemas``. Importing it does nothing but define names.
"""

from .errors import AgentFabricError

__all__ = ["AgentFabricError", "__version__"]
__version__ = "0.1.0"
