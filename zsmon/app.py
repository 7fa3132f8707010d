"""The composition root: config -> registry -> service, renderers, demo.

The only place that names the built-in checker and exporter packages; every
command of ``zsmon.cli``, the demo and the test fixtures build from here.
"""
from __future__ import annotations

import zsmon.checkers
import zsmon.exporters
from zsmon.alerts.model import build_model
from zsmon.alerts.render import runbook_pages
from zsmon.core.config import Config
from zsmon.core.registry import Registry
from zsmon.core.service import Service
from zsmon.dashboards.build import dashboard_links


def build_registry(config: Config) -> Registry:
    """Built-in checkers and exporters, installed plugins and the YAML checkers of ``config``."""
    return Registry(config, checker_packages=[zsmon.checkers], exporter_packages=[zsmon.exporters])


def build_service(config: Config, registry: Registry | None = None, *,
                  privileged_role_expected: str | None = None) -> Service:
    """The sidecar for ``config``; the status page links to the dashboards ``zsmon render`` provisions,
    and it serves the runbooks of every alert ``zsmon render`` writes for this registry.
    ``privileged_role_expected``: why a role that can do more than read is fine here (the demo)."""
    registry = registry or build_registry(config)
    return Service(registry, dashboard_links=dashboard_links(registry),
                   runbooks=lambda: runbook_pages(build_model(registry)),
                   privileged_role_expected=privileged_role_expected)
