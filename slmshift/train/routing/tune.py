"""`slmshift tune`: router policies searched with Ray Tune on paired outcomes, chosen and reported on disjoint tasks.

Flow: paired table (`pairs.py`) -> a seeded three-way split by task (`estimate.split`: fit / choose / held out) ->
a Ray Tune search (`search.py`): each trial fits its scorer on the fit part and replays a grid of thresholds on the
choose part -> the operating point: the highest SLM share whose choose-part quality is at least `budget` x
always-LLM's -> every curve, metric and that point on the held-out part with task-bootstrap 95% intervals, and the
budget as a non-inferiority verdict (`estimate.py`) -> files (`report.py`).

Quality is episode level (composed over fully paired episodes, `replay.py`) when the held-out part has at least
`min_episodes` of them, else call level; the report says which.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.train.routing import metrics
from slmshift.train.routing.estimate import (Estimator, Split, choose_point, params_key, plural, split,
                                             ungraded_share)
from slmshift.train.routing.pairs import PairedTable
from slmshift.train.routing.replay import Replay
from slmshift.train.routing.scorers import KINDS, LABELS, Fitted, fit_scorer


class TuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: float = Field(default=0.95, gt=0, le=1.5, description="Relative quality budget: the chosen point keeps "
                          "quality >= budget x always-LLM's.")
    holdout: float = Field(default=0.4, gt=0, lt=1, description="Share of tasks held out for reporting.")
    choose: float = Field(default=0.3, gt=0, lt=1, description="Share of tasks the operating point is chosen on (the "
                          "rest fit the scorers).")
    min_episodes: int = Field(default=10, ge=1, description="Fully paired held-out episodes needed for episode-level "
                              "quality (else call level).")
    seed: int = Field(default=0, description="Seeds the split, the search and the bootstrap.")
    time_budget_s: float = Field(default=300.0, gt=0, description="Wall-clock budget of the Tune search.")
    trials: int = Field(default=200, ge=1, description="Most Tune trials (the time budget usually ends it first).")
    grid: int = Field(default=40, ge=2, description="Quantile thresholds each trial replays.")
    report_grid: int = Field(default=20, ge=2, description="Quantile thresholds of each held-out curve.")
    n_boot: int = Field(default=1000, ge=50, description="Bootstrap resamples (of tasks) for the 95% intervals.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded Ray (default all).")
    kinds: list[str] = Field(default_factory=lambda: list(KINDS), description="Policy kinds to search.")
    progress: bool = Field(default=True, description="Show progress on the console.")


@dataclass
class TuneResult:
    out_dir: str
    metrics: dict[str, Any]
    chosen: dict[str, Any]
    policy_file: str
    table: PairedTable


def _deployable(kind: str, table: PairedTable) -> bool:
    return kind != "threshold_cluster" or table.clusters_dir is not None


def attempts(params: dict[str, Any]) -> int:
    """A point's `slm_attempts` (searched when the collect logged retries; 1 otherwise)."""
    return int(params.get("slm_attempts", 1))


class View(NamedTuple):
    """The paired table, held-out estimator and choose replay as an SLM answering up to k times would give them."""

    table: PairedTable
    held: Estimator
    choose: Replay


def quality_level(choose: Replay, held: Replay, min_episodes: int) -> str:
    """Episode level when both parts have fully paired episodes and the held-out part at least `min_episodes`."""
    return "episode" if choose.episodes and held.episodes and held.n_episodes >= min_episodes else "call"


class Planner:
    """The estimator without the search: given candidate points (kind, settings, tau), fit on the fit part, choose on
    the choose part, report on the held-out part, at the level (`episode` or `call`) the parts allow. `tune_routing`
    feeds it Tune's points; the known-truth tests feed it a grid directly."""

    def __init__(self, table: PairedTable, parts: Split, opts: TuneOptions):
        self.table, self.parts, self.opts = table, parts, opts
        self._views: dict[int, View] = {}
        _, self.held, self.choose_replay = self.view({})
        self.level = quality_level(self.choose_replay, self.held.replay, opts.min_episodes)
        self.primary = f"quality_{self.level}"
        self._fitted: dict[tuple[str, str], Fitted] = {}
        llm = np.zeros((self.held.replay.n, 1), bool)
        self.baselines = {"always_llm": self.held.point(llm), "always_slm": self.held.point(~llm)}

    def view(self, params: dict[str, Any]) -> View:
        """The parts as a point with `params` sees them: its `slm_attempts` (1 unless searched)."""
        k = attempts(params)
        if k not in self._views:
            t = self.table.at_attempts(k)
            self._views[k] = View(t, Estimator(t.df.iloc[self.parts.held], self.opts.n_boot, self.opts.seed),
                                  Replay(t.df.iloc[self.parts.choose]))
        return self._views[k]

    def fitted(self, kind: str, params: dict[str, Any]) -> Fitted:
        key = (kind, params_key(params))
        if key not in self._fitted:
            self._fitted[key] = fit_scorer(kind, params, self.view(params).table, self.parts.fit,
                                           seed=self.opts.seed)
        return self._fitted[key]

    def held_mask(self, kind: str, params: dict[str, Any], tau: float | None) -> np.ndarray:
        if kind == "llm" or tau is None:
            return np.zeros((self.held.replay.n, 1), bool)
        return self.fitted(kind, params).mask(self.parts.held, np.array([tau]))

    def held_point(self, kind: str, params: dict[str, Any], tau: float | None) -> dict[str, Any]:
        mask = self.held_mask(kind, params, tau)
        held = self.view(params).held
        out = held.point(mask, cascade=kind == "cascade")
        out["quality_ratio_to_llm"] = held.ratio(mask, self.level, self.opts.budget)
        out["ungraded"] = ungraded_share(self.table.df.iloc[self.parts.held], mask[:, 0])
        by = {}
        scen = self.table.df["scenario"].iloc[self.parts.held]
        if scen.notna().all() and scen.nunique() > 1:  # per scenario: what the loop's table sets beside verify
            for name in sorted(scen.unique()):
                rows = np.flatnonzero((scen == name).to_numpy())
                est = Estimator(self.view(params).table.df.iloc[self.parts.held[rows]], self.opts.n_boot,
                                self.opts.seed)
                by[name] = est.point(mask[rows], cascade=kind == "cascade")
        if by:
            out["by_scenario"] = by
        return out

    def choose_on(self, points: Any) -> dict[str, Any]:
        """The operating point among `points` (a frame of kind, params JSON, tau and choose-part figures)."""
        q_llm = self.choose_replay.evaluate(np.zeros((self.choose_replay.n, 1), bool))[self.primary][0]
        best = choose_point(points, self.primary, q_llm, self.opts.budget)
        if best is None:
            return {"kind": "llm", "params": {}, "tau": None, "choose": {},
                    "held_out": self.held_point("llm", {}, None)}
        params = json.loads(best["params"])
        return {"kind": best["kind"], "params": params, "tau": float(best["tau"]),
                "choose": {k: float(best[k]) for k in ("quality_call", "cost", "llm_share") + (
                    ("quality_episode",) if self.level == "episode" else ())},
                "held_out": self.held_point(best["kind"], params, float(best["tau"]))}

    def grid_points(self, kind: str, params: dict[str, Any], grid: int) -> list[dict[str, Any]]:
        """A threshold grid of one scorer replayed on the choose part (what one Tune trial reports)."""
        f = self.fitted(kind, params)
        c = self.parts.choose
        taus = metrics.threshold_grid(f.effective(c), grid)
        res = self.view(params).choose.evaluate(f.mask(c, taus), cascade=kind == "cascade")
        return [{"kind": kind, "params": params_key(params), "tau": float(t),
                 **{k: float(v[i]) for k, v in res.items()}} for i, t in enumerate(taus)]


def tune_routing(table: PairedTable, out_dir: str, opts: TuneOptions | None = None, console: Any = None) -> TuneResult:
    from rich.console import Console

    from slmshift.train.routing.report import print_summary, write_outputs
    from slmshift.train.routing.search import run_search

    opts = opts or TuneOptions()
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if opts.holdout + opts.choose >= 1:
        raise SlmshiftError(f"slmshift tune: holdout ({opts.holdout}) + choose ({opts.choose}) must leave tasks to fit "
                            "the scorers on. Fix: make their sum < 1.")
    parts = split(table, opts.holdout, opts.choose, opts.seed)
    need = table.requirements()
    kinds, skipped = [], {}
    for k in opts.kinds:
        if k not in need:
            raise SlmshiftError(f"slmshift tune: unknown policy kind {k!r}; available: {', '.join(KINDS)}")
        (skipped.__setitem__(k, need[k]) if need[k] else kinds.append(k))
    notes = list(table.notes) + [f"{LABELS[k]} skipped: {why}" for k, why in skipped.items()]
    if not kinds:
        raise SlmshiftError(f"slmshift tune: no policy can be evaluated on {table.source}: " +
                            "; ".join(f"{k}: {why}" for k, why in skipped.items()))
    if table.max_attempts > 1:
        notes.append(f"the collect logged up to {table.max_attempts} SLM attempts per call: slm_attempts searched "
                     f"from 1 to {table.max_attempts} with each policy's settings")
    for k in kinds:
        if not _deployable(k, table):
            notes.append(f"{LABELS[k]}: evaluated, but not written as policy.yaml (per-cluster tau needs a cluster "
                         "index; `slmshift convert` writes one)")
    plan = Planner(table, parts, opts)
    level = plan.level
    n_full = plan.held.replay.n_episodes
    if level == "call" and table.df["episode"].notna().any():
        notes.append(f"call-level quality: the held-out part has {n_full} fully paired episode(s) (need "
                     f"{opts.min_episodes}); sample shadows by episode (shadow_rate) with more episodes for episode "
                     "level")
    ag = int(table.df["agreement"].astype(bool).sum()) if "agreement" in table.df else 0
    if ag:
        notes.append(f"{ag} paired call(s) graded by agreement with the teacher's logged answer (no scenario grades "
                     "them): their quality figures are agreement, not correctness")
    ug = int((~table.df["graded"].astype(bool)).sum())
    if ug:
        notes.append(f"{ug} paired call(s) judged only by validity (no grader): used to fit scorers, left out of "
                     "quality and of the SLM share, reported as their own share")
    console.print(f"tune: {len(table)} paired calls from {table.source}; split by {parts.unit} (seed {opts.seed}): "
                  f"fit {parts.sizes['fit']}, choose {parts.sizes['choose']}, held out {parts.sizes['held_out']} "
                  f"{plural(parts.unit)}; quality: {level} level; policies: {', '.join(kinds)}", soft_wrap=True,
                  highlight=False)
    for n in notes:
        console.print(f"  note: {n}", soft_wrap=True, highlight=False)
    if "learned" in kinds:
        with console.status("embedding prompts (MiniLM)"):
            table.embeddings()

    trials, stats = run_search(table, parts.fit, parts.choose, kinds, opts, plan.primary, console)
    console.print(f"tune: {stats['trials']} trials in {stats['wall_s']:.0f} s ({stats['trials_per_s']:.2f} trials/s, "
                  f"{stats['points_per_s']:.0f} replayed thresholds/s)", highlight=False)
    trials["deployable"] = [_deployable(k, table) for k in trials["kind"]]
    trials["pareto"] = metrics.pareto_mask(trials[plan.primary].to_numpy(), trials["cost"].to_numpy())
    trials.to_parquet(out / "trials.parquet", index=False)

    dep = trials[trials["deployable"]]  # the choice is made on the deployable points' own front
    dep = dep[metrics.pareto_mask(dep[plan.primary].to_numpy(), dep["cost"].to_numpy())] if len(dep) else dep
    chosen = plan.choose_on(dep)

    # per-policy curves and metrics on the held-out part (settings: the kind's trial with the best choose APGR)
    b = plan.baselines
    cost_range = (float(b["always_slm"]["cost"]), float(b["always_llm"]["cost"]))
    policies: dict[str, Any] = {}
    for kind in kinds + ["oracle"]:
        if kind == "oracle":
            f, params = fit_scorer("oracle", {}, table, parts.held), {}
        else:
            sub = trials[trials["kind"] == kind]
            if sub.empty:
                continue
            params = json.loads(sub.sort_values("apgr_search", ascending=False, na_position="last").iloc[0]["params"])
            f = plan.fitted(kind, params)
        lo, hi = min(cost_range), max(cost_range)
        policies[kind] = plan.view(params).held.policy(f, parts.held, opts.report_grid, b, (lo, hi))
        policies[kind].update(params=params, label=LABELS[kind], deployable=kind != "oracle" and _deployable(kind, table))

    front = trials[trials["pareto"]].sort_values("cost")
    keys = ("quality_call", "cost", "llm_share") + (("quality_episode",) if level == "episode" else ())
    pareto = [{"kind": r["kind"], "params": json.loads(r["params"]), "tau": float(r["tau"]),
               "deployable": bool(r["deployable"]), "choose": {k: float(r[k]) for k in keys if k in r}}
              for _, r in front.iterrows()]
    for p in pareto[:60]:  # held-out figures for the front (capped: each may need a scorer fit)
        ho = plan.view(p["params"]).held.point(plan.held_mask(p["kind"], p["params"], p["tau"]),
                                               cascade=p["kind"] == "cascade")
        p["held_out"] = {k: v for k, v in ho.items() if not k.endswith("_ci")}
    policy_file = write_policy(chosen, table, out, plan.fitted)
    m = {"source": table.source, "rows": len(table), "split": {"unit": parts.unit, **parts.sizes,
         "rows": {"fit": int(len(parts.fit)), "choose": int(len(parts.choose)), "held_out": int(len(parts.held))}},
         "seed": opts.seed, "budget": opts.budget, "quality": level, "held_out_episodes": n_full,
         "has_cost": table.has_cost, "notes": notes, "baselines": b, "policies": policies, "chosen": chosen,
         "tune": stats, "teacher": teacher_profile(table.run_dir), "agreement_rows": ag}
    write_outputs(out, m, pareto, trials, plan.primary)
    print_summary(console, m, out)
    return TuneResult(str(out), m, chosen, str(policy_file), table)


def teacher_profile(run_dir: str | None) -> list[dict[str, Any]]:
    """The declared profile of every simulated model of the run (printed beside the figures it shapes)."""
    if not run_dir:
        return []
    import yaml

    from slmshift.platform.storage import join, read_text

    try:
        doc = yaml.safe_load(read_text(join(str(run_dir), "config.yaml"))) or {}
    except Exception:
        return []
    return simulated_profiles(doc.get("models") or [])


def simulated_profiles(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per declared teacher in a config's `models:` (as plain data): each simulated model (name, tier, its profile
    fields) and each workload-file teacher (name, tier, backend 'workload', its file)."""
    out = []
    for m in models:
        if not isinstance(m, dict):
            continue
        if m.get("backend") == "simulated":
            out.append({"name": m.get("name"), "tier": m.get("tier"), "profile": m.get("profile") or {}})
        elif m.get("backend") == "workload":
            out.append({"name": m.get("name"), "tier": m.get("tier"), "backend": "workload", "file": m.get("source")})
    return out


def write_policy(chosen: dict[str, Any], table: PairedTable, out: Path, fitted_for: Any) -> Path:
    """policy.yaml: the chosen point as a policy spec (`fitted_for(kind, params)` gives its fitted scorer); relative
    paths resolve against this file."""
    import yaml

    kind, params, tau = chosen["kind"], chosen["params"], chosen["tau"]
    name = f"tuned-{kind.replace('_', '-')}"
    clip = (lambda t: float(min(1.0, max(0.0, t))))
    if kind == "llm" or tau is None or (tau is not None and math.isinf(tau)):
        spec: dict[str, Any] = {"kind": "llm", "name": "tuned-llm"}
    elif kind in ("threshold", "threshold_cluster"):
        f = fitted_for(kind, params)
        spec = {"kind": "threshold", "name": name, "tau": clip(tau),
                "prior_strength": float(params.get("prior_strength", 2.0)),
                "estimates": [e.model_dump() for e in f.estimates]}
        if kind == "threshold_cluster":
            spec["clusters"] = os.path.relpath(table.clusters_dir, out)
            spec["tau_per_cluster"] = {int(c): clip(tau + off) for c, off in f.tau_offsets.items()}
    elif kind == "learned":
        fitted_for(kind, params).learned.save(out / "learned.joblib")
        spec = {"kind": "learned", "name": name, "model": "learned.joblib", "tau": clip(tau)}
    elif kind == "cascade":
        spec = {"kind": "cascade", "name": name, "tau": clip(tau)}
    elif kind == "random":
        spec = {"kind": "random", "name": name, "slm_share": clip(1.0 - tau), "seed": 0}
    else:
        raise ValueError(kind)
    if spec["kind"] != "llm" and attempts(params) > 1:
        spec["slm_attempts"] = attempts(params)
    ho = chosen["held_out"]
    q = ho.get("quality_episode", ho["quality_call"])
    header = (f"# Written by `slmshift tune` from {table.source}.\n"
              f"# Use it as an arm: router: {{policies: [{{file: {out / 'policy.yaml'}}}]}}\n"
              f"# Held-out prediction: quality {q:.3f}, SLM share {ho['slm_share']:.3f}, cost/call {ho['cost']:.6g}\n")
    path = out / "policy.yaml"
    path.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    return path


def calibrate(table: PairedTable, llm_share: float, opts: TuneOptions | None = None) -> dict[str, dict[str, float]]:
    """RouteLLM's calibration: per scored policy (default settings, fitted on the fit part), the tau that sends
    `llm_share` of the fit and choose parts' calls to the LLM, and the share it gives on the held-out part (which
    calibration never saw)."""
    opts = opts or TuneOptions()
    if not 0 <= llm_share <= 1:
        raise SlmshiftError(f"--llm-share must lie in [0, 1], got {llm_share}")
    parts = split(table, opts.holdout, opts.choose, opts.seed)
    need = table.requirements()
    out = {}
    for kind in ("threshold", "threshold_cluster", "learned", "cascade"):
        if need.get(kind) or kind not in opts.kinds:
            continue
        f = fit_scorer(kind, {}, table, parts.fit, seed=opts.seed)
        seen = parts.search
        scores = f.effective(seen)
        if f.valid is not None:  # a cascade escalates a failed check whatever tau is: those count as LLM calls
            scores = np.where(f.valid[seen], scores, -1.0)
        tau = max(0.0, metrics.calibrate_tau(scores, llm_share))
        out[kind] = {"tau": tau, "llm_share_calibrated": float(1 - f.mask(seen, np.array([tau])).mean()),
                     "llm_share_held_out": float(1 - f.mask(parts.held, np.array([tau])).mean()),
                     "distinct_scores": int(len(np.unique(f.scores)))}
    return out


def for_workload(table: PairedTable, workload: str) -> PairedTable:
    """The pairs of one workload id (a gateway call's X-Workload-Id, a scenario's label): tune a policy for it alone."""
    import dataclasses

    have = sorted(str(s) for s in table.df["scenario"].dropna().unique())
    keep = table.df["scenario"].astype(str) == workload
    if not keep.any():
        raise SlmshiftError(f"slmshift tune --workload {workload!r}: no paired calls of that workload in {table.source}"
                            f"; workloads with paired calls: {', '.join(have) or 'none'}. Fix: pass one of those.")
    return dataclasses.replace(table, df=table.df[keep].reset_index(drop=True),
                               notes=[*table.notes, f"pairs of workload {workload!r} only ({int(keep.sum())} of "
                                      f"{len(keep)})"])


def name_for_workload(policy_file: str, workload: str) -> str:
    """Name the tuned policy after its workload and say how the gateway serves it for that workload."""
    import yaml

    path = Path(policy_file)
    text = path.read_text()
    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    spec = yaml.safe_load(text)
    spec["name"] = f"tuned-{workload}"
    head += (f"# Serve it for workload {workload} alone: router: {{policies: [{{file: {path}}}]}} and "
             f"gateway: {{workloads: {{{workload}: {spec['name']}}}}}\n")
    path.write_text(head + yaml.safe_dump(spec, sort_keys=False))
    return spec["name"]


def cli_tune(run_dir: str | None, pairs: str | None, out: str | None, opts: TuneOptions, *, llm_share: float | None,
             verify_run: bool, verify_episodes: int | None, console: Any, workload: str | None = None) -> None:
    """What `slmshift tune` does; errors are SlmshiftError (exit 2)."""
    from slmshift.train.routing.pairs import paired_from_file, paired_from_run

    if (run_dir is None) == (pairs is None):
        raise SlmshiftError("slmshift tune: give either RUN_DIR (a run with paired outcomes) or --pairs FILE --out DIR.")
    if pairs is not None and out is None:
        raise SlmshiftError("slmshift tune --pairs FILE needs --out DIR (where the tune outputs go).")
    if verify_run and run_dir is None:
        raise SlmshiftError("slmshift tune --verify re-runs a run's episodes: give RUN_DIR, not --pairs.")
    if workload is not None and verify_run:
        raise SlmshiftError("slmshift tune --workload cannot --verify (a gateway's traffic has no episodes to re-run).")
    out = out or str(Path(run_dir) / ("tune" if workload is None else f"tune-{workload}"))
    if verify_run:
        from slmshift.train.routing.verify import unseen_tasks

        unseen_tasks(run_dir)  # fails before anything else when no task is left to verify on
    with console.status("reading paired outcomes"):
        table = paired_from_run(run_dir) if run_dir is not None else paired_from_file(pairs)
    if workload is not None:
        table = for_workload(table, workload)
    if llm_share is not None:
        from rich.table import Table

        cal = calibrate(table, llm_share, opts)
        t = Table(title=f"tau for an LLM-call share of {llm_share} (route to the SLM when score >= tau)")
        for h in ("policy", "tau", "LLM share (fit + choose, calibrated)", "LLM share (held out)", "distinct scores"):
            t.add_column(h)
        for kind, r in cal.items():
            t.add_row(LABELS[kind], f"{r['tau']:.4f}", f"{r['llm_share_calibrated']:.3f}",
                      f"{r['llm_share_held_out']:.3f}", str(r["distinct_scores"]))
        console.print(t)
        return
    result = tune_routing(table, out, opts, console)
    if workload is not None:
        name = name_for_workload(result.policy_file, workload)
        console.print(f"policy {name!r} for workload {workload!r}: {result.policy_file}", soft_wrap=True)
    if verify_run:
        from slmshift.train.routing.verify import verify

        verify(run_dir, out, episodes=verify_episodes, console=console)
