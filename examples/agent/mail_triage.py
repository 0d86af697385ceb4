"""An example LangGraph graph for the agent sink (workers/agent.py): triage of a mail event.

No model and no network: plain Python nodes decide "notify" or "ignore", so it runs
anywhere. A real agent puts a model call in `classify` (and raises what its client raises
when the model endpoint is down: list it in the sink's `dependency_errors`).

    START -> classify -> notify -> END      (urgent words in the subject, or a VIP sender)
                      -> ignore -> END      (everything else)

`notify` appends one JSON line per mail to `notify_log` (when set): the stand-in for
a desktop notification. The final state is {subject, sender, decision, reason}; the
sink sends the fields its `output` names on as a follow-up event.
"""

from __future__ import annotations

import json
import os
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

URGENT = ("urgent", "asap", "outage", "down", "overdue", "action required")


class Triage(TypedDict, total=False):
    subject: str
    sender: str
    decision: str  # "notify" | "ignore"
    reason: str


def build_graph(notify_log: str = "", vips: list[str] | None = None):
    """The compiled graph; `notify_log` and `vips` come from the sink's `graph_options`."""
    vip_senders = [v.lower() for v in (vips or [])]

    def classify(state: Triage) -> Triage:
        subject, sender = state.get("subject", "").lower(), state.get("sender", "").lower()
        word = next((w for w in URGENT if w in subject), None)
        if word:
            return {"decision": "notify", "reason": f"subject says {word!r}"}
        vip = next((v for v in vip_senders if v and v in sender), None)
        if vip:
            return {"decision": "notify", "reason": f"sender is a VIP ({vip})"}
        return {"decision": "ignore", "reason": "nothing urgent"}

    def notify(state: Triage) -> Triage:
        if notify_log:
            line = json.dumps({k: state.get(k, "") for k in ("subject", "sender", "reason")}) + "\n"
            fd = os.open(notify_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())  # one write: lines of concurrent runs never mix
            finally:
                os.close(fd)
        return {}

    def ignore(state: Triage) -> Triage:
        return {}

    graph = StateGraph(Triage)
    graph.add_node("classify", classify)
    graph.add_node("notify", notify)
    graph.add_node("ignore", ignore)
    graph.add_edge(START, "classify")
    graph.add_conditional_edges("classify", lambda s: s["decision"], {"notify": "notify", "ignore": "ignore"})
    graph.add_edge("notify", END)
    graph.add_edge("ignore", END)
    return graph.compile()


graph = build_graph()  # the same graph without a log: `graph: mail_triage:graph` names it directly
