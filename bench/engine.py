"""The hf engine's schedulers on the quickstart's real SLM request mix, side by side in one run.

The mix is what the quickstart (scenarios/quickstart.yaml) sends the SLM, rebuilt with the operator scenario's own
prompt builders on the same 16 BFCL tasks (seed 0; simple, multiple, parallel): the all-SLM arm's intent call
(max_tokens 48), function call (128; every other one sees all the task's functions, as after an unusable
intent) and one retry of it after an unparsable answer (128), then the
intent-on-SLM arm's intent calls again: 64 requests. They are replayed through Ray Serve at 32 concurrent
requests (32 client coroutines taking the next request as theirs returns, as the quickstart's 2 teams x 16
episodes do) against:

- `static`: `@serve.batch` waves through one `model.generate` (hf.scheduler: static, the old engine);
- `continuous`: the step-loop scheduler with prefix reuse (hf.scheduler: continuous, the default);
- `offline`: the same requests through plain `model.generate`, in-process, in arrival-order batches of 32
  (each row still cut at its own max_tokens/EOS), no Serve: the throughput a batch job would get;
- `vllm` (opt-in: needs a vLLM env, see docs/engines.md): the vllm backend's server behind the same Serve
  deployment, float32 (bf16 ran ~4x slower on this AVX2-only CPU), prefix caching on.
- `constrained` (opt-in): `continuous` with every call's output constraint enforced (the intent's JSON schema, the
  call's BFCL grammar; the other engines get the same requests with `constrained` off), for the cost of constraining.

Prints output tokens/s, p50/p95 request latency, the ratios, and the continuous engine's prefix-cache hit rate.
Each engine gets the replica's CPUs alone (deployed one after the other). Uses packaged SmolLM2-135M.

Run: .venv/bin/python bench/engine.py [--n 64] [--concurrency 32] [--engines static,continuous,offline]
     .venv/bin/python bench/engine.py --engines continuous,vllm      # vLLM against the hf engine
     .venv/bin/python bench/engine.py --engines continuous,constrained  # the cost of constrained decoding
     .venv/bin/python bench/engine.py --engines continuous,constrained --like-for-like 3  # the mask's cost alone

`--like-for-like R` then replays only the requests whose greedy output was identical with and without the
constraint (the free answer already satisfied it), R times each, engines alternating: both arms then generate the
same tokens in the same batches, so the ratio is the constraint's own cost, not a change of workload (constrained
answers end sooner, leaving thinner decode batches). Each deployment's warm-up request is constrained on the
constrained engine, so the replica's one-off vocabulary scan is reported apart (grammar_tokenizer_s).
"""

from __future__ import annotations

import os

# Passive OpenMP waiting, as the hf replicas get (deployment.app_for), for the in-process baseline too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics
import time

from slmshift.platform.types import LMRequest, ModelSpec, OutputConstraint

SOURCE = "packaged:smollm2-135m"
RETRY_ANSWER = "I will call the function with the values from the request."


def request_mix(n_tasks: int = 16) -> list[LMRequest]:
    """The quickstart's SLM calls, in the order its arms issue them (see the module doc)."""
    from slmshift.scenarios.bfcl import call_messages, intent_messages, load_tasks
    from slmshift.scenarios.bfcl.constraints import call_constraint, intent_constraint
    from slmshift.scenarios.bfcl.data import expected_function_names

    tasks = load_tasks(["simple", "multiple", "parallel"], n=n_tasks, seed=0)

    def req(i: int, kind: str, messages: list[dict], max_tokens: int) -> LMRequest:
        # the scenario's constraint rides along; only the `constrained` engine has it enforced (see serve_engine)
        t = tasks[i]
        c = intent_constraint(t) if kind == "intent" else call_constraint(t, selected[i])
        return LMRequest(experiment_id="bench", episode_id=f"ep{i}", call_index=0, scenario="operator",
                         role="planner" if kind == "intent" else "operator", call_kind=kind, messages=messages,
                         max_tokens=max_tokens, constraint=c, constrained=False)

    # The SLM's intent is often unusable; the Operator then sees every function: every other task here does.
    selected = [expected_function_names(t) if i % 2 == 0 else None for i, t in enumerate(tasks)]
    intents = [req(i, "intent", intent_messages(t), 48) for i, t in enumerate(tasks)]
    calls = [call_messages(t, selected[i]) for i, t in enumerate(tasks)]
    retries = [m + [{"role": "assistant", "content": RETRY_ANSWER},
                    {"role": "user", "content": "That could not be parsed (no function call found). Reply with only "
                                                "the function call(s) in the format [func_name(param=value, ...)]."}]
               for m in calls]
    out = []
    for i in range(len(tasks)):  # per task, in the order its calls come (so --n keeps a representative mix)
        out += [intents[i], req(i, "function_call", calls[i], 128), req(i, "function_call", retries[i], 128),
                intents[i]]
    return out


def spec_for(scheduler: str, concurrency: int) -> ModelSpec:
    scheduler = "continuous" if scheduler == "constrained" else scheduler
    if scheduler == "vllm":  # the same budget as the hf engine's: 32 rows, 2 GB of KV, 2048-token prompts
        return ModelSpec(name="slm-vllm", tier="slm", backend="vllm", source=SOURCE, resources={"num_cpus": 1},
                         max_ongoing_requests=max(64, 2 * concurrency), batching={"max_batch_size": 32},
                         vllm={"dtype": "float32", "max_model_len": 2048 + 128, "kv_cache_mb": 2048})
    # The quickstart's SLM block, with room for its longest prompts (they no longer get truncated).
    return ModelSpec(name=f"slm-{scheduler}", tier="slm", backend="hf", source=SOURCE, resources={"num_cpus": 1},
                     max_ongoing_requests=max(64, 2 * concurrency),
                     hf={"threads": 2, "max_input_tokens": 2048, "scheduler": scheduler},
                     batching={"max_batch_size": 32, "batch_wait_timeout_s": 0.05})


def summary(name: str, wall: float, lat: list[float], tokens: int, errors: int, extra: dict | None = None) -> dict:
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else lat * 19
    return {"engine": name, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(lat), 2), "p95_s": round(q[18], 2), **(extra or {})}


async def replay(handle, requests: list[LMRequest], concurrency: int) -> tuple[float, list[float], list]:
    queue = list(enumerate(requests))
    lat: list[float] = [0.0] * len(requests)
    out: list = [None] * len(requests)

    async def worker():
        while queue:
            i, q = queue.pop(0)
            t0 = time.perf_counter()
            out[i] = await handle.remote(q)
            lat[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, lat, out


def serve_engine(scheduler: str, requests: list[LMRequest], concurrency: int) -> tuple[dict, list]:
    from ray import serve

    from slmshift.serve.deployment import deploy_models

    spec = spec_for(scheduler, concurrency)
    if scheduler == "constrained":
        spec = spec.model_copy(update={"name": "slm-constrained"})
        requests = [q.model_copy(update={"constrained": True}) for q in requests]
    handle = deploy_models([spec], available_cpus=2)[spec.name]
    # Warm-up, constrained on the constrained engine: the replica's one-off vocabulary scan is then not charged to the
    # timed requests (it is reported apart, as grammar_tokenizer_s); each timed grammar still compiles cold.
    warm = LMRequest(experiment_id="bench", episode_id="warm", call_index=0, scenario="bench", role="r",
                     call_kind="warmup", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
                     constraint=OutputConstraint(regex="(hi|hello)"), constrained=scheduler == "constrained")
    handle.remote(warm).result(timeout_s=300)
    wall, lat, out = asyncio.run(replay(handle, requests, concurrency))
    stats = handle.info.remote().result(timeout_s=60)["stats"]
    serve.delete(spec.name)
    extra = {k: round(v, 3) for k, v in stats.items() if k in ("prefix_token_hit_rate", "prefix_hits", "prefix_lookups",
                                                               "prefix_hit_tokens", "mean_decode_rows", "peak_rows",
                                                               "grammar_compiles", "grammar_cache_hits",
                                                               "grammar_compile_s", "grammar_tokenizer_s",
                                                               "grammar_budget_closes")}
    errors = [r.error for r in out if r.error]
    if errors:
        print(f"  {scheduler}: {len(errors)} errors, first: {errors[0]}")
    return summary(scheduler, wall, lat, sum(r.tokens_out for r in out), len(errors), extra), out


def offline(requests: list[LMRequest], batch: int = 32) -> tuple[dict, list[dict]]:
    """Plain model.generate, batches of `batch` in arrival order; a row's latency is its batch's end."""
    from slmshift.serve.engines.hf import HFEngine

    engine = HFEngine(spec_for("static", batch))
    items = [(q, engine._prompt_ids(q)) for q in requests]
    engine._run_batch(items[:1])  # warm-up
    results, lat = [], []
    t0 = time.perf_counter()
    for s in range(0, len(items), batch):
        results += engine._run_batch(items[s : s + batch])
        lat += [time.perf_counter() - t0] * len(items[s : s + batch])
    wall = time.perf_counter() - t0
    return summary("offline", wall, lat, sum(r["tokens_out"] for r in results), 0), results


def like_for_like(requests: list[LMRequest], texts: dict[str, list[str]], concurrency: int, reps: int) -> list[dict]:
    """Constrained against free on the requests whose outputs were identical both ways, engines alternating."""
    same = [q for q, a, b in zip(requests, texts["continuous"], texts["constrained"]) if a == b]
    print(f"like for like: {len(same)} of {len(requests)} requests with identical greedy outputs, {reps} round(s)")
    rows, speed = [], {"continuous": [], "constrained": []}
    for r in range(reps):
        outs = {}
        for name in ("continuous", "constrained") if r % 2 == 0 else ("constrained", "continuous"):
            row, outs[name] = serve_engine(name, same, concurrency)
            row["engine"] = f"{name}-same-outputs"
            speed[name].append(row)
            rows.append(row)
            print(json.dumps(row))
        diff = sum(a.text != b.text for a, b in zip(outs["continuous"], outs["constrained"]))
        if diff:
            print(f"  round {r + 1}: {diff} outputs differ this time (the ratio below still compares equal work "
                  "only where they agree)")
    mean = {k: statistics.mean(x["tokens_per_s"] for x in v) for k, v in speed.items()}
    p50 = {k: statistics.mean(x["p50_s"] for x in v) for k, v in speed.items()}
    print(f"like for like, constrained / free: {mean['constrained'] / mean['continuous']:.3f}x tokens/s, "
          f"{p50['continuous'] / p50['constrained']:.3f}x lower p50 (mean of {reps} round(s) each)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="replay the first N requests of the 64-request mix "
                    "(4 per task: intent, call, retry, the second arm's intent)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--engines", default="static,continuous,offline")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--like-for-like", type=int, default=0, metavar="R",
                    help="with continuous,constrained: replay the identical-output requests R times each (see above)")
    args = ap.parse_args()

    import ray

    from slmshift.serve.sources import pull_packaged

    pull_packaged(SOURCE.split(":", 1)[1])
    requests = request_mix()[: args.n]
    print(f"{len(requests)} requests, {args.concurrency} concurrent, started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows, texts = [], {}
    engines = args.engines.split(",")
    if any(e != "offline" for e in engines):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for name in engines:
        if name == "offline":
            row, res = offline(requests, args.concurrency)
            texts[name] = [r["text"] for r in res]
        else:
            row, out = serve_engine(name, requests, args.concurrency)
            texts[name] = [r.text for r in out]
        rows.append(row)
        print(json.dumps(row))
    by = {r["engine"]: r for r in rows}

    def compare(new: str, old: str, label: str) -> None:
        """Ratios of `new` to `old` (measured in this run) and how many greedy outputs agree."""
        if new in by and old in by:
            n, o = by[new], by[old]
            print(f"{label}: {n['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s, "
                  f"{o['p50_s'] / n['p50_s']:.2f}x lower p50, {o['p95_s'] / n['p95_s']:.2f}x lower p95")
            same = sum(a == b for a, b in zip(texts[old], texts[new]))
            print(f"greedy outputs of {new} identical to {old}'s: {same}/{len(requests)}")

    compare("continuous", "static", "continuous / static")
    if "offline" in by and "continuous" in by:
        print(f"continuous (through Serve) / offline generate: "
              f"{by['continuous']['tokens_per_s'] / by['offline']['tokens_per_s']:.2f}x tokens/s")
    compare("vllm", "continuous", "vllm / hf continuous")
    compare("constrained", "continuous", "constrained / unconstrained (hf continuous)")
    if args.like_for_like and {"continuous", "constrained"} <= set(by):
        rows += like_for_like(requests, texts, args.concurrency, args.like_for_like)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
