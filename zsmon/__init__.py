"""zsmon: the observability and invariant-monitoring sidecar for ZeroState."""
__version__ = "0.1.0"
