"""The CLI's lines under engine nats (nexus/cli/natsviews.py)."""

from __future__ import annotations

from nexus.cli import natsviews

ENGINE = {
    "stream": "NEXUS",
    "reachable": True,
    "cluster": "nexus",
    "leader": "n1",
    "replicas": [
        {"name": "n0", "current": True, "offline": False, "lag": 0},
        {"name": "n2", "current": False, "offline": True, "lag": 12},
    ],
    "messages": 20,
    "bytes": 2048,
    "first_seq": 1,
    "last_seq": 20,
}


def test_engine_line_names_leader_followers_behind_and_offline():
    assert natsviews.engine_line(ENGINE) == (
        "engine nats: stream NEXUS leader=n1 followers: n0, n2 (behind 12) OFFLINE; "
        "20 events, 2048 bytes, seq 1..20, cluster nexus"
    )
    single = ENGINE | {"replicas": [], "cluster": None, "leader": "nats"}
    assert natsviews.engine_line(single) == "engine nats: stream NEXUS leader=nats; 20 events, 2048 bytes, seq 1..20"
    assert natsviews.engine_line(ENGINE | {"leader": None}).startswith("engine nats: stream NEXUS leader=NONE")
    gone = {"stream": "NEXUS", "reachable": False, "error": "TimeoutError"}
    assert natsviews.engine_line(gone) == "engine nats: stream NEXUS: cluster unreachable (TimeoutError)"


def test_journal_info_lists_each_partition(capsys):
    status = {
        "engine": ENGINE,
        "groups": {"g": {"lag": 3, "partition_lag": [0, 3], "owners": ["m-1", None], "dead_letters": 1}},
    }
    assert natsviews.journal_info(status, as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  group g: lag=3 dead_letters=1",
        "    partition 0: lag=0 owner=m-1",
        "    partition 1: lag=3 owner=-",
    ]


def test_status_lines(capsys):
    natsviews.print_status(
        {
            "router": {"accepted": 5, "rejected": 2, "rejected_by_reason": {"contract": 2}, "duplicates": 1},
            "engine": ENGINE,
        }
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ingest: accepted=5 rejected=2 (contract=2) duplicates=1"
    assert out[1].startswith("engine nats: stream NEXUS leader=n1")
