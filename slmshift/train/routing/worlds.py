"""Simulated worlds whose answer is known, to test the routing estimators (`replay`, `estimate`) against truth.

A world has call kinds, each with the SLM's and the LLM's accuracy, and tasks whose episodes make a random number
of calls of each kind in a fixed order. An episode succeeds when every call is right (the conjunction); once a call
is wrong, every later call of the episode is harder (`upstream_penalty` multiplies both tiers' accuracy), as an
agent working from a wrong PRD or a wrong intent does. A routing that sends whole call kinds to a tier has a known
episode success, Σ_shapes P(shape) Π accuracy, and a known SLM share; `measure` also simulates fresh episodes.

`collect` plays a run with paired outcomes: episodes under a collect routing (always-LLM, or a tuned per-kind
routing for a later iteration), the other tier's answer drawn for every call of an episode sampled at
`shadow_rate` (`unit="episode"`, as the pipeline samples) or for calls sampled one by one (`unit="call"`, how it
sampled before), each answer drawn in the context the episode actually had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from slmshift.train.routing.pairs import COLUMNS


@dataclass
class World:
    kinds: dict[str, tuple[float, float]]  # call kind -> (SLM accuracy, LLM accuracy)
    counts: dict[str, tuple[int, int]]  # call kind -> (min, max) calls of that kind per episode, drawn uniformly
    upstream_penalty: float = 1.0
    slm_cost: float = 0.0001
    llm_cost: float = 0.002
    order: list[str] = field(default_factory=list)  # call kinds in episode order (default: `kinds`' order)
    # call kind -> P(an SLM attempt fails the call's check); such an answer is wrong, and a valid one is right with
    # P(SLM accuracy / (1 - this)), so one attempt keeps the kind's SLM accuracy. Verifier-guided retries
    # (`attempts`) answer again while the check fails: k attempts are right with P((1 - invalid^k) x that).
    invalid: dict[str, float] = field(default_factory=dict)

    def slm_accuracy(self, kind: str, attempts: int = 1) -> float:
        inv = self.invalid.get(kind, 0.0)
        return (1 - inv ** attempts) * self.kinds[kind][0] / (1 - inv)

    def shapes(self, n: int, rng: np.random.Generator) -> list[list[str]]:
        order = self.order or list(self.kinds)
        return [[k for k in order for _ in range(int(rng.integers(self.counts[k][0], self.counts[k][1] + 1)))]
                for _ in range(n)]

    def truth(self, to_slm: set[str], attempts: int = 1) -> dict[str, float]:
        """Exact episode success and SLM share of a routing that sends the kinds `to_slm` to the SLM, which answers
        up to `attempts` times."""
        order = self.order or list(self.kinds)
        grids = [np.arange(self.counts[k][0], self.counts[k][1] + 1) for k in order]
        mesh = np.array(np.meshgrid(*grids, indexing="ij")).reshape(len(order), -1)  # every shape, equally likely
        acc = np.array([self.slm_accuracy(k, attempts) if k in to_slm else self.kinds[k][1] for k in order])
        success = np.prod(acc[:, None] ** mesh, axis=0).mean()
        slm = np.array([k in to_slm for k in order], float)
        share = (slm[:, None] * mesh).sum(axis=0).mean() / mesh.sum(axis=0).mean()
        return {"quality_episode": float(success), "slm_share": float(share)}

    def _answer(self, kind: str, tier: str, upstream_wrong: bool, rng: np.random.Generator) -> bool:
        p = self.kinds[kind][0 if tier == "slm" else 1] * (self.upstream_penalty if upstream_wrong else 1.0)
        return bool(rng.random() < p)

    def _draw(self, kind: str, tier: str, upstream_wrong: bool, attempts: int, rng: np.random.Generator
              ) -> tuple[bool, bool | None, int]:
        """(right, valid, the attempt it came from) for one answer of `tier`: the SLM's answers again while the
        check fails, up to `attempts`, in a world with `invalid`; any other answer is one draw, validity unknown."""
        if tier != "slm" or not self.invalid:
            return self._answer(kind, tier, upstream_wrong, rng), None, 1
        inv = self.invalid.get(kind, 0.0)
        for n in range(1, attempts + 1):
            if rng.random() >= inv:
                p = self.kinds[kind][0] / (1 - inv) * (self.upstream_penalty if upstream_wrong else 1.0)
                return bool(rng.random() < p), True, n
        return False, False, attempts

    def measure(self, to_slm: set[str], episodes: int, seed: int, attempts: int = 1) -> dict[str, float]:
        """Fresh episodes under the routing: measured success and SLM share."""
        rng = np.random.default_rng(seed)
        ok_eps, slm_calls, calls = 0, 0, 0
        for shape in self.shapes(episodes, rng):
            wrong = False
            for k in shape:
                tier = "slm" if k in to_slm else "llm"
                wrong |= not self._draw(k, tier, wrong, attempts, rng)[0]
                slm_calls += tier == "slm"
                calls += 1
            ok_eps += not wrong
        return {"quality_episode": ok_eps / episodes, "slm_share": slm_calls / calls}

    def collect(self, episodes: int, shadow_rate: float, seed: int, *, to_slm: set[str] = frozenset(),
                unit: str = "episode", attempts: int = 1) -> pd.DataFrame:
        """A paired table (the columns `pairs.py` builds) from `episodes` collect episodes, one task each; with
        `invalid` set, the SLM answers up to `attempts` times (served and shadow alike, as `shadow_attempts` and
        `slm_attempts` both at `attempts` log)."""
        rng = np.random.default_rng(seed)
        rows = []
        for e, shape in enumerate(self.shapes(episodes, rng)):
            sampled_ep = rng.random() < shadow_rate
            wrong, recs = False, []
            for i, k in enumerate(shape):
                obs = "slm" if k in to_slm else "llm"
                other = "llm" if obs == "slm" else "slm"
                paired = sampled_ep if unit == "episode" else rng.random() < shadow_rate
                ok, valid, n = {}, None, 1
                for tier in (obs, other) if paired else (obs,):  # the shadow sees the context the episode had
                    ok[tier], v, m = self._draw(k, tier, wrong, attempts, rng)
                    if tier == "slm":
                        valid, n = v, m
                if paired:
                    recs.append({"row": f"e{e}/{i}", "task": f"t{e}", "group": f"t{e}", "scenario": None,
                                 "episode": f"e{e}", "call_index": i, "call_kind": k, "prompt": None, "cluster": None,
                                 "slm_ok": ok["slm"], "llm_ok": ok["llm"], "slm_cost": self.slm_cost,
                                 "llm_cost": self.llm_cost, "slm_logprob": np.nan, "slm_valid": valid,
                                 "obs_tier": obs, "weight": 1.0 / shadow_rate, "graded": True,
                                 "slm_attempts": n, "slm_attempt_cap": attempts if self.invalid else 1,
                                 "slm_tries_cost": (n - 1) * self.slm_cost})
                wrong |= not ok[obs]
            for r in recs:
                r["episode_success"] = not wrong
                r["full_episode"] = len(recs) == len(shape)
            rows += recs
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["cluster"] = pd.array(df["cluster"], dtype="Int64")
        df["slm_valid"] = pd.array(df["slm_valid"], dtype="boolean")
        return df
