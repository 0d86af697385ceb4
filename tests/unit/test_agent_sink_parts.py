"""workers/agent.py in process: options, graph loading, the event -> input mapping, the
classification of failures (with real LangGraph graphs and the real Context)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import structlog

from nexus import Context, DependencyError, Event, PermanentError, new_id
from nexus.errors import ConfigError

pytest.importorskip("langgraph", reason="the agent extra is not installed")
from workers.agent import Agent, AgentRejected, AgentUnavailable  # noqa: E402

EVENT_ID = new_id()
EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "agent")


@pytest.fixture(autouse=True)
def _example_on_path(monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path, EXAMPLE])


def _ctx(emitted: list) -> Context:
    def emit(type_, payload, key=None, priority=5, correlation_id=None):
        emitted.append((type_, payload, key, priority, correlation_id))
        return f"followup-{len(emitted)}"

    return Context("g", "g-0", 1, False, 7, 0, {}, structlog.get_logger(), emit, EVENT_ID, None)


def _mail(subject: str, sender: str = "a@example.com") -> Event:
    payload = {"account": "me", "mailbox": "INBOX", "uid": 1, "uidvalidity": 1, "from": sender, "subject": subject}
    return Event(type="email.received", source="mail", payload=payload, key="inbox", id=EVENT_ID, time=1.0)


def test_the_example_graph_with_input_mapping_and_output(tmp_path):
    log = tmp_path / "n.log"
    agent = Agent(
        {
            "graph": "mail_triage:build_graph",
            "graph_options": {"notify_log": str(log), "vips": ["boss@"]},
            "input": {"subject": "{payload.subject}", "sender": "{payload.from}", "raw": {"path": "payload.uid"}},
            "output": {"type": "mail.triaged", "fields": ["decision", "reason"]},
        }
    )
    assert agent.graph_input(_mail("hi")) == {"subject": "hi", "sender": "a@example.com", "raw": 1}
    emitted: list = []
    asyncio.run(agent.handle(_mail("Server DOWN"), _ctx(emitted)))
    asyncio.run(agent.handle(_mail("hello", "boss@example.com"), _ctx(emitted)))
    asyncio.run(agent.handle(_mail("digest"), _ctx(emitted)))
    assert [e[1]["decision"] for e in emitted] == ["notify", "notify", "ignore"]
    assert emitted[0][:4] == ("mail.triaged", {"decision": "notify", "reason": "subject says 'down'"}, "inbox", 5)
    assert emitted[0][4] == EVENT_ID  # the follow-up carries its cause's id as correlation id
    assert len(log.read_text().splitlines()) == 2


def test_defaults_the_payload_is_the_input_and_nothing_is_sent_on():
    agent = Agent({"graph": "mail_triage:graph"})  # a compiled graph, named directly
    assert agent.graph_input(_mail("x"))["subject"] == "x"
    emitted: list = []
    asyncio.run(agent.handle(_mail("URGENT"), _ctx(emitted)))
    assert emitted == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "options.graph is required"),
        ({"graph": "no_colon"}, "options.graph"),
        ({"graph": "no_such_module_xyz:g"}, "cannot import no_such_module_xyz"),
        ({"graph": "mail_triage:nope"}, "mail_triage has no nope"),
        ({"graph": "mail_triage:URGENT"}, "not a LangGraph graph"),
        ({"graph": "mail_triage:graph", "graph_options": {"a": 1}}, "is a graph, not a function"),
        ({"graph": "mail_triage:build_graph", "graph_options": {"bogus": 1}}, "building the graph failed"),
        ({"graph": "mail_triage:graph", "input": {"s": "{payload"}}, "agent options.input.s"),
        ({"graph": "mail_triage:graph", "input": {"s": {"path": "body.x"}}}, "starting with payload or event"),
        ({"graph": "mail_triage:graph", "dependency_errors": ["NoSuchError"]}, "not an exception class"),
        ({"graph": "mail_triage:graph", "dependency_errors": ["nosuchmod.E"]}, "cannot import nosuchmod"),
        ({"graph": "mail_triage:graph", "outptu": {}}, "outptu"),
        ({"graph": "mail_triage:graph", "recursion_limit": 0}, "recursion_limit"),
    ],
)
def test_bad_options_are_one_config_error_line(options, message):
    with pytest.raises(ConfigError) as err:
        Agent(options)
    assert message in str(err.value) and "\n" not in str(err.value)


def _graph_raising(exc: BaseException):
    from langgraph.graph import START, StateGraph

    def node(state: dict) -> dict:
        raise exc

    g = StateGraph(dict)
    g.add_node("n", node)
    g.add_edge(START, "n")
    return g.compile()


def _run(agent: Agent, exc: BaseException) -> BaseException:
    agent.graph = _graph_raising(exc)
    with pytest.raises(BaseException) as err:
        asyncio.run(agent.handle(_mail("x"), _ctx([])))
    return err.value


def test_failures_are_classified_for_retries_breaker_and_dead_letters():
    agent = Agent({"graph": "mail_triage:graph", "dependency_errors": ["ConnectionError", "json.JSONDecodeError"]})
    down = _run(agent, ConnectionRefusedError("refused"))
    assert isinstance(down, AgentUnavailable) and isinstance(down, DependencyError)  # the breaker
    assert "ConnectionRefusedError: refused" in str(down)
    assert isinstance(_run(agent, ValueError("bad")), ValueError)  # as raised: retried, then dead-lettered
    assert type(_run(agent, PermanentError("no"))) is PermanentError  # a node's own verdict stands
    assert type(_run(agent, DependencyError("x"))) is DependencyError


def test_a_recursion_limit_and_an_unsendable_result_are_permanent():
    from langgraph.graph import START, StateGraph

    loop = StateGraph(dict)
    loop.add_node("a", lambda s: {"n": 1})
    loop.add_edge(START, "a")
    loop.add_edge("a", "a")
    agent = Agent({"graph": "mail_triage:graph", "recursion_limit": 3})
    agent.graph = loop.compile()
    with pytest.raises(AgentRejected, match="GraphRecursionError"):
        asyncio.run(agent.handle(_mail("x"), _ctx([])))

    odd = StateGraph(dict)
    odd.add_node("a", lambda s: {"thing": object()})
    odd.add_edge(START, "a")
    agent = Agent({"graph": "mail_triage:graph", "output": {"type": "t.x"}})
    agent.graph = odd.compile()
    with pytest.raises(AgentRejected, match="output.fields"):
        asyncio.run(agent.handle(_mail("x"), _ctx([])))
