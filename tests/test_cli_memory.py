"""zsmon checkers reset-memory: forgets a checker's Redis memory, all of it or named keys, of one deployment."""
import subprocess
import sys

import redis


def _run(tmp_path, prefix, *args, deployment="staging"):
    f = tmp_path / "c.yml"
    f.write_text(f"deployment: {deployment}\nredis:\n  key_prefix: '{prefix}'\n")
    return subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(f), "checkers", "reset-memory", *args],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_reset_named_key_then_all_of_one_deployment(tmp_path, redis_prefix):
    r = redis.Redis(decode_responses=True)
    mine, other = f"{redis_prefix}staging:", f"{redis_prefix}production:"
    r.set(f"{mine}reputation:drift_baseline", "x")
    r.set(f"{mine}reputation:last_scores", "y")
    r.set(f"{mine}payments:watermark", "z")
    r.set(f"{other}reputation:last_scores", "w")
    proc = _run(tmp_path, redis_prefix, "reputation", "drift_baseline")
    assert proc.returncode == 0 and "deleted 1 key of checker reputation" in proc.stdout
    assert not r.exists(f"{mine}reputation:drift_baseline") and r.exists(f"{mine}reputation:last_scores")
    assert _run(tmp_path, redis_prefix, "reputation").returncode == 0
    assert not r.exists(f"{mine}reputation:last_scores")
    assert r.exists(f"{mine}payments:watermark")  # other checkers keep their memory
    assert r.exists(f"{other}reputation:last_scores")  # and so does another deployment on the same Redis


def test_unknown_checker_is_one_line_exit_2(tmp_path, redis_prefix):
    proc = _run(tmp_path, redis_prefix, "nosuch")
    assert proc.returncode == 2 and "unknown checker 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_database_nor_a_deployment_name_it_says_whose_memory_is_unknown(tmp_path, redis_prefix):
    f = tmp_path / "c.yml"
    f.write_text(f"redis:\n  key_prefix: '{redis_prefix}'\ndatabase:\n  port: 1\n  connect_timeout_seconds: 1\n")
    proc = subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(f), "checkers", "reset-memory",
                           "reputation"], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "cannot tell whose memory" in proc.stderr and "ZSMON_DEPLOYMENT" in proc.stderr
    assert "Traceback" not in proc.stderr
