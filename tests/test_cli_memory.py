"""zsmon checkers reset-memory: forgets a checker's Redis memory, all of it or named keys."""
import subprocess
import sys

import redis


def _run(tmp_path, prefix, *args):
    f = tmp_path / "c.yml"
    f.write_text(f"redis:\n  key_prefix: '{prefix}'\n")
    return subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(f), "checkers", "reset-memory", *args],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_reset_named_key_then_all(tmp_path, redis_prefix):
    r = redis.Redis(decode_responses=True)
    r.set(f"{redis_prefix}reputation:drift_baseline", "x")
    r.set(f"{redis_prefix}reputation:last_scores", "y")
    r.set(f"{redis_prefix}payments:watermark", "z")
    proc = _run(tmp_path, redis_prefix, "reputation", "drift_baseline")
    assert proc.returncode == 0 and "deleted 1 key of checker reputation" in proc.stdout
    assert not r.exists(f"{redis_prefix}reputation:drift_baseline") and r.exists(f"{redis_prefix}reputation:last_scores")
    assert _run(tmp_path, redis_prefix, "reputation").returncode == 0
    assert not r.exists(f"{redis_prefix}reputation:last_scores")
    assert r.exists(f"{redis_prefix}payments:watermark")  # other checkers keep their memory


def test_unknown_checker_is_one_line_exit_2(tmp_path, redis_prefix):
    proc = _run(tmp_path, redis_prefix, "nosuch")
    assert proc.returncode == 2 and "unknown checker 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
