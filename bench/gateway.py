"""The gateway's overhead, measured side by side on one Ray instance: OpenAI chat completions through
`slmshift gateway` (FastAPI ingress -> call pipeline: route, check, S1 record, metrics -> Serve -> a zero-latency
simulated model) against the same HTTP requests to a bare Ray Serve echo app that returns a completion-shaped body.
Target: gateway p50 latency <= 1.2x the bare echo's. Rounds alternate so machine noise hits both alike.
On a CPU-bound machine latency follows CPU per request, so the bench also prints where each path spends it: CPU
ms per request of every Ray process (the HTTP proxy, the ingress replica, the model replica, the log writer).

Run: .venv/bin/python bench/gateway.py [--requests 400] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import aiohttp
import ray
from ray import serve

BODY = {"model": "teacher", "messages": [{"role": "user", "content": "Name one prime number."}], "max_tokens": 8}


def echo_app():
    from fastapi import FastAPI
    from fastapi import Request  # noqa: F401  (real annotations for the pickled handler)

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Echo:
        @app.post("/v1/chat/completions")
        async def chat(self, body: dict) -> dict:
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "2"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return Echo.bind()


async def drive(url: str, n: int, c: int) -> tuple[list[float], float, int]:
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            for _ in range(k, n, c):
                t0 = time.perf_counter()
                async with client.post(url, json=BODY) as r:
                    await r.read()
                    errors += r.status != 200
                lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(c)))
        return lat, time.perf_counter() - t0, errors


def ray_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of each Ray worker process on this machine, by its role name."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and p.info["cpu_times"] is not None:
            role = cmd.split()[0].removeprefix("ray::").split(".")[0]  # e.g. ServeReplica:echo:Echo, ProxyActor
            out[role] = out.get(role, 0.0) + p.info["cpu_times"].user + p.info["cpu_times"].system
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=8765)
    a = p.parse_args()

    from slmshift.platform.log import InteractionLog
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.deployment import deploy_models
    from slmshift.serve.gateway import build_app
    from slmshift.platform.config import GatewaySection

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config={"log_level": "WARNING"})
    teacher = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0},
                        max_ongoing_requests=256)
    handles = deploy_models([teacher], 2)
    log = InteractionLog.remote(tempfile.mkdtemp(prefix="bench-gw-"))
    serve.run(build_app([teacher], [policy_spec(kind="llm", name="all-llm")], handles, log, "bench",
                        GatewaySection(), [], scrub=False), name="gateway", route_prefix="/gw")
    serve.run(echo_app(), name="echo", route_prefix="/echo")
    base = f"http://127.0.0.1:{a.port}"
    asyncio.run(drive(f"{base}/gw/v1/chat/completions", 40, 8))  # warm-up both
    asyncio.run(drive(f"{base}/echo/v1/chat/completions", 40, 8))
    res: dict[str, list] = {"gateway": [], "echo": []}
    cpu: dict[str, dict[str, float]] = {"gateway": {}, "echo": {}}
    for _ in range(a.rounds):
        for name, path in (("echo", "/echo"), ("gateway", "/gw")):
            before = ray_cpu_s()
            res[name].append(asyncio.run(drive(f"{base}{path}/v1/chat/completions", a.requests, a.concurrency)))
            for role, t in ray_cpu_s().items():
                cpu[name][role] = cpu[name].get(role, 0.0) + t - before.get(role, t)
    out = {}
    for name, runs in res.items():
        lat = sorted(x for r in runs for x in r[0])
        out[name] = {"rps": statistics.median(a.requests / r[1] for r in runs), "p50": lat[len(lat) // 2],
                     "p99": lat[int(len(lat) * 0.99)], "errors": sum(r[2] for r in runs)}
        print(f"{name:8s} {out[name]['rps']:7.1f} req/s  p50 {out[name]['p50'] * 1e3:6.1f} ms  "
              f"p99 {out[name]['p99'] * 1e3:6.1f} ms  errors {out[name]['errors']}")
    n = a.requests * a.rounds
    for name, roles in cpu.items():
        busy = sorted(((t / n * 1e3, role) for role, t in roles.items() if t / n >= 1e-4), reverse=True)
        print(f"{name:8s} CPU ms/request in Ray processes: {sum(ms for ms, _ in busy):.2f} = "
              + ", ".join(f"{role} {ms:.2f}" for ms, role in busy[:5]))
    print(f"gateway / bare Serve echo: p50 latency {out['gateway']['p50'] / out['echo']['p50']:.2f}x, "
          f"throughput {out['gateway']['rps'] / out['echo']['rps']:.2f}x  (target: latency <= 1.2x)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
