"""Finds every exporter module of this package."""
from __future__ import annotations

import zsmon.exporters as package
from zsmon.core.discovery import import_submodules, named_subclasses
from zsmon.exporters.base import Exporter


def exporter_classes() -> dict[str, type[Exporter]]:
    import_submodules(package, {"base", "registry"})
    return {cls.name: cls for cls in sorted(named_subclasses(Exporter), key=lambda c: c.name)}
