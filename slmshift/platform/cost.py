"""Cost model: money from each model's price per 1M tokens; compute as FLOPs ≈ 2 × params × tokens."""

from __future__ import annotations

from slmshift.platform.types import Price


def cost_usd(price: Price, tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * price.input_per_m + tokens_out * price.output_per_m) / 1e6


def flops(params: float | None, tokens_in: int, tokens_out: int) -> float:
    """Forward-pass FLOPs (2 per parameter per token, prompt and output alike); 0 where params are unknown."""
    return 2.0 * (params or 0.0) * (tokens_in + tokens_out)
