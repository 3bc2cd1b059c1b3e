"""S4 select: measure every candidate zero-shot on each cluster's validation calls; pick by quality per cost.

The rule, stated once: a candidate's quality is its held-out accuracy (the scenario checker's verdict), plus
a tenth of its valid-output rate so that, among models that are all wrong, one that at least answers in
the right format ranks higher. Its cost is what it would charge for those calls (its price per token
times the tokens it read and wrote). Score = quality / cost; the highest score wins; ties (all zero
included) go to the cheaper candidate, then the smaller one, then the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from slmshift.train.candidates import Candidate
from slmshift.train.evaluate import CallGrade, EvalResult, evaluate

__all__ = ["Selection", "score", "choose", "select_candidates", "RULE"]

RULE = ("quality / cost, quality = accuracy + 0.1 x valid rate on the cluster's validation calls, "
        "cost = price x tokens for those calls; ties -> cheaper, then fewer parameters")
_VALID_WEIGHT = 0.1
_MIN_COST = 1e-12  # a free model (price 0) still ranks by quality rather than dividing by zero


def cost_usd(c: Candidate, ev: EvalResult) -> float:
    return (c.price.input_per_m * ev.tokens_in + c.price.output_per_m * ev.tokens_out) / 1e6


def quality(ev: EvalResult) -> float:
    return ev.correct_rate + _VALID_WEIGHT * ev.valid_rate


def score(c: Candidate, ev: EvalResult) -> float:
    return quality(ev) / max(cost_usd(c, ev), _MIN_COST)


def choose(results: list[tuple[Candidate, EvalResult]]) -> tuple[Candidate, EvalResult]:
    """The winner under RULE."""
    if not results:
        raise ValueError("no candidates to choose from")
    return min(results, key=lambda ce: (-round(score(*ce), 9), cost_usd(*ce), ce[0].params, ce[0].name))


@dataclass
class Selection:
    """S4's outcome for one cluster."""

    cluster: int
    chosen: Candidate
    before: EvalResult  # the chosen candidate's zero-shot result: the "before tuning" quality
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per candidate

    def summary(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "chosen": self.chosen.name, "rule": RULE, "candidates": self.table}


def select_candidates(val_rows: pd.DataFrame, cluster: int, cands: list[Candidate],
                      grader: Callable[[dict[str, Any], str], CallGrade], *, engines: dict[str, Any] | None = None,
                      threads: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
                      progress: Any = None) -> Selection:
    """Evaluate each candidate on one cluster's validation rows and choose one. `engines` caches loaded
    engines by candidate name across clusters (a model loads once per convert)."""
    from slmshift.serve.engines.base import get_engine_class

    engines = engines if engines is not None else {}
    results = []
    for c in cands:
        spec = c.model_spec(threads=threads)
        if c.name not in engines:
            engines[c.name] = get_engine_class(spec.backend)(spec)
        ev = evaluate(val_rows, spec, None, grader, engine=engines[c.name], batch_size=batch_size,
                      max_new_tokens=max_new_tokens, progress=progress,
                      desc=f"zero-shot {c.name} on cluster {cluster}")
        results.append((c, ev))
    chosen, before = choose(results)
    table = [{"candidate": c.name, "source": c.source, "params": c.params, "license": c.license,
              "memory_mb": c.memory_mb, "context_length": c.context_length, "n": ev.n,
              "accuracy": round(ev.correct_rate, 4), "valid_rate": round(ev.valid_rate, 4),
              "cost_usd": cost_usd(c, ev), "score": score(c, ev), "chosen": c is chosen} for c, ev in results]
    return Selection(cluster, chosen, before, table)
