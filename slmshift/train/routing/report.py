"""How `slmshift tune` shows its figures: metrics.json, pareto.json, report.md, curves.png, pareto.png and the console
summary, all rendered with `platform/render.py`. Nothing is computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slmshift.platform.render import figure, fmt, md_table
from slmshift.train.routing.estimate import plural


def clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_outputs(out: Path, m: dict[str, Any], pareto: list[dict], trials: pd.DataFrame, primary: str) -> None:
    (out / "pareto.json").write_text(json.dumps(clean(pareto), indent=2))
    (out / "metrics.json").write_text(json.dumps(clean(m), indent=2))
    plots(out, m, trials, primary)
    (out / "report.md").write_text(report_md(m))


def verdict_text(r: dict[str, Any]) -> str:
    """The budget verdict as a reader needs it: yes / no / not shown (with the tasks the observed effect needs)."""
    v = r.get("verdict", "n/a")
    if v == "not shown":
        need = r.get("units_needed")
        if need is not None and r.get("units", 0) < need and r["ci"][0] >= r.get("budget", math.inf):
            return f"not shown (only {r.get('units')} {r.get('unit', 'tasks')}: an interval needs {need} or more)"
        return f"not shown (the observed effect needs ~{need} {r.get('unit', 'tasks')}; have {r.get('units')})" \
            if need is not None and math.isfinite(need) else "not shown"
    return v


def teacher_lines(teachers: list[dict[str, Any]]) -> list[str]:
    """The declared teachers, printed beside every figure they shape: simulated models' profiles, and workload-file
    teachers (their answers are the reference that agreement is measured against)."""
    files = [t for t in teachers if t.get("backend") == "workload"]
    out = []
    if files:
        out += ["Workload-file teachers (they answer from a file of sessions, right by construction; calls no scenario "
                "grades are graded by agreement with their logged answers, not correctness):", ""]
        out += [f"- `{t['name']}` ({t['tier']}): workload-file teacher, `{t.get('file')}`" for t in files]
        out.append("")
    teachers = [t for t in teachers if t.get("backend") != "workload"]
    if not teachers:
        return out
    out += ["Simulated models (declared profiles; every quality figure below depends on them):", ""]
    for t in teachers:
        p = t.get("profile") or {}
        acc = p.get("accuracy") or {}
        acc_s = ", ".join(f"{k} {v}" for k, v in sorted(acc.items())) or "default"
        extra = ", ".join(f"{k} {v}" for k, v in sorted(p.items()) if k != "accuracy")
        out.append(f"- `{t['name']}` ({t['tier']}): accuracy {acc_s}" + (f"; {extra}" if extra else ""))
    return out + [""]


def report_md(m: dict[str, Any]) -> str:
    level = m["quality"]
    s = m["split"]
    lines = ["# Routing tune report", "",
             f"Source: `{m['source']}`: {m['rows']} paired calls, split by {s['unit']} (seed {m['seed']}) into three "
             f"disjoint parts: scorers fitted on {s['fit']} {plural(s['unit'])}, the operating point chosen on "
             f"{s['choose']}, every figure below reported on the {s['held_out']} held out, with 95% intervals "
             f"resampling {plural(s['unit'])}.", "",
             f"Quality: **{level} level**. " + (
                 f"Composed over {m['held_out_episodes']} fully paired held-out episodes (shadows are sampled by "
                 "episode): an episode that succeeded fails when a routed call is wrong where the observed one was "
                 "right; one that failed succeeds when the routing makes every wrong graded call right. Call level "
                 "is also given." if level == "episode" else
                 "Call level: the weighted mean outcome of the graded paired calls."),
             "Cost: " + ("mean USD per graded call from the log (a cascade pays both calls when it escalates)."
                         if m["has_cost"] else "the share of LLM calls (no cost columns)."), ""]
    if m.get("agreement_rows"):
        every = m["agreement_rows"] == m["rows"]
        lines += [f"**Agreement, not correctness**: {'every' if every else m['agreement_rows']} paired call"
                  f"{'' if every else '(s)'} (of {m['rows']}) no scenario grades (gateway traffic) counts as right for "
                  "the SLM when its answer agrees with the teacher's logged answer (tool calls and JSON as parsed "
                  "values, text by token F1 >= 0.8 with the same numbers), and the teacher's own answer as right: "
                  "quality figures below are agreement with the teacher" + (" where those calls weigh in." if not every
                                                                            else "."), ""]
    lines += teacher_lines(m.get("teacher") or [])
    if m["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in m["notes"]] + [""]
    b = m["baselines"]
    lines += ["## Baselines (held out)", ""] + md_table(
        ["routing", "quality (call)", "quality (episode)", "cost/call", "SLM share"],
        [[name, fmt(r["quality_call"], r.get("quality_call_ci")), fmt(r.get("quality_episode"), r.get("quality_episode_ci")),
          fmt(r["cost"], None, 6), fmt(r["slm_share"])]
         for name, r in (("always-LLM", b["always_llm"]), ("always-SLM", b["always_slm"]))])
    c = m["chosen"]
    ho = c["held_out"]
    r = ho.get("quality_ratio_to_llm", {})
    ug = ho.get("ungraded") or {}
    lines += ["", f"## Operating point (budget: quality >= {m['budget']} x always-LLM, non-inferiority)", "",
              f"Chosen on the choose part: **{c['kind']}** tau={fmt(c['tau'])} settings {json.dumps(c['params'])}. "
              "Policy file: `policy.yaml`.", ""] + md_table(["held out", "value [95% CI]"], [
        ["quality (call)", fmt(ho["quality_call"], ho.get("quality_call_ci"))],
        ["quality (episode)", fmt(ho.get("quality_episode"), ho.get("quality_episode_ci"))],
        ["quality / always-LLM (paired)", fmt(r.get("value"), r.get("ci"))],
        ["meets the budget", verdict_text(r)],
        ["SLM share (graded calls)", fmt(ho["slm_share"], ho.get("slm_share_ci"))],
        ["SLM share (ungraded calls, apart)", f"{fmt(ug.get('slm_share'))} of {ug.get('calls', 0)}"],
        ["cost per call", fmt(ho["cost"], ho.get("cost_ci"), 6)]])
    lines += ["", "'meets the budget' is yes only when the lower bound of the paired interval is at least the budget; "
              "not shown when only the point estimate is.", ""]
    for lvl in ("episode", "call") if level == "episode" else ("call",):
        rows = [[p["label"], fmt(p[lvl]["apgr"], p[lvl].get("apgr_ci")), fmt(p[lvl]["cpt50"], p[lvl].get("cpt50_ci")),
                 fmt(p[lvl]["cpt80"], p[lvl].get("cpt80_ci")), fmt(p[lvl]["aiq"], p[lvl].get("aiq_ci")),
                 f"`{json.dumps(p['params'])}`"] for p in m["policies"].values() if lvl in p]
        lines += [f"## Policies ({lvl}-level quality, held out)", ""] + md_table(
            ["policy", "APGR", "CPT(50%)", "CPT(80%)", "AIQ", "settings"], rows) + [""]
    t = m["tune"]
    lines += ["## Search", "", f"Ray Tune + Optuna (two objectives: quality max, cost min), {t['trials']} trials in "
              f"{t['wall_s']:.0f} s ({t['trials_per_s']:.2f} trials/s; {t['replayed_points']} thresholds replayed on "
              f"the choose part, {t['points_per_s']:.0f}/s). Every replayed point: `trials.parquet`; its Pareto front: "
              "`pareto.json`.", "",
              "Metrics: PGR = (q - q_SLM)/(q_LLM - q_SLM) per point; APGR = (AUC - AUC_SLM)/(AUC_LLM - AUC_SLM) "
              "over the LLM-call share (RouteLLM, lm-sys/RouteLLM routellm/evals); CPT(x) = the LLM-call share "
              "needed to recover x of the gap; AIQ = area under the non-decreasing convex hull of (cost, quality) "
              "over one cost range for every policy, always-SLM to always-LLM (RouterBench, withmartian/routerbench). "
              "Definitions: docs/routing.md.", "", "![curves](curves.png)", "", "![pareto](pareto.png)", ""]
    return "\n".join(lines)


def plots(out: Path, m: dict[str, Any], trials: pd.DataFrame, primary: str) -> None:
    level = m["quality"]
    policies, baselines, chosen = m["policies"], m["baselines"], m["chosen"]
    with figure(out / "curves.png") as ax:
        for kind, p in policies.items():
            if level not in p:
                continue
            pts = p[level]["curve"]
            ax.plot([q["llm_share"] for q in pts], [q["quality"] for q in pts], marker=".",
                    linestyle="--" if kind == "oracle" else "-", label=p["label"])
        ax.axhline(baselines["always_llm"][primary], color="red", linestyle=":", label="always-LLM")
        ax.axhline(baselines["always_slm"][primary], color="grey", linestyle=":", label="always-SLM")
        ho = chosen["held_out"]
        ax.plot([ho["llm_share"]], [ho.get(primary, ho["quality_call"])], marker="*", markersize=14, color="black",
                linestyle="none", label="chosen point")
        ax.set(xlabel="LLM calls (share)", ylabel=f"{level}-level quality (held out)",
               title="Quality vs LLM-call share (held out)")
        ax.legend(fontsize=7)
    with figure(out / "pareto.png") as ax:
        ax.scatter(trials["cost"], trials[primary], s=4, color="lightgrey", label="replayed thresholds")
        front = trials[trials["pareto"]].sort_values("cost")
        for kind, g in front.groupby("kind"):
            ax.scatter(g["cost"], g[primary], s=16, label=f"front: {kind}")
        ax.plot(front["cost"], front[primary], color="black", linewidth=0.8)
        s = chosen.get("choose") or {}
        if s:
            ax.plot([s["cost"]], [s.get(primary, s["quality_call"])], marker="*", markersize=14, color="black",
                    linestyle="none", label="chosen point")
        ax.set(xlabel="cost per call", ylabel=f"{level}-level quality (choose part)",
               title="Pareto front found by Ray Tune")
        ax.legend(fontsize=7)


def print_summary(console: Any, m: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    level = m["quality"]
    # every pair graded by agreement with the teacher (gateway traffic): say so wherever quality is shown
    what = "agreement" if m.get("agreement_rows") and m["agreement_rows"] == m["rows"] else "quality"
    t = Table(title=f"routing policies on held-out tasks ({level}-level {what}, 95% CI)")
    for h in ("policy", "APGR", "CPT(50%)", "CPT(80%)", "AIQ"):
        t.add_column(h)
    for p in m["policies"].values():
        q = p.get(level) or p["call"]
        t.add_row(p["label"], fmt(q["apgr"], q.get("apgr_ci")), fmt(q["cpt50"]), fmt(q["cpt80"]), fmt(q["aiq"]))
    console.print(t)
    c, b = m["chosen"], m["baselines"]
    ho = c["held_out"]
    key = f"quality_{level}"
    r = ho.get("quality_ratio_to_llm", {})
    console.print(f"chosen: {c['kind']} tau={fmt(c['tau'])}: held-out {what} {fmt(ho.get(key), ho.get(key + '_ci'))} "
                  f"vs always-LLM {fmt(b['always_llm'].get(key))} (ratio {fmt(r.get('value'), r.get('ci'))}, budget "
                  f"{m['budget']}: {verdict_text(r)}); SLM share {fmt(ho['slm_share'], ho.get('slm_share_ci'))}; "
                  f"cost/call {ho['cost']:.6g} vs {b['always_llm']['cost']:.6g}", soft_wrap=True, highlight=False)
    for line in teacher_lines(m.get("teacher") or [])[2:]:
        console.print(f"  {line}", soft_wrap=True, highlight=False)
    console.print(f"Report: {out}/report.md  Policy: {out}/policy.yaml  (use: router: {{policies: [{{file: "
                  f"{out}/policy.yaml}}]}})", soft_wrap=True, highlight=False)
