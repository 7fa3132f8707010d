"""The plugin's own tests, with zsmon's fixtures: a consistent world, then one planted fault."""
from zsmon.checkers.registry import checker_classes

from zsmon_example_plugin import AgentLivenessChecker


def _world(writer):
    writer.execute("""
        INSERT INTO agents (did, name, status, last_seen_at) VALUES
          ('did:agent:fresh',   'fresh',   'active',  now() - interval '10 seconds'),
          ('did:agent:quiet',   'quiet',   'active',  now() - interval '4 minutes'),
          ('did:agent:retired', 'retired', 'offline', now() - interval '30 days'),
          ('did:agent:new',     'new',     'offline', NULL)
    """)


def test_registered_through_the_entry_point():
    assert checker_classes()["agent_liveness"] is AgentLivenessChecker
    assert AgentLivenessChecker.source == "plugin"


def test_clean_world_then_a_silent_agent(writer, run_check):
    _world(writer)
    clean = run_check("agent_liveness", redis=False)
    assert clean.status == "pass" and clean.violation_counts == {"silent_active_agent": 0}
    writer.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE did = 'did:agent:quiet'")
    writer.execute("INSERT INTO agents (did, status) VALUES ('did:agent:ghost', 'active')")
    found = run_check("agent_liveness", redis=False)
    assert found.status == "fail" and found.violation_counts == {"silent_active_agent": 2}
    by_id = {v.entity_id: v for v in found.violations}
    assert by_id["did:agent:quiet"].difference > 3000 and by_id["did:agent:ghost"].actual == "never"
    assert "never sent a heartbeat" in by_id["did:agent:ghost"].detail


def test_threshold_is_a_setting(writer, run_check):
    _world(writer)
    result = run_check("agent_liveness", redis=False,
                       checkers={"agent_liveness": {"settings": {"max_silence_seconds": 60}}})
    assert [v.entity_id for v in result.violations] == ["did:agent:quiet"]
