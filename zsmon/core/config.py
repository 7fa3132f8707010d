"""Configuration: a YAML file overlaid by the platform's environment variables.

Precedence: defaults < YAML file (``--config`` / ``ZSMON_CONFIG``) < environment < command-line
flags (``zsmon run --metrics-listen / --api-listen``, passed as ``overrides``).
Every mistake becomes one ``ConfigError`` line naming the file (and line) or the
environment variable, the key, and what was expected. Secrets are ``SecretStr``:
they print as ``**********`` and their values never appear in an error.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator

from zsmon.core.yamlfile import ConfigError, Strict, YamlDoc, describe, explain, read_yaml


# A postgres URL whose authority (before the first '/', '?' or '#') holds more than one '@'.
_AT_IN_USERINFO = re.compile(r"^postgres(?:ql)?://[^/?#]*@[^/?#]*@", re.IGNORECASE)
ADMIN_TOKEN_MIN_LENGTH = 16
_ADMIN_TOKEN_MIN_DISTINCT = 5


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9090")
    return value


class DatabaseConfig(Strict):
    """The monitored PostgreSQL. zsmon's sessions are read-only and time-bounded."""

    url: SecretStr | None = Field(None, description="A full libpq DSN; overrides host/port/user/password/name/sslmode.")
    host: str = Field("127.0.0.1", description="Database host.")
    port: int = Field(5432, ge=1, le=65535, description="Database port.")
    user: str = Field("postgres", description="Role to connect as: a read-only role with SELECT and pg_monitor "
                      "(docs/deployment.md), not the postgres default, which zsmon warns about.")
    password: SecretStr = Field(SecretStr(""), description="Password; never logged.")
    name: str = Field("zerostate", description="Database name.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode.")
    max_connections: int = Field(4, ge=1, le=1000, description="Pool size: checkers and exporters running at once.")
    statement_timeout_seconds: float = Field(30.0, gt=0, description="Default statement_timeout of every session; "
                                             "a checker may override it.")
    lock_timeout_seconds: float = Field(5.0, gt=0, description="lock_timeout of every session.")
    connect_timeout_seconds: float = Field(5.0, gt=0, description="How long to wait for a connection before the "
                                           "run is an error.")
    recovery_conflict_retries: int = Field(
        2, ge=0, le=10, description="On a hot standby: how many times a checker run cancelled by a conflict with "
        "recovery (replay removing rows its snapshot still reads) is retried at once with a fresh snapshot before "
        "the run is an error that says so and names the standby setting to raise (docs/deployment.md, Hot "
        "standby).")
    require_minimal_role: bool = Field(False, description="Refuse to start (exit 2) when the role can do more than "
                                       "read: superuser, CREATEROLE, pg_execute_server_program, "
                                       "pg_write_server_files, pg_read_server_files, pg_signal_backend, "
                                       "pg_write_all_data, or a write privilege on any table. Recommended for "
                                       "production; without it zsmon starts and warns (log, "
                                       "zsmon_database_role_privileged, ZsmonDatabaseRolePrivileged). The role: "
                                       "docs/deployment.md.")

    @field_validator("url")
    @classmethod
    def _unescaped(cls, v: SecretStr | None) -> SecretStr | None:
        # libpq splits a URL's userinfo at its first '@': the rest of a password with an unescaped '@' would
        # become the host name, and be printed wherever the host is. Refused, without echoing any of it.
        if v is not None and _AT_IN_USERINFO.match(v.get_secret_value().strip()):
            raise ValueError("the user or password in the URL holds an unescaped '@': percent-encode it as %40 "
                             "(and ':' as %3A, '/' as %2F)")
        return v


class RedisConfig(Strict):
    """zsmon's memory across runs (watermarks, last-seen values, baselines) and HA leases. Optional."""

    enabled: bool = Field(True, description="Use Redis. Without it, invariants needing memory report skipped.")
    host: str = Field("127.0.0.1", description="Redis host; an empty REDIS_HOST disables Redis.")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    password: SecretStr | None = Field(None, description="Redis password; never logged.")
    db: int = Field(0, ge=0, description="Redis database number.")
    tls: bool = Field(False, description="Connect with TLS.")
    key_prefix: str = Field("zsmon:", description="Prefix of every key zsmon writes.")
    socket_timeout_seconds: float = Field(2.0, gt=0, description="Connect and read timeout.")


class LoggingConfig(Strict):
    """Structured logs on stderr; secrets are redacted by a processor."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum level.")
    format: Literal["json", "console"] = Field("console", description="json: one object per line; console: readable.")

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class HttpConfig(Strict):
    """The two listeners: metrics (/metrics, /health, /ready) and API (checks API, admin, status page)."""

    metrics_listen: str = Field("0.0.0.0:9090", description="HOST:PORT of the metrics listener.")
    api_listen: str = Field("0.0.0.0:8080", description="HOST:PORT of the API listener.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /api and /admin and the status page's "
                                          f"sign-in; without it those routes answer 403. At least "
                                          f"{ADMIN_TOKEN_MIN_LENGTH} characters (e.g. `openssl rand -hex 24`).")
    admin_name: str = Field("admin", min_length=1, max_length=100, description="Who the admin token stands for: "
                            "recorded as the author of acknowledgements made through the API.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve both listeners over TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")
    max_body_bytes: int = Field(65536, ge=1024, description="Larger request bodies get 413.")
    rate_limit_per_minute: int | None = Field(None, ge=1, description="Requests per minute per client on /api, "
                                              "/admin and /login (unset: no limit beyond the two below).")
    login_limit_per_minute: int | None = Field(10, ge=1, description="Sign-in attempts (POST /login) per minute per "
                                               "client; beyond it 429 with Retry-After (null: no limit).")
    auth_failure_limit_per_minute: int | None = Field(30, ge=1, description="Failed bearer-token or sign-in attempts "
                                                      "per minute per client; beyond it every /api, /admin and "
                                                      "/login request from that client gets 429 until the budget "
                                                      "refills, so a token cannot be guessed (null: no limit).")
    trusted_proxies: list[str] = Field(default_factory=list, description="Addresses or networks (10.0.0.0/8) of "
                                       "reverse proxies whose X-Forwarded-For/-Proto headers are believed: the "
                                       "limits above then apply to the client they name. Default: none, every "
                                       "forwarded header is ignored and a client is its connection's address.")
    header_timeout_seconds: float = Field(10.0, gt=0, le=300, description="A connection that has not sent a "
                                          "request's complete headers within this long is closed (slow clients).")
    keep_alive_timeout_seconds: int = Field(5, ge=1, le=300, description="An idle keep-alive connection is closed "
                                            "after this long.")
    on_demand_queue: int = Field(20, ge=1, le=10_000, description="Requests that may wait for one checker's "
                                 "on-demand run (POST /api/v1/checks/{name}/run, /admin/verify-balances); they "
                                 "share one run. Beyond it 429 with Retry-After.")
    max_concurrent_requests: int = Field(200, ge=8, le=100_000, description="Connections and requests one listener "
                                         "serves at once; beyond it 503.")
    ready_requires_checks: bool = Field(True, description="/ready is 503 while a checker's latest run failed "
                                        "because of the database (unreachable, statement_timeout, killed, "
                                        "unresponsive); false keeps the replica in service through such errors.")
    switch_interval_ms: float = Field(0.5, gt=0, le=100, description="Python's thread switch interval "
                                      "(`sys.setswitchinterval`) while `zsmon run` serves. Shorter than Python's "
                                      "5 ms so the HTTP thread answers a scrape promptly while a checker thread "
                                      "decodes a large result (see docs/performance.md); 5 restores the default.")
    metrics_process: bool = Field(True, description="Serve the metrics listener from a small process of its own: "
                                  "it answers /metrics from the bytes the service renders after every job "
                                  "(waiting a moment for a render that is due) and passes /health and /ready to "
                                  "the service, so a scrape never waits behind a sweep for Python's GIL; on Linux "
                                  "6.12+ it runs with a 0.3 ms scheduler slice, so it takes a busy CPU as soon "
                                  "as a scrape arrives (see docs/performance.md). false: the service's process "
                                  "serves it.")
    grafana_url: str | None = Field(None, description="Base URL of Grafana, for links from the status page.")
    runbook_base_url: str | None = Field(None, description="Base URL of runbooks kept elsewhere (a wiki): alerts "
                                         "and the status page then link `<base>/<Alert>.md`. Unset: zsmon serves "
                                         "its own at `/runbooks/<Alert>` and alerts link them under "
                                         "render.zsmon_url.")

    _v_listen = field_validator("metrics_listen", "api_listen")(lambda cls, v: _listen(v))

    @field_validator("runbook_base_url", "grafana_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v and not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", v):
            raise ValueError("expected an http(s) URL such as https://wiki.example.com/runbooks")
        return v.rstrip("/") if v else v

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None) -> SecretStr | None:
        token = v.get_secret_value() if v is not None else ""
        if token and len(token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(f"too short: the admin token must be at least {ADMIN_TOKEN_MIN_LENGTH} characters "
                             "(generate one with `openssl rand -hex 24`)")
        if token and len(set(token)) < _ADMIN_TOKEN_MIN_DISTINCT:
            raise ValueError(f"too easy to guess: the admin token must hold at least {_ADMIN_TOKEN_MIN_DISTINCT} "
                             "different characters (generate one with `openssl rand -hex 24`)")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/8)") from None
        return [item.strip() for item in v]


class SchedulerConfig(Strict):
    """Every checker and exporter collection is a job with its own interval."""

    max_workers: int = Field(4, ge=1, le=64, description="Jobs running at once.")
    jitter_ratio: float = Field(0.1, ge=0, le=0.5, description="Random jitter as a share of each interval.")
    health_interval_seconds: float = Field(5.0, gt=0, description="How often database and Redis health is probed "
                                           "(drives /ready).")
    misfire_grace_seconds: float = Field(30.0, gt=0, description="A run later than this is skipped, not run late.")
    shutdown_grace_seconds: float = Field(10.0, ge=1, le=300, description="On SIGTERM/SIGINT zsmon stops scheduling, "
                                          "cancels its running queries on the server and exits within this long "
                                          "(HA leases are handed over at once when no run is left, else they "
                                          "lapse). Keep it below Kubernetes' terminationGracePeriodSeconds (30).")


class HaConfig(Strict):
    """High availability: N replicas share the work through Redis leases (see docs/deployment.md)."""

    enabled: bool = Field(False, description="Run as one of several replicas: each checker and exporter runs "
                          "on the replica holding its Redis lease; results are shared through Redis.")
    lease_seconds: float = Field(15.0, ge=0.5, le=600, description="Lease length. The holder renews it every "
                                 "third of it; a dead holder's jobs move to another replica after at most this long.")
    identity: str | None = Field(None, max_length=200, description="This replica's name in results (`producer`) "
                                 "and leases (default: HOSTNAME-PID; in Kubernetes use the pod name).")
    on_redis_down: Literal["run_locally", "stand_by"] = Field(
        "run_locally", description="Without Redis, leases cannot be held: run_locally keeps every check running on "
        "every replica (duplicated results, never a blind spot); stand_by runs nothing until Redis is back.")


class CheckerConfig(Strict):
    enabled: bool = Field(True, description="Run this checker.")
    interval_seconds: float | None = Field(None, gt=0, description="Seconds between runs (default: the checker's).")
    full_interval_seconds: float | None = Field(None, gt=0, description="Seconds between full sweeps for checkers "
                                                "with an incremental mode.")
    statement_timeout_seconds: float | None = Field(None, gt=0, description="statement_timeout of this checker's runs.")
    settings: dict[str, Any] = Field(default_factory=dict, description="The checker's own settings (below).")


class ExporterConfig(Strict):
    enabled: bool = Field(True, description="Run this exporter.")
    interval_seconds: float | None = Field(None, gt=0, description="Seconds between collections.")
    settings: dict[str, Any] = Field(default_factory=dict, description="The exporter's own settings (below).")


class ChecksConfig(Strict):
    """Shared by every checker."""

    sample_limit: int = Field(100, ge=1, le=10000, description="Violations listed per invariant (largest "
                              "differences first); counts are always complete.")
    track_limit: int = Field(10000, ge=1, le=1_000_000, description="Violating entities remembered per "
                             "invariant (first seen, acknowledgements; about 170 bytes of Redis each), and "
                             "re-judged by every incremental run. Beyond it the count stays exact, the extra "
                             "violations page unacknowledged, and incremental runs become full sweeps until "
                             "fewer violate.")
    paths: list[Path] = Field(default_factory=list, description="Directories (their *.yml/*.yaml files) or files "
                              "of declarative YAML checkers (docs/writing-a-checker.md); relative to the config "
                              "file. The environment variable takes a colon-separated list.")

    @field_validator("paths", mode="before")
    @classmethod
    def _split_paths(cls, v: Any) -> Any:
        return [p for p in v.split(os.pathsep) if p.strip()] if isinstance(v, str) else v


_MATCHERS = re.compile(r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
                       r'(,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*)*$')
_METRIC = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class RenderConfig(Strict):
    """What `zsmon render` writes: Prometheus, Alertmanager and Grafana configuration."""

    scrape_interval_seconds: int = Field(10, ge=1, le=300, description="Prometheus scrape interval; also the "
                                         "step of the generated promtool tests.")
    evaluation_interval_seconds: int = Field(10, ge=1, le=300, description="Prometheus rule evaluation interval.")
    zsmon_targets: list[str] = Field(["zsmon:9090"], min_length=1, description="HOST:PORT of zsmon's metrics "
                                     "listener (scrape job `zsmon`).")
    api_targets: list[str] = Field(["api:9090"], min_length=1, description="HOST:PORT serving the platform API's "
                                   "own /metrics (scrape job `zerostate-api`).")
    api_metrics_path: str = Field("/metrics", description="Path of the platform API's metrics.")
    postgres_exporter_targets: list[str] = Field(["postgres-exporter:9187"], min_length=1,
                                                 description="postgres-exporter (scrape job `postgres`).")
    redis_exporter_targets: list[str] = Field(["redis-exporter:9121"], min_length=1,
                                              description="redis-exporter (scrape job `redis`).")
    alertmanager_targets: list[str] = Field(["alertmanager:9093"], min_length=1,
                                            description="Alertmanagers Prometheus sends alerts to.")
    prometheus_url: str = Field("http://prometheus:9090", description="Prometheus URL as Grafana reaches it.")
    zsmon_url: str = Field("http://localhost:8080", description="zsmon's API listener as on-call reaches it "
                           "from a browser: alerts link its runbooks (`/runbooks/<Alert>`) and its status page "
                           "filtered to the alert's checker and invariant.")
    grafana_url: str = Field("http://localhost:3000", description="Grafana as on-call reaches it from a browser: "
                             "alerts link the dashboard panel of their invariant or checker.")
    grafana_datasource: str = Field("Prometheus", description="Name of the provisioned Grafana datasource (the "
                                    "dashboards' `${datasource}` variable defaults to it).")
    money_unit: str = Field("currencyUSD", min_length=1, max_length=40, description="Grafana unit of the "
                            "platform's money on the dashboards (e.g. currencyUSD, currencyEUR, or a custom "
                            "`suffix: credits`); money rates are shown in it per second.")
    http_requests_metric: str = Field("http_requests_total", description="The API's request counter "
                                      "(labels method, path, status).")
    http_duration_metric: str = Field("http_request_duration_seconds", description="The API's request duration "
                                      "histogram (without `_bucket`).")
    http_error_matcher: str = Field('status=~"5.."', description="Label matcher(s) selecting failed requests, "
                                    "e.g. `status=~\"5..\"`.")
    high_error_rate_ratio: float = Field(0.05, gt=0, lt=1, description="HighErrorRate fires above this share of "
                                         "failed requests over 5 minutes.")
    availability_slo: float = Field(0.999, gt=0, lt=1, description="API availability objective (share of "
                                    "requests that do not fail); burn-rate factors are computed from it.")
    slo_period_days: int = Field(30, ge=1, le=365, description="Period of the availability objective.")
    unverified_after_seconds: int | None = Field(None, ge=10, le=86400, description="CriticalInvariantsUnverified "
                                                 "pages when a checker with a critical invariant (payments) has "
                                                 "completed no run for this long (default: its staleness limit - "
                                                 "three intervals, or an interval plus its statement_timeout - "
                                                 "and never more than 10 minutes).")
    staleness_factor: float = Field(3.0, ge=1.5, le=100, description="A checker or exporter with no successful "
                                    "run for this many of its intervals alerts as stale.")
    replication_lag_seconds: int = Field(60, ge=1, le=86400, description="ZsmonReplicationLag warns when zsmon "
                                         "reads a hot standby this many seconds behind the primary (for 2 "
                                         "minutes): its checks see the platform that late.")
    critical_invariant_for_seconds: int = Field(0, ge=0, description="`for` of alerts on critical (money) "
                                                "invariants: a violation seen in one snapshot is real.")
    warning_invariant_for_seconds: int = Field(300, ge=0, description="`for` of alerts on warning and info "
                                               "invariants.")
    pager_webhook_url: str = Field("http://pager.invalid/zsmon", description="Webhook that pages (severity "
                                   "critical). The default resolves nowhere: set it.")
    chat_webhook_url: str = Field("http://chat.invalid/zsmon", description="Webhook for tickets and chat "
                                  "(severity warning).")
    watchdog_webhook_url: str = Field("http://deadmansswitch.invalid/zsmon", description="Dead man's switch "
                                      "webhook receiving the always-firing Watchdog alert.")
    pager_group_wait_seconds: int = Field(5, ge=0, le=600, description="Alertmanager group_wait for pages (part "
                                          "of the time from a bad commit to a page).")

    @field_validator("http_error_matcher")
    @classmethod
    def _matchers(cls, v: str) -> str:
        if not _MATCHERS.match(v):
            raise ValueError('expected PromQL label matchers such as status=~"5.."')
        return v.strip()

    @field_validator("http_requests_metric", "http_duration_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not _METRIC.match(v):
            raise ValueError("expected a Prometheus metric name")
        return v

    @field_validator("zsmon_targets", "api_targets", "postgres_exporter_targets", "redis_exporter_targets",
                     "alertmanager_targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for target in v:
            _listen(target)
        return v

    @field_validator("pager_webhook_url", "chat_webhook_url", "watchdog_webhook_url", "prometheus_url",
                     "zsmon_url", "grafana_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", v):
            raise ValueError("expected an http(s) URL such as https://hooks.example.com/zsmon")
        return v


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class KubernetesConfig(Strict):
    """What `zsmon render --format kubernetes` writes: zsmon's Deployment and Service, a ServiceMonitor and
    PrometheusRules for the prometheus-operator, and dashboard ConfigMaps for the Grafana sidecar."""

    namespace: str = Field("monitoring", max_length=63, pattern=_K8S_NAME, description="Namespace of every object.")
    name: str = Field("zsmon", max_length=40, pattern=_K8S_NAME, description="Name of the Deployment, Service and "
                      "ServiceMonitor; prefix of the ConfigMaps and PrometheusRules.")
    image: str = Field("zsmon:local", min_length=1, description="zsmon's container image (built as in "
                       "docker-compose.monitoring.yml, pushed where the cluster pulls from).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent",
                                                                         description="imagePullPolicy.")
    replicas: int = Field(1, ge=1, le=10, description="zsmon replicas; more than one needs Redis (ha.*) so that "
                          "one replica runs each check.")
    secret_name: str = Field("zsmon", max_length=253, pattern=_K8S_NAME, description="Existing Secret with the keys "
                             "DB_PASSWORD, REDIS_PASSWORD and ADMIN_TOKEN (ZSMON_DATABASE_URL instead of "
                             "DB_PASSWORD when database.url is set); zsmon never writes secrets into manifests.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object, e.g. "
                                   "`release: kube-prometheus-stack` for the operator's rule and ServiceMonitor "
                                   "selectors.")
    dashboard_label: str = Field("grafana_dashboard", min_length=1, description="Label the Grafana sidecar "
                                 "watches for dashboard ConfigMaps.")
    dashboard_label_value: str = Field("1", description="Value of dashboard_label.")
    dashboard_folder: str | None = Field("ZeroState", description="Grafana folder (annotation grafana_folder, "
                                         "honoured by the sidecar's folderAnnotation); unset: no annotation.")
    cpu_request: str = Field("100m", description="CPU request of the zsmon container.")
    memory_request: str = Field("128Mi", description="Memory request of the zsmon container.")
    memory_limit: str = Field("512Mi", description="Memory limit of the zsmon container.")


class Config(Strict):
    deployment: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="Names this deployment's "
                                   "memory in Redis (every key lives under redis.key_prefix + this + ':'). Default: "
                                   "the monitored cluster's system identifier and the database name, so two "
                                   "databases never share memory or HA leases. Set it to keep the memory across a "
                                   "change of cluster (a major-version upgrade); see docs/deployment.md.")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    ha: HaConfig = Field(default_factory=HaConfig)
    checkers: dict[str, CheckerConfig] = Field(default_factory=dict, description="Per-checker settings by name.")
    exporters: dict[str, ExporterConfig] = Field(default_factory=dict, description="Per-exporter settings by name.")
    render: RenderConfig = Field(default_factory=RenderConfig, description="What `zsmon render` writes.")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig,
                                         description="What `zsmon render --format kubernetes` writes.")
    # Where the config came from, for messages (not a key).
    source: str | None = Field(None, exclude=True)
    # The parsed file, so later validation (checker settings, in the registry) can name file and line.
    _document: YamlDoc = PrivateAttr(default_factory=lambda: YamlDoc(None, "config file", {}))
    # Where a key's value came from when not the default: "--api-listen", "ZSMON_API_LISTEN", "FILE line N".
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    def origin(self, *key: str) -> str:
        """Who set ``key`` (e.g. ``"http", "metrics_listen"``): a flag, an environment variable, the config
        file and line, or ``the default``; for messages that say what to change."""
        if key in self._origins:
            return self._origins[key]
        node: Any = self._document.data
        for part in key:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            line = self._document.line_of(key)
            return f"{'.'.join(key)} in {self._document.where(line)}"
        return f"the default of {'.'.join(key)}"

    @property
    def document(self) -> YamlDoc:
        return self._document

    def checker(self, name: str) -> CheckerConfig:
        return self.checkers.get(name) or CheckerConfig()

    def exporter(self, name: str) -> ExporterConfig:
        return self.exporters.get(name) or ExporterConfig()

    def secrets(self) -> list[str]:
        """Every secret value, for the log redaction processor."""
        found = [self.database.password, self.database.url, self.redis.password, self.http.admin_token]
        out = [s.get_secret_value() for s in found if s is not None and s.get_secret_value()]
        if self.database.url is not None:  # the password inside a DSN
            from psycopg.conninfo import conninfo_to_dict

            try:
                pw = conninfo_to_dict(self.database.url.get_secret_value()).get("password")
            except Exception:
                pw = None
            if pw:
                out.append(str(pw))
            # As a person meant it (userinfo up to the last '@'), whatever libpq would make of it.
            url = self.database.url.get_secret_value()
            if "://" in url:
                userinfo = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
                if ":" in userinfo:
                    out.append(userinfo.split(":", 1)[1])
        return out


# The platform's environment variables (deployment guide) and zsmon's own.
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "ZSMON_DATABASE_URL": ("database", "url"),
    "DB_HOST": ("database", "host"),
    "DB_PORT": ("database", "port"),
    "DB_USER": ("database", "user"),
    "DB_PASSWORD": ("database", "password"),
    "DB_NAME": ("database", "name"),
    "DB_SSLMODE": ("database", "sslmode"),
    "DB_MAX_OPEN_CONNS": ("database", "max_connections"),
    "REDIS_HOST": ("redis", "host"),
    "REDIS_PORT": ("redis", "port"),
    "REDIS_PASSWORD": ("redis", "password"),
    "REDIS_TLS_ENABLED": ("redis", "tls"),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
    "ADMIN_TOKEN": ("http", "admin_token"),
    "TLS_CERT_FILE": ("http", "tls_cert_file"),
    "TLS_KEY_FILE": ("http", "tls_key_file"),
    "ZSMON_DATABASE_REQUIRE_MINIMAL_ROLE": ("database", "require_minimal_role"),
    "ZSMON_HA_ENABLED": ("ha", "enabled"),
    "ZSMON_HA_IDENTITY": ("ha", "identity"),
    "ZSMON_CHECKERS_PATH": ("checks", "paths"),
    "ZSMON_DEPLOYMENT": ("deployment",),
    "ZSMON_METRICS_LISTEN": ("http", "metrics_listen"),
    "ZSMON_API_LISTEN": ("http", "api_listen"),
}
# Keys that ``zsmon run`` also takes as flags (they override the environment and the file).
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "--metrics-listen": ("http", "metrics_listen"),
    "--api-listen": ("http", "api_listen"),
}
_UNKNOWN_HINT = " (see docs/configuration.md for the keys this section takes)"


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = data.get(part)
        if not isinstance(child, dict):
            child = data[part] = {}
        data = child
    data[path[-1]] = value


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < the YAML file < the environment < ``overrides`` (flag -> value, flags of ``FLAG_KEYS``;
    a None value is not given), validated as data.

    Only the config's own shape is checked here; each checker's and exporter's
    ``settings`` stay raw until the registry validates them against their models
    (with the same file-and-line errors, through ``config.document``).
    """
    env = os.environ if env is None else env
    if path is None and env.get("ZSMON_CONFIG"):
        path = env["ZSMON_CONFIG"]
    doc = YamlDoc(None, "config file", {})
    if path is not None:
        doc = read_yaml(Path(path), "config file",
                        hint=" (set --config or ZSMON_CONFIG to a readable YAML file)")
        if doc.data is None:
            doc = YamlDoc(doc.path, doc.what, {}, doc.node)
        if not isinstance(doc.data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              "(database, redis, ...)")
    data: dict[str, Any] = doc.data
    from_env: dict[tuple[str, ...], str] = {}
    for var, key in ENV_KEYS.items():
        if var in env:
            value: Any = env[var]
            if var == "REDIS_HOST" and value == "":
                _set(data, ("redis", "enabled"), False)
                continue
            if var in ("TLS_CERT_FILE", "TLS_KEY_FILE") and value == "":
                continue
            _set(data, key, value)
            from_env[key] = f"environment variable {var}"
    for flag, value in (overrides or {}).items():
        if value is not None:
            _set(data, FLAG_KEYS[flag], value)
            from_env[FLAG_KEYS[flag]] = flag
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        loc, msg, _ = describe(exc, unknown_hint=_UNKNOWN_HINT)
        for key_path, var in from_env.items():
            if loc[: len(key_path)] == key_path:
                raise ConfigError(f"{var} ({'.'.join(loc)}): {msg}") from None
        raise ConfigError(explain(exc, doc, unknown_hint=_UNKNOWN_HINT)) from None
    config.source = str(path) if path else None
    config._document = doc
    config._origins = {key: source.removeprefix("environment variable ") for key, source in from_env.items()}
    if path is not None and ("checks", "paths") not in from_env:
        base = Path(path).parent
        config.checks.paths = [p if p.is_absolute() else base / p for p in config.checks.paths]
    return config
