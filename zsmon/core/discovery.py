"""Finding the modules of a package and the classes they define (checkers, exporters)."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType, skip: set[str]) -> None:
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def named_subclasses(base: type) -> list[type]:
    """Every subclass (at any depth) that sets its own ``name``."""
    out: list[type] = []
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__dict__.get("name"):
            out.append(cls)
    return out
