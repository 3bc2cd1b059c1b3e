"""A workload-file teacher: an LLM tier deployable from YAML (`backend: workload`, `source: <workload file>`) that
answers a tool-using agent's calls from a file of sessions (platform/workload.py), so the gateway's flywheel can run
on real agent traffic with a named teacher and no hosted model.

Given the conversation so far, the teacher finds the session by the agent's question (its first user message that is
not a tool result), then walks the file's steps: a step is done when the conversation holds a call to its tool with
its arguments (filled from the results of the steps before it, compared as values) and that call's result. It emits
the first step not done, or the final answer once every step is. So each call after the first depends on what the
client's tools returned: a teacher that never saw those results could not produce it.

Off the file: when another model answered a turn (a policy routed it to the SLM) with a wrong call, an extra call or
a call in a different order, the teacher ignores that call's result and makes the right call, as a strong model
recovers from a bad step; it never quotes a result of a call the file did not ask for. It fails (a recorded error,
never an invented answer) only when a result of the file's own call cannot be read as the file says.

Reports label it: backend `workload` in every S1 record and the run's tables, "workload-file teacher" beside every
figure it shapes. It is not a model: its answers are right by construction, as far as the file is.
"""

from __future__ import annotations

import json
import re

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.constraint import tool_call_text
from slmshift.platform.types import LMRequest, LMResponse, ModelSpec
from slmshift.platform.workload import WorkloadSession, norm_question, read_workload, resolve
from slmshift.serve.engines.base import Engine

__all__ = ["WorkloadEngine", "TOOL_RESULT", "LABEL"]

LABEL = "workload-file teacher"
# How a tool result reads in the platform's plain chat messages (gateway/common.to_messages writes it; a test pins the
# two together): the engine knows the conversation's text, not the API it came through.
TOOL_RESULT = re.compile(r"^Result of tool call [^:]*: (.*)$", re.S)
CHARS_PER_TOKEN = 4


class WorkloadEngine(Engine):
    """Answers each call from the workload file named by `spec.source` (see the module docstring)."""

    backend = "workload"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        if not spec.source:
            raise SlmshiftError(f"model {spec.name!r}: backend 'workload' needs source: a workload file")
        self.path = spec.source
        self.sessions = read_workload(spec.source)
        self._by_question: dict[str, list[WorkloadSession]] = {}
        for s in self.sessions:
            self._by_question.setdefault(norm_question(s.question), []).append(s)

    def _session(self, req: LMRequest, question: str) -> WorkloadSession | None:
        found = self._by_question.get(norm_question(question)) or []
        same = [s for s in found if s.workload == req.scenario]
        return (same or found or [None])[0]

    def _text(self, req: LMRequest) -> str:
        users = [m.get("content") or "" for m in req.messages if m.get("role") == "user"]
        question = next((u for u in users if not TOOL_RESULT.match(u)), None)
        if question is None:
            raise LookupError("the conversation has no user question")
        s = self._session(req, question)
        if s is None:
            raise LookupError(f"no session of {self.path} asks {question[:120]!r}. Fix: add a session with this "
                              "question to the workload file, or send one of its questions")
        made = made_calls(req.messages)
        results: list[str] = []  # the results of the file's steps, in the file's order
        for step in s.steps:
            want = (step.tool, resolve(step.arguments, results))
            found = next((i for i, (call, _) in enumerate(made) if call == want), None)
            if found is None:
                return tool_call_text([want])
            results.append(made.pop(found)[1])
        return resolve(s.answer, results)

    def _answer(self, req: LMRequest) -> LMResponse:
        tokens_in = max(1, sum(len(m.get("content") or "") for m in req.messages) // CHARS_PER_TOKEN)
        try:
            text = self._text(req)
        except LookupError as e:
            return LMResponse(text="", model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                              tokens_in=tokens_in, error=f"{LABEL} {self.spec.name!r}: {e}")
        return LMResponse(text=text, model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                          tokens_in=tokens_in, tokens_out=min(req.max_tokens, max(1, len(text) // CHARS_PER_TOKEN)))

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        return [self._answer(r) for r in requests]


def made_calls(messages: list[dict]) -> list[tuple[tuple[str, object], str]]:
    """((tool, arguments), result) for each call in the conversation that has a result, in order. The plain messages
    (gateway/common.to_messages) write an assistant's calls as `tool_call_text` and each result after them, in the
    calls' order; a result with no call before it, or an assistant turn that is not a tool call, pairs with nothing."""
    pairs: list[tuple[tuple[str, object], str]] = []
    waiting: list[tuple[str, object]] = []
    for m in messages:
        text = m.get("content") or ""
        if m.get("role") == "assistant":
            waiting = _calls_in(text)
        elif m.get("role") == "user" and (r := TOOL_RESULT.match(text)) and waiting:
            pairs.append((waiting.pop(0), r.group(1)))
    return pairs


def _calls_in(text: str) -> list[tuple[str, object]]:
    start = text.find('{"tool_calls"')
    try:
        doc = json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return []
    return [(c.get("name"), c.get("arguments", {})) for c in doc.get("tool_calls", []) if isinstance(c, dict)]
