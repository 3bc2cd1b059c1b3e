"""Routing metrics over plain arrays: the quality-vs-LLM-share curve, PGR, APGR, CPT(x) and AIQ.

Conventions: a routing score `s` is the estimated probability that the SLM's output is acceptable; a call goes
to the SLM when `s >= tau`, else to the LLM (the strong model). Quality is a mean of 0/1 outcomes (or any score),
`llm_share` is the share of calls the LLM answers, in [0, 1].

Sources (definitions re-implemented here, not copied):
- RouteLLM, lm-sys/RouteLLM, `routellm/evals/benchmarks.py` (`evaluate`: thresholds are the bin edges of
  `pd.qcut(scores, num_results)`, the last edge compared strictly so that it sends every call to the strong
  model) and `routellm/evals/evaluate.py` (`generate_results`: AUC by the trapezoid rule over the strong-call
  share sorted ascending, APGR = (AUC - AUC_weak) / (AUC_strong - AUC_weak) with the weak/strong AUCs taken over
  the same x grid, and CPT(x) = `np.interp(x * (q_strong - q_weak) + q_weak, quality, strong_share)`).
  Their score is the strong model's win rate (strong when high); ours is the SLM's (SLM when high), so their
  `score >= t` is our `s < tau`.
- RouterBench, withmartian/routerbench, `evaluation/AIQ.py` (`get_non_descreasing_convex_hull_of`, `calc_AIQ`)
  and the paper (Hu et al. 2024, sec. 3): AIQ = (1 / (c_max - c_min)) * integral over [c_min, c_max] of the
  non-decreasing convex hull of (cost, quality). The repository divides by the largest cost (x from 0); we
  divide by the cost range as the paper writes it, which matters only when c_min > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Curve:
    """Operating points of one scored policy, sorted by LLM-call share (ascending)."""

    tau: np.ndarray
    llm_share: np.ndarray
    quality: np.ndarray
    cost: np.ndarray

    def points(self) -> list[dict[str, float]]:
        return [{"tau": float(t), "llm_share": float(x), "quality": float(q), "cost": float(c)}
                for t, x, q, c in zip(self.tau, self.llm_share, self.quality, self.cost)]


def threshold_grid(scores: np.ndarray, n: int = 10) -> np.ndarray:
    """RouteLLM's grid: the n+1 quantile bin edges of the scores (duplicates kept, as `pd.qcut(retbins=True)`
    would give after de-duplication), plus one threshold above the largest score, where every call goes to the
    LLM. With `s >= tau -> SLM`, the smallest edge sends every call to the SLM."""
    s = np.asarray(scores, dtype=float)
    if len(s) == 0:
        return np.array([np.inf])
    edges = np.unique(np.quantile(s, np.linspace(0, 1, n + 1)))
    return np.concatenate([edges, [np.inf]])


def route_slm(scores: np.ndarray, tau: float | np.ndarray) -> np.ndarray:
    """Boolean mask of calls sent to the SLM (score >= tau); one column per tau when tau is an array."""
    s = np.asarray(scores, dtype=float)
    t = np.asarray(tau, dtype=float)
    return s[:, None] >= t[None, :] if t.ndim else s >= t


def routed_quality(to_slm: np.ndarray, slm_ok: np.ndarray, llm_ok: np.ndarray) -> np.ndarray:
    """Mean outcome when masked calls take the SLM's outcome and the rest the LLM's (per column if 2-D)."""
    slm_ok, llm_ok = np.asarray(slm_ok, dtype=float), np.asarray(llm_ok, dtype=float)
    if to_slm.ndim == 2:
        slm_ok, llm_ok = slm_ok[:, None], llm_ok[:, None]
    return np.where(to_slm, slm_ok, llm_ok).mean(axis=0)


def routed_cost(to_slm: np.ndarray, slm_cost: np.ndarray, llm_cost: np.ndarray) -> np.ndarray:
    slm_cost, llm_cost = np.asarray(slm_cost, dtype=float), np.asarray(llm_cost, dtype=float)
    if to_slm.ndim == 2:
        slm_cost, llm_cost = slm_cost[:, None], llm_cost[:, None]
    return np.where(to_slm, slm_cost, llm_cost).mean(axis=0)


def curve(scores: np.ndarray, slm_ok: np.ndarray, llm_ok: np.ndarray, slm_cost: np.ndarray | None = None,
          llm_cost: np.ndarray | None = None, taus: np.ndarray | None = None, n: int = 10) -> Curve:
    """Quality, LLM-call share and mean cost per call at each threshold (default: `threshold_grid(scores, n)`).
    Without costs, cost is the LLM-call share. Points are sorted by LLM share, ties by quality."""
    s = np.asarray(scores, dtype=float)
    taus = threshold_grid(s, n) if taus is None else np.asarray(taus, dtype=float)
    mask = route_slm(s, taus)
    share = 1.0 - mask.mean(axis=0) if len(s) else np.zeros(len(taus))
    q = routed_quality(mask, slm_ok, llm_ok)
    c = share if slm_cost is None or llm_cost is None else routed_cost(mask, slm_cost, llm_cost)
    order = np.lexsort((q, share))
    return Curve(taus[order], share[order], q[order], np.asarray(c)[order])


def pgr(quality: np.ndarray | float, q_weak: float, q_strong: float) -> np.ndarray:
    """Performance gap recovered: (q - q_weak) / (q_strong - q_weak); NaN when the two models tie."""
    gap = q_strong - q_weak
    q = np.asarray(quality, dtype=float)
    return np.full_like(q, np.nan) if gap == 0 else (q - q_weak) / gap


def _trapz(y: np.ndarray, x: np.ndarray) -> float:
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)) if len(x) > 1 else 0.0


def auc(llm_share: np.ndarray, quality: np.ndarray) -> float:
    """Area under quality over the LLM-call share, trapezoid rule, points sorted by share."""
    x, y = np.asarray(llm_share, dtype=float), np.asarray(quality, dtype=float)
    o = np.argsort(x, kind="stable")
    return _trapz(y[o], x[o])


def apgr(llm_share: np.ndarray, quality: np.ndarray, q_weak: float, q_strong: float) -> float:
    """Average PGR, RouteLLM's way: (AUC - AUC_weak) / (AUC_strong - AUC_weak), the weak and strong AUCs being
    the constant lines q_weak and q_strong over the same x grid as the curve. NaN when the models tie."""
    x = np.sort(np.asarray(llm_share, dtype=float))
    span = x[-1] - x[0] if len(x) else 0.0
    a_weak, a_strong = q_weak * span, q_strong * span
    if a_strong == a_weak:
        return float("nan")
    return (auc(llm_share, quality) - a_weak) / (a_strong - a_weak)


def cpt(llm_share: np.ndarray, quality: np.ndarray, x: float, q_weak: float, q_strong: float) -> float:
    """Call-performance threshold CPT(x): the smallest LLM-call share at which the curve reaches
    q_weak + x * (q_strong - q_weak), by linear interpolation between consecutive points sorted by share.

    RouteLLM calls `np.interp(target, quality, share)`, which assumes quality increases along the curve; we walk
    the segments in share order and take the first crossing, which is the same on a monotone curve and stays
    meaningful on a noisy one. NaN when the curve never reaches the target."""
    xs, ys = np.asarray(llm_share, dtype=float), np.asarray(quality, dtype=float)
    o = np.lexsort((ys, xs))
    xs, ys = xs[o], ys[o]
    target = q_weak + x * (q_strong - q_weak)
    if len(xs) == 0:
        return float("nan")
    if ys[0] >= target:
        return float(xs[0])
    for i in range(1, len(xs)):
        if ys[i] >= target:
            y0, y1, x0, x1 = ys[i - 1], ys[i], xs[i - 1], xs[i]
            return float(x1 if y1 == y0 else x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return float("nan")


def nondecreasing_hull(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """RouterBench's non-decreasing convex hull of (cost, quality) points, as an (m, 2) array sorted by cost.

    The upper concave hull of the points (any two routers can be mixed, so every point on a segment between two
    points is reachable) cut where it stops rising: past the best-quality point, paying more buys nothing, so the
    hull stays flat there (the flat part is added by `aiq`)."""
    pts = np.unique(np.column_stack([np.asarray(cost, float), np.asarray(quality, float)]), axis=0)
    # per cost keep the best quality
    best: dict[float, float] = {}
    for c, q in pts:
        best[c] = max(q, best.get(c, -np.inf))
    pts = np.array(sorted(best.items()))
    hull: list[tuple[float, float]] = []
    for p in pts:  # Andrew's monotone chain, upper half
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append((float(p[0]), float(p[1])))
    h = np.array(hull)
    top = int(np.argmax(h[:, 1]))  # first point of the maximum quality
    return h[: top + 1]


def aiq(cost: np.ndarray, quality: np.ndarray, c_min: float | None = None, c_max: float | None = None) -> float:
    """RouterBench's Average Improvement in Quality: the area under the non-decreasing convex hull of the points,
    extended flat to c_max, divided by the cost range [c_min, c_max] (default: the points' own range). When the
    range is empty (one cost), AIQ is the best quality at that cost."""
    h = nondecreasing_hull(cost, quality)
    lo = float(h[0, 0]) if c_min is None else float(c_min)
    hi = float(np.max(cost)) if c_max is None else float(c_max)
    if hi <= lo:
        return float(h[:, 1].max())
    xs = np.concatenate([[lo], h[:, 0], [hi]])
    ys = np.concatenate([[h[0, 1]], h[:, 1], [h[-1, 1]]])
    keep = (xs >= lo) & (xs <= hi)
    xs, ys = xs[keep], ys[keep]
    return _trapz(ys, xs) / (hi - lo)


def calibrate_tau(scores: np.ndarray, llm_share: float) -> float:
    """RouteLLM's calibration (`routellm/calibrate_threshold.py`: the (1 - strong share) quantile of the strong
    win rate): with `s >= tau -> SLM`, tau is the `llm_share` quantile of the scores, so that share of calls
    scores below it and goes to the LLM. With tied scores no tau gives the exact share; we take the score value
    whose share is nearest the target (the smaller share on a tie), where a plain quantile can miss it by the
    whole tied block."""
    if not 0 <= llm_share <= 1:
        raise ValueError(f"llm_share must lie in [0, 1], got {llm_share}")
    s = np.sort(np.asarray(scores, dtype=float))
    if len(s) == 0 or llm_share >= 1:
        return float("inf")
    cands = np.append(np.unique(s), np.inf)
    shares = np.searchsorted(s, cands, side="left") / len(s)  # share of calls scoring below each candidate
    return float(cands[int(np.argmin(np.abs(shares - llm_share)))])


def pareto_mask(quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (quality at least as high and cost at most as low, one strictly).
    Exact duplicates of a front point are all kept."""
    q, c = np.asarray(quality, float), np.asarray(cost, float)
    out = np.zeros(len(q), dtype=bool)
    best_cheaper = -np.inf  # best quality among strictly cheaper points
    for cost_value in np.unique(c):
        idx = np.flatnonzero(c == cost_value)
        top = q[idx].max()
        if top > best_cheaper:
            out[idx[q[idx] == top]] = True
        best_cheaper = max(best_cheaper, top)
    return out


def group_counts(groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster-bootstrap draws: (counts (n_boot, n_groups), the groups, each row's group index). Each resample draws
    the groups (tasks, task families) with replacement; counts[b, g] is how often group g was drawn."""
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    counts = np.zeros((n_boot, len(uniq)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(uniq)), draws.ravel()), 1.0)
    return counts, uniq, inv


def bootstrap_groups(groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Cluster-bootstrap weights: (n_boot, n_rows) resample counts, resampling whole groups (tasks or episodes)
    with replacement, so the calls of one task move together."""
    counts, _, inv = group_counts(groups, n_boot, seed)
    return counts[:, inv]


def weighted_mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per resample (rows of `weights`), the weighted mean of `values` (1-D -> (B,), 2-D (n, k) -> (B, k))."""
    tot = weights.sum(axis=1)
    tot = np.where(tot == 0, np.nan, tot)
    out = weights @ np.asarray(values, dtype=float)
    return out / (tot[:, None] if out.ndim == 2 else tot)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples, NaNs dropped."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if len(s) == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    return (float(np.quantile(s, a)), float(np.quantile(s, 1 - a)))
