"""The engine interface: one async method over a batch of requests."""

from __future__ import annotations

import abc
import importlib
from typing import ClassVar

from slmshift.platform.types import LMRequest, LMResponse, ModelSpec


class Engine(abc.ABC):
    """A model backend. A Serve replica builds one and hands it batches collected by `@serve.batch`.

    Engines never know who calls them. `generate` returns exactly one response per request, in order;
    a failure for one request is an `LMResponse` with `error` set, not an exception.
    """

    backend: ClassVar[str]

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @abc.abstractmethod
    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]: ...

    def num_parameters(self) -> float | None:
        """Parameter count, for the FLOPs estimate; None where unknown."""
        return self.spec.params


# backend name -> "module:Class"; imported lazily so that e.g. the openai engine never loads torch.
_ENGINES: dict[str, str] = {
    "hf": "slmshift.serve.engines.hf:HFEngine",
    "simulated": "slmshift.serve.engines.simulated:SimulatedEngine",
    "openai": "slmshift.serve.engines.openai_engine:OpenAIEngine",
}


def register_engine(backend: str, target: str) -> None:
    _ENGINES[backend] = target


def get_engine_class(backend: str) -> type[Engine]:
    if backend not in _ENGINES:
        raise KeyError(f"unknown backend {backend!r}; available: {', '.join(sorted(_ENGINES))}")
    module, _, name = _ENGINES[backend].partition(":")
    return getattr(importlib.import_module(module), name)
