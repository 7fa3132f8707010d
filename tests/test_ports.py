"""The listeners' ports: flags > environment > YAML, and a busy port named alone with what moves it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from zsmon.core.config import load_config
from zsmon.testing import LOCAL_HTTP, running_service, wait_for

ZSMON = str(Path(sys.executable).with_name("zsmon"))
# Nothing answers there: the listeners are judged before (and whatever) the database says.
UNREACHABLE = {"REDIS_HOST": "", "ZSMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x?connect_timeout=1"}


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZSMON_", "DB_", "REDIS_", "ADMIN_TOKEN"))}
    return {**base, **UNREACHABLE, **extra}


@pytest.fixture
def busy_port():
    """A port another process (here: a listening socket) holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zsmon: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("busy, free", [("metrics", "api"), ("api", "metrics")])
def test_a_busy_port_is_named_alone_with_the_flag_that_moves_it(busy_port, busy, free):
    t0 = time.monotonic()
    proc = subprocess.run([ZSMON, "run", f"--{busy}-listen", f"127.0.0.1:{busy_port}",
                           f"--{free}-listen", "127.0.0.1:0"], env=_env(), capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - t0
    line = _one_error_line(proc)
    assert f"port {busy_port} is already in use" in line, line
    assert f"--{busy}-listen HOST:PORT" in line and f"ZSMON_{busy.upper()}_LISTEN" in line, line
    assert f"http.{busy}_listen" in line and f"set by --{busy}-listen" in line, line
    # The other listener is not named: it was free.
    assert f"--{free}-listen" not in line and f"{free}_listen" not in line and f"ZSMON_{free.upper()}" not in line, line
    assert elapsed < 10, f"{elapsed:.1f}s: the busy port is reported before the database is waited for"


def test_the_message_says_which_setting_chose_the_busy_port(busy_port, tmp_path):
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(f"http:\n  metrics_listen: 127.0.0.1:{busy_port}\n  api_listen: 127.0.0.1:0\n")
    from_file = _one_error_line(subprocess.run([ZSMON, "run", "--config", str(cfg)], env=_env(),
                                               capture_output=True, text=True, timeout=60))
    assert f"set by http.metrics_listen in config file {cfg} line 2" in from_file, from_file
    from_env = _one_error_line(subprocess.run(
        [ZSMON, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
        env=_env(ZSMON_METRICS_LISTEN="127.0.0.1:0", ZSMON_API_LISTEN=f"127.0.0.1:{busy_port}")))
    assert "the API listener" in from_env and "set by ZSMON_API_LISTEN" in from_env, from_env
    assert "metrics" not in from_env, from_env


def test_both_busy_names_both(busy_port):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        second = other.getsockname()[1]
        line = _one_error_line(subprocess.run(
            [ZSMON, "run", "--metrics-listen", f"127.0.0.1:{busy_port}", "--api-listen", f"127.0.0.1:{second}"],
            env=_env(), capture_output=True, text=True, timeout=60))
    assert f"port {busy_port} is already in use" in line and f"port {second} is already in use" in line, line


def test_a_malformed_flag_is_one_line_naming_the_flag():
    line = _one_error_line(subprocess.run([ZSMON, "run", "--api-listen", "localhost"], env=_env(),
                                          capture_output=True, text=True, timeout=60))
    assert "--api-listen (http.api_listen)" in line and "expected HOST:PORT" in line, line


def test_precedence_flag_over_environment_over_yaml(tmp_path):
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({"http": {"metrics_listen": "127.0.0.1:1001", "api_listen": "127.0.0.1:1002"}}))
    plain = load_config(cfg, env={})
    assert (plain.http.metrics_listen, plain.http.api_listen) == ("127.0.0.1:1001", "127.0.0.1:1002")
    assert plain.origin("http", "api_listen") == f"http.api_listen in config file {cfg} line 2"  # keys sorted
    env = {"ZSMON_METRICS_LISTEN": "127.0.0.1:2001", "ZSMON_API_LISTEN": "127.0.0.1:2002"}
    by_env = load_config(cfg, env=env)
    assert (by_env.http.metrics_listen, by_env.http.api_listen) == ("127.0.0.1:2001", "127.0.0.1:2002")
    assert by_env.origin("http", "metrics_listen") == "ZSMON_METRICS_LISTEN"
    by_flag = load_config(cfg, env=env, overrides={"--metrics-listen": "127.0.0.1:3001", "--api-listen": None})
    assert (by_flag.http.metrics_listen, by_flag.http.api_listen) == ("127.0.0.1:3001", "127.0.0.1:2002")
    assert by_flag.origin("http", "metrics_listen") == "--metrics-listen"
    assert load_config(None, env={}).origin("http", "api_listen") == "the default of http.api_listen"


def test_zsmon_run_serves_where_the_flag_and_the_environment_say(busy_port, tmp_path):
    """The YAML names a busy port for both listeners; the environment moves one, a flag the other: it serves."""
    cfg = tmp_path / "zsmon.yml"
    cfg.write_text(yaml.safe_dump({"http": {"metrics_listen": f"127.0.0.1:{busy_port}",
                                            "api_listen": f"127.0.0.1:{busy_port}"}}))
    metrics, api = _free_port(), _free_port()
    proc = subprocess.Popen([ZSMON, "run", "--config", str(cfg), "--api-listen", f"127.0.0.1:{api}"],
                            env=_env(ZSMON_METRICS_LISTEN=f"127.0.0.1:{metrics}", ZSMON_API_LISTEN="127.0.0.1:1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def up(port: int) -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                return False

        wait_for(lambda: up(metrics), timeout=30)
        assert "zsmon_build_info" in requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        assert up(api)
        assert requests.get(f"http://127.0.0.1:{api}/", timeout=5).status_code == 200  # the status page
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ---- zsmon demo ------------------------------------------------------------------------------
def _demo(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([ZSMON, "demo", "--duration", "1", *args], env=_env(), capture_output=True, text=True,
                          timeout=60)
    return proc, time.monotonic() - t0


def test_demo_twice_says_another_zsmon_holds_the_ports_before_starting_anything(make_config):
    with running_service(make_config(redis=False, http=LOCAL_HTTP)) as other:
        ports = other.service.ports
        proc, elapsed = _demo("--metrics-port", str(ports["metrics"]), "--api-port", str(ports["api"]))
        only_metrics, _ = _demo("--metrics-port", str(ports["metrics"]), "--api-port", "0")
    line = _one_error_line(proc)
    assert "another zsmon demo (or zsmon run) already listens on" in line, line
    assert f":{ports['metrics']} (metrics)" in line and f":{ports['api']} (api)" in line, line
    assert "zsmon demo --metrics-port 0 --api-port 0" in line, line
    # Nothing was started: no database, no Redis, no temporary folder to clean up.
    assert proc.stdout == "", proc.stdout
    assert elapsed < 8, f"{elapsed:.1f}s"
    line = _one_error_line(only_metrics)
    assert f":{ports['metrics']} (metrics)" in line and "--api-port" not in line and "(api)" not in line, line
    assert only_metrics.stdout == ""


def test_demo_on_a_port_another_program_holds(busy_port):
    proc, _ = _demo("--metrics-port", "0", "--api-port", str(busy_port))
    line = _one_error_line(proc)
    assert f"port {busy_port} is already in use by another process (api, 127.0.0.1:{busy_port})" in line, line
    assert "another zsmon" not in line and "zsmon demo --api-port 0" in line and "--metrics-port" not in line, line
    assert proc.stdout == ""
