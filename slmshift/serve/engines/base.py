"""The engine interface: one async method over a batch of requests."""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar

from slmshift.platform.types import LMRequest, LMResponse, ModelSpec


class Engine(abc.ABC):
    """A model backend. A Serve replica builds one and hands it batches collected by `@serve.batch`, or, when
    `continuous` is true, each request as it arrives through `submit` (the engine then batches by itself).

    Engines never know who calls them. `generate` returns exactly one response per request, in order;
    a failure for one request is an `LMResponse` with `error` set, not an exception.
    """

    backend: ClassVar[str]
    continuous: bool = False  # True: the engine schedules its own running batch; Serve calls `submit` per request

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @abc.abstractmethod
    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]: ...

    async def submit(self, request: LMRequest) -> LMResponse:
        """One request; engines with their own scheduler override this and set `continuous`."""
        return (await self.generate([request]))[0]

    def check_health(self) -> None:
        """Raise if the engine can no longer serve (e.g. the server process it owns is gone): Serve then replaces
        the replica. Called every few seconds by the deployment's own `check_health`."""

    def stats(self) -> dict[str, Any]:
        """Engine counters for `info()` (e.g. scheduler steps, prefix-cache hits); empty by default."""
        return {}

    def num_parameters(self) -> float | None:
        """Parameter count, for the FLOPs estimate; None where unknown."""
        return self.spec.params


# backend name -> "module:Class"; imported lazily so that e.g. the openai engine never loads torch.
_ENGINES: dict[str, str] = {
    "hf": "slmshift.serve.engines.hf:HFEngine",
    "simulated": "slmshift.serve.engines.simulated:SimulatedEngine",
    "openai": "slmshift.serve.engines.openai_engine:OpenAIEngine",
    "vllm": "slmshift.serve.engines.vllm_engine:VLLMEngine",
    "workload": "slmshift.serve.engines.workload:WorkloadEngine",  # a teacher answering from a workload file  # a vLLM server from its own env (no vllm import here)
}


# Backends whose engine holds an answer to the request's output constraint (`LMRequest.enforced`): hf with llguidance
# masks, vllm and openai by passing it on as structured outputs / tool_choice. Declared here, not on the classes, so
# the gateway can ask without importing an engine (hf's pulls in torch). It refuses a format that a router arm would
# send to an engine not listed (a 400 naming the option) rather than ignore it.
_ENFORCING: set[str] = {"hf", "vllm", "openai"}


def register_engine(backend: str, target: str, enforces_constraints: bool = False) -> None:
    _ENGINES[backend] = target
    (_ENFORCING.add if enforces_constraints else _ENFORCING.discard)(backend)


def enforces_constraints(backend: str) -> bool:
    """Can this backend's engine hold an answer to the call's output constraint?"""
    return backend in _ENFORCING


def get_engine_class(backend: str) -> type[Engine]:
    if backend not in _ENGINES:
        raise KeyError(f"unknown backend {backend!r}; available: {', '.join(sorted(_ENGINES))}")
    module, _, name = _ENGINES[backend].partition(":")
    return getattr(importlib.import_module(module), name)
