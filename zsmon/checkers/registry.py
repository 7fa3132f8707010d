"""Finds every checker: the modules of this package, installed plugins, then YAML files.

Adding a checker means adding one module here, one installed package that
declares a ``zsmon.checkers`` entry point (``source = "plugin"``), or one YAML
file on ``checks.paths`` / ``$ZSMON_CHECKERS_PATH`` (``source = "yaml"``, see
``declarative.py``). The scheduler, the metrics, the API and the renderers all
read this registry, so nothing else needs editing.
"""
from __future__ import annotations

from importlib.metadata import entry_points

import zsmon.checkers as package
from zsmon.checkers import declarative
from zsmon.checkers.base import Checker
from zsmon.core.config import ConfigError
from zsmon.core.discovery import import_submodules, named_subclasses

ENTRY_POINT_GROUP = "zsmon.checkers"
_NOT_CHECKERS = {"base", "registry", "declarative"}


class RegistryError(ConfigError):
    """A checker could not be loaded or two checkers share a name: a deployment mistake, one line, exit 2."""


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
    """Every checker class by name (built-in, plugin, YAML), sorted by name.

    A YAML file that is invalid or reuses a taken name raises ``ConfigError``.
    """
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
    for name, cls in declarative.load().items():
        if name in found:
            raise declarative.DeclarativeError(
                f"checker file {cls.path}: name: {name!r} is already taken by the {found[name].source} "
                f"checker in {found[name].__module__}; choose another name")
        found[name] = cls
    return dict(sorted(found.items()))
