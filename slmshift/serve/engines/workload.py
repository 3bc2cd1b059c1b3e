"""A workload-file teacher: an LLM tier deployable from YAML (`backend: workload`, `source: <workload file>`) that
answers a tool-using agent's calls from a file of sessions (platform/workload.py), so the gateway's flywheel can run
on real agent traffic with a named teacher and no hosted model.

Given the conversation so far, the teacher finds the session by the agent's question (its first user message that is
not a tool result), counts the tool results the agent already sent back, and emits the next tool call with its
arguments filled from those results, or the final answer once every step has its result. So each call after the
first depends on what the client's tools returned: a teacher that never saw those results could not produce it.

Reports label it: backend `workload` in every S1 record and the run's tables, "workload-file teacher" beside every
figure it shapes. It is not a model: its answers are right by construction, as far as the file is.
"""

from __future__ import annotations

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
        results = [m.group(1) for m in map(TOOL_RESULT.match, users) if m]
        question = next((u for u in users if not TOOL_RESULT.match(u)), None)
        if question is None:
            raise LookupError("the conversation has no user question")
        s = self._session(req, question)
        if s is None:
            raise LookupError(f"no session of {self.path} asks {question[:120]!r}. Fix: add a session with this "
                              "question to the workload file, or send one of its questions")
        k = len(results)
        if k > len(s.steps):
            raise LookupError(f"session {s.session!r} of workload {s.workload!r} has {len(s.steps)} tool call(s) but "
                              f"the conversation holds {k} tool results")
        if k < len(s.steps):
            step = s.steps[k]
            return tool_call_text([(step.tool, resolve(step.arguments, results))])
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
