"""The ``zsmon`` command.

Exit codes (docs/invariants.md): ``check --once`` exits 1 when any violation was
found, otherwise 2 when a check could not run (or the input was bad), else 0.
A user mistake prints one line on stderr, never a traceback.
"""
from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

import zsmon
from zsmon.alerts.kubernetes import render_kubernetes
from zsmon.alerts.render import render_all
from zsmon.app import build_registry, build_service
from zsmon.core.config import CheckerConfig, Config, ConfigError, load_config
from zsmon.core.config_docs import reference
from zsmon.core.db import DatabaseUnavailable, describe
from zsmon.core.deployment import prefix_of
from zsmon.core.lifecycle import Lifecycle, LifecycleError, parse_duration, validate_target
from zsmon.core.logging import configure_logging, get_logger, redactor
from zsmon.core.privileges import RoleGuard
from zsmon.core.redis import make_redis, ping
from zsmon.core.results import describe_violation
from zsmon.core.registry import Registry
from zsmon.core.service import BusyListener, ListenError, build_runner
from zsmon.demo.run import Options, main as demo_main

EXIT_VIOLATIONS = 1
EXIT_ERROR = 2


def _fail(message: str) -> NoReturn:
    # Every error line passes the redactor: the config's known secrets once it is loaded, and anything that
    # looks like a credential (a URL's userinfo, password=...) always, before the config is read too.
    click.echo(f"zsmon: error: {redactor.scrub(message)}", err=True)
    sys.exit(EXIT_ERROR)


def _load(ctx: click.Context, overrides: dict[str, Any] | None = None) -> Config:
    try:
        config = load_config(ctx.obj.get("config_path"), overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))
    configure_logging(config.logging.level, config.logging.format, config.secrets())
    return config


def _registry(ctx: click.Context, overrides: dict[str, Any] | None = None) -> Registry:
    """The config and the registry it selects (checker settings validated): a mistake is one line, exit 2."""
    config = _load(ctx, overrides)
    try:
        return build_registry(config)
    except ConfigError as exc:
        _fail(str(exc))


_CONFIG_HELP = "YAML config file (default: $ZSMON_CONFIG; env vars such as DB_HOST override it)."


def _config_after_command(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:  # given after the subcommand: it overrides one given before it (or $ZSMON_CONFIG)
        ctx.ensure_object(dict)["config_path"] = value


def config_option(f: Any) -> Any:
    """``--config`` accepted after the subcommand too: ``zsmon check --once --config f.yml``."""
    return click.option("--config", "config_path", type=click.Path(), expose_value=False,
                        callback=_config_after_command, help=_CONFIG_HELP)(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(), envvar="ZSMON_CONFIG", help=_CONFIG_HELP)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """zsmon: invariant monitoring and metrics for the ZeroState platform."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def _listen_fix(config: Config, busy: BusyListener) -> str:
    """One listener that could not bind, and how to move it: the flag, the variable, the key, who set it."""
    key = f"{busy.listener}_listen"
    label = "API" if busy.listener == "api" else busy.listener
    return (f"{busy.reason} (the {label} listener {busy.address}, set by {config.origin('http', key)}): pick "
            f"another with --{busy.listener}-listen HOST:PORT, ZSMON_{busy.listener.upper()}_LISTEN or http.{key} "
            "(port 0: any free one)")


@cli.command()
@click.option("--metrics-listen", metavar="HOST:PORT", default=None,
              help="Metrics listener (/metrics, /health, /ready); overrides ZSMON_METRICS_LISTEN and "
                   "http.metrics_listen [default: 0.0.0.0:9090].")
@click.option("--api-listen", metavar="HOST:PORT", default=None,
              help="API and status page listener; overrides ZSMON_API_LISTEN and http.api_listen "
                   "[default: 0.0.0.0:8080].")
@config_option
@click.pass_context
def run(ctx: click.Context, metrics_listen: str | None, api_listen: str | None) -> None:
    """Run the sidecar: scheduled checks and collections, /metrics and the API."""
    registry = _registry(ctx, {"--metrics-listen": metrics_listen, "--api-listen": api_listen})
    try:
        build_service(registry.config, registry).run_forever()
    except ListenError as exc:
        _fail("; ".join(_listen_fix(registry.config, busy) for busy in exc.failures))
    except ConfigError as exc:
        _fail(str(exc))


def _text(result: dict[str, Any], sample: int | None = None) -> str:
    head = f"{result['checker']:<12} {result['status'].upper():<5} {result['mode']:<11} {result['duration_seconds']:.3f}s"
    lines = [head]
    if result["error"]:
        lines.append(f"  error: {result['error']}")
    for inv, count in result["violation_counts"].items():
        if count:
            lines.append(f"  {inv}: {count} violation{'s' if count != 1 else ''}")
            if inv in result.get("summaries", {}):
                lines.append(f"    {result['summaries'][inv]}")
            rows = [v for v in result["violations"] if v["invariant"] == inv]
            for v in rows[:sample]:
                lines.append(f"    {v['entity_type']} {v['entity_id']}: {describe_violation(v)}")
            shown = len(rows[:sample])
            if count > shown:
                why = "raise --sample to see more" if shown < len(rows) else "checks.sample_limit caps the sample"
                lines.append(f"    ... and {count - shown} more not shown ({why})")
    for inv, reason in result["skipped"].items():
        lines.append(f"  skipped {inv}: {reason}")
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _totals(results: list[dict[str, Any]]) -> str:
    """The last line of the text output: what the run found, all checkers together."""
    failing = sum(r["status"] == "fail" for r in results)
    errors = sum(r["status"] == "error" for r in results)
    found = sum(sum(r["violation_counts"].values()) for r in results)
    unacked = sum(sum(r.get("unacknowledged_counts", r["violation_counts"]).values()) for r in results)
    skipped = sum(len(r["skipped"]) for r in results)
    line = (f"total: {_plural(len(results), 'checker')}, {failing} failing, {_plural(errors, 'error')}; "
            f"{_plural(found, 'violation')} ({unacked} unacknowledged)")
    if skipped:
        line += f", {_plural(skipped, 'invariant')} skipped (not judged: see the 'skipped' lines above)"
    return line


def exit_code(results: list[dict[str, Any]]) -> int:
    if any(sum(r["violation_counts"].values()) for r in results):
        return EXIT_VIOLATIONS
    if any(r["status"] == "error" for r in results):
        return EXIT_ERROR
    return 0


@cli.command()
@click.option("--once", is_flag=True, help="Run every selected checker once and exit (otherwise repeat).")
@click.option("--only", "only", multiple=True, metavar="NAME", help="Run only this checker (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--mode", type=click.Choice(["auto", "full", "incremental"]), default="auto", show_default=True,
              help="Force a full sweep or an incremental run where the checker supports it.")
@click.option("--interval", type=float, default=60.0, show_default=True, help="Seconds between repeats without --once.")
@click.option("--sample", type=click.IntRange(min=0), default=None, metavar="N",
              help="Text output: show at most N violation rows per invariant (default: every sampled row).")
@config_option
@click.pass_context
def check(ctx: click.Context, once: bool, only: tuple[str, ...], fmt: str, mode: str, interval: float,
          sample: int | None) -> None:
    """Run checkers now and print their results (exit 1: violations, 2: could not check, 0: clean)."""
    registry = _registry(ctx)
    try:
        runner = build_runner(registry, only=only or None)
    except ConfigError as exc:
        _fail(str(exc))
    if not runner.checkers:
        _fail("no checker is enabled (see checkers.<name>.enabled in the config)")
    database = registry.config.database
    guard = RoleGuard(runner.db, database.require_minimal_role)

    def inspect_role() -> None:
        """Once the database answers, before any checker runs: warn about (or refuse) a role that can do more
        than read. A refusal is a ConfigError: one line, exit 2."""
        if guard.report is None:
            try:
                guard.check(database.connect_timeout_seconds)
            except DatabaseUnavailable as exc:  # the checkers' own results will say why
                get_logger("zsmon.cli").warning("database_role_unknown", error=str(exc))

    try:
        while True:
            # The database is asked once up front: unreachable, every checker is an error at once.
            results = [r.to_dict() for r in runner.run_checks(mode=None if mode == "auto" else mode,
                                                              on_reachable=inspect_role)]
            if fmt == "json":
                click.echo(json.dumps({"checks": results}, indent=2))
            else:
                click.echo("\n".join([*(_text(r, sample) for r in results), _totals(results)]))
            if once:
                sys.exit(exit_code(results))
            time.sleep(interval)
    except ConfigError as exc:  # database.require_minimal_role refused the role
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        runner.db.close()


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Directory to write into.")
@click.option("--format", "fmt", type=click.Choice(["files", "kubernetes"]), default="files", show_default=True,
              help="files: Prometheus, Alertmanager and Grafana config files; kubernetes: a Deployment, Service, "
                   "ServiceMonitor, PrometheusRules and dashboard ConfigMaps (kubectl apply -k DIR).")
@click.option("--checkers", "selected", metavar="NAME[,NAME...]", default=None,
              help="Only these of the enabled checkers get alerts, dashboard rows and runbooks (default: every "
                   "checker the config enables). Leave out a plugin the deployed zsmon does not have.")
@config_option
@click.pass_context
def render(ctx: click.Context, out: str, fmt: str, selected: str | None) -> None:
    """Render Prometheus rules and config, Alertmanager config and Grafana dashboards (or Kubernetes manifests)
    for the checkers the config enables, and say which."""
    registry = _registry(ctx)
    if selected is not None:
        registry = _select_checkers(registry, [n.strip() for n in selected.split(",") if n.strip()])
    try:
        written = (render_kubernetes if fmt == "kubernetes" else render_all)(registry, Path(out))
    except ConfigError as exc:
        _fail(str(exc))
    enabled = registry.enabled_checkers()
    click.echo("checkers: " + (", ".join(f"{name} ({_origin(b.cls)})" for name, b in sorted(enabled.items()))
                               or "none (no checker is enabled: no invariant alerts or panels)"))
    for name, bound in sorted(enabled.items()):
        if bound.cls.source == "plugin":
            click.echo(f"warning: checker {name} comes from a plugin installed here ({_origin(bound.cls)}): the "
                       f"zsmon that runs with these rules needs it too, or InvariantCheckMissing fires for it "
                       f"forever; leave it out with --checkers or checkers.{name}.enabled: false", err=True)
    click.echo(f"wrote {len(written)} files to {out}")


def _select_checkers(registry: Registry, names: list[str]) -> Registry:
    """The registry of the same config with every enabled checker not in ``names`` disabled."""
    enabled = registry.enabled_checkers()
    unknown = [n for n in names if n not in enabled]
    if not names or unknown:
        _fail(f"render --checkers: {'no checker named' if names else 'give at least one name'}"
              f"{' ' + ', '.join(map(repr, unknown)) if unknown else ''} among the enabled checkers "
              f"({', '.join(sorted(enabled)) or 'none'})")
    config = registry.config
    checkers = dict(config.checkers)
    for name in set(enabled) - set(names):
        checkers[name] = (checkers.get(name) or CheckerConfig()).model_copy(update={"enabled": False})
    try:
        return build_registry(config.model_copy(update={"checkers": checkers}))
    except ConfigError as exc:
        _fail(str(exc))


def _origin(cls: Any) -> str:
    """Where a checker class comes from: built in, the YAML file, or the plugin's distribution."""
    if cls.source == "yaml":
        return f"yaml {getattr(cls, 'path', '?')}"
    if cls.source == "plugin":
        from importlib.metadata import entry_points

        for ep in entry_points(group="zsmon.checkers"):
            module, _, attr = ep.value.partition(":")
            if module == cls.__module__ and attr == cls.__qualname__:
                return f"plugin {ep.dist.name if ep.dist else ep.name} {ep.dist.version if ep.dist else ''}".strip()
        return "plugin"
    return "built in"


@cli.command()
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Stop this long after starting, warm-up included (default: Ctrl-C).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulated traffic and faults.")
@click.option("--faults/--no-faults", default=True, show_default=True, help="Plant a fault every --fault-every seconds.")
@click.option("--fault-every", type=click.FloatRange(min=0.5), default=15.0, show_default=True, metavar="SECONDS")
@click.option("--rate", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Simulated platform operations per second, per simulator.")
@click.option("--database-url", default=None, metavar="DSN",
              help="Use this database instead of an embedded one (the simulators write to it; never production).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090, show_default=True, help="0: any free port.")
@click.option("--api-port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--check-interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between runs of every checker.")
@click.option("--fault", "only_faults", multiple=True, metavar="NAME",
              help="Plant only this fault (repeatable; a name as the demo prints it, e.g. "
                   "inject_stuck_open_auction or payments.one_unit_leak).")
def demo(duration: float | None, seed: int, faults: bool, fault_every: float, rate: float, database_url: str | None,
         metrics_port: int, api_port: int, check_interval: float, only_faults: tuple[str, ...]) -> None:
    """Everything in one command: embedded PostgreSQL and Redis, simulated traffic with faults, the sidecar.

    --duration counts from the start (the databases' start-up and the warm-up included).
    """
    sys.exit(demo_main(Options(duration=duration, seed=seed, faults=faults, fault_every=fault_every, rate=rate,
                               database_url=database_url, metrics_port=metrics_port, api_port=api_port,
                               check_interval=check_interval, only_faults=only_faults)))


@cli.group()
def checkers() -> None:
    """Inspect the registry of checkers."""


def _checker_rows(registry: Registry) -> list[dict[str, Any]]:
    """Every registered checker (enabled or not) as the list/explain commands show it."""
    rows = []
    for name, bound in registry.checkers.items():
        cls, raw = bound.cls, bound.checker.settings
        rows.append({
            "name": name, "source": cls.source, "enabled": bound.enabled, "description": cls.description,
            "origin": str(getattr(cls, "path", "") or cls.__module__),
            "interval_seconds": bound.interval_seconds,
            "default_interval_seconds": cls.default_interval_seconds,
            "supports_incremental": cls.supports_incremental,
            "recommended_indexes": [{"table": a.table, "column": a.column, "statement": a.statement,
                                     "saves": a.saves} for a in cls.recommended_indexes],
            "full_interval_seconds": bound.full_interval_seconds,
            "statement_timeout_seconds": bound.statement_timeout_seconds,
            "runbook_url": cls.runbook_url,
            "invariants": [dict(vars(i)) for i in cls.invariants],
            "settings": [{"key": key, "value": getattr(raw, key), "default": field.get_default(call_default_factory=True),
                          "description": field.description or ""} for key, field in cls.Settings.model_fields.items()],
            "sql": getattr(cls, "query", None),
        })
    return rows


def _shown(value: Any) -> str:
    """A setting's value as one would write it in the YAML config."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value, default=str) if not isinstance(value, (int, float)) or isinstance(value, bool) \
        else format(value, "g")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@checkers.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@config_option
@click.pass_context
def checkers_list(ctx: click.Context, fmt: str) -> None:
    """Every checker: name, source (builtin, plugin, yaml), interval, invariants."""
    rows = _checker_rows(_registry(ctx))
    if fmt == "json":
        keys = ("name", "source", "enabled", "interval_seconds", "invariants")
        click.echo(json.dumps({"checkers": _jsonable([{k: r[k] for k in keys} for r in rows])}, indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [7])
    click.echo(f"{'CHECKER':<{width}}  {'SOURCE':<7}  {'INTERVAL':>8}  INVARIANTS")
    for r in rows:
        off = "" if r["enabled"] else "  (disabled)"
        click.echo(f"{r['name']:<{width}}  {r['source']:<7}  {r['interval_seconds']:>7g}s  "
                   f"{', '.join(i['id'] for i in r['invariants'])}{off}")


@checkers.command("explain")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@config_option
@click.pass_context
def checkers_explain(ctx: click.Context, name: str, fmt: str) -> None:
    """One checker in full: invariants, settings with their values, the SQL of a YAML checker."""
    rows = {r["name"]: r for r in _checker_rows(_registry(ctx))}
    if name not in rows:
        _fail(f"unknown checker {name!r}; known: {', '.join(rows)} (zsmon checkers list)")
    r = rows[name]
    if fmt == "json":
        click.echo(json.dumps(_jsonable(r), indent=2))
        return
    out = [f"{r['name']} ({r['source']}, {r['origin']})", f"  {r['description']}", ""]
    every = f"every {r['interval_seconds']:g}s"
    if r["interval_seconds"] != r["default_interval_seconds"]:
        every += f" (default {r['default_interval_seconds']:g}s)"
    if r["supports_incremental"]:
        every += f", incremental; full sweep every {r['full_interval_seconds']:g}s"
    out += [f"  runs:              {every}{'' if r['enabled'] else ' - disabled'}",
            f"  statement timeout: {r['statement_timeout_seconds']:g}s"]
    if r["runbook_url"]:
        out.append(f"  runbook:           {r['runbook_url']}")
    out += ["", "  invariants:"]
    for i in r["invariants"]:
        memory = ", needs memory (Redis)" if i["needs_memory"] else ""
        out += [f"    {i['id']}  [{i['severity']}, entity {i['entity_type']}{memory}]", f"      {i['description']}"]
    if r["recommended_indexes"]:
        out += ["", "  indexes its incremental runs rely on (the platform's schema has none; zsmon runs no DDL):"]
        for a in r["recommended_indexes"]:
            out += [f"    {a['statement']};", f"      {a['saves']}"]
    if r["settings"]:
        out += ["", f"  settings (checkers.{name}.settings):"]
        for s in r["settings"]:
            changed = "" if s["value"] == s["default"] else f" (default {_shown(s['default'])})"
            out += [f"    {s['key']} = {_shown(s['value'])}{changed}", f"      {s['description']}"]
    if r["sql"]:
        out += ["", "  SQL (each row is a violation):", *("    " + line for line in r["sql"].splitlines())]
    click.echo("\n".join(out))


@checkers.command("reset-memory")
@click.argument("name")
@click.argument("keys", nargs=-1)
@config_option
@click.pass_context
def checkers_reset_memory(ctx: click.Context, name: str, keys: tuple[str, ...]) -> None:
    """Forget what a checker remembers in Redis (all of it, or only KEYS), for this deployment only.

    \b
    After a deliberate change, e.g. a legitimate shift of the reputation population:
      zsmon checkers reset-memory reputation drift_baseline
    Without KEYS: every key of the checker (last-seen values, watermarks, baselines);
    its next run starts afresh (a full sweep; memory invariants skipped once).
    """
    registry = _registry(ctx)
    config, known = registry.config, registry.checkers
    if name not in known:
        _fail(f"unknown checker {name!r}; known: {', '.join(known)}")
    client = make_redis(config.redis)
    reason = ping(client)
    if reason:
        _fail(f"cannot reset memory: {reason}")
    base = f"{_deployment_prefix(config)}{name}:"
    targets = [base + k for k in keys] if keys else list(client.scan_iter(match=base + "*", count=1000))
    deleted = client.delete(*targets) if targets else 0
    click.echo(f"deleted {deleted} key{'s' if deleted != 1 else ''} of checker {name}")


class _AckGroup(click.Group):
    """``zsmon ack CHECKER INVARIANT ...`` acknowledges; ``list`` and ``revoke`` are subcommands."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "create", self.commands["create"], args
        return super().resolve_command(ctx, args)


def _deployment_prefix(config: Config) -> str:
    """The Redis prefix of the monitored database's memory (zsmon.core.deployment)."""
    prefix = prefix_of(config)
    if prefix is None:
        _fail(f"cannot tell whose memory to use: database {describe(config.database)} does not answer (or set "
              "`deployment`, ZSMON_DEPLOYMENT, to the deployment's name)")
    return prefix


def _lifecycle(registry: Registry) -> Lifecycle:
    config = registry.config
    client = make_redis(config.redis)
    reason = ping(client)
    if reason:
        _fail(f"acknowledgements live in Redis: {reason}")
    return Lifecycle(client, _deployment_prefix(config), config.checks.track_limit)


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


@cli.group(cls=_AckGroup)
def ack() -> None:
    """Acknowledge known violations so they stop paging (they stay visible everywhere).

    \b
      zsmon ack CHECKER INVARIANT ENTITY_ID... --reason TEXT [--expires 3d]
      zsmon ack CHECKER INVARIANT --all-current --reason TEXT [--expires 3d]
      zsmon ack list
      zsmon ack revoke ID

    An acknowledged violation pages again when its difference grows beyond what was
    acknowledged, when the acknowledgement expires or is revoked, or when it resolves and
    comes back. --all-current covers the entities violating now, never future ones.
    """


@ack.command("create", hidden=True)
@click.argument("checker")
@click.argument("invariant")
@click.argument("entities", nargs=-1)
@click.option("--all-current", is_flag=True, help="Every entity violating the invariant now.")
@click.option("--reason", required=True, help="Why it is known (a ticket, a plan); shown beside the violation.")
@click.option("--expires", metavar="DURATION", help="e.g. 12h, 3d, 1w (default: until revoked).")
@click.option("--author", default=None, help="Who acknowledges (default: your login name).")
@config_option
@click.pass_context
def ack_create(ctx: click.Context, checker: str, invariant: str, entities: tuple[str, ...], all_current: bool,
               reason: str, expires: str | None, author: str | None) -> None:
    """Acknowledge current violations of one invariant."""
    registry = _registry(ctx)
    try:
        validate_target({n: [i.id for i in b.invariants] for n, b in registry.checkers.items()}, checker, invariant)
        if bool(entities) == all_current:
            raise LifecycleError("name the entities to acknowledge or give --all-current (not both)")
        if not reason.strip():
            raise LifecycleError("--reason must say why (a ticket, a plan)")
        expires_in = parse_duration(expires) if expires else None
        done = _lifecycle(registry).acknowledge(checker, invariant, None if all_current else list(entities),
                                                reason.strip(), author or getpass.getuser(), expires_in)
    except LifecycleError as exc:
        _fail(str(exc))
    n = len(done.entities)
    click.echo(f"acknowledged {n} violation{'s' if n != 1 else ''} of {checker}/{invariant} as {done.id} "
               f"(expires: {_when(done.expires_at)}): they stop paging; a new violation still pages")


@ack.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@config_option
@click.pass_context
def ack_list(ctx: click.Context, fmt: str) -> None:
    """Every acknowledgement in force."""
    acks = _lifecycle(_registry(ctx)).acks()
    if fmt == "json":
        click.echo(json.dumps({"acks": [a.to_dict() for a in acks]}, indent=2))
        return
    if not acks:
        click.echo("no acknowledgement in force")
        return
    click.echo(f"{'ID':<8}  {'CHECKER/INVARIANT':<40}  {'ENTITIES':>8}  {'AUTHOR':<12}  {'EXPIRES':<20}  REASON")
    for a in acks:
        click.echo(f"{a.id:<8}  {a.checker + '/' + a.invariant:<40}  {len(a.entities):>8}  {a.author:<12}  "
                   f"{_when(a.expires_at):<20}  {a.reason}")


@ack.command("revoke")
@click.argument("ack_id", metavar="ID")
@click.option("--author", default=None, help="Who revokes (default: your login name).")
@config_option
@click.pass_context
def ack_revoke(ctx: click.Context, ack_id: str, author: str | None) -> None:
    """Revoke an acknowledgement: its violations page again."""
    try:
        done = _lifecycle(_registry(ctx)).revoke(ack_id, author or getpass.getuser())
    except LifecycleError as exc:
        _fail(str(exc))
    click.echo(f"revoked {done.id} ({done.checker}/{done.invariant}, {len(done.entities)} entities): they page again")


@cli.group("config")
def config_group() -> None:
    """Validate the configuration or print its reference."""


@config_group.command("check")
@config_option
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the config file and environment; print nothing but errors (exit 2) or 'ok'."""
    config = _registry(ctx).config
    click.echo(f"ok: {config.source or 'no file (defaults and environment)'}")


@config_group.command("reference")
def config_reference() -> None:
    """Print docs/configuration.md: every key, its type, default, env var and meaning."""
    # The defaults only: the reference documents the built-in checkers, whatever this machine's config says.
    click.echo(reference(build_registry(Config())), nl=False)


@cli.command()
def version() -> None:
    """Print zsmon's version."""
    click.echo(f"zsmon {zsmon.__version__}")


def main() -> None:
    try:
        cli(obj={})
    except ConfigError as exc:  # anything that slipped past a command's own handling
        _fail(str(exc))


if __name__ == "__main__":
    main()
