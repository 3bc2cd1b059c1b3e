"""The gateway's overhead, measured side by side on one Ray instance: OpenAI chat completions and Responses calls
through `slmshift gateway` (FastAPI ingress -> call pipeline: route, check, S1 record, metrics -> Serve -> a
zero-latency simulated model) against the same HTTP requests to a bare Ray Serve echo app that returns a body of the
same API's shape. The gateway runs twice: calling the model's own Serve deployment, and with the model served inside
its ingress replica (`gateway.inline`).
Target: gateway p50 latency <= 1.2x the bare echo's. Rounds alternate so machine noise hits both alike; the median of
the per-round ratios is printed beside the pooled one (it holds up better on a shared machine).
On a CPU-bound machine latency follows CPU per request, so the bench also prints where each path spends it: CPU
ms per request of every Ray process (the HTTP proxy, the ingress replica, the model replica, the log writer).

Run: .venv/bin/python bench/gateway.py [--requests 400] [--concurrency 16] [--rounds 3] [--api chat responses]
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

PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
BODIES = {"chat": {"model": "teacher", "messages": [{"role": "user", "content": "Name one prime number."}],
                   "max_tokens": 8},
          "responses": {"model": "teacher", "input": "Name one prime number.", "max_output_tokens": 8}}


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

        @app.post("/v1/responses")
        async def responses(self, body: dict) -> dict:
            return {"id": "x", "object": "response", "created_at": 0, "status": "completed", "model": body.get("model"),
                    "output": [{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                                "content": [{"type": "output_text", "text": "2", "annotations": []}]}],
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}

    return Echo.bind()


async def drive(url: str, body: dict, n: int, c: int) -> tuple[list[float], float, int]:
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            for _ in range(k, n, c):
                t0 = time.perf_counter()
                async with client.post(url, json=body) as r:
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
    p.add_argument("--api", nargs="+", choices=sorted(PATHS), default=["chat", "responses"])
    a = p.parse_args()

    from slmshift.platform.log import InteractionLog
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.deployment import deploy_models
    from slmshift.serve.gateway import build_app
    from slmshift.platform.config import GatewaySection

    # its own Ray instance: never one a `ray start` on this machine left running (its CPUs, its other apps)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config={"log_level": "WARNING"})
    teacher = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0},
                        max_ongoing_requests=256)
    handles = deploy_models([teacher], 2)
    log = InteractionLog.remote(tempfile.mkdtemp(prefix="bench-gw-"))
    serve.run(build_app([teacher], [policy_spec(kind="llm", name="all-llm")], handles, log, "bench",
                        GatewaySection(), [], scrub=False),
              name="gateway", route_prefix="/gw")
    # the same gateway with the model served in its own replica (gateway.inline): one Serve request less per call
    serve.run(build_app([teacher], [policy_spec(kind="llm", name="all-llm")], {}, log, "bench",
                        GatewaySection(inline=["teacher"]), [], scrub=False),
              name="gateway-inline", route_prefix="/gwi")
    serve.run(echo_app(), name="echo", route_prefix="/echo")
    base = f"http://127.0.0.1:{a.port}"
    for api in a.api:  # warm-up both
        for path in ("/gw", "/gwi", "/echo"):
            asyncio.run(drive(f"{base}{path}{PATHS[api]}", BODIES[api], 40, 8))
    res: dict[tuple[str, str], list] = {}
    cpu: dict[tuple[str, str], dict[str, float]] = {}
    for _ in range(a.rounds):
        for api in a.api:
            for name, path in (("echo", "/echo"), ("gateway", "/gw"), ("inline", "/gwi")):
                before = ray_cpu_s()
                res.setdefault((api, name), []).append(
                    asyncio.run(drive(f"{base}{path}{PATHS[api]}", BODIES[api], a.requests, a.concurrency)))
                roles = cpu.setdefault((api, name), {})
                for role, t in ray_cpu_s().items():
                    roles[role] = roles.get(role, 0.0) + t - before.get(role, t)
    out = {}
    for (api, name), runs in res.items():
        lat = sorted(x for r in runs for x in r[0])
        out[api, name] = {"rps": statistics.median(a.requests / r[1] for r in runs), "p50": lat[len(lat) // 2],
                          "p99": lat[int(len(lat) * 0.99)], "errors": sum(r[2] for r in runs)}
        o = out[api, name]
        print(f"{api:9s} {name:8s} {o['rps']:7.1f} req/s  p50 {o['p50'] * 1e3:6.1f} ms  "
              f"p99 {o['p99'] * 1e3:6.1f} ms  errors {o['errors']}")
    n = a.requests * a.rounds
    for (api, name), roles in cpu.items():  # every Ray process on the machine: others' show up on a shared one
        busy = sorted(((t / n * 1e3, role) for role, t in roles.items() if t / n >= 1e-4), reverse=True)
        print(f"{api:9s} {name:8s} CPU ms/request in Ray processes: {sum(ms for ms, _ in busy):.2f} = "
              + ", ".join(f"{role} {ms:.2f}" for ms, role in busy[:5]))
    for api in a.api:
        for name, what in (("gateway", "gateway"), ("inline", "gateway, model inline")):
            gw, echo = out[api, name], out[api, "echo"]
            # Each round's runs are adjacent in time: their ratio sees the same machine load, so its median across
            # rounds holds up on a shared machine where others' bursts hit one pooled side more.
            paired = sorted(statistics.median(g[0]) / statistics.median(e[0])
                            for e, g in zip(res[api, "echo"], res[api, name]))
            print(f"{api:9s} {what} / bare Serve echo: p50 latency {gw['p50'] / echo['p50']:.2f}x, "
                  f"throughput {gw['rps'] / echo['rps']:.2f}x; per round p50 ratio median "
                  f"{statistics.median(paired):.2f}x [{paired[0]:.2f}-{paired[-1]:.2f}]  (target: latency <= 1.2x)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
