"""A simulated teacher: quality, latency and price follow a declared profile.

It answers from the scenario's hidden reference when its per-call-kind accuracy says it succeeds, and with one
of the scenario's plausible wrong answers when it does not. Draws are seeded by the call's identity (task,
call kind, position), so a run is reproducible whatever the batching, ordering or launch time. Reports always
label it simulated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re

from slmshift.platform.types import LMRequest, LMResponse
from slmshift.serve.engines.base import Engine

CHARS_PER_TOKEN = 4  # token counts are estimated from text length; the profile's prices apply to them
# What it answers a call that has no scenario reference (every gateway call): labelled, never a real answer. The
# gateway's check marks it invalid and S2 drops it under every keep rule (train/curate.py).
PLACEHOLDER = re.compile(r"^\[simulated [^\]]*: no scenario reference for this call, so no real answer\]$")


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


class SimulatedEngine(Engine):
    backend = "simulated"

    def _rng(self, req: LMRequest) -> random.Random:
        # Keyed by what was asked, not by run or arm: a relaunch reproduces, every policy arm meets the same
        # teacher answer for a task, and a repeated task gets the same answer, as from a greedy LLM.
        key = json.dumps([self.spec.name, req.seed, req.scenario, req.task_id, req.call_kind, req.call_index])
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))

    def _answer(self, req: LMRequest) -> LMResponse:
        p = self.spec.profile
        tokens_in = estimate_tokens("".join(m.get("content", "") for m in req.messages))
        if req.hidden is None:  # e.g. a gateway call: no scenario knows the answer. Say so, deterministically.
            text = f"[simulated {self.spec.name}: no scenario reference for this call, so no real answer]"
            return LMResponse(text=text, model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                              tokens_in=tokens_in, tokens_out=min(estimate_tokens(text), req.max_tokens),
                              simulated=True, mean_logprob=0.0)
        rng = self._rng(req)
        accuracy = p.accuracy_for(req.call_kind) * (1.0 if req.hidden.upstream_ok else 1.0 - p.upstream_penalty)
        right = rng.random() < accuracy
        if right or not req.hidden.distractors:
            text = req.hidden.answer if right else ""
        else:
            text = rng.choice(req.hidden.distractors)
        tokens_out = min(estimate_tokens(text), req.max_tokens)
        latency = p.latency_base_s + p.latency_per_token_s * tokens_out
        latency *= 1 + p.latency_jitter * (2 * rng.random() - 1)
        mean = p.mean_logprob_right if right else p.mean_logprob_wrong
        logprob = min(0.0, rng.gauss(mean, p.mean_logprob_sd))
        return LMResponse(text=text, model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                          tokens_in=tokens_in, tokens_out=tokens_out, latency_s=latency, simulated=True,
                          mean_logprob=logprob)

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        out = [self._answer(r) for r in requests]
        waits = [r.latency_s for r in out if r.latency_s > 0]
        if waits:  # the batch returns when its slowest member would have
            await asyncio.sleep(max(waits))
        return out
