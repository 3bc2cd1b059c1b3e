"""How `slmshift tune` turns paired outcomes into figures it may publish: a three-way split by task, and every figure
on the held-out part with a 95% interval that resamples tasks (or task families), never calls.

- fit: scorers are fitted here (threshold counts, the learned classifier);
- choose: the Tune search replays thresholds here and the operating point is chosen here;
- held out: every reported figure. Nothing reported as held out was used to fit or to choose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from slmshift.platform.errors import SlmshiftError
from slmshift.train.routing import metrics
from slmshift.train.routing.pairs import PairedTable
from slmshift.train.routing.replay import Replay
from slmshift.train.routing.scorers import Fitted


@dataclass
class Split:
    fit: np.ndarray
    choose: np.ndarray
    held: np.ndarray
    unit: str  # "task family", "task" or "row"
    sizes: dict[str, int]  # units per part

    @property
    def search(self) -> np.ndarray:
        """Rows tune may look at before reporting (fit + choose)."""
        return np.sort(np.concatenate([self.fit, self.choose]))


def plural(unit: str) -> str:
    return "task families" if unit == "task family" else f"{unit}s"


def split(table: PairedTable, holdout: float, choose: float, seed: int) -> Split:
    """Seeded disjoint fit / choose / held-out parts. Tasks (or their families, for `family#instance` ids) are kept
    whole on one side; rows when there are no task ids."""
    df = table.df
    has_groups = df["group"].notna().all()
    unit = ("task family" if (df["task"].astype(str) != df["group"].astype(str)).any() else "task") \
        if has_groups else "row"
    groups = (df["group"] if has_groups else df["row"]).astype(str).to_numpy()
    uniq = np.unique(groups)
    if len(uniq) < 3:
        raise SlmshiftError(f"{table.source}: {len(df)} paired call(s) from {len(uniq)} {unit}(s): fitting, choosing "
                            f"and reporting on disjoint parts need at least 3 {plural(unit)}. Fix: run more episodes with "
                            "paired outcomes.")
    perm = np.random.default_rng(seed).permutation(uniq)
    n_held = max(1, min(len(uniq) - 2, round(holdout * len(uniq))))
    n_choose = max(1, min(len(uniq) - n_held - 1, round(choose * len(uniq))))
    part = {g: 2 for g in perm[:n_held]} | {g: 1 for g in perm[n_held:n_held + n_choose]}
    where = np.array([part.get(g, 0) for g in groups])
    return Split(np.flatnonzero(where == 0), np.flatnonzero(where == 1), np.flatnonzero(where == 2), unit,
                 {"fit": len(uniq) - n_held - n_choose, "choose": n_choose, "held_out": n_held})


MIN_VERDICT_UNITS = 10  # as promotion's min_promotion_tasks: below ~10 clusters a percentile cluster bootstrap
# under-covers (its resamples take few distinct values; two task families whose arms tied gave [1.00, 1.00])


def noninferiority(point: float, samples: np.ndarray, budget: float, n_units: int) -> dict[str, Any]:
    """The budget as a non-inferiority verdict on a paired bootstrap of a ratio to always-LLM:
    "yes" when the interval's lower bound is >= budget on at least MIN_VERDICT_UNITS resampled units; "not shown" when
    only the point estimate is, or the units are too few for the interval to be trusted (with the number of units the
    observed effect would need for its bound to clear the budget, scaling the interval by 1/sqrt(n)); "no" when the
    point estimate is below the budget."""
    lo, hi = metrics.interval(samples)
    out: dict[str, Any] = {"value": point, "ci": (lo, hi), "budget": budget, "units": n_units}
    if not (math.isfinite(point) and math.isfinite(lo)):
        return out | {"verdict": "n/a"}
    if lo >= budget:
        if n_units < MIN_VERDICT_UNITS:
            return out | {"verdict": "not shown", "units_needed": MIN_VERDICT_UNITS}
        return out | {"verdict": "yes"}
    if point < budget:
        return out | {"verdict": "no"}
    need = math.inf if point == budget else math.ceil(n_units * ((point - lo) / (point - budget)) ** 2)
    return out | {"verdict": "not shown", "units_needed": need}


class Estimator:
    """Routings replayed on one set of rows, with task-bootstrap 95% intervals (the same resampled tasks for every
    figure, so differences and ratios are paired)."""

    def __init__(self, df: pd.DataFrame, n_boot: int, seed: int):
        self.replay = r = Replay(df)
        counts, uniq, inv = metrics.group_counts(r.groups, n_boot, seed)
        self.n_units = len(uniq)
        self.w_rows = counts[:, inv] * r.w
        self.w_eps = counts[:, np.searchsorted(uniq, r.ep_groups)] if r.episodes else None
        self.n_boot = n_boot

    def levels(self) -> list[str]:
        return ["call", "episode"] if self.replay.episodes else ["call"]

    def _quality(self, mask: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, bootstrap weights) of one level's quality under the routings of `mask` (n, k)."""
        if level == "episode":
            return self.replay.episode_ok(mask), self.w_eps
        return self.replay.outcomes(mask).astype(float), self.w_rows

    def point(self, mask: np.ndarray, cascade: bool = False) -> dict[str, Any]:
        """One routing's figures with intervals: quality (call, episode), cost per call, LLM and SLM share."""
        r = self.replay
        mask = mask if mask.ndim == 2 else mask[:, None]
        res = r.evaluate(mask, cascade)
        out: dict[str, Any] = {}
        for key, vals in (("cost", r.costs(mask, cascade)), ("llm_share", (~mask).astype(float))):
            out[key] = float(res[key][0])
            out[f"{key}_ci"] = metrics.interval(metrics.weighted_mean(self.w_rows, vals)[:, 0])
        out["slm_share"] = 1.0 - out["llm_share"]
        out["slm_share_ci"] = (1.0 - out["llm_share_ci"][1], 1.0 - out["llm_share_ci"][0])
        for level in self.levels():
            vals, w = self._quality(mask, level)
            out[f"quality_{level}"] = float(res[f"quality_{level}"][0])
            out[f"quality_{level}_ci"] = metrics.interval(metrics.weighted_mean(w, vals)[:, 0])
        out["units"] = self.n_units
        out["episodes"] = r.n_episodes
        return out

    def ratio(self, mask: np.ndarray, level: str, budget: float) -> dict[str, Any]:
        """Quality of the routing over always-LLM's on the same tasks: a paired bootstrap and the budget verdict."""
        mask = mask if mask.ndim == 2 else mask[:, None]
        q = self.replay.evaluate(mask)[f"quality_{level}"][0]
        q_llm = self.replay.evaluate(np.zeros_like(mask))[f"quality_{level}"][0]
        point = float(q / q_llm) if q_llm > 0 else float("nan")
        a, w = self._quality(mask, level)
        b, _ = self._quality(np.zeros_like(mask), level)
        num, den = metrics.weighted_mean(w, a)[:, 0], metrics.weighted_mean(w, b)[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            samples = np.where(den > 0, num / den, np.nan)
        return noninferiority(point, samples, budget, self.n_units)

    def policy(self, f: Fitted, idx: np.ndarray, grid: int, baselines: dict, cost_range: tuple[float, float]
               ) -> dict[str, Any]:
        """Curve and RouteLLM/RouterBench metrics of one fitted policy on these rows (`idx`: their table rows), with
        intervals. AIQ uses one cost range for every policy (RouterBench), the always-SLM to always-LLM cost."""
        r = self.replay
        eff = f.effective(idx)
        taus = metrics.threshold_grid(eff, grid) if f.kind != "oracle" else np.append(np.unique(eff), np.inf)
        mask = f.mask(idx, taus)
        cascade = f.kind == "cascade"
        res = r.evaluate(mask, cascade)
        share_b = metrics.weighted_mean(self.w_rows, (~mask).astype(float))
        cost_b = metrics.weighted_mean(self.w_rows, r.costs(mask, cascade))
        c0 = float(baselines["always_slm"]["cost"])
        lo, hi = cost_range
        out: dict[str, Any] = {}
        for level in self.levels():
            q = res[f"quality_{level}"]
            q_weak = float(baselines["always_slm"][f"quality_{level}"])
            q_strong = float(baselines["always_llm"][f"quality_{level}"])
            x, c = res["llm_share"], res["cost"]
            xe, qe, ce = _from_zero(x, q, c, q_weak, c0)
            m = {"apgr": metrics.apgr(xe, qe, q_weak, q_strong), "cpt50": metrics.cpt(xe, qe, 0.5, q_weak, q_strong),
                 "cpt80": metrics.cpt(xe, qe, 0.8, q_weak, q_strong), "aiq": metrics.aiq(ce, qe, lo, hi),
                 "curve": sorted(({"tau": float(t), "llm_share": float(a), "quality": float(b), "cost": float(d),
                                   "pgr": float(p)} for t, a, b, d, p in
                                  zip(taus, x, q, c, metrics.pgr(q, q_weak, q_strong))),
                                 key=lambda p: (p["llm_share"], p["quality"]))}
            if len(xe) > len(x):
                m["joined_to_always_slm"] = True
            vals, w = self._quality(mask, level)
            qb = metrics.weighted_mean(w, vals)  # (B, k)
            # the always-SLM/LLM ends, resampled with the same tasks: a paired bootstrap of the gap
            wb = metrics.weighted_mean(w, self._quality(np.ones((r.n, 1), bool), level)[0])[:, 0]
            sb = metrics.weighted_mean(w, self._quality(np.zeros((r.n, 1), bool), level)[0])[:, 0]
            ap, c5, c8, aq = [], [], [], []
            for b in range(len(qb)):
                xs = share_b[b] if level == "call" else x  # episode level: the call share of the same routing
                xs, qs, cs = _from_zero(xs, qb[b], cost_b[b], wb[b], c0)
                ap.append(metrics.apgr(xs, qs, wb[b], sb[b]))
                c5.append(metrics.cpt(xs, qs, 0.5, wb[b], sb[b]))
                c8.append(metrics.cpt(xs, qs, 0.8, wb[b], sb[b]))
                aq.append(metrics.aiq(cs, qs, lo, hi))
            m.update({"apgr_ci": metrics.interval(ap), "cpt50_ci": metrics.interval(c5),
                      "cpt80_ci": metrics.interval(c8), "aiq_ci": metrics.interval(aq)})
            out[level] = m
        return out


def _from_zero(x: np.ndarray, q: np.ndarray, c: np.ndarray, q0: float, c0: float):
    """A curve that cannot reach an LLM share of 0 (a cascade always escalates a failed check) is joined to
    always-SLM at 0, the random mix of the two in between, so that every policy's APGR, CPT and AIQ span [0, 1]."""
    if len(x) == 0 or np.min(x) <= 1e-12:
        return x, q, c
    return np.append(0.0, x), np.append(q0, q), np.append(c0, c)


def ungraded_share(df: pd.DataFrame, mask: np.ndarray) -> dict[str, Any]:
    """SLM share among calls judged only by validity (their own column, never the headline share)."""
    ug = ~df["graded"].astype(bool).to_numpy()
    return {"calls": int(ug.sum()), "slm_share": float(mask[ug].mean()) if ug.any() else float("nan")}


def choose_point(points: pd.DataFrame, primary: str, q_llm: float, budget: float) -> pd.Series | None:
    """The operating point, on the choose split: the highest SLM share whose quality is at least budget x
    always-LLM's there (ties: higher quality, then lower cost); None when no point qualifies."""
    feasible = points[points[primary] >= budget * q_llm - 1e-12]
    if feasible.empty:
        return None
    return feasible.assign(slm=1 - feasible["llm_share"]).sort_values(
        ["slm", primary, "cost"], ascending=[False, False, True]).iloc[0]


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
