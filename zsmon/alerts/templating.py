"""Jinja2 for files that contain Prometheus and Grafana templates.

Prometheus annotations (``{{ $labels.checker }}``) and Grafana legends
(``{{status}}``) use ``{{ }}`` themselves, so our templates use other
delimiters and leave those untouched: ``<< value >>``, ``<% for ... %>``,
``<# comment #>``. Undefined names are errors (``StrictUndefined``).

Templates render YAML that is parsed back and dumped again: the output is
always well-formed, canonical and diffable, whatever the template's whitespace.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import yaml

from zsmon.alerts.model import duration, percent, promql_string


def environment(*template_dirs: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in template_dirs]),
        undefined=jinja2.StrictUndefined,
        variable_start_string="<<", variable_end_string=">>",
        block_start_string="<%", block_end_string="%>",
        comment_start_string="<#", comment_end_string="#>",
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        autoescape=False,
    )
    # ``q``: a YAML-safe (JSON) quoted scalar; ``pq``: a PromQL string literal; ``dur``: seconds -> 1m30s.
    env.filters["q"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["pq"] = promql_string
    env.filters["dur"] = duration
    env.filters["pct"] = percent
    return env


def render_yaml(env: jinja2.Environment, name: str, context: dict[str, Any]) -> Any:
    """Render template ``name`` and parse the YAML it produced (errors name the template and line)."""
    text = env.get_template(name).render(**context)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        lines = text.splitlines()
        shown = lines[mark.line] if mark and mark.line < len(lines) else ""
        raise ValueError(f"template {name} rendered invalid YAML at{where}: {exc}: {shown!r}") from None


class _Dumper(yaml.SafeDumper):
    """Literal blocks for multi-line strings; never wraps long PromQL lines."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:  # lists indented under keys
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any, header: str = "") -> str:
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000,
                     allow_unicode=True)
    return (header + body) if header else body


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
