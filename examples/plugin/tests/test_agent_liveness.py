"""The plugin's own tests, with zsmon's fixtures: a consistent world, then one planted fault."""
import re
import time

import pytest
import redis
from pydantic import ValidationError

from zsmon.app import build_registry
from zsmon.core.config import Config
from zsmon.core.lifecycle import Lifecycle
from zsmon.core.service import build_runner
from zsmon.core.yamlfile import ConfigError
from zsmon.testing import REDIS_URL, bind_checker, deployment_prefix

from zsmon_example_plugin import AgentLivenessChecker
from zsmon_example_plugin.checker import AgentLivenessSettings



def _world(writer):
    writer.execute("""
        INSERT INTO agents (did, name, status, last_seen_at) VALUES
          ('did:agent:fresh',   'fresh',   'online',  now() - interval '10 seconds'),
          ('did:agent:quiet',   'quiet',   'busy',    now() - interval '4 minutes'),
          ('did:agent:retired', 'retired', 'offline', now() - interval '30 days'),
          ('did:agent:new',     'new',     'offline', NULL)
    """)


def test_registered_through_the_entry_point():
    assert build_registry(Config()).checker_classes["agent_liveness"] is AgentLivenessChecker
    assert AgentLivenessChecker.source == "plugin"


def test_clean_world_then_a_silent_agent(writer, run_check):
    _world(writer)
    clean = run_check("agent_liveness", redis=False)
    assert clean.status == "pass" and clean.violation_counts == {"silent_active_agent": 0}
    writer.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE did = 'did:agent:quiet'")
    writer.execute("INSERT INTO agents (did, name, status) VALUES ('did:agent:ghost', 'ghost', 'online')")
    found = run_check("agent_liveness", redis=False)
    assert found.status == "fail" and found.violation_counts == {"silent_active_agent": 2}
    by_id = {v.entity_id: v for v in found.violations}
    assert by_id["did:agent:ghost"].actual == "never" and "never sent a heartbeat" in by_id["did:agent:ghost"].detail
    quiet = by_id["did:agent:quiet"]
    assert quiet.expected == "a heartbeat within 300 s" and quiet.actual.endswith("Z")
    assert re.search(r"is busy but sent no heartbeat for 36\d\d s$", quiet.detail), quiet.detail


def test_threshold_is_a_setting(writer, run_check):
    _world(writer)
    result = run_check("agent_liveness", redis=False,
                       checkers={"agent_liveness": {"settings": {"max_silence_seconds": 60}}})
    assert [v.entity_id for v in result.violations] == ["did:agent:quiet"]


def test_the_registry_refuses_a_bad_setting_with_file_and_line(make_config):
    with pytest.raises(ConfigError) as bad:
        build_registry(make_config(redis=False, checkers={"agent_liveness": {"settings": {"max_silence_seconds": 0}}}))
    assert "line 4: checkers.agent_liveness.settings.max_silence_seconds: Input should be greater than 0" \
        in str(bad.value)
    with pytest.raises(ConfigError, match=r"line 4: checkers\.agent_liveness\.settings\.max_silence: unknown key"):
        build_registry(make_config(redis=False, checkers={"agent_liveness": {"settings": {"max_silence": 60}}}))


def test_an_instance_with_its_own_settings_runs_against_the_database(writer, make_config):
    """Without the registry: the class instantiated with settings, bound to a runner on the test database."""
    with pytest.raises(ValidationError):
        AgentLivenessSettings(max_silence_seconds=-1)
    _world(writer)
    config = make_config(redis=False)
    runner = build_runner(build_registry(config), only=["schema"])
    try:
        checker = AgentLivenessChecker(AgentLivenessSettings(max_silence_seconds=60, statuses=["busy", "offline"]))
        runner.checkers[checker.name] = bind_checker(checker, config)
        result = runner.run_check(checker.name)
        assert result.violation_counts == {"silent_active_agent": 3}
        assert {v.entity_id for v in result.violations} == {"did:agent:quiet", "did:agent:retired", "did:agent:new"}
    finally:
        runner.db.close()


def test_an_acknowledged_silent_agent_stays_acknowledged(writer, make_config, run_check):
    """The lifecycle comes for free; the silence (an age, declared difference_is_age) keeps growing, and
    an acknowledgement still holds."""
    _world(writer)
    writer.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE did = 'did:agent:quiet'")
    config = make_config()
    first = run_check("agent_liveness", config=config)
    (violation,) = first.violations
    assert violation.lifecycle["runs_seen"] == 1 and first.unacknowledged_counts == {"silent_active_agent": 1}
    Lifecycle(redis.Redis.from_url(REDIS_URL, decode_responses=True), deployment_prefix(config)).acknowledge(
        "agent_liveness", "silent_active_agent", ["did:agent:quiet"], "ZS-1: agent being decommissioned", "test")
    time.sleep(1.1)  # the silence grows between the runs
    second = run_check("agent_liveness", config=config)
    (violation,) = second.violations
    assert violation.lifecycle["runs_seen"] == 2 and violation.lifecycle["acknowledgement"] is not None
    assert second.unacknowledged_counts == {"silent_active_agent": 0}
