"""One Ray Serve application per model: a `ModelServer` deployment that batches requests into its engine."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from ray import serve

from slmshift.platform import metrics
from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import LMRequest, LMResponse, ModelSpec
from slmshift.serve.engines import get_engine_class


@serve.deployment
class ModelServer:
    """Serves one `ModelSpec`. A continuous engine gets each request as it arrives (it keeps its own running
    batch); any other engine gets the concurrent requests `@serve.batch` collects, as one call."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = ModelSpec.model_validate(spec)
        self.engine = get_engine_class(self.spec.backend)(self.spec)
        self.batched.set_max_batch_size(self.spec.batching.max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)

    async def __call__(self, request: LMRequest) -> LMResponse:
        if not self.engine.continuous:
            out = await self.batched(request)
            if isinstance(out, BaseException):  # this request's own failure (see `batched`)
                raise out
            return out
        t0 = time.perf_counter()
        out = await self.engine.submit(request)
        metrics.record_batch(self.spec.name, self.spec.backend, 1, time.perf_counter() - t0)
        return out

    async def generate_many(self, requests: list[LMRequest]) -> list[LMResponse | BaseException]:
        """Several calls in one Serve request (handle-side batching): each is served as if sent alone, and an
        exception stays with its own call (returned in its place, raised by the caller's wrapper)."""
        return list(await asyncio.gather(*(self(r) for r in requests), return_exceptions=True))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def batched(self, requests: list[LMRequest]) -> list[LMResponse]:
        t0 = time.perf_counter()
        try:
            out = await self.engine.generate(requests)
        except Exception:
            if len(requests) == 1:
                raise
            # One bad request must not fail the others batched with it: serve each alone; a failure is returned
            # in its own request's place and raised to that caller only.
            alone = await asyncio.gather(*(self.engine.generate([r]) for r in requests), return_exceptions=True)
            out = [r if isinstance(r, BaseException) else r[0] for r in alone]
        metrics.record_batch(self.spec.name, self.spec.backend, len(requests), time.perf_counter() - t0)
        return out

    def check_health(self) -> None:  # Serve's periodic health check: a failing engine gets its replica replaced
        self.engine.check_health()

    def info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "params": self.engine.num_parameters(), "backend": self.spec.backend,
                "stats": self.engine.stats()}


def app_for(spec: ModelSpec):
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    if spec.backend == "hf":
        # OpenMP threads that spin while waiting collapse when the host is oversubscribed (Ray's actors, other
        # replicas): measured 20x slower decoding on 2 busy cores, none with passive waiting. Set before torch loads.
        actor["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
    return ModelServer.options(
        name=f"model-{spec.name}",
        num_replicas=spec.replicas,
        max_ongoing_requests=spec.max_ongoing_requests,
        # Bounded by default: under overload a caller is told at once (BackPressureError) rather than left
        # waiting behind an unbounded queue. Serve counts the queue per caller (handle), not per deployment.
        max_queued_requests=(4 * spec.max_ongoing_requests * spec.replicas if spec.max_queued_requests is None
                             else spec.max_queued_requests),
        # Each rejection says how long to wait (BackPressureError.retry_after_s); the call pipeline honours it.
        backpressure_config={"retry_after_s": spec.retry_after_s},
        ray_actor_options=actor,
    ).bind(spec.model_dump())


def _first_line_of_cause(err: Exception) -> str:
    """Serve wraps replica constructor failures in a long traceback; users need its last real line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else type(err).__name__


def deploy_models(specs: list[ModelSpec], available_cpus: float) -> dict[str, Any]:
    """Deploy every model as its own Serve app; return name -> DeploymentHandle.

    Checks CPU reservations first: Serve waits forever for a replica it cannot place.
    """
    need = sum(s.resources.num_cpus * s.replicas for s in specs)
    if need > available_cpus:
        detail = ", ".join(f"{s.name}: {s.replicas}×{s.resources.num_cpus}" for s in specs)
        raise ModelLoadError(
            f"The models reserve {need:g} CPUs ({detail}) but the Ray cluster has {available_cpus:g}. "
            "Fix: lower models[].resources.num_cpus or replicas, or run on a bigger cluster (--address).")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # No HTTP proxy: agents reach models through handles. Serve's own actors log warnings only.
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    handles = {}
    for spec in specs:
        try:
            # Replicas log at WARNING: per-request INFO lines would flood the driver's console.
            handles[spec.name] = serve.run(app_for(spec), name=spec.name, route_prefix=None,
                                           logging_config={"log_level": "WARNING"})
        except Exception as e:
            raise ModelLoadError(
                f"Model {spec.name!r} (backend {spec.backend}, source {spec.source!r}) failed to load: "
                f"{_first_line_of_cause(e)}. Fix: check models[].source and the backend options for {spec.name!r}."
            ) from None
    return handles
