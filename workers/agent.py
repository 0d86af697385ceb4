"""Agent sink: feeds each event into a LangGraph graph (`pip install 'nexus-pipeline[agent]'`).

Config::

    workers:
      triage:
        handler: workers.agent:Agent
        subscribe: ["email.received"]
        retry: {attempts: 3, backoff: [1s, 5s]}       # the group's: as for every sink
        breaker: {failures: 5, window: 60s, reset: 30s}
        options:
          graph: mail_triage:build_graph   # module:attr, a compiled graph, a StateGraph, or a
          graph_options: {notify_log: ./notified.log}  # function returning one (called once with these)
          input:                           # the graph's input: state key -> a template (a string) ...
            subject: "{payload.subject}"
            sender: "{payload.from}"
            to: {path: payload.to}         # ... or {path: P}: the value itself (a list, a dict, a number)
          thread_id: "{event.key}"         # configurable.thread_id, for a graph with a checkpointer
          recursion_limit: 25
          output:                          # send the graph's final state on as a follow-up event
            type: mail.triaged
            fields: [decision, reason]     # which state keys (default: all of them)
          dependency_errors: [ConnectionError, TimeoutError, httpx.ConnectError]

Without `input` the graph gets the payload's fields as its input. Templates and paths are
those of the other sinks (workers/mapping.py): roots `payload` and `event`.

Failures: whatever a node raises fails the call; the group's `retry` runs the graph again
and the last failure goes to the dead-letter store. An exception of a class listed in
`dependency_errors` (what a model or tool endpoint that is down raises) becomes a
`DependencyError`, which feeds the group's circuit breaker instead: events wait in the
journal, none is dead-lettered because the endpoint is down. `nexus.PermanentError` from a
node, a graph that hits its recursion limit, and a result that cannot be sent on are dead-
lettered at once (running it again would do the same). Delivery is at least once: a graph
with side effects can see an event twice (`ctx.redelivered` is in the run's metadata,
`config["metadata"]["nexus_redelivered"]`, with the event id).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import re
from typing import Annotated, Any

import msgspec

from nexus.common.modules import import_user_module
from nexus.errors import ConfigError, DependencyError, PermanentError
from nexus.protocol.events import Event
from workers.mapping import Template, event_data, load_options, value_at

GRAPH_RE = re.compile(r"[\w.]+:[\w.]+")
INSTALL_HINT = "pip install 'nexus-pipeline[agent]'"


class FromPath(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An input value taken as it is from the event: `{path: payload.to}`."""

    path: Annotated[str, msgspec.Meta(min_length=1)]


class OutputOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Annotated[str, msgspec.Meta(min_length=1)]  # the follow-up's event type
    fields: list[str] = []  # state keys to send (default: every key of the final state)
    key: str = "{event.key}"  # template of the follow-up's key ("" renders as no key)
    priority: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5


class AgentOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    graph: str
    graph_options: dict[str, Any] | None = None
    input: dict[str, str | FromPath] = {}
    thread_id: str = ""
    recursion_limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 25
    output: OutputOptions | None = None
    dependency_errors: list[str] = msgspec.field(default_factory=lambda: ["ConnectionError", "TimeoutError"])


class AgentUnavailable(DependencyError):
    """What the graph talks to is down (a `dependency_errors` class): the breaker counts it."""


class AgentRejected(PermanentError):
    """Running the graph again cannot help (recursion limit, a result that cannot be sent)."""


def load_graph(spec: str, graph_options: dict[str, Any] | None) -> Any:
    """The runnable graph `spec` names: a compiled graph (has `ainvoke`), a StateGraph
    (compiled here), or a function that returns either (called with `graph_options`)."""
    module_name, _, attr = spec.partition(":")
    obj: Any = import_user_module(module_name, f"agent options.graph {spec}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"agent options.graph {spec}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    built = False
    if not hasattr(obj, "ainvoke") and not hasattr(obj, "compile") and callable(obj):
        try:
            obj = obj(**(graph_options or {}))
        except Exception as exc:  # noqa: BLE001 - user code: one line
            raise ConfigError(
                f"agent options.graph {spec}: building the graph failed: {type(exc).__name__}: {exc}"
            ) from None
        built = True
    if graph_options is not None and not built:
        raise ConfigError(f"agent options.graph_options: {spec} is a graph, not a function that builds one")
    if not hasattr(obj, "ainvoke") and hasattr(obj, "compile"):
        obj = obj.compile()  # a StateGraph
    if not hasattr(obj, "ainvoke"):
        raise ConfigError(
            f"agent options.graph {spec}: not a LangGraph graph (a compiled graph, a StateGraph, "
            f"or a function returning one); got {type(obj).__name__}"
        )
    return obj


def load_exception(name: str) -> type[BaseException]:
    """'ConnectionError' (a builtin), 'httpx.ConnectError' or 'httpx:ConnectError'."""
    where = f"agent options.dependency_errors {name!r}"
    if ":" in name or "." in name:
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr, None)
        except Exception as exc:  # noqa: BLE001 - one line
            raise ConfigError(f"{where}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    else:
        found = getattr(builtins, name, None)
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ConfigError(f"{where}: not an exception class")
    return found


def _check_path(path: str, where: str) -> tuple[str, ...]:
    parts = tuple(path.split("."))
    if parts[0] not in ("payload", "event") or not all(parts):
        raise ConfigError(f"{where} {path!r}: a dotted path starting with payload or event (e.g. payload.to)")
    return parts


class Agent:
    """Handler class: one graph per member, `ainvoke` per event."""

    def __init__(self, options: dict):
        if not (options or {}).get("graph"):
            raise ConfigError("agent: options.graph is required (module:attr of a LangGraph graph or its builder)")
        if importlib.util.find_spec("langgraph") is None:
            raise ConfigError(f"agent sink: langgraph is not installed ({INSTALL_HINT})")
        self.options = opts = load_options(AgentOptions, options, "agent")
        if not GRAPH_RE.fullmatch(opts.graph):
            raise ConfigError(f"agent options.graph {opts.graph!r}: module:attr, e.g. mail_triage:build_graph")
        self._input: list[tuple[str, Template | tuple[str, ...]]] = [
            (
                key,
                _check_path(spec.path, f"agent options.input.{key}")
                if isinstance(spec, FromPath)
                else Template(spec, f"agent options.input.{key}"),
            )
            for key, spec in opts.input.items()
        ]
        self._thread = Template(opts.thread_id, "agent options.thread_id") if opts.thread_id else None
        self._key = Template(opts.output.key, "agent options.output.key") if opts.output else None
        self._dependency = tuple(load_exception(n) for n in opts.dependency_errors)
        from langgraph.errors import GraphRecursionError  # after the find_spec check

        self._permanent: tuple[type[BaseException], ...] = (GraphRecursionError,)
        self.graph = load_graph(opts.graph, opts.graph_options)

    def graph_input(self, event: Event) -> dict[str, Any]:
        data = event_data(event)
        if not self._input:
            payload = data["payload"]
            return dict(payload) if isinstance(payload, dict) else {"payload": payload}
        return {
            key: spec.render(data) if isinstance(spec, Template) else value_at(data, spec) for key, spec in self._input
        }

    async def handle(self, event: Event, ctx) -> None:
        data = event_data(event) if (self._thread or self._key) else {}
        config: dict[str, Any] = {
            "recursion_limit": self.options.recursion_limit,
            "run_name": f"nexus:{ctx.group}",
            "metadata": {
                "nexus_event_id": event.id,
                "nexus_type": event.type,
                "nexus_seq": ctx.seq,
                "nexus_attempt": ctx.attempt,
                "nexus_redelivered": ctx.redelivered,
            },
        }
        if self._thread is not None:
            config["configurable"] = {"thread_id": self._thread.render(data)}
        graph_input = self.graph_input(event)
        try:
            result = await self.graph.ainvoke(graph_input, config=config)
        except (DependencyError, PermanentError):
            raise  # the node said what it is
        except self._permanent as exc:
            raise AgentRejected(f"graph {self.options.graph}: {type(exc).__name__}: {exc}") from exc
        except self._dependency as exc:
            raise AgentUnavailable(f"graph {self.options.graph}: {type(exc).__name__}: {exc}") from exc
        ctx.log.debug("agent_graph_done", graph=self.options.graph)
        out = self.options.output
        if out is None or self._key is None:
            return
        payload = self._select(result, out.fields)
        key = self._key.render(data) or None
        ctx.emit(out.type, payload, key=key, priority=out.priority)

    def _select(self, result: Any, fields: list[str]) -> Any:
        state = result if isinstance(result, dict) else {"result": result}
        chosen = {f: state.get(f) for f in fields} if fields else dict(state)
        try:
            return msgspec.to_builtins(chosen)
        except (TypeError, ValueError) as exc:
            raise AgentRejected(
                f"graph {self.options.graph}: its result cannot be sent on as an event ({exc}); "
                "name the plain-data keys in options.output.fields"
            ) from None
