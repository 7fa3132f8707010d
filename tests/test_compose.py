"""docker-compose.monitoring.yml against the Compose Specification's JSON schema (no Docker engine here).

The schema is committed test data (tests/data/compose-spec, from the check-jsonschema wheel):
nothing is downloaded at test time.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from zsmon.alerts.render import render_files
from zsmon.app import build_registry
from zsmon.core.config import ENV_KEYS, Config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "tests/data/compose-spec/compose-spec.json").read_text())
COMPOSE = ROOT / "docker-compose.monitoring.yml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def _errors(doc):
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    return sorted(e.message for e in validator.iter_errors(doc))


def test_schema_itself_is_valid():
    jsonschema.validators.validator_for(SCHEMA).check_schema(SCHEMA)


def test_compose_file_is_valid(compose):
    assert _errors(compose) == []


def test_the_schema_has_teeth(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["prometheus"]["imagee"] = "typo"
    assert _errors(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["grafana"]["ports"] = "3000:3000"
    assert _errors(broken)


def test_the_stack_has_every_service(compose):
    assert set(compose["services"]) == {"zsmon", "prometheus", "alertmanager", "grafana", "postgres-exporter",
                                        "redis-exporter"}


def test_zsmon_gets_the_deployment_guides_env_vars(compose):
    env = compose["services"]["zsmon"]["environment"]
    guide = {"DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "DB_SSLMODE", "REDIS_HOST", "REDIS_PORT",
             "REDIS_PASSWORD", "REDIS_TLS_ENABLED", "LOG_LEVEL", "LOG_FORMAT"}
    assert guide <= set(env)
    assert set(env) <= set(ENV_KEYS), f"zsmon does not read {set(env) - set(ENV_KEYS)}"
    assert "ADMIN_TOKEN" in env
    # Secrets come from the environment, never from the file.
    for key in ("DB_PASSWORD", "ADMIN_TOKEN"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", env[key]), key


def test_mounts_match_the_rendered_layout(compose):
    files = render_files(build_registry(Config()))
    mounts = {s: [v for v in svc.get("volumes", []) if isinstance(v, str) and v.startswith("${ZSMON_RENDER_DIR")]
              for s, svc in compose["services"].items()}
    # ${ZSMON_RENDER_DIR:-./monitoring}/prometheus:/etc/prometheus:ro -> "prometheus"
    sources = {m.split("}/", 1)[1].split(":", 1)[0] for vs in mounts.values() for m in vs}
    assert sources == {"prometheus", "alertmanager", "grafana/provisioning", "grafana/dashboards"}
    for src in sources:
        assert any(f.startswith(src + "/") for f in files), f"the compose file mounts {src}, render writes no such dir"
    prom = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert any(v.endswith(":/var/lib/grafana/dashboards/zsmon:ro") for v in mounts["grafana"])
    am = compose["services"]["alertmanager"]
    assert "--cluster.listen-address=" in am["command"]


def test_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, name
    assert compose["services"]["prometheus"]["image"].endswith("v2.42.0")
    assert compose["services"]["alertmanager"]["image"].endswith("v0.25.0")
