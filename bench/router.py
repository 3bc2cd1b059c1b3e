"""Router decision latency against the SLM call it routes, measured side by side in one process and one run.

1. `threshold` (with an S3 cluster index, so each decision embeds the prompt with MiniLM and finds its cluster) and
   `learned` (MiniLM embedding + logistic regression): `policy.route(request)` one call at a time, as the call
   pipeline does, p50/p99 over the quickstart's BFCL prompts; also the batched cost per call (embed a batch at
   once, score it at once), which is what a batching router would pay.
2. The bare SLM call those decisions route: packaged SmolLM2-135M's hf engine in-process, one request at a time
   (`engine.generate([request])`, no Serve), on the same prompts with the quickstart's max_tokens.
   Target: routing p50 <= 10% of the SLM call's p50.
3. Tune replay: `slmshift tune --pairs` on ~1.3k synthetic paired rows (the test generator's three call kinds) for
   the CLI's default search budget (300 s): trials/s, replayed thresholds/s and the whole command's wall time
   (target <= 10 min).

Run: .venv/bin/python bench/router.py [--decisions 200] [--slm-calls 16] [--tune-budget 300] [--skip-slm] [--skip-tune]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from slmshift.platform.types import LMRequest, ModelSpec

SLM = ModelSpec(name="smollm2-135m", tier="slm", backend="hf", source="packaged:smollm2-135m",
                resources={"num_cpus": 2}, hf={"threads": 2, "max_input_tokens": 1024})
LLM = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0})


def requests(n_tasks: int = 16) -> list[LMRequest]:
    """The quickstart's SLM calls: intent (max_tokens 48) and function call (128) on 16 BFCL tasks."""
    from slmshift.scenarios.bfcl import call_messages, intent_messages, load_tasks

    tasks = load_tasks(["simple", "multiple", "parallel"], n=n_tasks, seed=0)
    out = []
    for i, t in enumerate(tasks):
        out.append(LMRequest(experiment_id="bench", episode_id=f"ep{i}", call_index=0, scenario="operator",
                             role="planner", call_kind="intent", messages=intent_messages(t), max_tokens=48))
        out.append(LMRequest(experiment_id="bench", episode_id=f"ep{i}", call_index=1, scenario="operator",
                             role="operator", call_kind="function_call", messages=call_messages(t, None),
                             max_tokens=128))
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(xs), q))


def build_policies(reqs: list[LMRequest], tmp: Path) -> dict:
    """A 4-cluster index over the prompts and scorers fitted on synthetic outcomes (what they predict does not
    change their cost)."""
    from sklearn.cluster import KMeans

    from slmshift.platform.artifacts import ClusterIndex, prompt_text
    from slmshift.platform.embeddings import embed
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.scorers import LearnedScorer, ThresholdTable
    from slmshift.serve.router import build_policy

    emb = embed([prompt_text(r.messages) for r in reqs])
    km = KMeans(n_clusters=4, n_init=4, random_state=0).fit(emb)
    ClusterIndex(km.cluster_centers_, [{"id": i, "label": f"c{i}"} for i in range(4)]).save(tmp / "clusters")
    kinds = [r.call_kind for r in reqs]
    y = np.array([k == "intent" for k in kinds])
    est = ThresholdTable.fit(kinds, km.labels_.tolist(), y)
    LearnedScorer.fit(emb, kinds, y).save(tmp / "learned.joblib")
    models = [SLM, LLM]
    return {
        "threshold": build_policy(policy_spec(kind="threshold", estimates=[e.model_dump() for e in est],
                                              clusters=str(tmp / "clusters"), tau=0.5), models),
        "learned": build_policy(policy_spec(kind="learned", model=str(tmp / "learned.joblib"),
                                            clusters=str(tmp / "clusters"), tau=0.5), models),
    }


def bench_routing(reqs: list[LMRequest], n: int, tmp: Path) -> dict:
    from slmshift.platform.artifacts import ClusterIndex, prompt_text
    from slmshift.platform.embeddings import embed
    from slmshift.platform.scorers import LearnedScorer

    policies = build_policies(reqs, tmp)
    out = {}
    for name, policy in policies.items():
        for r in reqs[:4]:  # warm: MiniLM, the index and the scorer load on first use
            d = policy.route(r)
            assert "failed to load" not in d.reason, d.reason
        lat = []
        for i in range(n):
            r = reqs[i % len(reqs)].model_copy(update={"call_index": i})
            t0 = time.perf_counter()
            policy.route(r)
            lat.append(time.perf_counter() - t0)
        out[name] = {"p50_ms": 1e3 * pct(lat, 0.5), "p99_ms": 1e3 * pct(lat, 0.99), "n": n}
    # batched: one embedding call and one scoring call for the whole batch
    index, scorer = ClusterIndex.load(tmp / "clusters"), LearnedScorer.load(tmp / "learned.joblib")
    texts, kinds = [prompt_text(r.messages) for r in reqs], [r.call_kind for r in reqs]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        v = embed(texts)
        index.assign_vectors(v)
        scorer.score_batch(v, kinds)
        times.append((time.perf_counter() - t0) / len(reqs))
    out["batched_per_call_ms"] = 1e3 * statistics.median(times)
    out["batch"] = len(reqs)
    return out


async def bench_slm(reqs: list[LMRequest], n: int) -> dict:
    from slmshift.serve.engines.hf import HFEngine
    from slmshift.serve.sources import pull_packaged

    pull_packaged("smollm2-135m")
    engine = HFEngine(SLM)
    await engine.generate([reqs[0]])  # warm
    lat, toks = [], []
    for i in range(n):
        t0 = time.perf_counter()
        resp = (await engine.generate([reqs[i % len(reqs)]]))[0]
        lat.append(time.perf_counter() - t0)
        toks.append(resp.tokens_out)
    engine.close()
    return {"p50_ms": 1e3 * pct(lat, 0.5), "p99_ms": 1e3 * pct(lat, 0.99), "n": n,
            "mean_tokens_out": float(np.mean(toks))}


def bench_tune(budget: float, tmp: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))
    from test_tune import synthetic_pairs  # the tests' generator: three call kinds, informative log-probs
    from rich.console import Console

    from slmshift.train.routing.pairs import paired_from_file
    from slmshift.train.routing.tune import TuneOptions, tune_routing

    p = tmp / "pairs.csv"
    synthetic_pairs(430).to_csv(p, index=False)  # 1290 rows
    t0 = time.perf_counter()
    table = paired_from_file(str(p))
    res = tune_routing(table, str(tmp / "tune"), TuneOptions(time_budget_s=budget, num_cpus=2, progress=False),
                       Console(quiet=True))
    wall = time.perf_counter() - t0
    return {"rows": len(table), "search_budget_s": budget, **res.metrics["tune"], "command_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--slm-calls", type=int, default=16)
    ap.add_argument("--tune-budget", type=float, default=300.0)
    ap.add_argument("--skip-slm", action="store_true")
    ap.add_argument("--skip-tune", action="store_true")
    args = ap.parse_args()
    reqs = requests()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    result: dict = {"routing": bench_routing(reqs, args.decisions, tmp)}
    print(json.dumps(result["routing"], indent=2), flush=True)
    if not args.skip_slm:
        result["slm_call"] = asyncio.run(bench_slm(reqs, args.slm_calls))
        for name in ("threshold", "learned"):
            result["routing"][name]["share_of_slm_p50"] = result["routing"][name]["p50_ms"] / result["slm_call"]["p50_ms"]
            result["routing"][name]["share_of_slm_p99"] = result["routing"][name]["p99_ms"] / result["slm_call"]["p99_ms"]
        print(json.dumps(result["slm_call"], indent=2), flush=True)
    if not args.skip_tune:
        result["tune"] = bench_tune(args.tune_budget, tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
