"""docs/invariants.md documents every invariant of every built-in checker, and the project never
points at files outside itself."""
import re
from pathlib import Path

import pytest

from zsmon.app import build_registry
from zsmon.core.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/invariants.md"

_HEADING = re.compile(r"^## .*\(checker `([a-z_]+)`\)\s*$", re.M)


def _builtin() -> dict[str, type]:
    return {name: cls for name, cls in build_registry(Config()).checker_classes.items()
            if cls.source == "builtin"}


def _sections() -> dict[str, str]:
    """Checker name -> the text from its `## ... (checker `name`)` heading to the next `## ` heading."""
    text = DOC.read_text()
    out = {}
    for m in _HEADING.finditer(text):
        nxt = re.search(r"^## ", text[m.end():], re.M)
        out[m.group(1)] = text[m.end():m.end() + nxt.start()] if nxt else text[m.end():]
    return out


_CASES = [(name, inv) for name, cls in sorted(_builtin().items()) for inv in cls.invariants]


def test_there_are_builtin_checkers():
    assert {"payments", "auctions", "reputation", "schema"} <= set(_builtin())


@pytest.mark.parametrize("checker,inv", _CASES, ids=[f"{c}.{i.id}" for c, i in _CASES])
def test_invariant_is_documented_in_its_section(checker, inv):
    sections = _sections()
    assert checker in sections, f"docs/invariants.md has no section `## ... (checker `{checker}`)`"
    rows = [line for line in sections[checker].splitlines()
            if line.startswith("|") and f"`{inv.id}`" in line]
    assert rows, f"`{inv.id}` ({checker}) is not in a table row of its section of docs/invariants.md"
    assert any(re.search(rf"\|\s*{re.escape(inv.severity)}\s*\|", row) for row in rows), \
        f"the row of `{inv.id}` ({checker}) in docs/invariants.md does not give its severity {inv.severity!r}"


_TEXT = {".md", ".py", ".sql", ".j2", ".yml"}


def test_no_reference_outside_the_project():
    files = [ROOT / "README.md", *(p for d in ("docs", "zsmon") for p in (ROOT / d).rglob("*")
                                   if p.is_file() and p.suffix in _TEXT)]
    bad = [f"{p.relative_to(ROOT)}: {needle}" for p in files for needle in ("shared/domain.md", "../shared")
           if needle in p.read_text(errors="replace")]
    assert not bad, f"files point outside the project: {bad}"
