"""The registry: every checker and exporter zsmon knows, bound to its configuration.

Built from a config and the packages of built-in checkers and exporters (the
composition root names them), it finds

* built-in classes: every subclass defined in those packages' modules that sets ``name``;
* plugins: installed packages declaring a ``zsmon.checkers`` entry point (``source = "plugin"``);
* YAML checkers: the files on ``checks.paths`` (``source = "yaml"``, see ``declarative.py``);

then validates each ``checkers.<name>`` / ``exporters.<name>`` section against
that class's ``Settings`` (errors name the config file and line) and hands out
*bound* checkers and exporters: instance, settings and the effective intervals
and timeout, computed here once. The scheduler, the runner, the metrics, the API
and the renderers all read the same registry, so a new checker needs no other edit.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Iterable, Iterator

from pydantic import ValidationError

from zsmon.core import declarative
from zsmon.core.checker import Checker, Invariant
from zsmon.core.config import Config
from zsmon.core.exporter import Exporter
from zsmon.core.yamlfile import ConfigError, explain

ENTRY_POINT_GROUP = "zsmon.checkers"


class RegistryError(ConfigError):
    """A checker could not be loaded or two checkers share a name: a deployment mistake, one line, exit 2."""


@dataclass(frozen=True)
class BoundChecker:
    """A checker as this deployment runs it: the instance (with its settings) and its effective schedule."""

    checker: Checker
    enabled: bool
    interval_seconds: float
    full_interval_seconds: float | None   # None: the checker has no incremental mode
    statement_timeout_seconds: float

    @property
    def name(self) -> str:
        return self.checker.name

    @property
    def cls(self) -> type[Checker]:
        return type(self.checker)

    @property
    def invariants(self) -> tuple[Invariant, ...]:
        return self.checker.invariants


@dataclass(frozen=True)
class BoundExporter:
    exporter: Exporter
    enabled: bool
    interval_seconds: float

    @property
    def name(self) -> str:
        return self.exporter.name


def _import_submodules(package: ModuleType) -> None:
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def _named_subclasses(base: type, package: ModuleType) -> list[type]:
    """Every subclass (at any depth) defined in ``package`` that sets its own ``name``.

    Only the package's modules count: a class defined elsewhere (a test, a plugin not
    declared through an entry point) is not silently picked up.
    """
    out: list[type] = []
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__dict__.get("name") and cls.__module__.startswith(package.__name__ + "."):
            out.append(cls)
    return out


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


def _checker_classes(packages: Iterable[ModuleType], config: Config) -> dict[str, type[Checker]]:
    found: dict[str, type[Checker]] = {}
    for package in packages:
        _import_submodules(package)
        for cls in _named_subclasses(Checker, package):
            if cls.name in found and found[cls.name] is not cls:
                raise RegistryError(f"two checkers are named {cls.name!r}: {found[cls.name].__module__} "
                                    f"and {cls.__module__}")
            found[cls.name] = cls
    for name, cls in _plugins().items():
        if name in found and found[name] is not cls:
            raise RegistryError(f"plugin checker {name!r} clashes with {found[name].__module__}")
        found[name] = cls
    for name, cls in declarative.load(config.checks.paths).items():
        if name in found:
            raise declarative.DeclarativeError(
                f"checker file {cls.path}: name: {name!r} is already taken by the {found[name].source} "
                f"checker in {found[name].__module__}; choose another name")
        found[name] = cls
    return dict(sorted(found.items()))


def _exporter_classes(packages: Iterable[ModuleType]) -> dict[str, type[Exporter]]:
    found: dict[str, type[Exporter]] = {}
    for package in packages:
        _import_submodules(package)
        for cls in _named_subclasses(Exporter, package):
            found[cls.name] = cls
    return dict(sorted(found.items()))


class Registry:
    """Every checker and exporter, validated against ``config`` and bound to it."""

    def __init__(self, config: Config, checker_packages: Iterable[ModuleType] = (),
                 exporter_packages: Iterable[ModuleType] = ()) -> None:
        self.config = config
        self.checker_classes = _checker_classes(checker_packages, config)
        self.exporter_classes = _exporter_classes(exporter_packages)
        self.checkers = {name: self._bind_checker(cls) for name, cls in self.checker_classes.items()}
        self.exporters = {name: self._bind_exporter(cls) for name, cls in self.exporter_classes.items()}
        self._unknown("checkers", config.checkers, self.checkers)
        self._unknown("exporters", config.exporters, self.exporters)

    # ---- binding ------------------------------------------------------------------------------
    def _settings(self, section: str, name: str, model: type, raw: Any) -> Any:
        if isinstance(raw, model):
            return raw
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(explain(exc, self.config.document, (section, name, "settings"))) from None

    def _bind_checker(self, cls: type[Checker]) -> BoundChecker:
        cfg = self.config.checker(cls.name)
        settings = self._settings("checkers", cls.name, cls.Settings, cfg.settings)
        full = None
        if cls.supports_incremental:
            full = cfg.full_interval_seconds or cls.default_full_interval_seconds
        return BoundChecker(
            checker=cls(settings), enabled=cfg.enabled,
            interval_seconds=cfg.interval_seconds or cls.default_interval_seconds,
            full_interval_seconds=full,
            statement_timeout_seconds=cfg.statement_timeout_seconds or self.config.database.statement_timeout_seconds)

    def _bind_exporter(self, cls: type[Exporter]) -> BoundExporter:
        cfg = self.config.exporter(cls.name)
        settings = self._settings("exporters", cls.name, cls.Settings, cfg.settings)
        return BoundExporter(cls(settings), cfg.enabled, cfg.interval_seconds or cls.default_interval_seconds)

    def _unknown(self, section: str, configured: dict[str, Any], known: dict[str, Any]) -> None:
        for name in configured:
            if name not in known:
                raise ConfigError(self.config.document.error(
                    (section, name), f"unknown name; known: {', '.join(known) or 'none'}"))

    # ---- what the rest of zsmon asks -----------------------------------------------------------
    def enabled_checkers(self, only: Iterable[str] | None = None) -> dict[str, BoundChecker]:
        """The checkers to run: ``only`` (enabled or not, unknown names refused) or every enabled one."""
        only = list(only or [])
        unknown = [n for n in only if n not in self.checkers]
        if unknown:
            raise ConfigError(f"unknown checker {', '.join(map(repr, unknown))}; known: {', '.join(self.checkers)}")
        if only:
            return {n: b for n, b in self.checkers.items() if n in only}
        return {n: b for n, b in self.checkers.items() if b.enabled}

    def enabled_exporters(self) -> dict[str, BoundExporter]:
        return {n: b for n, b in self.exporters.items() if b.enabled}

    def invariants(self) -> Iterator[tuple[BoundChecker, Invariant]]:
        for bound in self.checkers.values():
            for inv in bound.invariants:
                yield bound, inv
