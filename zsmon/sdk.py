"""What a checker or exporter author imports: the framework's public surface, in one place.

A checker file needs nothing else (see docs/writing-a-checker.md)::

    from zsmon.sdk import Checker, CheckContext, CheckerSettings, Invariant

It knows nothing of the registry or the config: the registry finds it, validates
``checkers.<name>.settings`` against its ``Settings`` and schedules it.
"""
from zsmon.core.checker import Checker, CheckContext, CheckerSettings, IndexAdvice, Invariant, Severity
from zsmon.core.exporter import CollectContext, Exporter, ExporterSettings
from zsmon.core.results import CheckResult, Violation

__all__ = ["Checker", "CheckContext", "CheckerSettings", "CheckResult", "CollectContext", "Exporter",
           "ExporterSettings", "IndexAdvice", "Invariant", "Severity", "Violation"]
