"""`zsmon render --format kubernetes`: the manifests validate without a cluster and carry the same
rules and dashboards as the file output, including YAML and plugin checkers.

Core kinds are validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate
(strict: unknown fields are errors), the prometheus-operator kinds against the CRD schemas in
tests/data/k8s (closed the same way). Nothing is downloaded.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from zsmon.alerts.kubernetes import CHECKERS_MOUNT, kubernetes_files, kubernetes_objects
from zsmon.alerts.render import render_files
from zsmon.app import build_registry
from zsmon.core import declarative
from zsmon.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "k8s"
EXAMPLES = ROOT / "examples" / "checkers"
ZSMON = str(Path(sys.executable).with_name("zsmon"))
K8S_VERSIONS = ("1.28.0", kv.latest_version())
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRETS = {"DB_PASSWORD": "pg-secret-7f3e", "REDIS_PASSWORD": "redis-secret-19ab", "ADMIN_TOKEN": "admin-secret-c4d2"}


def _closed(schema):
    """Like the API server's strict field validation: an object with declared properties takes no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_validators():
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
        key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
        out[key] = jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))
    return out


CRD = _crd_validators()


def validate(obj):
    """Raise when ``obj`` is not a valid object of its kind."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD:
        CRD[key].validate(obj)
        # CRDs leave metadata open; check it as ObjectMeta through a core kind.
        for version in K8S_VERSIONS:
            kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, version, strict=True)
    else:
        for version in K8S_VERSIONS:
            kv.validate(obj, version, strict=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One render through the real command: YAML checkers, the plugin if installed, a non-default config."""
    tmp = tmp_path_factory.mktemp("k8s")
    cfg = tmp / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({
        "database": {"host": "postgres.zerostate.svc", "sslmode": "require", "user": "zsmon_ro"},
        "redis": {"host": "redis.zerostate.svc"},
        "checks": {"paths": [str(EXAMPLES)], "sample_limit": 50},
        "checkers": {"stuck_tasks": {"interval_seconds": 30, "settings": {"grace_seconds": 120}}},
        "kubernetes": {"namespace": "zerostate-monitoring", "labels": {"release": "kube-prometheus-stack"},
                       "replicas": 2, "image": "registry.example/zsmon:0.1.0"},
    }))
    out = tmp / "out"
    env = {**os.environ, **SECRETS}
    env.pop("ZSMON_CHECKERS_PATH", None)
    done = subprocess.run([ZSMON, "--config", str(cfg), "render", "--format", "kubernetes", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = {}
    for path in sorted(out.glob("*.yaml")):
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        docs[path.name] = doc
    config = load_config(cfg, env={})
    return {"dir": out, "docs": docs, "config": config, "files": render_files(build_registry(config))}


def _objects(rendered, kind):
    return [d for d in rendered["docs"].values() if d.get("kind") == kind]


def test_every_object_validates(rendered):
    objects = [d for name, d in rendered["docs"].items() if name != "kustomization.yaml"]
    kinds = {d["kind"] for d in objects}
    assert kinds == {"Deployment", "Service", "ConfigMap", "ServiceMonitor", "PrometheusRule"}
    for obj in objects:
        validate(obj)
        assert DNS_1123.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63
        assert obj["metadata"]["namespace"] == "zerostate-monitoring"
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert len(json.dumps(obj)) < 256 * 1024, f"{obj['metadata']['name']} is too large for kubectl apply"
    kustomization = rendered["docs"]["kustomization.yaml"]
    assert sorted(kustomization["resources"]) == sorted(n for n in rendered["docs"] if n != "kustomization.yaml")


def test_the_validators_catch_mistakes(rendered):
    rule = copy.deepcopy(_objects(rendered, "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        validate(rule)
    monitor = copy.deepcopy(_objects(rendered, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate(monitor)
    del monitor["spec"]["endpoints"][0]["intervall"]
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="'selector' is a required property"):
        validate(monitor)
    deployment = copy.deepcopy(_objects(rendered, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(_objects(rendered, "Deployment")[0])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    config_map = copy.deepcopy(_objects(rendered, "ConfigMap")[0])
    config_map["metadata"]["labels"] = {"grafana_dashboard": 1}
    with pytest.raises(kv.ValidationError):
        validate(config_map)


def test_prometheus_rules_are_the_rendered_rule_files(rendered):
    expected = {}
    for path, text in rendered["files"].items():
        if path.startswith("prometheus/rules/"):
            for group in yaml.safe_load(text)["groups"]:
                expected[group["name"]] = group
    got = {}
    for rule in _objects(rendered, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            assert group["name"] not in got
            got[group["name"]] = group
    assert got == expected
    alerts = {r["alert"] for g in got.values() for r in g["rules"] if "alert" in r}
    # A YAML checker's alert, with its own runbook link.
    assert "StuckTasksStuckTaskViolation" in alerts and "AgentCapacityAgentOverCapacityViolation" in alerts
    (stuck,) = [r for r in got["zsmon-checker-stuck_tasks"]["rules"] if r.get("alert", "").startswith("StuckTasks")]
    assert stuck["labels"]["severity"] == "warning"
    if "agent_liveness" in {g.removeprefix("zsmon-checker-") for g in got}:
        assert "AgentLivenessSilentActiveAgentViolation" in alerts


def test_prometheus_rules_pass_promtool(rendered, tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    files = []
    for rule in _objects(rendered, "PrometheusRule"):
        path = tmp_path / f"{rule['metadata']['name']}.yml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        files.append(str(path))
    done = subprocess.run(["promtool", "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboards_are_configmaps_for_the_grafana_sidecar(rendered):
    boards = {p.split("/")[-1]: json.loads(t) for p, t in rendered["files"].items() if p.startswith("grafana/dashboards/")}
    maps = [c for c in _objects(rendered, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    got = {}
    for cm in maps:
        assert cm["metadata"]["annotations"]["grafana_folder"] == "ZeroState"
        ((key, text),) = cm["data"].items()
        got[key] = json.loads(text)
    assert got == boards
    invariants = json.dumps(got["zsmon-invariants.json"])
    assert "stuck_tasks" in invariants and "payment_audit_trail" in invariants


def test_deployment_service_and_service_monitor_fit_together(rendered):
    (dep,) = _objects(rendered, "Deployment")
    (svc,) = _objects(rendered, "Service")
    (mon,) = _objects(rendered, "ServiceMonitor")
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert dep["spec"]["replicas"] == 2 and container["image"] == "registry.example/zsmon:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics", "scheme": "HTTP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics", "scheme": "HTTP"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "api": 8080}
    # The Service selects the pods and names the ports the ServiceMonitor scrapes.
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert mon["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    # The job the rules and dashboards select (`job="zsmon"`) comes from the Service's label.
    assert svc["metadata"]["labels"][mon["spec"]["jobLabel"]] == "zsmon"
    # The deployment guide's variables, the secrets only through secretKeyRef.
    env = {e["name"]: e for e in container["env"]}
    assert env["DB_HOST"]["value"] == "postgres.zerostate.svc" and env["DB_SSLMODE"]["value"] == "require"
    assert env["DB_USER"]["value"] == "zsmon_ro" and env["REDIS_HOST"]["value"] == "redis.zerostate.svc"
    assert {"DB_PORT", "DB_NAME", "REDIS_PORT", "REDIS_TLS_ENABLED", "LOG_LEVEL", "LOG_FORMAT"} <= set(env)
    for key in SECRETS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "zsmon", "key": key,
                                                         "optional": key != "DB_PASSWORD"}
    text = "\n".join(p.read_text() for p in rendered["dir"].glob("*.yaml"))
    assert not any(value in text for value in SECRETS.values())
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_pods_get_the_same_config_and_yaml_checkers(rendered, tmp_path):
    (dep,) = _objects(rendered, "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    maps = {c["metadata"]["name"]: c for c in _objects(rendered, "ConfigMap")}
    # The config ConfigMap, mounted where ZSMON_CONFIG points, loads with the pod's plain env.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, text in maps[volumes["config"]]["data"].items():
        (config_dir / key).write_text(text)
    assert env["ZSMON_CONFIG"] == f"{mounts['config']}/zsmon.yml"
    checkers_dir = tmp_path / "checkers"
    checkers_dir.mkdir()
    for key, text in maps[volumes["checkers"]]["data"].items():
        (checkers_dir / key).write_text(text)
    assert env["ZSMON_CHECKERS_PATH"] == mounts["checkers"] == CHECKERS_MOUNT
    pod_env = {k: v for k, v in env.items() if v is not None}
    pod_env.update(ZSMON_CHECKERS_PATH=str(checkers_dir))
    config = load_config(config_dir / "zsmon.yml", env=pod_env)
    assert config.checks.sample_limit == 50 and config.database.host == "postgres.zerostate.svc"
    assert config.checks.paths == [checkers_dir]
    registry = build_registry(config)
    assert registry.checkers["stuck_tasks"].interval_seconds == 30
    assert registry.checkers["stuck_tasks"].checker.settings.grace_seconds == 120
    assert set(declarative.load([checkers_dir])) == {"stuck_tasks", "agent_capacity", "payment_audit_trail"}
    assert {n for n, c in registry.checker_classes.items() if c.source == "yaml"} == {
        "stuck_tasks", "agent_capacity", "payment_audit_trail"}


def test_secrets_and_database_url(make_config):
    config = make_config(redis=False, database={"url": "postgresql://zsmon:pw-in-url-55@db/zerostate"},
                         http={"admin_token": "tok-88-d2f91a0c7e"}, kubernetes={"dashboard_folder": None})
    files = kubernetes_files(build_registry(config), files={})
    text = "".join(files.values())
    assert "pw-in-url-55" not in text and "tok-88-d2f91a0c7e" not in text
    (dep,) = [o for o in kubernetes_objects(build_registry(config), files={}) if o["kind"] == "Deployment"]
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ZSMON_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "ZSMON_DATABASE_URL"
    assert "DB_PASSWORD" not in env and "DB_HOST" not in env
    assert env["REDIS_HOST"]["value"] == ""  # Redis off, as REDIS_HOST="" means to zsmon
    for obj in kubernetes_objects(build_registry(config), files={}):
        validate(obj)


def test_several_replicas_turn_on_ha_with_the_pod_name_as_identity(make_config):
    def env_of(config):
        (dep,) = [o for o in kubernetes_objects(build_registry(config), files={}) if o["kind"] == "Deployment"]
        return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}, dep

    single, _ = env_of(make_config(kubernetes={"dashboard_folder": None}))
    assert "ZSMON_HA_ENABLED" not in single
    env, dep = env_of(make_config(kubernetes={"dashboard_folder": None, "replicas": 3}))
    assert dep["spec"]["replicas"] == 3 and env["ZSMON_HA_ENABLED"]["value"] == "true"
    assert env["ZSMON_HA_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    validate(dep)
