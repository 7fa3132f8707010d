"""Docs that are generated must be current, and every config key must say what it does."""
from pathlib import Path

from pydantic import BaseModel

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.core.config_docs import reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    assert (ROOT / "docs/configuration.md").read_text() == reference(build_registry(Config())), \
        "docs/configuration.md is stale: run `zsmon config reference > docs/configuration.md`"


def _undocumented(model: type[BaseModel], prefix: str) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            missing += _undocumented(ann, f"{prefix}{name}.")
        elif not field.description:
            missing.append(prefix + name)
    return missing


def test_every_key_has_a_description():
    missing = _undocumented(Config, "")
    registry = build_registry(Config())
    for name, cls in registry.checker_classes.items():
        missing += _undocumented(cls.Settings, f"checkers.{name}.settings.")
    for name, cls in registry.exporter_classes.items():
        missing += _undocumented(cls.Settings, f"exporters.{name}.settings.")
    assert not missing, f"config keys without a description: {missing}"
