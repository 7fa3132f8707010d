"""Finds every checker: the modules of this package, then installed plugins.

Adding a checker means adding one module here (or one installed package that
declares a ``zsmon.checkers`` entry point). The scheduler, the metrics, the API
and the renderers all read this registry, so nothing else needs editing.
"""
from __future__ import annotations

from importlib.metadata import entry_points

import zsmon.checkers as package
from zsmon.checkers.base import Checker
from zsmon.core.discovery import import_submodules, named_subclasses

ENTRY_POINT_GROUP = "zsmon.checkers"
_NOT_CHECKERS = {"base", "registry"}


class RegistryError(Exception):
    """A checker could not be loaded or two checkers share a name."""


def _plugins() -> dict[str, type[Checker]]:
    found: dict[str, type[Checker]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin names itself, it does not crash zsmon
            raise RegistryError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Checker)):
            raise RegistryError(f"plugin entry point {ep.name!r} ({ep.value}) is not a Checker subclass")
        obj.source = "plugin"
        found[obj.name] = obj
    return found


def checker_classes() -> dict[str, type[Checker]]:
    """Every checker class by name, built-in first, sorted by name."""
    import_submodules(package, _NOT_CHECKERS)
    plugins = _plugins()
    found: dict[str, type[Checker]] = {}
    for cls in named_subclasses(Checker):
        # Only this package's modules: a class defined elsewhere (a test, a plugin not declared
        # through an entry point) is not silently picked up.
        if not cls.__module__.startswith(package.__name__ + "."):
            continue
        name = cls.name
        if name in found and found[name] is not cls:
            raise RegistryError(f"two checkers are named {name!r}: {found[name].__module__} and {cls.__module__}")
        found[name] = cls
    for name, cls in plugins.items():
        if name in found and found[name] is not cls:
            raise RegistryError(f"plugin checker {name!r} clashes with {found[name].__module__}")
        found[name] = cls
    return dict(sorted(found.items()))
