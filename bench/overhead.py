"""Overhead of the slmshift stack, measured side by side in one run on one Ray instance.

1. Per-call latency and calls/s: actor -> call pipeline (router, check, S1 record, metrics) -> Serve -> simulated engine
   with zero latency -> S1 log actor, against actors calling a bare Serve echo deployment with the same
   request object. Target: full stack <= 1.3x bare Serve.
2. The hf engine's tokens/s for SmolLM2-135M under 32 concurrent requests through Serve, against offline
   `model.generate` on one batch of the same 32 prompts. Target: >= 0.8x.

Run: .venv/bin/python bench/overhead.py [--calls 400] [--actors 8] [--coroutines 4] [--skip-hf]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import ray
from ray import serve

from slmshift.platform.policies import policy_spec
from slmshift.platform.types import Hidden, LMRequest, ModelSpec
from slmshift.serve.deployment import deploy_models

PROMPTS = [f"Write one sentence about the number {i} and why it is interesting." for i in range(32)]


def request(i: int) -> LMRequest:
    return LMRequest(experiment_id="bench", episode_id=f"ep{i}", call_index=0, scenario="bench", role="agent",
                     call_kind="intent", messages=[{"role": "user", "content": PROMPTS[i % 32]}], max_tokens=16,
                     hidden=Hidden(answer='{"functions": ["f"]}', distractors=['{"functions": []}']))


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Echo:
    async def __call__(self, req: LMRequest) -> LMRequest:
        return req


@ray.remote(num_cpus=0)
class Caller:
    """Makes `n` calls with `c` coroutines, either bare or through the call pipeline; returns per-call latencies."""

    def __init__(self, mode: str, handle, models=None, log=None, params=None):
        self.mode, self.handle = mode, handle
        if mode == "full":
            from slmshift.platform.log import LogClient
            from slmshift.serve.pipeline import CallPipeline

            self.log = LogClient(log)
            from slmshift.serve.handle_batching import wrap_handles

            # as in a team actor: calls to a simulated model are micro-batched per deployment (handle_batch_ms)
            self.pipeline = CallPipeline(policy=policy_spec(kind="llm"), models=models,
                                         handles=wrap_handles({"teacher": handle}, models), params=params, log=self.log)

    async def run(self, n: int, c: int, offset: int) -> list[float]:
        lat: list[float] = []

        async def worker(k: int):
            for j in range(k, n, c):
                t0 = time.perf_counter()
                if self.mode == "full":
                    from slmshift.agents.client import Session

                    session = Session(self.pipeline, experiment_id="bench", scenario="bench",
                                      episode_id=f"a{offset}-{j}", task_id="t")
                    await session.call(role="agent", call_kind="intent", messages=request(j).messages,
                                       max_tokens=16, hidden=request(j).hidden)
                else:
                    await self.handle.remote(request(j))
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(k) for k in range(c)))
        if self.mode == "full":
            await self.log.drain()
        return lat


def measure(mode: str, handle, args, rnd: int, **kw) -> tuple[float, float]:
    callers = [Caller.remote(mode, handle, **kw) for _ in range(args.actors)]
    ray.get([c.run.remote(8, 2, -1 - i - 100 * rnd) for i, c in enumerate(callers)])  # warm-up
    t0 = time.perf_counter()
    lats = sum(ray.get([c.run.remote(args.calls, args.coroutines, i + 100 * rnd) for i, c in enumerate(callers)]), [])
    wall = time.perf_counter() - t0
    for c in callers:
        ray.kill(c)
    return len(lats) / wall, statistics.mean(lats)


def bench_stack(args) -> None:
    from slmshift.platform.log import InteractionLog

    echo = serve.run(Echo.bind(), name="echo", route_prefix=None, logging_config={"log_level": "WARNING"})
    spec = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 1},
                     max_ongoing_requests=64, batching={"max_batch_size": 32, "batch_wait_timeout_s": 0.0})
    full = deploy_models([spec], available_cpus=2)["teacher"]
    log = InteractionLog.remote(tempfile.mkdtemp(prefix="slmshift-bench-"))
    rows = []
    for rnd in range(args.rounds):  # alternate to spread machine noise over both
        rows.append(("bare",) + measure("bare", echo, args, rnd))
        rows.append(("full",) + measure("full", full, args, rnd, models=[spec], log=log, params={"teacher": 7e10}))
    counts = ray.get(log.close.remote())
    bare = [r for r in rows if r[0] == "bare"]
    fulls = [r for r in rows if r[0] == "full"]
    b_cps, f_cps = statistics.median(r[1] for r in bare), statistics.median(r[1] for r in fulls)
    b_lat, f_lat = statistics.median(r[2] for r in bare), statistics.median(r[2] for r in fulls)
    total = args.actors * args.calls
    print(f"\n[stack] {args.actors} actors x {args.coroutines} coroutines, {total} calls per round, "
          f"{args.rounds} rounds (median); {counts['interactions']} S1 records written")
    print(f"  bare Serve echo : {b_cps:8.1f} calls/s   mean latency {b_lat * 1e3:6.1f} ms")
    print(f"  full stack      : {f_cps:8.1f} calls/s   mean latency {f_lat * 1e3:6.1f} ms")
    print(f"  ratio full/bare : latency {f_lat / b_lat:.2f}x   throughput {b_cps / f_cps:.2f}x slower   (target <= 1.3x)")
    serve.delete("echo")
    serve.delete("teacher")


def bench_hf(args) -> None:
    import torch

    from slmshift.serve.sources import load_model_and_tokenizer

    spec = ModelSpec(name="smollm2", tier="slm", backend="hf", source="packaged:smollm2-135m",
                     resources={"num_cpus": 1}, hf={"threads": 2},
                     batching={"max_batch_size": 32, "batch_wait_timeout_s": 0.1})
    handle = deploy_models([spec], available_cpus=2)["smollm2"]
    reqs = [request(i).model_copy(update={"max_tokens": args.tokens, "hidden": None}) for i in range(32)]

    async def burst():
        return await asyncio.gather(*(handle.remote(r) for r in reqs))

    asyncio.run(burst())  # warm-up
    t0 = time.perf_counter()
    out = asyncio.run(burst())
    serve_wall = time.perf_counter() - t0
    serve_tok = sum(r.tokens_out for r in out)
    serve.delete("smollm2")

    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer("packaged:smollm2-135m", "float32", "cpu")
    texts = [tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in reqs]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        t0 = time.perf_counter()
        gen = model.generate(**batch, max_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        off_wall = time.perf_counter() - t0
    new = gen[:, batch["input_ids"].shape[1]:]
    # count up to and including the first EOS, as the engine does
    off_tok = 0
    for row in new.tolist():
        off_tok += next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
    s, o = serve_tok / serve_wall, off_tok / off_wall
    print(f"\n[hf] SmolLM2-135M, 32 requests x {args.tokens} new tokens, greedy, fp32, 2 threads")
    print(f"  Serve + hf engine (32 concurrent) : {s:7.1f} tok/s  ({serve_tok} tokens in {serve_wall:.1f} s)")
    print(f"  offline model.generate (batch 32) : {o:7.1f} tok/s  ({off_tok} tokens in {off_wall:.1f} s)")
    print(f"  ratio serve/offline               : {s / o:.2f}x   (target >= 0.8x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=250, help="calls per actor per round")
    p.add_argument("--actors", type=int, default=8)
    p.add_argument("--coroutines", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request in the hf benchmark")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-stack", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        if not args.skip_stack:
            bench_stack(args)
        if not args.skip_hf:
            bench_hf(args)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
