"""``python -m agentfabric`` runs the CLI."""

from .cli import main

main()
