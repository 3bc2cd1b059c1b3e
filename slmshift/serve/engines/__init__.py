"""Engines: the backends behind a model deployment. `get_engine_class(backend)` picks one by name."""

from __future__ import annotations

from slmshift.serve.engines.base import Engine, get_engine_class, register_engine

__all__ = ["Engine", "get_engine_class", "register_engine"]
