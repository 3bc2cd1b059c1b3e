"""Ray custom metrics (`ray.util.metrics`), exported on each node's metrics port for Prometheus/Grafana.

Created lazily, once per process: Ray metric objects must be built inside the worker that records them.
Names get Ray's `ray_` prefix and counters a `_total` suffix (e.g. `ray_slmshift_calls_total`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

CALL_TAGS = ("model", "tier", "scenario", "call_kind", "policy")
LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Histogram

    return {
        "calls": Counter("slmshift_calls", "Model calls made by agents.", tag_keys=CALL_TAGS + ("valid",)),
        "tokens_in": Counter("slmshift_tokens_in", "Prompt tokens.", tag_keys=CALL_TAGS),
        "tokens_out": Counter("slmshift_tokens_out", "Generated tokens.", tag_keys=CALL_TAGS),
        "cost": Counter("slmshift_cost_usd", "Cost in USD from the declared prices.", tag_keys=CALL_TAGS),
        "latency": Histogram("slmshift_call_latency_s", "Call latency seen by the agent.", LATENCY_BOUNDS, tag_keys=CALL_TAGS),
        "episodes": Counter("slmshift_episodes", "Finished episodes.", tag_keys=("scenario", "policy", "outcome")),
        "engine_requests": Counter("slmshift_engine_requests", "Requests served by an engine.", tag_keys=("model", "backend")),
        "engine_batch": Histogram("slmshift_engine_batch_size", "Requests per engine batch.",
                                  [1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model", "backend")),
        "engine_latency": Histogram("slmshift_engine_batch_latency_s", "Engine time per batch.", LATENCY_BOUNDS,
                                    tag_keys=("model", "backend")),
    }


def record_call(tags: dict[str, str], valid: bool | None, tokens_in: int, tokens_out: int, cost: float, latency: float) -> None:
    m = _metrics()
    m["calls"].inc(1, tags={**tags, "valid": str(valid)})
    for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out), ("cost", cost)):
        if value > 0:  # Counter.inc rejects 0
            m[name].inc(value, tags=tags)
    m["latency"].observe(latency, tags=tags)


def record_episode(scenario: str, policy: str, success: bool) -> None:
    _metrics()["episodes"].inc(1, tags={"scenario": scenario, "policy": policy, "outcome": "success" if success else "failure"})


def record_batch(model: str, backend: str, size: int, latency: float) -> None:
    m, tags = _metrics(), {"model": model, "backend": backend}
    m["engine_requests"].inc(size, tags=tags)
    m["engine_batch"].observe(size, tags=tags)
    m["engine_latency"].observe(latency, tags=tags)
