"""FlowMesh: contracts shared by the orchestrator, the workers and the CLI."""

__version__ = "0.1.0"
