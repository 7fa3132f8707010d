"""The layering of zsmon's packages (pyproject.toml ``[tool.importlinter]``), enforced by import-linter.

Each layer imports only the layers below it: ``zsmon.core`` is the framework and knows
no checker, exporter or renderer; ``zsmon.app`` is the one composition root; the CLI sits on top.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    proc = lint_imports()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Contracts: 1 kept, 0 broken" in out, out


def test_a_broken_contract_fails(tmp_path):
    """The check can fail: the CLI really imports zsmon.core, so forbidding that breaks the contract."""
    contract = tmp_path / "contract.ini"
    contract.write_text(
        "[importlinter]\n"
        "root_package = zsmon\n"
        "\n"
        "[importlinter:contract:cli-without-core]\n"
        "name = the CLI never imports the framework (false: a probe)\n"
        "type = forbidden\n"
        "source_modules =\n"
        "    zsmon.cli\n"
        "forbidden_modules =\n"
        "    zsmon.core\n",
        encoding="utf-8")
    proc = lint_imports(str(contract))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Contracts: 0 kept, 1 broken" in out, out
    assert "zsmon.cli -> zsmon.core" in out, out
