"""Measured figures of a router arm against always-LLM on the same verify tasks (a verify run of `slmshift tune
--verify` or of the loop), with intervals that resample tasks (or task families), never calls or episodes.

- success: episodes the infrastructure let finish (an episode lost to dead actors, error 'infra: ...', is left out,
  as the run report does); the ratio to always-LLM is a paired task bootstrap and the budget a non-inferiority
  verdict (`estimate.noninferiority`);
- SLM share: over the answers the scenario graded (`correct` known): the headline. Answers judged only by validity
  (e.g. a multi-turn summary) are their own column; a cascade's rejected attempts are not answers, and a retry of
  an invalid answer is not a step of its own (a weaker model retries more, which would change the denominator);
- cost per episode: every call the arm paid for, a cascade's rejected attempts included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from slmshift.platform.report import infra_lost
from slmshift.train.routing import metrics
from slmshift.train.routing.estimate import noninferiority
from slmshift.train.routing.pairs import family

BASELINE = "all-llm"


def read_verify(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A verify run's (calls, episodes): every non-shadow call that reached a model, episodes that finished."""
    from slmshift.platform.log import read_episodes, read_interactions

    calls = read_interactions(run_dir)
    eps = read_episodes(run_dir)
    return calls[~calls["infra_error"].astype(bool)], eps[~infra_lost(eps)]


def _task(df: pd.DataFrame) -> pd.Series:
    """A task's key: scenarios of one pooled row may share task ids (a BFCL id in two categories is two tasks)."""
    return df["scenario"].astype(str) + "\x1f" + df["task_id"].astype(str)


def _unit(task_key: str) -> str:
    """The unit intervals resample: the task, or its family for `family#instance` ids."""
    scenario, task = task_key.split("\x1f", 1)
    return f"{scenario}\x1f{family(task)}"


def _task_boot(units: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    counts, _, inv = metrics.group_counts(units.astype(str), n_boot, seed)
    return counts, inv


def arm_vs_llm(calls: pd.DataFrame, eps: pd.DataFrame, arm: str, budget: float, *, baseline: str = BASELINE,
               n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The arm against `baseline` on the tasks both ran; None when the arm has no episode."""
    a, b = eps[eps["policy"] == arm], eps[eps["policy"] == baseline]
    if a.empty:
        return None
    tasks = sorted(set(_task(a)) & set(_task(b)))
    units = np.array([_unit(t) for t in tasks], dtype=object)
    counts, inv = _task_boot(units, n_boot, seed) if len(tasks) else (np.zeros((n_boot, 0)), np.zeros(0, int))
    w = counts[:, inv] if len(tasks) else np.zeros((n_boot, 0))

    def per_task(e: pd.DataFrame) -> np.ndarray:
        s = e.groupby(_task(e).to_numpy())["success"].mean()
        return s.reindex(tasks).to_numpy(float)

    s_arm, s_llm = per_task(a), per_task(b)
    point = float(s_arm.mean() / s_llm.mean()) if len(tasks) and s_llm.mean() > 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = (w @ s_arm) / (w @ s_llm) if len(tasks) else np.array([np.nan])
    verdict = noninferiority(point, samples, budget, len(set(units)))
    verdict["unit"] = "task families" if any(u != t for u, t in zip(units, tasks)) else "tasks"
    c_arm = calls[calls["policy"] == arm]
    answers = c_arm[~c_arm["escalated"].astype(bool)]
    retry = _retries(answers)
    graded = answers[answers["correct"].notna() & ~retry]
    ungraded = answers[answers["correct"].isna()]
    share, share_ci = _share(graded, n_boot, seed)
    c_llm = calls[calls["policy"] == baseline]
    n_ep = lambda e: max(1, len(e))  # noqa: E731
    return {
        "episodes": int(len(a)), "tasks": len(tasks), "units": len(set(units)),
        "success_arm": float(a["success"].mean()), "success_llm": float(b["success"].mean()) if len(b) else float("nan"),
        "success_arm_ci": metrics.interval((w @ s_arm) / np.maximum(w.sum(axis=1), 1)) if len(tasks) else (np.nan,) * 2,
        "ratio": verdict,
        "calls_graded": int(len(graded)), "slm_share": share, "slm_share_ci": share_ci,
        "calls_ungraded": int(len(ungraded)),
        "slm_share_ungraded": float((ungraded["tier"] == "slm").mean()) if len(ungraded) else float("nan"),
        "escalated_attempts": int(c_arm["escalated"].astype(bool).sum()), "retries": int(retry.sum()),
        **_cost_per_call(c_arm, graded, n_boot, seed),
        "cost_per_episode_arm": float(c_arm["cost_usd"].sum() / n_ep(a)),
        "cost_per_episode_llm": float(c_llm["cost_usd"].sum() / n_ep(b)) if len(b) else float("nan"),
        "latency_p50_arm": float(answers["latency_s"].median()) if len(answers) else float("nan"),
        "latency_p50_llm": float(c_llm["latency_s"].median()) if len(c_llm) else float("nan"),
        "slm_share_by_call_kind": graded.groupby("call_kind")["tier"].apply(
            lambda t: float((t == "slm").mean())).to_dict(),
        "simulated_llm": bool(c_llm["simulated"].astype(bool).all()) if len(c_llm) else False,
    }


def _cost_per_call(paid: pd.DataFrame, graded: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    """Everything the arm paid (rejected attempts and retries included) per graded answer, as tune predicts it, with
    a task-bootstrap interval of the ratio."""
    if graded.empty:
        return {"cost_per_call": float("nan"), "cost_per_call_ci": (float("nan"), float("nan"))}
    keys = sorted(set(_task(paid)))
    cost = paid.groupby(_task(paid).to_numpy())["cost_usd"].sum().reindex(keys).fillna(0).to_numpy(float)
    n = graded.groupby(_task(graded).to_numpy()).size().reindex(keys).fillna(0).to_numpy(float)
    counts, inv = _task_boot(np.array([_unit(k) for k in keys], dtype=object), n_boot, seed)
    w = counts[:, inv]
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = (w @ cost) / (w @ n)
    return {"cost_per_call": float(cost.sum() / n.sum()), "cost_per_call_ci": metrics.interval(samples)}


def _retries(answers: pd.DataFrame) -> pd.Series:
    """Calls that retry the one before (same episode, role and call kind, after an invalid answer). A weaker model
    makes more of them, so counting them would give each arm's share a different denominator; the share counts each
    step once, at its first answer."""
    if answers.empty:
        return pd.Series(False, index=answers.index)
    a = answers.sort_values(["episode_id", "call_index"])
    prev = a.shift(1)
    same = (a["episode_id"] == prev["episode_id"]) & (a["role"] == prev["role"]) & (a["call_kind"] == prev["call_kind"])
    return (same & (prev["valid"] == False)).reindex(answers.index).fillna(False).astype(bool)  # noqa: E712


def _share(graded: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, tuple[float, float]]:
    """SLM share of graded answers, its interval resampling task families (all calls of a task move together)."""
    if graded.empty:
        return float("nan"), (float("nan"), float("nan"))
    slm = (graded["tier"] == "slm").to_numpy(float)
    counts, inv = _task_boot(_task(graded).map(_unit).to_numpy(), n_boot, seed)
    w = counts[:, inv]
    return float(slm.mean()), metrics.interval((w @ slm) / np.maximum(w.sum(axis=1), 1e-12))


def against_prediction(pred: dict[str, Any], meas: dict[str, Any]) -> list[str]:
    """Lines for each figure whose measurement falls outside its prediction: the difference's 95% interval (both
    intervals' half-widths combined as independent normal errors) excludes zero."""
    out = []
    for name, p, pci, m, mci in (
            ("SLM share", pred.get("slm_share"), pred.get("slm_share_ci"), meas.get("slm_share"), meas.get("slm_share_ci")),
            ("episode success", pred.get("quality_episode"), pred.get("quality_episode_ci"), meas.get("success_arm"),
             meas.get("success_arm_ci"))):
        if p is None or m is None or pci is None or mci is None or not np.isfinite([p, m, *pci, *mci]).all():
            continue
        half = np.hypot((pci[1] - pci[0]) / 2, (mci[1] - mci[0]) / 2)
        if abs(m - p) > half:
            out.append(f"{name}: measured {m:.3f} [{mci[0]:.3f}, {mci[1]:.3f}] lies outside the prediction "
                       f"{p:.3f} [{pci[0]:.3f}, {pci[1]:.3f}]")
    return out
