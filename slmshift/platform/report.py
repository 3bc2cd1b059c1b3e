"""Run summary computed from the S1 log and the episode table: the numbers a researcher publishes."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd


def _pct(s: pd.Series, q: float) -> float:
    return float(s.quantile(q)) if len(s) else float("nan")


def _rate(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.astype(float).mean()) if len(s) else float("nan")


def _call_stats(g: pd.DataFrame) -> dict[str, Any]:
    return {
        "calls": int(len(g)),
        "tokens_in": int(g["tokens_in"].sum()),
        "tokens_out": int(g["tokens_out"].sum()),
        "cost_usd": float(g["cost_usd"].sum()),
        "flops": float(g["flops"].sum()),
        "latency_p50_s": _pct(g["latency_s"], 0.5),
        "latency_p95_s": _pct(g["latency_s"], 0.95),
        "valid_rate": _rate(g["valid"]),
        "slm_share": float((g["tier"] == "slm").mean()) if len(g) else float("nan"),
    }


def summarize(interactions: pd.DataFrame, episodes: pd.DataFrame) -> dict[str, Any]:
    """Group the log by model, by (scenario, policy) arm and by call kind."""
    df = interactions
    models = []
    for (model, tier, backend), g in df.groupby(["model", "tier", "backend"], sort=True):
        models.append({"model": model, "tier": tier, "backend": backend, "simulated": bool(g["simulated"].any()),
                       **_call_stats(g)})
    arms = []
    for (scenario, policy), e in episodes.groupby(["scenario", "policy"], sort=False):
        calls = df[(df["scenario"] == scenario) & (df["policy"] == policy)]
        stats = _call_stats(calls)
        arms.append({"scenario": scenario, "policy": policy, "episodes": int(len(e)),
                     "success_rate": float(e["success"].mean()), "mean_reward": float(e["reward"].mean()),
                     "episode_errors": int(e["error"].notna().sum()),
                     "mean_steps": float(e["steps"].fillna(0).mean()),
                     "cost_per_episode_usd": stats["cost_usd"] / len(e), **stats})
    kinds = []
    for (scenario, policy, role, kind), g in df.groupby(["scenario", "policy", "role", "call_kind"], sort=False):
        kinds.append({"scenario": scenario, "policy": policy, "role": role, "call_kind": kind,
                      "category": str(g["category"].mode().iloc[0]), "calls": int(len(g)),
                      "slm_share": float((g["tier"] == "slm").mean()), "valid_rate": _rate(g["valid"]),
                      "correct_rate": _rate(g["correct"]), "latency_p50_s": _pct(g["latency_s"], 0.5)})
    # Task ids "family#instance" (e.g. a MiniWoB task and its seed) get a per-family table.
    tasks = []
    fam_eps = episodes[episodes["task_id"].str.contains("#", regex=False)]
    fam_eps = fam_eps.assign(family=fam_eps["task_id"].str.split("#").str[0])
    for (scenario, policy, family), e in fam_eps.groupby(["scenario", "policy", "family"], sort=True):
        calls = df[(df["scenario"] == scenario) & (df["policy"] == policy) & df["episode_id"].isin(e["episode_id"])]
        tasks.append({"scenario": scenario, "policy": policy, "task": family, "episodes": int(len(e)),
                      "success_rate": float(e["success"].mean()), "mean_reward": float(e["reward"].mean()),
                      "mean_steps": float(e["steps"].fillna(0).mean()), "calls": int(len(calls)),
                      "cost_usd": float(calls["cost_usd"].sum()),
                      "slm_share": float((calls["tier"] == "slm").mean()) if len(calls) else float("nan")})
    return {"totals": _call_stats(df) | {"episodes": int(len(episodes))}, "models": models, "arms": arms,
            "call_kinds": kinds, "tasks": tasks}


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
                          "latency_p50_s", "latency_p95_s", "valid_rate"]),
    "Scenarios × policies": ("arms", ["scenario", "policy", "episodes", "success_rate", "mean_reward", "mean_steps",
                                      "slm_share", "calls", "cost_usd", "cost_per_episode_usd", "latency_p50_s",
                                      "latency_p95_s", "episode_errors"]),
    "Roles and call kinds": ("call_kinds", ["scenario", "policy", "role", "call_kind", "category", "calls",
                                            "slm_share", "valid_rate", "correct_rate", "latency_p50_s"]),
    "Tasks": ("tasks", ["scenario", "policy", "task", "episodes", "success_rate", "mean_reward", "mean_steps",
                        "calls", "cost_usd", "slm_share"]),
}


def to_markdown(summary: dict[str, Any], title: str) -> str:
    out = [f"# {title}", ""]
    if any(m["simulated"] for m in summary["models"]):
        out += ["Models marked simulated are declared teachers: their quality, latency and price follow a profile.", ""]
    for name, (key, cols) in TABLES.items():
        if not summary.get(key):
            continue
        out += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in summary[key]]
        out.append("")
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
