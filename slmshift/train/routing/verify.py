"""`slmshift tune --verify`: real episodes at the chosen point and at always-LLM on tasks the tuned run never saw,
through the normal runner, measured (`measure.py`) and set beside the held-out prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.render import fmt, md_table
from slmshift.train.routing.measure import BASELINE, against_prediction, arm_vs_llm, read_verify


def _seen(run_dir: str) -> set[str]:
    from slmshift.platform.log import read_interactions

    return {str(t) for t in read_interactions(run_dir, include_shadow=True)["task_id"].dropna() if str(t)}


def unseen_tasks(run_dir: str) -> dict[str, int]:
    """Per scenario of the run, how many tasks of its pool the run never used; a scenario with none left is an error
    that says how large the pool is and how many the run used."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.scenario import scenario_class, scenario_options
    from slmshift.runner import read_run_config

    cfg = read_run_config(run_dir, scenario_options())
    seen = _seen(run_dir)
    out = {}
    for spec in cfg.scenarios:
        seed = cfg.experiment.seed if spec.seed is None else spec.seed
        ask = spec.model_copy(update={"episodes": spec.episodes + len(seen), "exclude_tasks": []})
        pool = {str(t.id) for t in scenario_class(spec.kind)(ask, seed).tasks()}
        used = len(pool & seen)
        out[spec.label] = len(pool) - used
        if used >= len(pool):
            raise SlmshiftError(f"slmshift tune --verify: scenario {spec.label!r} has {len(pool)} task(s) in its pool "
                                f"and the tuned run used {used}: none is left to verify on. Fix: widen the scenario's "
                                "task options (categories, problems, tasks), or tune a run that used fewer episodes.")
    return out


def verify(run_dir: str, out_dir: str, *, episodes: int | None = None, console: Any = None,
           address: str | None = None) -> dict[str, Any]:
    import yaml
    from rich.console import Console

    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import run_experiment

    console = console or Console()
    out = Path(out_dir)
    cfg_path, policy_path = Path(run_dir) / "config.yaml", out / "policy.yaml"
    if not cfg_path.is_file():
        raise SlmshiftError(f"{run_dir}: no config.yaml, so its episodes cannot be re-run. --verify needs a run "
                            "directory printed by `slmshift run` (not --pairs data).")
    if not policy_path.is_file():
        raise SlmshiftError(f"{policy_path}: not found. Fix: run `slmshift tune {run_dir}` first.")
    unseen_tasks(run_dir)
    m = json.loads((out / "metrics.json").read_text())
    data = yaml.safe_load(cfg_path.read_text())
    seen = sorted(_seen(run_dir))
    data["experiment"]["name"] = f"{data['experiment']['name']}-verify"
    data["router"] = {"policies": [{"file": str(policy_path.resolve())}, {"kind": "llm", "name": BASELINE}]}
    for s in data["scenarios"]:
        s["exclude_tasks"] = sorted(set(s.get("exclude_tasks") or []) | set(seen))
        if episodes:
            s["episodes"] = episodes
    vpath = out / "verify.yaml"
    vpath.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(vpath, scenario_options())
    arm = cfg.router.policies[0].label
    result = run_experiment(cfg, address=address, console=console)
    if result.interrupted:  # Ctrl-C: the partial verify run is on disk; do not compare a part with the prediction
        raise KeyboardInterrupt
    calls, eps = read_verify(result.run_dir)
    meas = arm_vs_llm(calls, eps, arm, m["budget"]) or {}
    pred = m["chosen"]["held_out"]
    rows = [["SLM share (graded calls)", fmt(pred.get("slm_share"), pred.get("slm_share_ci")),
             fmt(meas.get("slm_share"), meas.get("slm_share_ci"))],
            ["episode success", fmt(pred.get("quality_episode"), pred.get("quality_episode_ci")),
             fmt(meas.get("success_arm"), meas.get("success_arm_ci"))],
            ["success / always-LLM", fmt(pred["quality_ratio_to_llm"].get("value"), pred["quality_ratio_to_llm"].get("ci")),
             fmt((meas.get("ratio") or {}).get("value"), (meas.get("ratio") or {}).get("ci"))],
            ["meets the budget", pred["quality_ratio_to_llm"].get("verdict", "n/a"),
             (meas.get("ratio") or {}).get("verdict", "n/a")],
            ["cost per graded call", fmt(pred.get("cost"), pred.get("cost_ci"), 6), fmt(meas.get("cost_per_call"), meas.get("cost_per_call_ci"), 6)]]
    misses = against_prediction(pred, meas)
    from rich.table import Table

    t = Table(title=f"verify: predicted (held-out replay) vs measured ({meas.get('episodes', 0)} episodes a side on "
                    f"{meas.get('tasks', 0)} unseen tasks)")
    for h in ("figure", "predicted [95% CI]", "measured [95% CI]"):
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    for line in misses:
        console.print(f"[yellow]outside the prediction:[/] {line}", highlight=False)
    doc = {"run_dir": result.run_dir, "excluded_tasks": len(seen), "predicted": pred, "measured": meas,
           "outside_prediction": misses}
    from slmshift.train.routing.report import clean

    (out / "verify.json").write_text(json.dumps(clean(doc), indent=2))
    with open(out / "report.md", "a") as f:
        f.write("\n".join(["", "## Verification on unseen tasks", ""] +
                          md_table(["figure", "predicted [95% CI]", "measured [95% CI]"], rows) +
                          ["", f"New run: `{result.run_dir}` ({meas.get('episodes', 0)} episodes per arm, {len(seen)} "
                           "tasks of the tuned run excluded)."] +
                          [f"- outside the prediction: {x}" for x in misses]) + "\n")
    return doc
