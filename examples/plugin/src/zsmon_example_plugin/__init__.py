"""An example zsmon plugin: one checker, registered through the ``zsmon.checkers`` entry point."""
from zsmon_example_plugin.checker import AgentLivenessChecker

__all__ = ["AgentLivenessChecker"]
