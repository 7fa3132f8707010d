"""``GET /runbooks/<name>`` on the API listener: the runbooks, served by zsmon itself.

Every alert's ``runbook_url`` links here by default (``render.zsmon_url``), so a
runbook link works wherever zsmon runs, with no wiki or repository to reach.
The pages are Markdown (hand-written for the fixed alerts, generated from the
registry for each checker and invariant) handed in by the composition root;
here they become HTML with markdown-it in CommonMark mode with raw HTML turned
off (any markup in a page is shown as text, ``javascript:`` links are refused),
served under the status page's Content-Security-Policy. Public, like the
status page's counts: a runbook holds no secret and no violation detail.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markdown_it import MarkdownIt

# Another page of the same folder, as the repository's copies link them: "ApiDown.md", "payments.md#x".
_SIBLING = re.compile(r"^([A-Za-z0-9_-]+)\.md(#[A-Za-z0-9_-]*)?$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
INDEX = "README"


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default = md.renderer.rules.get("link_open")

    def link_open(tokens: Any, idx: int, options: Any, env: Any) -> str:
        href = tokens[idx].attrGet("href") or ""
        m = _SIBLING.match(href)
        if m:  # served pages have no .md suffix: /runbooks/ApiDown
            tokens[idx].attrSet("href", m.group(1) + (m.group(2) or ""))
        if default is not None:
            return default(tokens, idx, options, env)
        return md.renderer.renderToken(tokens, idx, options, env)

    md.renderer.rules["link_open"] = link_open
    return md


_MD = _markdown()


def render_runbook(markdown: str) -> str:
    """Safe HTML for one page: raw HTML in the Markdown is escaped, not interpreted."""
    return _MD.render(markdown)


def register_runbooks(app: FastAPI, runbook: Callable[[str], str | None],
                      page: Callable[..., HTMLResponse]) -> None:
    """Add ``GET /runbooks/`` (the index) and ``GET /runbooks/<name>`` (``<name>.md`` too) to the API app."""

    def show(name: str) -> Response:
        text = runbook(name) if _NAME.match(name) else None
        if text is None:
            return page("runbook.html.j2", status_code=404, title="No such runbook", body="", missing=name)
        m = re.search(r"^# (.+)$", text, re.MULTILINE)
        return page("runbook.html.j2", title=m.group(1).strip("` ") if m else name, body=render_runbook(text),
                    missing=None)

    @app.get("/runbooks", include_in_schema=False)
    def runbooks_root() -> Response:
        return RedirectResponse("/runbooks/", status_code=308)

    @app.get("/runbooks/", response_class=HTMLResponse, include_in_schema=False)
    def runbook_index() -> Response:
        return show(INDEX)

    @app.get("/runbooks/{name}", response_class=HTMLResponse, include_in_schema=False)
    def runbook_page(name: str) -> Response:
        return show(name.removesuffix(".md"))
