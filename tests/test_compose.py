"""docker-compose.monitoring.yml against the Compose Specification's JSON schema (no Docker engine here).

The schema is committed test data (tests/data/compose-spec, from the check-jsonschema wheel):
nothing is downloaded at test time.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from zsmon.alerts.render import render_all, render_files
from zsmon.app import build_registry
from zsmon.core.config import ENV_KEYS, Config, load_config
from zsmon.testing import every_job_ran

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
    assert set(compose["services"]) == {"zsmon", "zsmon-db-role", "zsmon-redis", "prometheus", "alertmanager",
                                        "grafana", "postgres-exporter", "redis-exporter"}


def test_zsmon_gets_the_deployment_guides_env_vars(compose):
    env = compose["services"]["zsmon"]["environment"]
    guide = {"DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "DB_SSLMODE", "REDIS_HOST", "REDIS_PORT",
             "REDIS_PASSWORD", "REDIS_TLS_ENABLED", "LOG_LEVEL", "LOG_FORMAT"}
    assert guide <= set(env)
    assert set(env) <= set(ENV_KEYS) | {"ZSMON_CONFIG"}, f"zsmon does not read {set(env) - set(ENV_KEYS)}"
    assert "ADMIN_TOKEN" in env
    # Secrets come from the environment, never from the file.
    for key in ("DB_PASSWORD", "ADMIN_TOKEN"):  # DB_PASSWORD: zsmon's own role's (ZSMON_DB_PASSWORD)
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


# ---- the stack as a user runs it: `docker compose up` with the variables the header asks for ----------------
# The variables a user must set; everything else has a default.
REQUIRED = {"DB_HOST": "db", "DB_PASSWORD": "owner-secret", "ZSMON_DB_PASSWORD": "zsmon-secret",
            "ADMIN_TOKEN": "compose-token-7f3a9", "GRAFANA_ADMIN_PASSWORD": "grafana"}
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, colon, op, arg = m.groups()
        value = env.get(name)
        missing = value is None or (colon == ":" and value == "")
        if op == "?" and missing:
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op == "-" and missing:
            return arg
        return value or ""
    return _VAR.sub(one, text)


def up(env: dict[str, str] | None = None) -> dict:
    """The compose file as docker compose sees it with ``env`` (default: only the required variables):
    parsed, then every string interpolated (so ``KEY: ${X:-}`` is an empty string, not null)."""
    env = REQUIRED if env is None else env

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, env) if isinstance(node, str) else node
    return walk(yaml.safe_load(COMPOSE.read_text()))


def host_path(source: str) -> Path:
    return (ROOT / source).resolve() if not source.startswith("/") else Path(source)


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to the compose file)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = host_path(source)
    return out


def in_container(service: dict, path: str) -> Path:
    """The host file a container path of ``service`` is, through its bind mounts."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target):].lstrip("/")
    raise AssertionError(f"{path} is not mounted from the host")


def test_what_a_user_must_set_and_nothing_more():
    services = up()["services"]
    assert _errors(up()) == []
    for name in REQUIRED:
        with pytest.raises(KeyError, match=name):
            up({k: v for k, v in REQUIRED.items() if k != name})
    assert services["zsmon"]["environment"]["ADMIN_TOKEN"] == "compose-token-7f3a9"


def test_zsmon_runs_with_redis_by_default():
    services = up()["services"]
    env = services["zsmon"]["environment"]
    config = load_config(in_container(services["zsmon"], env["ZSMON_CONFIG"]), env=env)
    assert config.redis.enabled and config.redis.host == "zsmon-redis"
    redis = services["zsmon-redis"]
    assert set(redis["networks"]) & set(services["zsmon"]["networks"])
    assert services["zsmon"]["depends_on"]["zsmon-redis"] == {"condition": "service_healthy"}
    assert "redis-cli" in redis["healthcheck"]["test"] and "--appendonly" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"]), "zsmon's memory survives a restart"
    # Another Redis, or none (an empty host): the same variable the deployment guide documents.
    off = {**REQUIRED, "ZSMON_REDIS_HOST": ""}
    env = up(off)["services"]["zsmon"]["environment"]
    assert not load_config(in_container(services["zsmon"], env["ZSMON_CONFIG"]), env=env).redis.enabled


def test_the_mounted_config_and_checkers_directory_are_read(tmp_path):
    """ZSMON_CONFIG names the mounted file; its checks.paths is the mounted checkers folder: a YAML checker
    dropped there is registered."""
    import shutil

    services = up()["services"]
    zsmon = services["zsmon"]
    env = zsmon["environment"]
    assert env["ZSMON_CONFIG"].startswith("/etc/zsmon/") and (ROOT / "deploy/zsmon/zsmon.yml").is_file()
    assert mounts(zsmon) == {"/etc/zsmon": ROOT / "deploy/zsmon"}
    assert all(v.endswith(":ro") for v in zsmon["volumes"])
    config = load_config(in_container(zsmon, env["ZSMON_CONFIG"]), env=env)
    assert config.checks.paths == [ROOT / "deploy/zsmon/checkers"]
    assert build_registry(config).checkers  # valid as it stands
    # The same stack with ZSMON_CONFIG_DIR pointing at a copy holding one YAML checker.
    copy_dir = tmp_path / "zsmon"
    shutil.copytree(ROOT / "deploy/zsmon", copy_dir)
    shutil.copy(ROOT / "examples/checkers/stuck_tasks.yml", copy_dir / "checkers")
    zsmon = up({**REQUIRED, "ZSMON_CONFIG_DIR": str(copy_dir)})["services"]["zsmon"]
    config = load_config(in_container(zsmon, env["ZSMON_CONFIG"]), env=zsmon["environment"])
    registry = build_registry(config)
    assert registry.checkers["stuck_tasks"].cls.source == "yaml"


def test_sslmode_follows_the_platform():
    services = up()["services"]
    assert services["zsmon"]["environment"]["DB_SSLMODE"] == "prefer"
    assert services["zsmon-db-role"]["environment"]["PGSSLMODE"] == "prefer"
    assert services["postgres-exporter"]["environment"]["DATA_SOURCE_URI"].endswith("sslmode=prefer")
    # The platform's own setting (the deployment guide's DB_SSLMODE=require for a managed database) wins.
    services = up({**REQUIRED, "DB_SSLMODE": "require"})["services"]
    assert services["zsmon"]["environment"]["DB_SSLMODE"] == "require"
    assert services["zsmon-db-role"]["environment"]["PGSSLMODE"] == "require"
    assert services["postgres-exporter"]["environment"]["DATA_SOURCE_URI"].endswith("sslmode=require")


def _published(service: dict) -> dict[int, int]:
    out = {}
    for p in service.get("ports", []):
        host_ip, host, container = p.split(":")
        assert host_ip == "127.0.0.1", f"{p}: published on every interface"
        out[int(host)] = int(container)
    return out


def test_curl_localhost_9090_metrics_is_zsmon_under_compose_too():
    services = up()["services"]
    zsmon = services["zsmon"]
    config = load_config(in_container(zsmon, zsmon["environment"]["ZSMON_CONFIG"]), env=zsmon["environment"])
    metrics_port = int(config.http.metrics_listen.rpartition(":")[2])
    api_port = int(config.http.api_listen.rpartition(":")[2])
    assert _published(zsmon) == {9090: metrics_port, 8080: api_port}
    owners = {host: name for name, svc in services.items() for host in _published(svc)}
    assert len(owners) == sum(len(_published(s)) for s in services.values()), "a host port published twice"
    assert owners[9090] == "zsmon" and owners[8080] == "zsmon"
    assert _published(services["prometheus"]) == {9091: 9090}
    readme = (ROOT / "README.md").read_text()
    assert "curl localhost:9090/metrics" in readme and "localhost:9091" in readme
    assert "curl localhost:9090/metrics" in COMPOSE.read_text()


def test_zsmon_and_the_postgres_exporter_use_the_read_only_role():
    services = up()["services"]
    role = services["zsmon-db-role"]
    assert role["environment"]["ZSMON_DB_USER"] == "zsmon" == services["zsmon"]["environment"]["DB_USER"]
    assert services["zsmon"]["environment"]["DB_PASSWORD"] == "zsmon-secret" == role["environment"]["ZSMON_DB_PASSWORD"]
    assert services["postgres-exporter"]["environment"]["DATA_SOURCE_USER"] == "zsmon"
    assert services["postgres-exporter"]["environment"]["DATA_SOURCE_PASS"] == "zsmon-secret"
    # The platform's owner credentials reach only the one-shot that creates the role.
    for name, svc in services.items():
        if name != "zsmon-db-role":
            assert "owner-secret" not in json.dumps(svc), name
    for name in ("zsmon", "postgres-exporter"):
        assert services[name]["depends_on"]["zsmon-db-role"] == {"condition": "service_completed_successfully"}
    assert role["restart"] == "no"
    sql_file = in_container(role, role["command"][role["command"].index("-f") + 1])
    assert sql_file == ROOT / "deploy/zsmon-role.sql" and sql_file.is_file()


def test_the_mounted_prometheus_and_alertmanager_configs_pass_promtool_and_amtool(tmp_path):
    """Rendered from the mounted config into ZSMON_RENDER_DIR, then checked at the paths the services read."""
    services = up()["services"]
    zsmon = services["zsmon"]
    config = load_config(in_container(zsmon, zsmon["environment"]["ZSMON_CONFIG"]), env=zsmon["environment"])
    out = tmp_path / "monitoring"
    render_all(build_registry(config), out)
    services = up({**REQUIRED, "ZSMON_RENDER_DIR": str(out)})["services"]

    prom = services["prometheus"]
    prom_file = in_container(prom, _flag(prom["command"], "--config.file"))
    checked = subprocess.run(["promtool", "check", "config", str(prom_file)], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
    am = services["alertmanager"]
    am_file = in_container(am, _flag(am["command"], "--config.file"))
    checked = subprocess.run(["amtool", "check-config", str(am_file)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr

    # Every target Prometheus scrapes is a service it shares a network with, on the port that service serves.
    prom_cfg = yaml.safe_load(prom_file.read_text())
    serves = {"zsmon": {int(config.http.metrics_listen.rpartition(":")[2])}, "alertmanager": {9093},
              "postgres-exporter": {9187}, "redis-exporter": {9121}, "prometheus": {9090}}
    for name, ports in serves.items():
        if name in ("postgres-exporter", "redis-exporter"):
            assert ports == {int(p) for p in services[name]["expose"]}
    targets = [t for job in prom_cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    targets += [t for am_cfg in prom_cfg["alerting"]["alertmanagers"] for sc in am_cfg["static_configs"]
                for t in sc["targets"]]
    for target in targets:
        host, _, port = target.rpartition(":")
        if host == "api":  # the platform's API, on the platform's network
            assert "platform" in prom["networks"]
            continue
        assert host in services and int(port) in serves[host], target
        assert set(prom["networks"]) & set(services[host]["networks"]), target
    # Grafana reads the dashboards where the provisioning says, and Prometheus where it is.
    grafana = services["grafana"]
    provider = yaml.safe_load(in_container(grafana, "/etc/grafana/provisioning/dashboards/zsmon.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in mounts(grafana)
    source = yaml.safe_load(in_container(grafana, "/etc/grafana/provisioning/datasources/zsmon.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def _flag(command: list[str], name: str) -> str:
    return next(c.split("=", 1)[1] for c in command if c.startswith(name + "="))


# ---- the read-only role the stack creates, on a real PostgreSQL ----------------------------------------------
def _docs_grants() -> dict:
    """The minimal role of docs/deployment.md: the tables it may SELECT and its other grants."""
    text = (ROOT / "docs/deployment.md").read_text()
    block = re.search(r"```sql\n(CREATE ROLE zsmon.*?)```", text, re.S).group(1)
    code = "\n".join(line.split("--")[0] for line in block.splitlines())
    tables = re.search(r"GRANT SELECT ON (.*?) TO zsmon;", code, re.S).group(1)
    return {"select": {t.strip() for t in tables.split(",")},
            "connect": bool(re.search(r"GRANT CONNECT ON DATABASE \w+ TO zsmon;", code)),
            "usage": "GRANT USAGE ON SCHEMA public TO zsmon;" in code,
            "pg_monitor": "GRANT pg_monitor TO zsmon;" in code}


def _role_grants(conn, role: str) -> dict:
    select = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') AND has_table_privilege(%s, c.oid, 'SELECT')",
        (role,))}
    writes = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind IN ('r', 'p') AND (has_table_privilege(%s, c.oid, 'INSERT') OR has_table_privilege(%s, "
        "c.oid, 'UPDATE') OR has_table_privilege(%s, c.oid, 'DELETE') OR has_table_privilege(%s, c.oid, "
        "'TRUNCATE'))", (role,) * 4).fetchone()[0]
    attrs = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin "
                         "FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return {"select": select, "writes": writes, "attrs": attrs,
            "connect": conn.execute("SELECT has_database_privilege(%s, current_database(), 'CONNECT')",
                                    (role,)).fetchone()[0],
            "usage": conn.execute("SELECT has_schema_privilege(%s, 'public', 'USAGE')", (role,)).fetchone()[0],
            "create": conn.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)).fetchone()[0],
            "pg_monitor": conn.execute("SELECT pg_has_role(%s, 'pg_monitor', 'MEMBER')", (role,)).fetchone()[0]}


def _run_role_service(db_url: str, role: str, drop: tuple[str, ...] = (), **extra: str) -> subprocess.CompletedProcess:
    """The zsmon-db-role service's command with its environment, pointed at ``db_url``."""
    from psycopg.conninfo import conninfo_to_dict

    dsn = conninfo_to_dict(db_url)
    svc = up({**REQUIRED, "DB_HOST": dsn.get("host", "127.0.0.1"), "DB_PORT": str(dsn.get("port", 5432)),
              "DB_NAME": dsn["dbname"], "DB_USER": dsn.get("user", "postgres"), "ZSMON_DB_USER": role,
              "DB_SSLMODE": "disable", **extra})["services"]["zsmon-db-role"]
    command = list(svc["command"])
    i = command.index("-f") + 1
    command[i] = str(in_container(svc, command[i]))
    import os

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           **{k: str(v) for k, v in svc["environment"].items() if k not in drop}}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def compose_role(db_url):
    import uuid

    import psycopg

    role = f"zsmon_compose_{uuid.uuid4().hex[:8]}"
    yield role
    with psycopg.connect(db_url, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def test_the_stack_creates_exactly_the_documented_read_only_role(db_url, compose_role):
    import psycopg

    docs = _docs_grants()
    assert docs["select"] and docs["connect"] and docs["usage"] and docs["pg_monitor"]
    with psycopg.connect(db_url, autocommit=True) as admin:
        for attempt in range(2):  # idempotent: a restart of the stack runs it again
            done = _run_role_service(db_url, compose_role)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "zsmon-secret" not in done.stdout + done.stderr
            got = _role_grants(admin, compose_role)
            assert got["select"] == docs["select"], (attempt, got["select"] ^ docs["select"])
            assert got["writes"] == 0 and not got["create"]
            assert got["connect"] and got["usage"] and got["pg_monitor"]
            assert got["attrs"] == (False, False, False, False, False, True)
        # A grant too many (by hand, or an older version of the role) is taken back by the next start.
        admin.execute(f'GRANT INSERT ON agents TO "{compose_role}"')
        assert _role_grants(admin, compose_role)["writes"] == 1
        assert _run_role_service(db_url, compose_role).returncode == 0
        assert _role_grants(admin, compose_role)["writes"] == 0


def test_zsmon_checks_and_exports_as_the_compose_role(db_url, compose_role, make_config):
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    assert _run_role_service(db_url, compose_role).returncode == 0
    as_role = make_conninfo(**{**conninfo_to_dict(db_url), "user": compose_role, "password": "zsmon-secret"})
    with every_job_ran(make_config(redis=False, env={"ZSMON_DATABASE_URL": as_role}), "the compose role"):
        pass


def test_the_role_service_says_what_is_missing(db_url, compose_role):
    # Compose itself refuses to start without ZSMON_DB_PASSWORD; the file says so too when run by hand.
    no_password = _run_role_service(db_url, compose_role, drop=("ZSMON_DB_PASSWORD",))
    assert no_password.returncode != 0 and "ZSMON_DB_PASSWORD is not set" in no_password.stderr
    import uuid

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    empty = f"zsmon_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{empty}"')
    try:
        before = _run_role_service(make_conninfo(**{**conninfo_to_dict(db_url), "dbname": empty}), compose_role)
        assert before.returncode != 0
        assert re.search(r"the platform tables .*accounts.* do not exist: run the platform's migrations", before.stderr)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
