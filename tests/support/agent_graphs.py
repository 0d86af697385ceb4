"""LangGraph graphs and a handler for the agent sink's system tests (tests/system/test_agent_sink.py);
imported by spawned members (tests/support is on PYTHONPATH)."""

from __future__ import annotations

import json
import os
from typing import TypedDict

import msgspec
from langgraph.graph import START, StateGraph


class State(TypedDict, total=False):
    id: str
    done: bool


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def failing(calls: str):
    """Every run records the event id in `calls`, then its node raises: retried, then dead-lettered."""

    def explode(state: State) -> State:
        _append(calls, state["id"])
        raise RuntimeError(f"node exploded on {state['id']}")

    g = StateGraph(State)
    g.add_node("explode", explode)
    g.add_edge(START, "explode")
    return g.compile()


def needs_service(calls: str, up: str):
    """Raises ConnectionRefusedError (a dependency error) until the file `up` exists; then
    records the event id in `calls`."""

    def call_service(state: State) -> State:
        if not os.path.exists(up):
            raise ConnectionRefusedError("the model endpoint is down")
        _append(calls, state["id"])
        return {"done": True}

    g = StateGraph(State)
    g.add_node("call_service", call_service)
    g.add_edge(START, "call_service")
    return g  # not compiled: the sink compiles a StateGraph


def record_payload(event, ctx) -> None:
    """Handler: one JSON line per event (id, type, key, correlation id, payload) in options.out."""
    line = {
        "id": event.id,
        "type": event.type,
        "key": event.key,
        "correlation_id": event.correlation_id,
        "payload": msgspec.to_builtins(event.payload),
    }
    _append(ctx.options["out"], json.dumps(line))
