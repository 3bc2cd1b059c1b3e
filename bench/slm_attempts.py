"""Verifier-guided retries (`slm_attempts`) with SmolLM2-135M: correctness gained per extra SLM call, against one
attempt (the baseline) in the same run.

Each arm sends the same BFCL calls (simple, multiple, parallel) through the real call pipeline (`CallPipeline`, policy
`slm`, `slm_attempts` k) to one in-process hf engine (continuous scheduler), the scenario's own check deciding whether
an answer is retried. Call kinds: `intent` free (constrain: none; a third of its zero-shot answers are invalid) and
`function_call` constrained (constrain: slm). Per arm: final correctness and validity, SLM calls per task, and the
correctness gained over k = 1 per extra SLM call, all with 95% intervals resampling tasks (2,000 resamples, the same
tasks for both arms of a difference).

Run: .venv/bin/python bench/slm_attempts.py [--n 60] [--attempts 1,2,4] [--kinds intent,function_call]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as hf replicas get: spinning threads crawl on busy shared cores

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from constrained_validity import SOURCE, bfcl_cases  # noqa: E402  (the sibling bench: the same BFCL calls)
from slmshift.platform.types import ModelSpec  # noqa: E402

CONSTRAIN = {"intent": "none", "function_call": "slm"}


def run_arm(engine, cases, kind: str, k: int, seed: int) -> dict[str, list]:
    """Per task (in `cases` order): final correct, final valid, SLM calls made."""
    from slmshift.platform.policies import policy_spec
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog

    log = MemoryLog()
    pipeline = CallPipeline(policy=policy_spec(kind="slm", name=f"k{k}", slm_attempts=k, constrain=CONSTRAIN[kind]),
                            models=[engine.spec], handles={engine.spec.name: LocalHandle(engine)}, params={}, log=log)

    async def one(i: int, req, grade) -> None:
        # one experiment id for every arm: attempt n of a call draws the same seed whatever k, so arms are paired
        req = req.model_copy(update={"experiment_id": "attempts", "episode_id": f"t{i}", "seed": seed})

        def check(text: str) -> SimpleNamespace:  # the scenario's own grader, as the pipeline reads a verdict
            valid, correct = grade(text)
            return SimpleNamespace(valid=bool(valid), correct=bool(correct), reason=None if valid else "invalid")

        await pipeline.call(req, check=check)

    async def all_calls() -> None:
        await asyncio.gather(*(one(i, req, grade) for i, (_, req, grade) in enumerate(cases)))

    asyncio.run(all_calls())
    by_ep: dict[str, list[dict]] = {}
    for r in log.records:
        by_ep.setdefault(r["episode_id"], []).append(r)
    out = {"correct": [], "valid": [], "calls": []}
    for i in range(len(cases)):
        recs = by_ep.get(f"t{i}", [])
        final = next((r for r in recs if not r["escalated"]), None)
        out["correct"].append(bool(final and final["correct"]))
        out["valid"].append(bool(final and final["valid"]))
        out["calls"].append(len(recs))
    return out


def interval(draws: np.ndarray) -> list[float]:
    return [round(float(np.quantile(draws, 0.025)), 3), round(float(np.quantile(draws, 0.975)), 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60, help="BFCL tasks (one call of each kind each)")
    ap.add_argument("--attempts", default="1,2,4", help="slm_attempts values; the first is the baseline")
    ap.add_argument("--kinds", default="intent,function_call")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from slmshift.serve.engines.hf import HFEngine

    print(f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    engine = HFEngine(ModelSpec(name="slm", tier="slm", backend="hf", source=SOURCE,
                                hf={"threads": 2, "max_input_tokens": 4096}, batching={"max_batch_size": 32}))
    cases = bfcl_cases(args.n)
    ks = [int(x) for x in args.attempts.split(",")]
    rng = np.random.default_rng(0)
    for kind in args.kinds.split(","):
        mine = [c for c in cases if c[1].call_kind == kind]
        idx = rng.integers(0, len(mine), size=(2000, len(mine)))  # task resamples shared by every arm of this kind
        base = None
        for k in ks:
            t0 = time.perf_counter()
            arm = {key: np.asarray(v, dtype=float) for key, v in run_arm(engine, mine, kind, k, args.seed).items()}
            row = {"call_kind": kind, "constrain": CONSTRAIN[kind], "slm_attempts": k, "tasks": len(mine),
                   "correct": round(arm["correct"].mean(), 3), "correct_ci": interval(arm["correct"][idx].mean(1)),
                   "valid": round(arm["valid"].mean(), 3), "slm_calls_per_task": round(arm["calls"].mean(), 2),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            if base is None:
                base = arm
            else:
                gain = arm["correct"][idx].mean(1) - base["correct"][idx].mean(1)
                extra = arm["calls"][idx].mean(1) - base["calls"][idx].mean(1)
                row["gain_vs_first"] = round(float(arm["correct"].mean() - base["correct"].mean()), 3)
                row["gain_ci"] = interval(gain)
                row["extra_calls_per_task"] = round(float(arm["calls"].mean() - base["calls"].mean()), 2)
                row["gain_per_extra_call"] = round(row["gain_vs_first"] / row["extra_calls_per_task"], 3) \
                    if row["extra_calls_per_task"] > 0 else None
                ok = extra > 0
                row["gain_per_extra_call_ci"] = interval(gain[ok] / extra[ok]) if ok.any() else None
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
