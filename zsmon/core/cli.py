"""The ``zsmon`` command.

Exit codes (shared/domain.md): ``check --once`` exits 1 when any violation was
found, otherwise 2 when a check could not run (or the input was bad), else 0.
A user mistake prints one line on stderr, never a traceback.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

import zsmon
from zsmon.core.config import Config, ConfigError, load_config
from zsmon.core.logging import configure_logging

EXIT_VIOLATIONS = 1
EXIT_ERROR = 2


def _fail(message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    click.echo(f"zsmon: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _load(ctx: click.Context) -> Config:
    try:
        config = load_config(ctx.obj.get("config_path"))
    except ConfigError as exc:
        _fail(str(exc))
    configure_logging(config.logging.level, config.logging.format, config.secrets())
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="ZSMON_CONFIG",
              help="YAML config file (default: $ZSMON_CONFIG; env vars such as DB_HOST override it).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """zsmon: invariant monitoring and metrics for the ZeroState platform."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the sidecar: scheduled checks and collections, /metrics and the API."""
    from zsmon.core.service import Service

    config = _load(ctx)
    try:
        Service(config).run_forever()
    except ConfigError as exc:
        _fail(str(exc))


def _text(result: dict[str, Any]) -> str:
    head = f"{result['checker']:<12} {result['status'].upper():<5} {result['mode']:<11} {result['duration_seconds']:.3f}s"
    lines = [head]
    if result["error"]:
        lines.append(f"  error: {result['error']}")
    for inv, count in result["violation_counts"].items():
        if count:
            lines.append(f"  {inv}: {count} violation{'s' if count != 1 else ''}")
            if inv in result.get("summaries", {}):
                lines.append(f"    {result['summaries'][inv]}")
            for v in (v for v in result["violations"] if v["invariant"] == inv):
                lines.append(f"    {v['entity_type']} {v['entity_id']}: expected {v['expected']}, actual "
                             f"{v['actual']}, difference {v['difference']} - {v['detail']}")
    for inv, reason in result["skipped"].items():
        lines.append(f"  skipped {inv}: {reason}")
    return "\n".join(lines)


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
@click.pass_context
def check(ctx: click.Context, once: bool, only: tuple[str, ...], fmt: str, mode: str, interval: float) -> None:
    """Run checkers now and print their results (exit 1: violations, 2: could not check, 0: clean)."""
    from zsmon.core.service import build_runner

    config = _load(ctx)
    try:
        runner = build_runner(config, only=only or None)
    except ConfigError as exc:
        _fail(str(exc))
    if not runner.checkers:
        _fail("no checker is enabled (see checkers.<name>.enabled in the config)")
    try:
        while True:
            results = [runner.run_check(n, mode=None if mode == "auto" else mode).to_dict() for n in runner.checkers]
            if fmt == "json":
                click.echo(json.dumps({"checks": results}, indent=2))
            else:
                click.echo("\n".join(_text(r) for r in results))
            if once:
                sys.exit(exit_code(results))
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        runner.db.close()


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Directory to write into.")
@click.pass_context
def render(ctx: click.Context, out: str) -> None:
    """Render Prometheus rules and config, Alertmanager config and Grafana dashboards."""
    config = _load(ctx)
    try:
        from zsmon.alerts.render import render_all
    except ImportError:
        _fail("rendering is not available in this build")
    try:
        written = render_all(config, Path(out))
    except ConfigError as exc:
        _fail(str(exc))
    click.echo(f"wrote {len(written)} files to {out}")


@cli.group()
def checkers() -> None:
    """Inspect the registry of checkers."""


@checkers.command("list")
@click.pass_context
def checkers_list(ctx: click.Context) -> None:
    """Every checker: name, source, interval, invariants."""
    from zsmon.core.service import build_checkers

    config = _load(ctx)
    try:
        found = build_checkers(config)
    except ConfigError as exc:
        _fail(str(exc))
    for name, c in found.items():
        every = config.checker(name).interval_seconds or c.default_interval_seconds
        click.echo(f"{name:<14} {c.source:<8} every {every:g}s  {', '.join(i.id for i in c.invariants)}")


@cli.group("config")
def config_group() -> None:
    """Validate the configuration or print its reference."""


@config_group.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the config file and environment; print nothing but errors (exit 2) or 'ok'."""
    config = _load(ctx)
    click.echo(f"ok: {config.source or 'no file (defaults and environment)'}")


@config_group.command("reference")
def config_reference() -> None:
    """Print docs/configuration.md: every key, its type, default, env var and meaning."""
    from zsmon.core.config_docs import reference

    click.echo(reference(), nl=False)


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
