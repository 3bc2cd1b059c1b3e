"""Run summary computed from the S1 log and the episode table: the numbers a researcher publishes.

Infrastructure is not the model: calls with `infra_error` are counted (`infra_errors`) but left out of validity,
correctness, latency and SLM share; episodes lost to dead team actors (error 'infra: …') are left out of success
rate and cost per episode. A rejected SLM attempt (`escalated`: a cascade's, or one a verifier-guided retry replaced)
costs money and time, so it counts in cost and latency, but it did not answer, so it is not in the SLM share. Shadow calls are reported as `shadow_cost_usd`."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from slmshift.platform.render import md_table


def _pct(s: pd.Series, q: float) -> float:
    return float(s.quantile(q)) if len(s) else float("nan")


def _rate(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.astype(float).mean()) if len(s) else float("nan")


def _flag(g: pd.DataFrame, col: str) -> pd.Series:
    return g[col].fillna(False).astype(bool) if col in g.columns else pd.Series(False, index=g.index)


def _answered(g: pd.DataFrame) -> pd.DataFrame:
    """Calls that reached a model: an infrastructure error (dead replica or node, load shed) is not the model's."""
    return g[~_flag(g, "infra_error")]


def _slm_share(g: pd.DataFrame) -> float:
    """Share of answered calls the SLM answered: a rejected SLM attempt (escalated: cascade or retry) did not answer."""
    a = _answered(g)
    a = a[~_flag(a, "escalated")]
    return float((a["tier"] == "slm").mean()) if len(a) else float("nan")


def _call_stats(g: pd.DataFrame) -> dict[str, Any]:
    """Cost and tokens count every call made (escalated attempts too); quality, latency and SLM share only calls
    that reached a model."""
    a = _answered(g)
    return {
        "calls": int(len(g)),
        "tokens_in": int(g["tokens_in"].sum()),
        "tokens_out": int(g["tokens_out"].sum()),
        "cost_usd": float(g["cost_usd"].sum()),
        "flops": float(g["flops"].sum()),
        "latency_p50_s": _pct(a["latency_s"], 0.5),
        "latency_p95_s": _pct(a["latency_s"], 0.95),
        "valid_rate": _rate(a["valid"]),
        "slm_share": _slm_share(g),
        "infra_errors": int(_flag(g, "infra_error").sum()),
        "escalated": int(_flag(g, "escalated").sum()),
    }


def infra_lost(e: pd.DataFrame) -> pd.Series:
    """Episodes recorded as failed because their team actor died under every attempt (not the models' failure)."""
    return e["error"].fillna("").astype(str).str.startswith("infra:")


def summarize(interactions: pd.DataFrame, episodes: pd.DataFrame,
              shadow: pd.DataFrame | None = None) -> dict[str, Any]:
    """Group the log by model, by (scenario, policy) arm and by call kind. `interactions` without shadow records
    (`read_interactions` default); `shadow`: the shadow records, whose cost is shown apart from the arms'."""
    df = interactions
    shadow = shadow if shadow is not None else df.iloc[:0]
    models = []
    for (model, tier, backend), g in df.groupby(["model", "tier", "backend"], sort=True):
        models.append({"model": model, "tier": tier, "backend": backend, "simulated": bool(g["simulated"].any()),
                       **_call_stats(g)})
    arms = []
    for (scenario, policy), e in episodes.groupby(["scenario", "policy"], sort=False):
        calls = df[(df["scenario"] == scenario) & (df["policy"] == policy)]
        sh = shadow[(shadow["scenario"] == scenario) & (shadow["policy"] == policy)]
        stats = _call_stats(calls)
        lost = infra_lost(e)
        ran = e[~lost]  # success and cost per episode over episodes the infrastructure let finish
        arms.append({"scenario": scenario, "policy": policy, "episodes": int(len(e)),
                     "success_rate": float(ran["success"].mean()) if len(ran) else float("nan"),
                     "mean_reward": float(ran["reward"].mean()) if len(ran) else float("nan"),
                     "episode_errors": int(e["error"].notna().sum()), "infra_lost_episodes": int(lost.sum()),
                     "mean_steps": float(ran["steps"].fillna(0).mean()) if len(ran) else float("nan"),
                     "cost_per_episode_usd": stats["cost_usd"] / len(ran) if len(ran) else float("nan"), **stats,
                     "shadow_calls": int(len(sh)), "shadow_cost_usd": float(sh["cost_usd"].sum())})
    kinds = []
    for (scenario, policy, role, kind), g in df.groupby(["scenario", "policy", "role", "call_kind"], sort=False):
        a = _answered(g)
        kinds.append({"scenario": scenario, "policy": policy, "role": role, "call_kind": kind,
                      "category": str(g["category"].mode().iloc[0]), "calls": int(len(g)),
                      "slm_share": _slm_share(g), "valid_rate": _rate(a["valid"]),
                      "correct_rate": _rate(a["correct"]), "latency_p50_s": _pct(a["latency_s"], 0.5),
                      "infra_errors": int(len(g) - len(a)), "escalated": int(_flag(g, "escalated").sum())})
    # Task ids "family#instance" (e.g. a MiniWoB task and its seed) get a per-family table.
    tasks = []
    fam_eps = episodes[episodes["task_id"].str.contains("#", regex=False)]
    fam_eps = fam_eps.assign(family=fam_eps["task_id"].str.split("#").str[0])
    for (scenario, policy, family), e in fam_eps.groupby(["scenario", "policy", "family"], sort=True):
        calls = df[(df["scenario"] == scenario) & (df["policy"] == policy) & df["episode_id"].isin(e["episode_id"])]
        ran = e[~infra_lost(e)]
        tasks.append({"scenario": scenario, "policy": policy, "task": family, "episodes": int(len(e)),
                      "success_rate": float(ran["success"].mean()) if len(ran) else float("nan"),
                      "mean_reward": float(ran["reward"].mean()) if len(ran) else float("nan"),
                      "mean_steps": float(ran["steps"].fillna(0).mean()) if len(ran) else float("nan"),
                      "calls": int(len(calls)), "cost_usd": float(calls["cost_usd"].sum()),
                      "slm_share": _slm_share(calls)})
    totals = _call_stats(df) | {"episodes": int(len(episodes)), "infra_lost_episodes": int(infra_lost(episodes).sum()),
                                "shadow_calls": int(len(shadow)), "shadow_cost_usd": float(shadow["cost_usd"].sum())}
    return {"totals": totals, "models": models, "arms": arms, "call_kinds": kinds, "tasks": tasks}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


TABLES = {
    "Models": ("models", ["model", "tier", "backend", "simulated", "calls", "tokens_in", "tokens_out", "cost_usd",
                          "latency_p50_s", "latency_p95_s", "valid_rate", "infra_errors"]),
    "Scenarios × policies": ("arms", ["scenario", "policy", "episodes", "success_rate", "mean_reward", "mean_steps",
                                      "slm_share", "calls", "escalated", "infra_errors", "cost_usd",
                                      "cost_per_episode_usd", "shadow_cost_usd", "latency_p50_s", "latency_p95_s",
                                      "episode_errors", "infra_lost_episodes"]),
    "Roles and call kinds": ("call_kinds", ["scenario", "policy", "role", "call_kind", "category", "calls",
                                            "slm_share", "valid_rate", "correct_rate", "latency_p50_s", "escalated",
                                            "infra_errors"]),
    "Tasks": ("tasks", ["scenario", "policy", "task", "episodes", "success_rate", "mean_reward", "mean_steps",
                        "calls", "cost_usd", "slm_share"]),
}


def to_markdown(summary: dict[str, Any], title: str) -> str:
    out = [f"# {title}", ""]
    if summary.get("incomplete"):
        inc = summary["incomplete"]
        out += [f"**Interrupted:** {inc['episodes_without_outcome']} episode(s) have no outcome yet; the figures "
                f"below cover the finished ones. Resume with `{inc['resume']}`.", ""]
    out += ["Calls with an infrastructure error (`infra_errors`: a dead replica or node) are left out of quality, "
            "latency and SLM share; rejected SLM attempts (`escalated`: a cascade's, or a retry's) count in cost and "
            "latency but not in SLM share; shadow calls are not part of the arms, their cost is `shadow_cost_usd`.", ""]
    if any(m["simulated"] for m in summary["models"]):
        out += ["Models marked simulated are declared teachers: their quality, latency and price follow a profile.", ""]
    for name, (key, cols) in TABLES.items():
        if not summary.get(key):
            continue
        out += [f"## {name}", ""] + md_table(cols, [[_fmt(row[c]) for c in cols] for row in summary[key]]) + [""]
    return "\n".join(out)


def print_summary(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    for name, (key, cols) in TABLES.items():
        if not summary.get(key):
            continue
        t = Table(title=name, title_justify="left")
        for c in cols:
            t.add_column(c, justify="left" if c in ("model", "tier", "backend", "scenario", "policy", "role", "call_kind",
                                                  "category", "task") else "right")
        for row in summary[key]:
            t.add_row(*(_fmt(row[c]) for c in cols))
        console.print(t)


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=lambda v: None)
