"""Configuration: env vars work with no file, override the file, and mistakes name file, line and key."""
import subprocess
import sys

import pytest

from zsmon.app import build_registry
from zsmon.core.config import ConfigError, load_config
from zsmon.core.db import conninfo


def test_platform_env_vars_work_without_a_file():
    cfg = load_config(None, env={"DB_HOST": "db.internal", "DB_PORT": "6432", "DB_USER": "mon", "DB_PASSWORD": "s3cr3t!",
                                 "DB_NAME": "zerostate", "DB_SSLMODE": "require", "DB_MAX_OPEN_CONNS": "7",
                                 "REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_PASSWORD": "rpw",
                                 "REDIS_TLS_ENABLED": "true", "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json",
                                 "ADMIN_TOKEN": "adm-Xq9-7e21f0b4c"})
    assert (cfg.database.host, cfg.database.port, cfg.database.user, cfg.database.name) == ("db.internal", 6432, "mon", "zerostate")
    assert cfg.database.sslmode == "require" and cfg.database.max_connections == 7
    assert (cfg.redis.host, cfg.redis.port, cfg.redis.tls) == ("cache", 6380, True)
    assert cfg.redis.password.get_secret_value() == "rpw"
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "json")
    assert cfg.http.admin_token.get_secret_value() == "adm-Xq9-7e21f0b4c"
    assert "s3cr3t!" not in repr(cfg) and "adm-Xq9-7e21f0b4c" not in repr(cfg)


def test_sessions_are_read_only_and_time_bounded():
    info = conninfo(load_config(None, env={"DB_PASSWORD": "pw"}).database)
    assert "default_transaction_read_only=on" in info
    assert "statement_timeout=30000" in info and "lock_timeout=" in info
    assert "application_name=zsmon" in info


def test_env_overrides_file(tmp_path):
    f = tmp_path / "z.yml"
    f.write_text("database:\n  host: from-file\n  port: 5433\nredis:\n  enabled: false\n")
    cfg = load_config(f, env={"DB_HOST": "from-env"})
    assert cfg.database.host == "from-env" and cfg.database.port == 5433 and not cfg.redis.enabled


def test_empty_redis_host_disables_redis():
    assert load_config(None, env={"REDIS_HOST": ""}).redis.enabled is False


@pytest.mark.parametrize("text, expected", [
    ("database:\n  host: x\n  prot: 5432\n", "line 3: database.prot: unknown key"),
    ("database:\n  port: abc\n", "line 2: database.port: Input should be a valid integer"),
    ("http:\n  api_listen: nowhere\n", "http.api_listen: Value error, expected HOST:PORT"),
    ("database: [1, 2\n", "invalid YAML"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_mistakes_name_file_line_and_key(tmp_path, text, expected):
    f = tmp_path / "bad.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert str(f) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("checkers:\n  nosuch:\n    enabled: true\n", "line 2: checkers.nosuch: unknown name"),
    ("checkers:\n  schema:\n    settings:\n      bogus: 1\n", "line 4: checkers.schema.settings.bogus: unknown key"),
])
def test_checker_mistakes_name_file_line_and_key_when_the_registry_is_built(tmp_path, text, expected):
    """Checker names and settings belong to the registry: load_config accepts the shape, build_registry refuses."""
    f = tmp_path / "bad.yml"
    f.write_text(text)
    config = load_config(f, env={})
    with pytest.raises(ConfigError) as err:
        build_registry(config)
    assert str(f) in str(err.value)
    assert expected in str(err.value)


def test_env_mistake_names_the_variable_and_never_echoes_a_secret():
    with pytest.raises(ConfigError, match="environment variable DB_PORT"):
        load_config(None, env={"DB_PORT": "not-a-port"})
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"ZSMON_DATABASE_URL": "postgresql://u:hunter2@h/db", "DB_PORT": "x"})
    assert "hunter2" not in str(err.value)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml", env={})


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    f = tmp_path / "bad.yml"
    f.write_text("database:\n  port: [oops]\n")
    proc = subprocess.run([sys.executable, "-m", "zsmon.cli", "--config", str(f), "check", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "bad.yml line 2: database.port" in proc.stderr and "Traceback" not in proc.stderr
