"""MetaGPT's standard operating procedure as a graph, and the message pool the roles talk through.

Each role watches message types and publishes others (MetaGPT's `_watch` / `publish_message`). The SOP graph
has an edge u -> v for every type u publishes and v watches; the QaEngineer -> Engineer edge is the feedback
loop and carries its retry bound. Everything else must be acyclic, and that order decides who acts first when
several roles watch the same message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import networkx as nx

__all__ = ["Message", "MessagePool", "ROLES", "build_sop", "role_order", "run_sop", "SOPError"]

# role -> (message types it watches, message types it publishes)
ROLES: dict[str, tuple[set[str], set[str]]] = {
    "ProductManager": ({"requirement"}, {"prd"}),
    "Architect": ({"prd"}, {"design"}),
    "ProjectManager": ({"design"}, {"tasks"}),
    "Engineer": ({"tasks", "test_report"}, {"code"}),
    "QaEngineer": ({"code"}, {"test_report", "done"}),
}
FEEDBACK = {"test_report"}  # message types that flow backwards in the SOP


class SOPError(RuntimeError):
    pass


@dataclass(frozen=True)
class Message:
    type: str
    sender: str
    content: str
    data: Any = field(default=None, compare=False)


def build_sop(max_debug_rounds: int, roles: dict[str, tuple[set[str], set[str]]] = ROLES) -> nx.DiGraph:
    g = nx.DiGraph()
    for name, (watch, publishes) in roles.items():
        g.add_node(name, watch=frozenset(watch), publishes=frozenset(publishes))
    for u, (_, publishes) in roles.items():
        for v, (watch, _) in roles.items():
            for t in sorted(publishes & watch):
                fb = t in FEEDBACK
                g.add_edge(u, v, message=t, feedback=fb, **({"max_rounds": max_debug_rounds} if fb else {}))
    role_order(g)  # validates
    return g


def role_order(g: nx.DiGraph) -> list[str]:
    """Roles in SOP order: a topological sort of the graph without its feedback edges."""
    forward = g.edge_subgraph([(u, v) for u, v, fb in g.edges(data="feedback") if not fb]).copy()
    forward.add_nodes_from(g.nodes)
    try:
        return list(nx.lexicographical_topological_sort(forward, key=lambda n: list(g.nodes).index(n)))
    except nx.NetworkXUnfeasible as e:
        raise SOPError(f"the SOP has a cycle that is not a declared feedback edge: {nx.find_cycle(forward)}") from e


class MessagePool:
    """Shared memory of one episode: every message published, and a queue of those not yet handled."""

    def __init__(self, graph: nx.DiGraph):
        self.graph = graph
        self.order = role_order(graph)
        self.history: list[Message] = []
        self._queue: deque[Message] = deque()

    def publish(self, msg: Message) -> None:
        self.history.append(msg)
        self._queue.append(msg)

    def subscribers(self, msg_type: str) -> list[str]:
        return [r for r in self.order if msg_type in self.graph.nodes[r]["watch"]]

    def latest(self, msg_type: str) -> Message | None:
        return next((m for m in reversed(self.history) if m.type == msg_type), None)

    def count(self, msg_type: str) -> int:
        return sum(m.type == msg_type for m in self.history)

    def feedback_budget(self, sender: str, receiver: str) -> int:
        return int(self.graph.edges[sender, receiver].get("max_rounds", 0))

    def pop(self) -> Message | None:
        return self._queue.popleft() if self._queue else None


Act = Callable[[Message, MessagePool], Awaitable[list[Message]]]


async def run_sop(pool: MessagePool, roles: dict[str, Act], start: Message, max_steps: int = 64) -> list[str]:
    """Publish `start`, then hand each message to the roles watching it, in SOP order, until the queue is
    empty. Returns the roles in the order they acted."""
    missing = set(pool.order) - set(roles)
    if missing:
        raise SOPError(f"no behaviour for roles {sorted(missing)}")
    pool.publish(start)
    acted: list[str] = []
    while (msg := pool.pop()) is not None:
        for name in pool.subscribers(msg.type):
            if len(acted) >= max_steps:
                raise SOPError(f"SOP did not finish within {max_steps} role actions")
            acted.append(name)
            for out in await roles[name](msg, pool):
                if out.type not in pool.graph.nodes[name]["publishes"]:
                    raise SOPError(f"{name} published {out.type!r}, which the SOP does not declare for it")
                pool.publish(out)
    return acted
