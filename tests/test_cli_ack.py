"""zsmon ack: acknowledge current violations from the command line, list and revoke; mistakes are one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zsmon.demo.simulator.payments import PaymentSimulator, inject_fault


@pytest.fixture
def cli(tmp_path, db_url, redis_prefix):
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(f"redis:\n  key_prefix: '{redis_prefix}'\n")
    env = {"PATH": "/usr/bin:/bin", "ZSMON_DATABASE_URL": db_url, "REDIS_HOST": "127.0.0.1", "USER": "oncall"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(cfg), *args], env=env,
                              capture_output=True, text=True, timeout=120)
    return run


def test_ack_list_revoke_and_every_mistake_is_one_line(cli, writer):
    PaymentSimulator(writer, seed=3).run(200)
    channel = inject_fault(writer, "escrowed_without_lock")
    first = cli("check", "--once", "--only", "payments", "--format", "json")
    assert first.returncode == 1, first.stderr
    (check,) = json.loads(first.stdout)["checks"]
    assert check["unacknowledged_counts"]["escrow_state"] == 1

    for args, message in [
        (("ack", "nosuch", "escrow_state", "--all-current", "--reason", "r"), "unknown checker 'nosuch'"),
        (("ack", "payments", "nosuch", "--all-current", "--reason", "r"), "checker payments has no invariant 'nosuch'"),
        (("ack", "payments", "escrow_state", "not-a-channel", "--reason", "r"), "not-a-channel does not violate it now"),
        (("ack", "payments", "escrow_state", "--all-current", "--reason", "r", "--expires", "soon"),
         "duration 'soon': expected a number and a unit"),
        (("ack", "payments", "escrow_state", "--reason", "r"), "name the entities to acknowledge or give --all-current"),
        (("ack", "revoke", "feedbeef"), "no acknowledgement 'feedbeef'"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)

    done = cli("ack", "payments", "escrow_state", channel, "--reason", "ZS-7 known", "--expires", "2d")
    assert done.returncode == 0, done.stderr
    assert "acknowledged 1 violation of payments/escrow_state" in done.stdout
    ack_id = done.stdout.split(" as ")[1].split()[0]
    listed = json.loads(cli("ack", "list", "--format", "json").stdout)["acks"]
    assert [(a["id"], a["author"], a["reason"], list(a["entities"])) for a in listed] == \
        [(ack_id, "oncall", "ZS-7 known", [channel])]

    second = json.loads(cli("check", "--once", "--only", "payments", "--format", "json").stdout)["checks"][0]
    assert second["violation_counts"]["escrow_state"] == 1 and second["unacknowledged_counts"]["escrow_state"] == 0
    (v,) = [v for v in second["violations"] if v["invariant"] == "escrow_state"]
    assert v["acknowledgement"]["reason"] == "ZS-7 known" and v["runs_seen"] == 2

    revoked = cli("ack", "revoke", ack_id)
    assert revoked.returncode == 0 and f"revoked {ack_id}" in revoked.stdout
    assert cli("ack", "list").stdout.strip() == "no acknowledgement in force"
