"""S5's promotion rule: an adapter replaces the base (or the adapter in force) only on evidence, a paired bootstrap
over held-out tasks. The calls of one task are correlated, so resampling them one by one made the interval too narrow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROMOTION_RULE", "paired_interval", "task_groups", "promotion", "challenge", "no_room"]

PROMOTION_RULE = ("promoted only on evidence: the 95% paired-bootstrap interval of adapter - base accuracy on the "
                  "same held-out calls lies above zero, the bootstrap resampling held-out tasks (all of a task's calls "
                  "together; a call without a task id is its own task), on at least min_promotion_tasks tasks")


def paired_interval(before: list[bool], after: list[bool], groups: list[Any] | None = None, *,
                    resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of after - before accuracy over calls: a 95% percentile cluster bootstrap.

    Each resample draws as many groups as there are, with replacement, and takes the mean difference over all their
    paired calls. `groups` (one key per call, e.g. its task id) keeps correlated calls together, so the interval
    reflects how many independent tasks were seen; None makes each call its own group (the plain pair bootstrap).
    """
    import numpy as np

    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if len(d) == 0:
        return 0.0, 0.0, 0.0
    codes = np.arange(len(d))
    if groups is not None:  # groups numbered in order of first appearance: distinct groups draw as calls did
        _, first, inverse = np.unique(np.asarray([str(g) for g in groups]), return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=int)
        rank[np.argsort(first)] = np.arange(len(first))
        codes = rank[inverse.reshape(-1)]
    # per-group sums and sizes: a resample's mean is sum(sums) / sum(sizes) over its drawn groups (no per-call gather)
    sums, sizes = np.bincount(codes, weights=d), np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def task_groups(verdicts: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """(group per call, distinct task ids, calls without one): a call with no task id is its own group."""
    groups = [f"task:{t}" if (t := str(v.get("task_id") or "")) else f"call:{i}" for i, v in enumerate(verdicts)]
    untasked = sum(g.startswith("call:") for g in groups)
    return groups, len(set(groups)) - untasked, untasked


def promotion(before: Any, after: Any, min_tasks: int = 10, seed: int = 0, against: str = "the base"
              ) -> tuple[bool, str, dict[str, Any]]:
    """Apply PROMOTION_RULE to two evaluations of the same held-out calls; returns (promoted, reason, interval).

    The interval dict: diff, low, high, n (tasks resampled, a call without a task id counting as one) and calls.
    """
    b = [bool(v.get("correct")) for v in before.verdicts]
    a = [bool(v.get("correct")) for v in after.verdicts]
    if len(a) != len(b):
        return False, f"base and adapter were judged on different calls ({len(b)} vs {len(a)})", {}
    groups, n_tasks, untasked = task_groups(before.verdicts)
    if groups != task_groups(after.verdicts)[0]:
        return False, "base and adapter were judged on different calls (their task ids differ)", {}
    mean, low, high = paired_interval(b, a, groups, seed=seed)
    n = n_tasks + untasked
    ci = {"diff": mean, "low": low, "high": high, "n": n, "calls": len(a)}
    acc = f"held-out {before.measure} {before.correct_rate:.2f} -> {after.correct_rate:.2f}, diff {mean:+.2f} " \
          f"[{low:+.2f}, {high:+.2f}] on {n} tasks / {len(a)} calls (bootstrap over tasks)"
    if untasked:
        acc += f"; {untasked} call(s) without a task id each resampled as its own task"
    if n < min_tasks:
        return False, f"{acc}: fewer than {min_tasks} held-out tasks, not enough evidence to promote", ci
    if low > 0:
        return True, f"{acc}: interval above zero", ci
    return False, f"{acc}: interval includes zero" if high >= 0 else f"{acc}: worse than {against}", ci


def no_room(before: Any) -> str | None:
    """Why no adapter could be promoted over `before` (an evaluation on the held-out calls), or None: when every call
    is already correct, no paired difference can be positive, so the interval never lies above zero and training
    would be spent for nothing (on the paper-table collect, two of five MetaGPT clusters)."""
    if before.verdicts and all(v.get("correct") for v in before.verdicts):
        return (f"the base answers all {len(before.verdicts)} held-out calls correctly "
                f"({before.measure} {before.correct_rate:.2f}): no adapter could show a gain")
    return None


def challenge(promoted: bool, reason: str, label: str, incumbent: Any, after: Any, min_tasks: int = 10,
              seed: int = 0) -> tuple[bool, str, dict[str, Any]]:
    """The new adapter against the adapter in force for its task (`incumbent`'s evaluation, same held-out calls):
    promoted only if it beats the base (`promoted`, `reason`) and the adapter in force, by the same paired
    task-bootstrap rule. Returns (promoted, reason, the incumbent's figures for the report)."""
    beats, why, interval = promotion(incumbent, after, min_tasks, seed, against="the adapter in force")
    figures = {"label": label, "correct_rate": incumbent.correct_rate, "interval": interval, "beats": beats}
    if not promoted:
        return False, f"{reason}; against the adapter in force {label!r}: {why}", figures
    if not beats:
        return False, f"{reason}; but not over the adapter in force {label!r}, which stays: {why}", figures
    return True, f"{reason}; and over the adapter in force {label!r}: {why}", figures
