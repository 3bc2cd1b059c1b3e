"""Overload: 10x the load a model deployment is configured for, with and without a queue bound.

A simulated model with a fixed latency serves `replicas x max_ongoing_requests` requests at a time, so it completes
about `capacity = replicas x max_ongoing / latency` requests per second. Caller actors (as team actors and the
gateway are) send an open-loop stream at `factor x capacity` for `--duration` seconds through Serve handles.

With the bound (`ModelSpec.max_queued_requests`, default 4 x max_ongoing x replicas per caller) the excess is
rejected at once with ray.serve.exceptions.BackPressureError and accepted calls keep a bounded latency; with
`max_queued_requests: -1` (Serve's default) everything queues and latency grows with the backlog. Either way every
request must end (no hang) and the replica must still serve afterwards. `nominal` (1x load) gives the reference
throughput.

Prints per mode: offered, accepted, rejected (and the exception type the caller sees), other errors, timed out,
p50/p99 latency of accepted calls and of rejections, and whether the replica still answers.
The per-caller bound means the deployment's total queue is callers x max_queued_requests.

Run: .venv/bin/python bench/overload.py [--factor 10] [--duration 5] [--latency 0.5] [--max-ongoing 4]
     [--replicas 1] [--callers 2] [--timeout 60] [--modes nominal,bounded,unbounded]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import time

import ray
from ray import serve

from slmshift.platform.types import Hidden, LMRequest, ModelSpec
from slmshift.serve.deployment import deploy_models


def _request(i: int) -> LMRequest:
    return LMRequest(experiment_id="overload", episode_id=f"ep{i}", call_index=0, scenario="bench", role="agent",
                     call_kind="intent", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8,
                     hidden=Hidden(answer='{"functions": ["f"]}'))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@ray.remote(num_cpus=0)
class Caller:
    """Sends `rate` requests/s for `duration` s without waiting for answers (open loop), like many episodes'
    agents calling at once; returns one (outcome, latency) per request."""

    def __init__(self, handle):
        self.handle = handle
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one INFO line per cancelled request otherwise

    async def run(self, rate: float, duration: float, offset: int, timeout_s: float) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(self.handle.remote(_request(offset + i)), timeout_s)
                out.append(("ok" if resp.error is None else f"engine:{resp.error[:40]}", time.perf_counter() - t0))
            except asyncio.TimeoutError:
                out.append(("timed_out", time.perf_counter() - t0))
            except Exception as e:  # what the call pipeline sees: recorded by exception type
                out.append((f"{type(e).__module__}.{type(e).__name__}", time.perf_counter() - t0))

        tasks, start, n = [], time.perf_counter(), int(rate * duration)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return out


def run_mode(name: str, max_queued: int | None, factor: float, args) -> dict:
    spec = ModelSpec(name=f"sim-{name}", tier="llm", backend="simulated", replicas=args.replicas,
                     max_ongoing_requests=args.max_ongoing, max_queued_requests=max_queued,
                     resources={"num_cpus": 0}, batching={"max_batch_size": args.max_ongoing, "batch_wait_timeout_s": 0.005},
                     profile={"accuracy": {"default": 1.0}, "latency_base_s": args.latency})
    handle = deploy_models([spec], available_cpus=float(ray.cluster_resources().get("CPU", 0)))[spec.name]
    capacity = args.replicas * args.max_ongoing / args.latency
    rate = factor * capacity / args.callers
    callers = [Caller.remote(handle) for _ in range(args.callers)]
    t0 = time.perf_counter()
    results = [r for rs in ray.get([c.run.remote(rate, args.duration, k * 10**6, args.timeout)
                                    for k, c in enumerate(callers)]) for r in rs]
    wall = time.perf_counter() - t0
    # The replica must still answer after the storm.
    try:
        after = ray.get(callers[0].run.remote(1.0, 1.0, 9 * 10**6, 30.0))
        alive = all(o == "ok" for o, _ in after)
    except Exception:
        alive = False
    status = serve.status().applications[spec.name].status
    serve.delete(spec.name)
    outcomes = collections.Counter(o for o, _ in results)
    ok = [lat for o, lat in results if o == "ok"]
    rejected = [lat for o, lat in results if o.endswith("BackPressureError")]
    bound = spec.max_queued_requests if spec.max_queued_requests is not None else 4 * args.max_ongoing * args.replicas
    return {
        "mode": name, "max_queued_requests": bound, "offered": len(results), "accepted": len(ok),
        "rejected": len(rejected), "timed_out": outcomes.get("timed_out", 0), "factor": factor,
        "errors": {o: c for o, c in outcomes.items()
                   if o not in ("ok", "timed_out") and not o.endswith("BackPressureError")},
        "rejection_type": next((o for o in outcomes if o.endswith("BackPressureError")), None),
        "p50_s": _pct(ok, 0.5), "p99_s": _pct(ok, 0.99), "reject_p50_s": _pct(rejected, 0.5),
        "reject_p99_s": _pct(rejected, 0.99), "accepted_per_s": len(ok) / wall, "wall_s": wall,
        "offered_per_s": rate * args.callers, "capacity_per_s": capacity, "replica_alive_after": alive,
        "app_status": str(status),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, default=10.0, help="Offered load / configured capacity.")
    ap.add_argument("--duration", type=float, default=5.0, help="Seconds of offered load.")
    ap.add_argument("--latency", type=float, default=0.5, help="Simulated model latency per request (s).")
    ap.add_argument("--max-ongoing", type=int, default=4, help="max_ongoing_requests per replica.")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--callers", type=int, default=2, help="Caller actors (each has its own handle queue).")
    ap.add_argument("--timeout", type=float, default=60.0, help="A request not ended by then is cancelled and "
                    "counted as timed out (what an unbounded queue does to callers).")
    ap.add_argument("--modes", default="nominal,bounded,unbounded", help="nominal: 1x load, default bound (the "
                    "reference throughput); bounded: factor x load, default bound; unbounded: factor x load, -1.")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # address="local": a new cluster even when a `ray start` one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", namespace="slmshift-bench")
    rows = []
    try:
        for mode in args.modes.split(","):
            if mode not in ("nominal", "bounded", "unbounded"):
                ap.error(f"unknown mode {mode!r}; modes: nominal, bounded, unbounded")
            rows.append(run_mode(mode, -1 if mode == "unbounded" else None,
                                 1.0 if mode == "nominal" else args.factor, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    cap = rows[0]["capacity_per_s"]
    print(f"\noverload: up to {args.factor:g}x capacity ({cap:.1f} req/s = {args.replicas} replica(s) x "
          f"{args.max_ongoing} ongoing / {args.latency} s) for {args.duration:g} s from {args.callers} caller actors")
    head = ["mode", "load", "max_queued", "offered", "accepted", "rejected", "timed out", "errors", "p50 s", "p99 s",
            "reject p50 ms", "reject p99 ms", "accepted/s", "alive after"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) for x in [
            r["mode"], f"{r['factor']:g}x", r["max_queued_requests"], r["offered"], r["accepted"], r["rejected"],
            r["timed_out"],
            sum(r["errors"].values()), f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", f"{1000 * r['reject_p50_s']:.1f}",
            f"{1000 * r['reject_p99_s']:.1f}", f"{r['accepted_per_s']:.1f}", r["replica_alive_after"]]))
    for r in rows:
        if r["rejection_type"]:
            print(f"{r['mode']}: rejected calls raise {r['rejection_type']} in the caller")
        if r["errors"]:
            print(f"{r['mode']}: other errors {r['errors']}")
    print("(simulated model; timings on a shared 2-core machine are 'busy machine' figures)")


if __name__ == "__main__":
    main()
