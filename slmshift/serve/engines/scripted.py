"""A scripted model: answers each call kind from a script, in order (the last entry repeats), else with a callback
or the call's hidden reference. It drives real episodes through the real call pipeline where a test or a replay
needs exact outputs (a model that fails the third code call, a recorded transcript), and records what it was asked.
"""

from __future__ import annotations

from typing import Callable

from slmshift.platform.types import LMRequest, LMResponse, ModelSpec
from slmshift.serve.engines.base import Engine


class ScriptedEngine(Engine):
    backend = "scripted"

    def __init__(self, spec: ModelSpec, script: dict[str, list[str]] | None = None,
                 answer: Callable[[LMRequest], str] | None = None):
        super().__init__(spec)
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.answer = answer
        self.requests: list[LMRequest] = []

    def _text(self, r: LMRequest) -> str:
        q = self.script.get(r.call_kind)
        if q:
            return q.pop(0) if len(q) > 1 else q[0]
        if self.answer is not None:
            return self.answer(r)
        return r.hidden.answer if r.hidden else ""

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        self.requests += requests
        return [LMResponse(text=self._text(r), model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                           adapter=r.adapter) for r in requests]
