"""The loop's report (LOOP_DIR/report.md and report.html): the paper's case-study table (arXiv 2506.02153, Appendix
B) as measured by verify, beside tune's prediction, with the simulated teacher's profile printed above it.

Every figure comes from `train/routing/measure.py` (how a verify number is computed) and is rendered with
`platform/render.py` (how any report shows it); this module only chooses rows and columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slmshift.platform.config import LoopSection
from slmshift.platform.render import figure, fmt, html_page, md_table

BEFORE_ARM = "tuned-base"  # verify's arm for "before conversion": the tuned router, the SLM without adapters
STAGES = ("collect", "convert", "tune", "verify")
# The paper's estimates of the share of LLM calls SLMs could take (Appendix B), per agent system, and the scenario
# kinds that measure each system: the verify episodes of all of a system's scenarios are pooled into its row.
PAPER_ESTIMATE = {"MetaGPT": 0.60, "Open Operator": 0.40, "Cradle": 0.70}
PAPER_SYSTEM = {"metagpt": "MetaGPT", "operator": "Open Operator", "operator_multiturn": "Open Operator",
                "cradle": "Cradle"}
NEW_FAMILIES, TRAINED_FAMILIES = "new task families", "new seeds of trained families"


def stage_note(st: dict[str, Any]) -> str:
    """The stage's failure, or how many attempts failed before the one that finished (wall s is that one's)."""
    earlier = st.get("earlier_failures") or []
    if "reason" in st or not earlier:
        return st.get("reason", "")
    return f"{len(earlier)} earlier attempt(s) failed (last: {earlier[-1][:200]}); wall s is the final attempt's"


def rows_of(calls: Any, eps: Any, budget: float, arm: str, groups: dict[str, str], trained: dict[str, set[str]]
            ) -> list[dict[str, Any]]:
    """Per table row (an agent system pooling its scenarios, or one scenario), the arm against always-LLM. A scenario
    whose task ids are `family#instance` splits into rows for new task families and new seeds of trained ones."""
    from slmshift.train.routing.measure import arm_vs_llm
    from slmshift.train.routing.pairs import family

    def key(scenario: str, task: str) -> str:
        row = groups.get(scenario, scenario)
        if "#" not in str(task):
            return row
        seen = {family(t) for t in trained.get(scenario, set())}
        return f"{row} · {TRAINED_FAMILIES if family(task) in seen else NEW_FAMILIES}"

    ep_row = [key(s, t) for s, t in zip(eps["scenario"], eps["task_id"])]
    ep_of = dict(zip(eps["episode_id"], ep_row))
    call_row = calls["episode_id"].map(ep_of)
    out = []
    for row in sorted(set(ep_row)):
        sel = np.array([r == row for r in ep_row])
        r = arm_vs_llm(calls[(call_row == row).to_numpy()], eps[sel], arm, budget)
        if r is not None:
            out.append({"row": row, "scenarios": sorted(set(eps[sel & (eps["policy"] == arm).to_numpy()]["scenario"])),
                        **r})
    return out


def prediction_for(chosen: dict[str, Any] | None, scenarios: list[str], all_scenarios: list[str]) -> dict | None:
    """Tune's held-out prediction for a row: its scenario's own where tune gave one, the pooled one when the row is
    every scenario tune saw; None otherwise (a pooled prediction is not one row's)."""
    ho = (chosen or {}).get("held_out")
    if not ho:
        return None
    by = ho.get("by_scenario") or {}
    if len(scenarios) == 1 and scenarios[0] in by:
        return by[scenarios[0]]
    if sorted(scenarios) == sorted(all_scenarios):
        return ho
    return None


def result_cells(r: dict[str, Any], pred: dict | None) -> list[str]:
    from slmshift.train.routing.report import verdict_text

    ratio = r["ratio"]
    if pred:
        q = "quality_episode" if pred.get("quality_episode") is not None else "quality_call"
        predicted = f"{fmt(pred.get('slm_share'), pred.get('slm_share_ci'), pct=True)} / " \
                    f"{fmt(pred.get(q), pred.get(q + '_ci'), pct=True)}"
    return [fmt(r["slm_share"], r["slm_share_ci"], pct=True),
            f"{fmt(r['slm_share_ungraded'], pct=True)} of {r['calls_ungraded']}" if r["calls_ungraded"] else "-",
            f"{fmt(r['success_arm'], pct=True)} vs {fmt(r['success_llm'], pct=True)}",
            fmt(ratio.get("value"), ratio.get("ci"), 2), verdict_text(ratio),
            predicted if pred else "-",
            (f"{fmt(pred.get('cost'), pred.get('cost_ci'), 6)} / " if pred else "- / ")
            + fmt(r["cost_per_call"], r["cost_per_call_ci"], 6),
            f"{r['episodes']} ep / {r['units']} {ratio.get('unit', 'tasks')} / {r['calls_graded']} graded calls",
            f"{fmt(r['cost_per_episode_arm'], None, 4)} vs {fmt(r['cost_per_episode_llm'], None, 4)}",
            f"{fmt(r['latency_p50_arm'], None, 2)} vs {fmt(r['latency_p50_llm'], None, 2)}",
            "simulated" if r["simulated_llm"] else "real"]


RESULTS = ["SLM share of graded calls [95% CI]", "ungraded calls: SLM share", "success tuned vs all-LLM",
           "ratio [95% CI]", "meets budget", "tune predicted: share / success [95% CI]",
           "cost per graded call: predicted / measured (USD)", "n",
           "cost/episode tuned vs LLM (USD)", "latency p50 tuned vs LLM (s)", "LLM"]


def teacher_section(config: dict[str, Any]) -> list[str]:
    from slmshift.train.routing.report import teacher_lines
    from slmshift.train.routing.tune import simulated_profiles

    teachers = simulated_profiles(config.get("models") or [])
    lines = teacher_lines(teachers)
    if not any(t.get("backend") != "workload" for t in teachers):  # workload-file teachers only (or none)
        return lines
    return lines + ["A simulated teacher fails a share of calls set per call kind (more after an upstream error, "
                    "`upstream_penalty`), at random whatever their difficulty: an SLM that replaces those random "
                    "failures can beat always-LLM. A perfect teacher (accuracy 1.0) is the conservative bound.", ""]


def write_report(ld: Path, state: Any) -> None:
    """LOOP_DIR/report.md and report.html (PNG plots embedded), from whatever stages finished."""
    from slmshift.train.routing.measure import against_prediction, read_verify

    config = state.doc.get("config") or {}
    loop = LoopSection.model_validate(config.get("loop") or {})
    scen = config.get("scenarios", [])
    systems = {s.get("name") or s["kind"]: PAPER_SYSTEM.get(s["kind"], s.get("name") or s["kind"]) for s in scen}
    pooled = len(set(systems.values())) < len(systems)  # some system's row pools several scenarios
    iters = {int(k): v for k, v in state.doc["iterations"].items() if k != "0"}
    split = state.doc.get("split") or {}
    trained = {k: set(v.get("train", [])) for k, v in split.items()}
    table, stage_rows, cluster_rows, per_iter, per_scenario, misses = [], [], [], {}, [], []
    for it in sorted(iters):
        for name in STAGES:
            st = iters[it].get(name, {})
            stage_rows.append([str(it), name, st.get("status", "pending"),
                               f"{st['wall_s']:.0f}" if "wall_s" in st else "-", stage_note(st)])
        for c in iters[it].get("convert", {}).get("clusters", []) or []:
            ci = c.get("interval") or {}
            n = f"n={ci['n']}" + (f" tasks / {ci['calls']} calls" if "calls" in ci else "") if ci else ""
            cluster_rows.append([str(it), str(c["id"]), c["label"], f"{c['n_train']}/{c['n_val']}",
                                 fmt(c.get("before"), pct=True), fmt(c.get("after"), pct=True),
                                 f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}] ({n})" if ci else "-",
                                 "yes" if c["promoted"] else "no", c.get("status", "")])
        v = iters[it].get("verify", {})
        if v.get("status") != "done":
            continue
        calls, eps = read_verify(v["run_dir"])
        chosen = iters[it].get("tune", {}).get("chosen")
        tuned_scen = sorted(set(eps["scenario"]))
        per_iter[it] = rows_of(calls, eps, loop.budget, "tuned", {}, trained)
        conv = iters[it].get("convert", {})
        adapters, carried = bool(conv.get("registry")), conv.get("carried") or []
        after = f"{it}: after conversion" + (f" (carried: {', '.join(carried)})" if carried else "")
        arms = ([("0: before conversion", BEFORE_ARM)] if it == 1 and adapters else []) \
            + [(after if adapters else f"{it}: no adapter promoted (base SLM)", "tuned")]
        for label, arm in arms:
            for r in rows_of(calls, eps, loop.budget, arm, systems, trained):
                pred = prediction_for(chosen, r["scenarios"], tuned_scen)
                table.append([label, r["row"], ", ".join(r["scenarios"]),
                              fmt(PAPER_ESTIMATE.get(r["row"].split(" · ")[0]), pct=True)] + result_cells(r, pred))
                misses += [f"{label}, {r['row']}: {m}" for m in (against_prediction(pred, r) if pred else [])]
            if pooled:
                own = per_iter[it] if arm == "tuned" else rows_of(calls, eps, loop.budget, arm, {}, trained)
                per_scenario += [[label, r["row"]] + result_cells(r, prediction_for(chosen, r["scenarios"], tuned_scen))
                                 for r in own]
    n_verify = {k: len(v.get("verify", [])) for k, v in split.items()}
    md = ["# slmshift loop report", "",
          f"Loop dir: `{ld}`. Verify tasks: drawn with loop seed {loop.seed} "
          f"({', '.join(f'{k}: {n}' for k, n in n_verify.items())}), disjoint from every collect; a published table "
          "should use a seed not used while developing.",
          f"Budget: the tuned router keeps verify success >= {loop.budget} x always-LLM's, as non-inferiority: "
          "'yes' only when the lower bound of the paired 95% interval of the ratio clears it; 'not shown' when only "
          "the point estimate does (with the tasks the observed effect would need). Intervals resample tasks (task "
          "families for `family#instance` ids), never calls.",
          "The SLM share counts the calls the scenario graded; calls judged only by their validity (e.g. multi-turn "
          "summaries) are their own column. Cost per episode includes a cascade's rejected attempts.",
          "Row 0 (before conversion) is the tuned router on the base SLM, row N iteration N's router serving the "
          "adapters in force after it: its own promotions, plus earlier ones for tasks it promoted none for "
          "(*carried*), on the same held-out verify tasks. 'tune predicted' is tune's held-out replay of collect's "
          "shadows, which the SLM of collect answered (the base SLM in iteration 1).", ""]
    md += teacher_section(config)
    md += ["## The paper's table, measured (verify episodes on held-out tasks)", ""]
    header = ["iter", "agent system", "scenarios (pooled)", "paper estimate"] + RESULTS
    md += md_table(header, table) if table else ["(no verify stage finished yet)"]
    if misses:
        md += ["", "Measurements outside their prediction (the difference's 95% interval excludes zero):", ""]
        md += [f"- {m}" for m in misses]
    if per_scenario:
        md += ["", "## Each scenario of a pooled row", ""] + md_table(["iter", "scenario"] + RESULTS, per_scenario)
    md += ["", "## SLM share per call kind (verify, tuned arm, graded calls)", ""]
    kinds_rows = [[str(it), r["row"], k, fmt(v, pct=True)] for it, rows in per_iter.items() for r in rows
                  for k, v in sorted(r["slm_share_by_call_kind"].items())]
    md += md_table(["iter", "scenario", "call kind", "SLM share"], kinds_rows) if kinds_rows else ["-"]
    md += ["", "## Held-out accuracy per cluster before/after LoRA (paired task-bootstrap interval of the difference)",
           ""]
    md += md_table(["iter", "cluster", "label", "train/val", "before", "after", "diff [95% CI]", "promoted", "why"],
                   cluster_rows) if cluster_rows else ["-"]
    md += ["", "## Stages", ""] + md_table(["iter", "stage", "status", "wall s", "reason"], stage_rows)
    pngs = plots(ld, per_iter, iters)
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(md) + "\n"
    (ld / "report.md").write_text(text)
    (ld / "report.html").write_text(html_page(text, {p.name: p for p in pngs}, "slmshift loop report"))


def plots(ld: Path, per_iter: dict[int, list[dict]], iters: dict[int, dict]) -> list[Path]:
    out = []
    if per_iter:
        out.append(ld / "loop_trends.png")
        with figure(out[-1], ncols=2, size=(10, 3.6), dpi=90) as axes:
            for s in sorted({r["row"] for rows in per_iter.values() for r in rows}):
                its = [it for it in sorted(per_iter) if any(r["row"] == s for r in per_iter[it])]
                rows = [next(r for r in per_iter[it] if r["row"] == s) for it in its]
                axes[0].plot(its, [r["cost_per_episode_arm"] for r in rows], marker="o", label=f"{s} tuned")
                axes[0].plot(its, [r["cost_per_episode_llm"] for r in rows], ls="--", marker="x", label=f"{s} all-LLM")
                for k in sorted({k for r in rows for k in r["slm_share_by_call_kind"]}):
                    axes[1].plot(its, [r["slm_share_by_call_kind"].get(k, np.nan) for r in rows], marker="o",
                                 label=f"{s}: {k}")
            axes[0].set(title="cost per episode (verify)", xlabel="iteration", ylabel="USD")
            axes[1].set(title="SLM share per call kind (verify, tuned)", xlabel="iteration", ylim=(0, 1))
            for ax in axes:
                ax.legend(fontsize=7)
    for it in sorted(iters):  # each iteration's Pareto front, as tune drew it
        for png in sorted((ld / f"iter-{it}" / "tune").glob("*pareto*.png")):
            dest = ld / f"iter{it}_{png.name}"
            dest.write_bytes(png.read_bytes())
            out.append(dest)
    return out
