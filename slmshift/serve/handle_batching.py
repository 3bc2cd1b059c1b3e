"""Handle-side micro-batching: the calls one process makes to a model within a few ms travel as one Serve request.

Ray Serve costs a few ms of CPU per request (routing, serialization, the replica's request handling). A team
actor running many simulated episodes makes calls faster than that; gathering them pays the cost per batch.
`BatchingHandle` wraps a `DeploymentHandle` and keeps its calling convention, `await handle.remote(request)`:
the first call of a batch starts a `window_ms` timer (or the batch fills to `max_batch`), then the whole batch
goes to the deployment's `generate_many(list)`, and each caller gets its own answer. An exception for one call
(returned in its place by `generate_many`) is raised to that caller only; a failure of the Serve request itself
is raised to every caller in it, so per-call retry logic (e.g. the call pipeline's infra retries) still works.

Use `wrap_handles(handles, specs)`: models whose `batching.handle_batch_ms` resolves to 0 keep their plain handle.
"""

from __future__ import annotations

import asyncio
from typing import Any

from slmshift.platform.types import LMRequest, ModelSpec

DEFAULT_SIMULATED_MS = 2.0  # simulated engines answer in microseconds: Serve's per-request cost dominates


def handle_batch_ms(spec: ModelSpec) -> float:
    """The window for a model: its `batching.handle_batch_ms`, else 2 ms for simulated engines and 0 (off) for
    real ones, whose own batching (continuous or @serve.batch) already amortizes Serve per token."""
    ms = spec.batching.handle_batch_ms
    if ms is None:
        return DEFAULT_SIMULATED_MS if spec.backend == "simulated" else 0.0
    return ms


class BatchingHandle:
    """A DeploymentHandle whose `.remote(request)` calls are gathered into `generate_many` requests."""

    def __init__(self, handle: Any, window_ms: float, max_batch: int = 64, method: str = "generate_many"):
        if window_ms <= 0:
            raise ValueError("BatchingHandle needs window_ms > 0; use the plain handle to turn batching off")
        self._handle, self.window_s, self.max_batch, self.method = handle, window_ms / 1000, max_batch, method
        self._pending: list[tuple[LMRequest, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task] = set()  # keeps send tasks alive until they finish
        self.batches = 0  # Serve requests sent (for tests and benchmarks)

    def remote(self, request: LMRequest) -> asyncio.Future:
        """Queue one call; returns an awaitable resolving to its LMResponse. Call from a running event loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (e.g. a second asyncio.run): nothing pending belongs to it
            self._loop, self._pending, self._timer = loop, [], None
        fut = loop.create_future()
        self._pending.append((request, fut))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[tuple[LMRequest, asyncio.Future]]) -> None:
        self.batches += 1
        try:
            results = await getattr(self._handle, self.method).remote([r for r, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.method} returned {len(results)} answers for {len(batch)} calls")
        except BaseException as exc:  # the Serve request itself failed: every call in it sees that
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), res in zip(batch, results):
            if fut.done():  # the caller gave up (cancelled) meanwhile
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def __getattr__(self, name: str) -> Any:
        """Everything else (`info`, `options`, other methods) is the wrapped handle's."""
        if name.startswith("_"):  # not set yet (e.g. while unpickling): no recursion through _handle
            raise AttributeError(name)
        return getattr(self._handle, name)


def wrap_handles(handles: dict[str, Any], specs: list[ModelSpec]) -> dict[str, Any]:
    """name -> handle, batching those whose `handle_batch_ms` resolves above 0 (one wrapper per caller process:
    wrap in the process that makes the calls, e.g. a team actor's constructor, not in the driver)."""
    by_name = {s.name: s for s in specs}
    out = {}
    for name, handle in handles.items():
        ms = handle_batch_ms(by_name[name]) if name in by_name else 0.0
        out[name] = BatchingHandle(handle, ms) if ms > 0 else handle
    return out


__all__ = ["BatchingHandle", "handle_batch_ms", "wrap_handles"]
