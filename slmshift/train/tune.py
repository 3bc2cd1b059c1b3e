"""`slmshift tune`: routing thresholds searched with Ray Tune on paired outcomes, reported on held-out tasks.

Flow: paired table (`pairs.py`) -> seeded split of tasks (rows when there are no task ids) into a search half and a
held-out half -> a Ray Tune search (Optuna, two objectives: quality max, cost min) on the search half, over policy
kinds and their settings; each trial fits its scorer on the search half and replays a whole grid of thresholds
(a trial costs seconds of Tune overhead, a replay microseconds) -> the Pareto front of every replayed point ->
the operating point: the highest SLM share whose search-half quality is at least `budget` x always-LLM's ->
every curve, metric and that point evaluated on the held-out half with task-bootstrap 95% intervals -> files.

Quality is measured two ways. Call level: the mean outcome of the paired calls. Episode level (when the episodes'
outcomes are known): an episode is predicted to succeed under a routing when it succeeded as observed and no call
routed differently from what was observed turned a right answer wrong (routed tier wrong where the observed tier
was right). With the recommended setup (an always-LLM arm with `shadow: slm`) this is "the always-LLM outcome holds
and no SLM-routed call was wrong where the LLM was right". It assumes calls do not depend on earlier calls' tier
and that the SLM never rescues a failed episode; `--verify` measures the real thing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.train import routing_metrics as rm
from slmshift.train.pairs import PairedTable

KINDS = ("threshold", "threshold_cluster", "learned", "cascade", "random")  # searched; oracle is reported only
LABELS = {"threshold": "threshold (per call kind)", "threshold_cluster": "threshold (per cluster, per-cluster tau)",
          "learned": "learned (MiniLM + call kind)", "cascade": "cascade (check + confidence)", "random": "random",
          "oracle": "oracle (upper bound, not deployable)"}


class TuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: float = Field(default=0.95, gt=0, le=1.5, description="Relative quality budget: the chosen point keeps "
                          "quality >= budget x always-LLM's.")
    holdout: float = Field(default=0.5, gt=0, lt=1, description="Share of tasks held out for reporting.")
    seed: int = Field(default=0, description="Seeds the split, the search and the bootstrap.")
    time_budget_s: float = Field(default=300.0, gt=0, description="Wall-clock budget of the Tune search.")
    trials: int = Field(default=200, ge=1, description="Most Tune trials (the time budget usually ends it first).")
    grid: int = Field(default=40, ge=2, description="Quantile thresholds each trial replays.")
    report_grid: int = Field(default=20, ge=2, description="Quantile thresholds of each held-out curve.")
    n_boot: int = Field(default=1000, ge=50, description="Bootstrap resamples (of tasks) for the 95% intervals.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded Ray (default all).")
    kinds: list[str] = Field(default_factory=lambda: list(KINDS), description="Policy kinds to search.")
    progress: bool = Field(default=True, description="Show progress on the console.")


# --- replay: a routing decision per row -> quality, cost, LLM share -------------------------------------------


class Replay:
    """Vectorised replay of routings over a fixed set of paired rows. A mask (n, k) says, per row and candidate
    routing, whether the SLM's answer is kept; a cascade always pays the SLM and also the LLM when it escalates."""

    def __init__(self, df: pd.DataFrame):
        self.n = len(df)
        self.slm_ok = df["slm_ok"].to_numpy(bool)
        self.llm_ok = df["llm_ok"].to_numpy(bool)
        self.slm_cost = df["slm_cost"].to_numpy(float)
        self.llm_cost = df["llm_cost"].to_numpy(float)
        groups = df["task"] if df["task"].notna().all() else df["row"]
        self.groups = groups.astype(str).to_numpy()
        self.episodes = bool(df["episode"].notna().all() and df["episode_success"].notna().all() and len(df))
        if self.episodes:
            obs_slm = (df["obs_tier"] == "slm").to_numpy()
            self.obs_ok = np.where(obs_slm, self.slm_ok, self.llm_ok)
            codes, uniq = pd.factorize(df["episode"])
            from scipy.sparse import csr_matrix

            self.E = csr_matrix((np.ones(self.n), (codes, np.arange(self.n))), shape=(len(uniq), self.n))
            first = pd.Series(np.arange(self.n)).groupby(codes).first().to_numpy()
            self.ep_success = df["episode_success"].astype(bool).to_numpy()[first]
            self.ep_groups = self.groups[first]

    def evaluate(self, mask: np.ndarray, cascade: bool = False) -> dict[str, np.ndarray]:
        mask = mask if mask.ndim == 2 else mask[:, None]
        ok = np.where(mask, self.slm_ok[:, None], self.llm_ok[:, None])
        if cascade:
            cost = np.where(mask, self.slm_cost[:, None], (self.slm_cost + self.llm_cost)[:, None])
        else:
            cost = np.where(mask, self.slm_cost[:, None], self.llm_cost[:, None])
        out = {"quality_call": ok.mean(axis=0), "cost": cost.mean(axis=0), "llm_share": 1.0 - mask.mean(axis=0)}
        if self.episodes:
            out["quality_episode"] = self.episode_ok(ok).mean(axis=0)
        return out

    def episode_ok(self, ok: np.ndarray) -> np.ndarray:
        """(n_episodes, k): observed success and no call turned from right (observed tier) to wrong (routed)."""
        harm = (self.obs_ok[:, None] & ~ok).astype(float)
        return self.ep_success[:, None] & (np.asarray(self.E @ harm) == 0)

    def outcomes(self, mask: np.ndarray) -> np.ndarray:
        mask = mask if mask.ndim == 2 else mask[:, None]
        return np.where(mask, self.slm_ok[:, None], self.llm_ok[:, None])


# --- scorers: a policy kind + settings -> a score per row (SLM when score - offset >= tau) ---------------------


@dataclass
class Fitted:
    """A scorer fitted on the search split, able to score any rows of the table."""

    kind: str
    params: dict[str, Any]
    scores: np.ndarray  # per row of the whole table
    offsets: np.ndarray  # per row: the cluster's tau offset (0 without per-cluster tau)
    valid: np.ndarray | None = None  # cascade: rows whose SLM answer passed the check
    estimates: list | None = None
    learned: Any = None
    tau_offsets: dict[int, float] = field(default_factory=dict)

    def effective(self, idx: np.ndarray) -> np.ndarray:
        return self.scores[idx] - self.offsets[idx]

    def mask(self, idx: np.ndarray, taus: np.ndarray) -> np.ndarray:
        m = rm.route_slm(self.effective(idx), np.asarray(taus, dtype=float))
        if self.valid is not None:
            m = m & self.valid[idx][:, None] if m.ndim == 2 else m & self.valid[idx]
        return m


def fit_scorer(kind: str, params: dict[str, Any], table: PairedTable, search: np.ndarray,
               emb: np.ndarray | None = None, seed: int = 0) -> Fitted:
    """Fit `kind` with `params` on the search rows; score every row."""
    df = table.df
    n = len(df)
    zeros = np.zeros(n)
    if kind in ("threshold", "threshold_cluster"):
        from slmshift.platform.scorers import ThresholdTable

        use_cluster = kind == "threshold_cluster"
        clusters = [None if pd.isna(c) else int(c) for c in df["cluster"]] if use_cluster else [None] * n
        kinds = df["call_kind"].astype(str).tolist()
        est = ThresholdTable.fit([kinds[i] for i in search], [clusters[i] for i in search],
                                 df["slm_ok"].to_numpy()[search])
        t = ThresholdTable(est, params.get("prior_strength", 2.0))
        scores = np.array([t.score(k, c) for k, c in zip(kinds, clusters)])
        offs = {int(k[4:]): float(v) for k, v in params.items() if k.startswith("off_")}
        offsets = np.array([offs.get(c, 0.0) if c is not None else 0.0 for c in clusters]) if offs else zeros
        return Fitted(kind, params, scores, offsets, estimates=est, tau_offsets=offs)
    if kind == "learned":
        from slmshift.platform.scorers import LearnedScorer

        emb = table.embeddings() if emb is None else emb
        kinds = df["call_kind"].astype(str).tolist()
        sc = LearnedScorer.fit(emb[search], [kinds[i] for i in search], df["slm_ok"].to_numpy()[search], seed=seed,
                               C=params.get("C", 1.0))
        return Fitted(kind, params, sc.score_batch(emb, kinds), zeros, learned=sc)
    if kind == "cascade":
        lp = df["slm_logprob"].to_numpy(float)
        valid = df["slm_valid"].fillna(True).to_numpy(bool)
        conf = np.where(np.isnan(lp), 1.0, np.exp(np.minimum(lp, 0.0)))  # no log-prob: accepted on its check
        return Fitted(kind, params, conf, zeros, valid=valid)
    if kind == "random":
        u = np.random.default_rng(seed + 7).random(n)
        return Fitted(kind, params, u, zeros)
    if kind == "oracle":
        # Only calls where the LLM alone is right go to the LLM, and those of successful episodes with the fewest
        # such calls first: the best call-level and episode-level curve for each LLM share. Reads the outcomes.
        # Calls where both tiers agree go next, and calls only the SLM gets right last.
        llm_ok, slm_ok = df["llm_ok"].to_numpy(bool), df["slm_ok"].to_numpy(bool)
        gain = llm_ok & ~slm_ok
        s = np.where(slm_ok & ~llm_ok, 1.0, 0.75)
        if gain.any():
            per_ep = pd.Series(gain.astype(int)).groupby(df["episode"].fillna(df["row"]).to_numpy()).transform("sum")
            ok_ep = df["episode_success"].fillna(True).astype(bool).to_numpy()
            rank = np.where(ok_ep, per_ep.to_numpy(), per_ep.max() + 1)
            s = np.where(gain, 0.5 * rank / (rank.max() + 1), s)
        return Fitted(kind, params, s, zeros)
    raise ValueError(f"unknown policy kind {kind!r}")


# --- the Tune search ----------------------------------------------------------------------------------------


def _trial(config: dict[str, Any], table: PairedTable = None, search: np.ndarray = None, emb: Any = None,
           grid: int = 40, seed: int = 0, primary: str = "quality_call") -> None:
    """One Tune trial: fit the sampled scorer on the search rows, replay a whole threshold grid, report the sampled
    operating point (at its LLM share) as the two objectives and every grid point for the front."""
    from ray import tune

    kind = config["kind"]
    params = {k: v for k, v in config.items() if k not in ("kind", "llm_share")}
    fitted = fit_scorer(kind, params, table, search, emb, seed)
    replay = Replay(table.df.iloc[search])
    eff = fitted.effective(search)
    taus = rm.threshold_grid(eff, grid)
    star = rm.calibrate_tau(eff, float(config["llm_share"]))
    taus = np.concatenate([taus, [star]])
    res = replay.evaluate(fitted.mask(search, taus), cascade=kind == "cascade")
    points = [{"tau": float(t), **{k: float(v[i]) for k, v in res.items()}} for i, t in enumerate(taus[:-1])]
    x, q = res["llm_share"][:-1], res[primary][:-1]
    all_llm = replay.evaluate(np.zeros((replay.n, 1), bool))[primary][0]
    all_slm = replay.evaluate(np.ones((replay.n, 1), bool))[primary][0]
    tune.report({"quality": float(res[primary][-1]), "cost": float(res["cost"][-1]),
                 "llm_share_at": float(res["llm_share"][-1]), "tau_at": float(star),
                 "apgr_search": float(rm.apgr(x, q, all_slm, all_llm)), "points": json.dumps(points)})


class _Space:
    """Define-by-run search space (Optuna): the policy kind, then only that kind's settings. A class, not a closure,
    because Tune pickles its searcher when it checkpoints."""

    def __init__(self, kinds: list[str], clusters: list[int]):
        self.kinds, self.clusters = list(kinds), list(clusters)

    def __call__(self, trial: Any) -> None:
        kind = trial.suggest_categorical("kind", self.kinds)
        trial.suggest_float("llm_share", 0.0, 1.0)
        if kind in ("threshold", "threshold_cluster"):
            trial.suggest_float("prior_strength", 0.5, 20.0, log=True)
        if kind == "threshold_cluster":
            for c in self.clusters:
                trial.suggest_float(f"off_{c}", -0.3, 0.3)
        if kind == "learned":
            trial.suggest_float("C", 1e-2, 1e2, log=True)


def run_search(table: PairedTable, search: np.ndarray, kinds: list[str], opts: TuneOptions, primary: str,
               console: Any = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The Ray Tune search. Returns one row per (trial, replayed threshold) and search stats."""
    import logging

    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # RAY_ADDRESS joins a cluster; otherwise always a fresh embedded one ("local"), never a stray `ray start`
        where = {"address": os.environ["RAY_ADDRESS"]} if os.environ.get("RAY_ADDRESS") else \
            {"address": "local", "num_cpus": opts.num_cpus}
        ray.init(**where, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        started_here = True
    for name in ("ray", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # trials cut by the time budget are counted below
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter honours verbose=0; the new one prints tables
    emb = table.embeddings() if "learned" in kinds else None
    clusters = sorted({int(c) for c in table.df["cluster"].iloc[search].dropna()}) if "threshold_cluster" in kinds else []
    searcher = OptunaSearch(space=_Space(kinds, clusters), metric=["quality", "cost"], mode=["max", "min"],
                            seed=opts.seed)
    storage = tempfile.mkdtemp(prefix="slmshift-tune-")
    progress = _progress_callback(console, opts) if opts.progress and console is not None else None
    trainable = tune.with_parameters(_trial, table=table, search=search, emb=emb, grid=opts.grid, seed=opts.seed,
                                     primary=primary)
    t0 = time.perf_counter()
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=opts.trials, time_budget_s=opts.time_budget_s,
                                        max_concurrent_trials=max(1, int(ray.available_resources().get("CPU", 1)))),
            run_config=tune.RunConfig(name="routing", storage_path=storage, verbose=0,
                                      callbacks=[progress] if progress else None))
        if progress:
            progress.start()
        grid = tuner.fit()
    finally:
        if progress:
            progress.stop()
        wall = time.perf_counter() - t0
        shutil.rmtree(storage, ignore_errors=True)
        if started_here:
            ray.shutdown()
    rows, errors = [], 0
    for i, r in enumerate(grid):
        if r.error is not None or not r.metrics or "points" not in r.metrics:
            errors += 1
            continue
        cfg = dict(r.config)
        params = {k: v for k, v in cfg.items() if k not in ("kind", "llm_share")}
        for p in json.loads(r.metrics["points"]):
            rows.append({"trial": i, "kind": cfg["kind"], "params": json.dumps(params, sort_keys=True),
                         "sampled_llm_share": cfg["llm_share"], "apgr_search": r.metrics["apgr_search"], **p})
    if errors and not rows:
        first = next((r.error for r in grid if r.error is not None), None)
        raise SlmshiftError(f"slmshift tune: every Tune trial failed; first error: {first}")
    n_trials = len(grid) - errors
    stats = {"trials": n_trials, "failed_trials": errors, "wall_s": wall,
             "trials_per_s": n_trials / wall if wall else float("nan"),
             "replayed_points": len(rows), "points_per_s": len(rows) / wall if wall else float("nan")}
    return pd.DataFrame(rows), stats


_BARS: dict[int, Any] = {}  # live progress bars by id: Tune pickles its callbacks, a bar stays in the driver


def _progress_callback(console: Any, opts: TuneOptions) -> Any:
    """A Tune callback driving a rich progress bar in the driver: trials finished out of the most allowed."""
    from ray.tune import Callback
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f} trials"),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task(f"tune: searching (budget {opts.time_budget_s:.0f} s)", total=opts.trials)
    key = id(bar)
    _BARS[key] = (bar, task)
    cb = type("TuneProgress", (Callback,), {"on_trial_complete": _cb_complete, "start": _cb_start, "stop": _cb_stop})()
    cb.key = key
    return cb


# module-level (importable) so that pickling the callback class never pickles the live bar
def _cb_complete(self: Any, iteration: int, trials: list, trial: Any, **info: Any) -> None:
    _advance(self.key)


def _cb_start(self: Any) -> None:
    _BARS[self.key][0].start()


def _cb_stop(self: Any) -> None:
    _BARS.pop(self.key)[0].stop()


def _advance(key: int) -> None:
    if key in _BARS:
        bar, task = _BARS[key]
        bar.advance(task)


@dataclass
class TuneResult:
    out_dir: str
    metrics: dict[str, Any]
    chosen: dict[str, Any]
    policy_file: str
    table: PairedTable


def split(table: PairedTable, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(search rows, held-out rows, unit): tasks are kept whole on one side; rows when there are no task ids."""
    df = table.df
    unit = "task" if df["task"].notna().all() else "row"
    groups = (df["task"] if unit == "task" else df["row"]).astype(str).to_numpy()
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise SlmshiftError(f"{table.source}: {len(df)} paired call(s) from {len(uniq)} {unit}(s): a search split and "
                            f"a held-out split need at least 2 {unit}s. Fix: run more episodes with paired outcomes.")
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(uniq)[: max(1, min(len(uniq) - 1, round(holdout * len(uniq))))].tolist())
    is_held = np.array([g in held for g in groups])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held), unit


def _deployable(kind: str, table: PairedTable) -> bool:
    return kind != "threshold_cluster" or table.clusters_dir is not None


def tune_routing(table: PairedTable, out_dir: str, opts: TuneOptions | None = None, console: Any = None) -> TuneResult:
    from rich.console import Console

    opts = opts or TuneOptions()
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    search, held, unit = split(table, opts.holdout, opts.seed)
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
    for k in kinds:
        if not _deployable(k, table):
            notes.append(f"{LABELS[k]}: evaluated, but not written as policy.yaml (per-cluster tau needs a cluster "
                         "index; `slmshift convert` writes one)")
    hold_replay, search_replay = Replay(table.df.iloc[held]), Replay(table.df.iloc[search])
    primary = "quality_episode" if hold_replay.episodes and search_replay.episodes else "quality_call"
    console.print(f"tune: {len(table)} paired calls from {table.source}; {len(search)} to search, {len(held)} held out "
                  f"(split by {unit}, seed {opts.seed}); quality: {'episode' if 'episode' in primary else 'call'} "
                  f"level; policies: {', '.join(kinds)}", soft_wrap=True, highlight=False)
    for n in notes:
        console.print(f"  note: {n}", soft_wrap=True, highlight=False)
    if "learned" in kinds:
        with console.status("embedding prompts (MiniLM)"):
            table.embeddings()

    trials, stats = run_search(table, search, kinds, opts, primary, console)
    console.print(f"tune: {stats['trials']} trials in {stats['wall_s']:.0f} s ({stats['trials_per_s']:.2f} trials/s, "
                  f"{stats['points_per_s']:.0f} replayed thresholds/s)", highlight=False)
    trials["deployable"] = [_deployable(k, table) for k in trials["kind"]]
    front_mask = rm.pareto_mask(trials[primary].to_numpy(), trials["cost"].to_numpy())
    trials["pareto"] = front_mask
    trials.to_parquet(out / "trials.parquet", index=False)

    # the operating point, chosen on the search split
    q_llm_search = search_replay.evaluate(np.zeros((search_replay.n, 1), bool))[primary][0]
    dep = trials[trials["deployable"]]  # the choice is made on the deployable points' own front
    dep = dep[rm.pareto_mask(dep[primary].to_numpy(), dep["cost"].to_numpy())] if len(dep) else dep
    feasible = dep[dep[primary] >= opts.budget * q_llm_search - 1e-12]
    fitted_cache: dict[tuple[str, str], Fitted] = {}

    def fitted_for(kind: str, params_json: str) -> Fitted:
        key = (kind, params_json)
        if key not in fitted_cache:
            fitted_cache[key] = fit_scorer(kind, json.loads(params_json), table, search, seed=opts.seed)
        return fitted_cache[key]

    boot_rows = rm.bootstrap_groups(hold_replay.groups, opts.n_boot, opts.seed)
    boot_eps = _episode_weights(hold_replay, opts) if hold_replay.episodes else None

    def held_point(kind: str, params_json: str, tau: float) -> dict[str, Any]:
        f = fitted_for(kind, params_json)
        mask = f.mask(held, np.array([tau]))
        res = hold_replay.evaluate(mask, cascade=kind == "cascade")
        return _with_ci(res, mask, hold_replay, boot_rows, boot_eps, kind == "cascade")

    llm_mask = np.zeros((hold_replay.n, 1), bool)
    baselines = {"always_llm": _with_ci(hold_replay.evaluate(llm_mask), llm_mask, hold_replay, boot_rows, boot_eps),
                 "always_slm": _with_ci(hold_replay.evaluate(~llm_mask), ~llm_mask, hold_replay, boot_rows, boot_eps)}
    if len(feasible):
        best = feasible.assign(slm=1 - feasible["llm_share"]).sort_values(
            ["slm", primary, "cost"], ascending=[False, False, True]).iloc[0]
        chosen = {"kind": best["kind"], "params": json.loads(best["params"]), "tau": float(best["tau"]),
                  "search": {k: float(best[k]) for k in ("quality_call", "cost", "llm_share") + (
                      ("quality_episode",) if primary == "quality_episode" else ())},
                  "held_out": held_point(best["kind"], best["params"], float(best["tau"]))}
    else:
        chosen = {"kind": "llm", "params": {}, "tau": None, "search": {}, "held_out": baselines["always_llm"]}
    q_key = primary
    ratio = _ratio_ci(chosen, baselines, q_key, hold_replay, boot_rows, boot_eps, fitted_for, held)
    chosen["held_out"]["quality_ratio_to_llm"] = ratio
    chosen["meets_budget_held_out"] = bool(ratio["value"] >= opts.budget) if not math.isnan(ratio["value"]) else None

    # per-policy curves and metrics on the held-out split (settings: the kind's trial with the best search APGR)
    policies: dict[str, Any] = {}
    for kind in kinds + ["oracle"]:
        if kind == "oracle":
            params_json = "{}"
        else:
            sub = trials[trials["kind"] == kind]
            if sub.empty:
                continue
            params_json = sub.sort_values("apgr_search", ascending=False, na_position="last").iloc[0]["params"]
        f = fitted_for(kind, params_json) if kind != "oracle" else fit_scorer("oracle", {}, table, held)
        policies[kind] = _policy_metrics(f, held, hold_replay, opts, boot_rows, boot_eps, baselines)
        policies[kind]["params"] = json.loads(params_json)
        policies[kind]["label"] = LABELS[kind]
        policies[kind]["deployable"] = kind != "oracle" and _deployable(kind, table)

    front = trials[trials["pareto"]].sort_values("cost")
    pareto = [{"kind": r["kind"], "params": json.loads(r["params"]), "tau": float(r["tau"]),
               "deployable": bool(r["deployable"]),
               "search": {k: float(r[k]) for k in ("quality_call", "cost", "llm_share") +
                          (("quality_episode",) if "quality_episode" in r else ())}} for _, r in front.iterrows()]
    for p in pareto[:60]:  # held-out figures for the front (capped: each may need a scorer fit)
        p["held_out"] = {k: v for k, v in held_point(p["kind"], json.dumps(p["params"], sort_keys=True),
                                                      p["tau"]).items() if not k.endswith("_ci")}
    (out / "pareto.json").write_text(json.dumps(_clean(pareto), indent=2))

    policy_file = write_policy(chosen, table, out, fitted_for)
    metrics = {"source": table.source, "rows": len(table), "search_rows": int(len(search)), "held_out_rows": int(len(held)),
               "split_unit": unit, "seed": opts.seed, "budget": opts.budget,
               "quality": "episode" if primary == "quality_episode" else "call", "has_cost": table.has_cost,
               "notes": notes, "baselines": baselines, "policies": policies, "chosen": chosen, "tune": stats}
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2))
    _plots(out, policies, baselines, chosen, trials, primary)
    (out / "report.md").write_text(report_md(metrics))
    _print_summary(console, metrics, out)
    return TuneResult(str(out), metrics, chosen, str(policy_file), table)


def _episode_weights(replay: Replay, opts: TuneOptions) -> np.ndarray:
    """Bootstrap weights per episode, resampling the same tasks as the row weights (same seed, same groups)."""
    uniq, inv = np.unique(replay.groups, return_inverse=True)
    rng = np.random.default_rng(opts.seed)
    draws = rng.integers(0, len(uniq), size=(opts.n_boot, len(uniq)))
    counts = np.zeros((opts.n_boot, len(uniq)))
    np.add.at(counts, (np.repeat(np.arange(opts.n_boot), len(uniq)), draws.ravel()), 1.0)
    ep_idx = np.searchsorted(uniq, replay.ep_groups)
    return counts[:, ep_idx]


def _with_ci(res: dict[str, np.ndarray], mask: np.ndarray, replay: Replay, w_rows: np.ndarray,
             w_eps: np.ndarray | None, cascade: bool = False) -> dict[str, Any]:
    """One routing's held-out figures with task-bootstrap 95% intervals."""
    mask = mask if mask.ndim == 2 else mask[:, None]
    ok = replay.outcomes(mask)[:, 0].astype(float)
    cost = np.where(mask[:, 0], replay.slm_cost, replay.llm_cost + (replay.slm_cost if cascade else 0.0))
    out: dict[str, Any] = {}
    for key, vals in (("quality_call", ok), ("cost", cost), ("llm_share", (~mask[:, 0]).astype(float))):
        out[key] = float(res[key][0])
        out[f"{key}_ci"] = rm.interval(rm.weighted_mean(w_rows, vals))
    out["slm_share"] = 1.0 - out["llm_share"]
    if replay.episodes and w_eps is not None:
        eok = replay.episode_ok(replay.outcomes(mask))[:, 0].astype(float)
        out["quality_episode"] = float(eok.mean())
        out["quality_episode_ci"] = rm.interval(rm.weighted_mean(w_eps, eok))
    return out


def _ratio_ci(chosen, baselines, key, replay, w_rows, w_eps, fitted_for, held) -> dict[str, Any]:
    """Held-out quality of the chosen point over always-LLM's, with a paired bootstrap interval."""
    q_llm = baselines["always_llm"].get(key)
    q = chosen["held_out"].get(key)
    if q is None or not q_llm:
        return {"value": float("nan"), "ci": (float("nan"), float("nan"))}
    if chosen["kind"] == "llm":
        mask = np.zeros((replay.n, 1), bool)
    else:
        mask = fitted_for(chosen["kind"], json.dumps(chosen["params"], sort_keys=True)).mask(held, np.array([chosen["tau"]]))
    ok, ok_llm = replay.outcomes(mask), replay.outcomes(np.zeros((replay.n, 1), bool))
    if key == "quality_episode":
        a, b, w = replay.episode_ok(ok)[:, 0], replay.episode_ok(ok_llm)[:, 0], w_eps
    else:
        a, b, w = ok[:, 0], ok_llm[:, 0], w_rows
    num, den = rm.weighted_mean(w, a.astype(float)), rm.weighted_mean(w, b.astype(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(den > 0, num / den, np.nan)
    return {"value": float(q / q_llm), "ci": rm.interval(samples)}


def _policy_metrics(f: Fitted, held: np.ndarray, replay: Replay, opts: TuneOptions, w_rows: np.ndarray,
                    w_eps: np.ndarray | None, baselines: dict) -> dict[str, Any]:
    """Held-out curve and RouteLLM/RouterBench metrics of one fitted policy, with bootstrap intervals."""
    eff = f.effective(held)
    taus = rm.threshold_grid(eff, opts.report_grid) if f.kind != "oracle" else np.append(np.unique(eff), np.inf)
    mask = f.mask(held, taus)
    cascade = f.kind == "cascade"
    res = replay.evaluate(mask, cascade)
    ok = replay.outcomes(mask).astype(float)
    cost_rows = np.where(mask, replay.slm_cost[:, None],
                         replay.llm_cost[:, None] + (replay.slm_cost[:, None] if cascade else 0.0))
    share_rows = (~mask).astype(float)
    out: dict[str, Any] = {}
    levels = [("call", ok, w_rows)]
    if replay.episodes and w_eps is not None:
        levels.append(("episode", replay.episode_ok(ok.astype(bool)).astype(float), w_eps))
    share_b = rm.weighted_mean(w_rows, share_rows)
    cost_b = rm.weighted_mean(w_rows, cost_rows)
    for level, vals, w in levels:
        q = res[f"quality_{level}"]
        q_weak = float(baselines["always_slm"][f"quality_{level}"])
        q_strong = float(baselines["always_llm"][f"quality_{level}"])
        x, c = res["llm_share"], res["cost"]
        c0 = float(baselines["always_slm"]["cost"])
        xe, qe, ce = _from_zero(x, q, c, q_weak, c0)
        m = {"apgr": rm.apgr(xe, qe, q_weak, q_strong), "cpt50": rm.cpt(xe, qe, 0.5, q_weak, q_strong),
             "cpt80": rm.cpt(xe, qe, 0.8, q_weak, q_strong), "aiq": rm.aiq(ce, qe),
             "curve": [{"tau": float(t), "llm_share": float(a), "quality": float(b), "cost": float(d),
                        "pgr": float(p)} for t, a, b, d, p in zip(taus, x, q, c, rm.pgr(q, q_weak, q_strong))]}
        m["curve"].sort(key=lambda p: (p["llm_share"], p["quality"]))
        if len(xe) > len(x):
            m["joined_to_always_slm"] = True
        qb = rm.weighted_mean(w, vals)  # (B, k)
        # the always-SLM/LLM ends, resampled with the same tasks: a paired bootstrap of the gap
        all_ok = replay.outcomes(np.ones((replay.n, 1), bool)).astype(float)
        none_ok = replay.outcomes(np.zeros((replay.n, 1), bool)).astype(float)
        if level == "episode":
            all_ok, none_ok = (replay.episode_ok(all_ok.astype(bool)).astype(float),
                               replay.episode_ok(none_ok.astype(bool)).astype(float))
        wb, sb = rm.weighted_mean(w, all_ok)[:, 0], rm.weighted_mean(w, none_ok)[:, 0]
        ap, c5, c8, aq = [], [], [], []
        for b in range(min(len(qb), opts.n_boot)):
            xs = share_b[b] if level == "call" else x  # episode-level: the call share of the same routing
            xs, qs, cs = _from_zero(xs, qb[b], cost_b[b], wb[b], c0)
            ap.append(rm.apgr(xs, qs, wb[b], sb[b]))
            c5.append(rm.cpt(xs, qs, 0.5, wb[b], sb[b]))
            c8.append(rm.cpt(xs, qs, 0.8, wb[b], sb[b]))
            aq.append(rm.aiq(cs, qs))
        m.update({"apgr_ci": rm.interval(ap), "cpt50_ci": rm.interval(c5), "cpt80_ci": rm.interval(c8),
                  "aiq_ci": rm.interval(aq)})
        out[level] = m
    return out


def _from_zero(x: np.ndarray, q: np.ndarray, c: np.ndarray, q0: float, c0: float):
    """A curve that cannot reach an LLM share of 0 (a cascade always escalates a failed check) is joined to
    always-SLM at 0, the random mix of the two in between, so that every policy's APGR, CPT and AIQ span [0, 1]."""
    if len(x) == 0 or np.min(x) <= 1e-12:
        return x, q, c
    return np.append(0.0, x), np.append(q0, q), np.append(c0, c)


# --- outputs --------------------------------------------------------------------------------------------------


def write_policy(chosen: dict[str, Any], table: PairedTable, out: Path, fitted_for: Any) -> Path:
    """policy.yaml: the chosen point as a policy spec; relative paths resolve against this file."""
    import yaml

    kind, params, tau = chosen["kind"], chosen["params"], chosen["tau"]
    name = f"tuned-{kind.replace('_', '-')}"
    clip = (lambda t: float(min(1.0, max(0.0, t))))
    if kind == "llm" or tau is None or (tau is not None and math.isinf(tau)):
        spec: dict[str, Any] = {"kind": "llm", "name": "tuned-llm"}
    elif kind in ("threshold", "threshold_cluster"):
        f = fitted_for(kind, json.dumps(params, sort_keys=True))
        spec = {"kind": "threshold", "name": name, "tau": clip(tau),
                "prior_strength": float(params.get("prior_strength", 2.0)),
                "estimates": [e.model_dump() for e in f.estimates]}
        if kind == "threshold_cluster":
            spec["clusters"] = os.path.relpath(table.clusters_dir, out)
            spec["tau_per_cluster"] = {int(c): clip(tau + off) for c, off in f.tau_offsets.items()}
    elif kind == "learned":
        f = fitted_for(kind, json.dumps(params, sort_keys=True))
        f.learned.save(out / "learned.joblib")
        spec = {"kind": "learned", "name": name, "model": "learned.joblib", "tau": clip(tau)}
    elif kind == "cascade":
        spec = {"kind": "cascade", "name": name, "tau": clip(tau)}
    elif kind == "random":
        spec = {"kind": "random", "name": name, "slm_share": clip(1.0 - tau), "seed": 0}
    else:
        raise ValueError(kind)
    ho = chosen["held_out"]
    q = ho.get("quality_episode", ho["quality_call"])
    header = (f"# Written by `slmshift tune` from {table.source}.\n"
              f"# Use it as an arm: router: {{policies: [{{file: {out / 'policy.yaml'}}}]}}\n"
              f"# Held-out prediction: quality {q:.3f}, SLM share {ho['slm_share']:.3f}, cost/call {ho['cost']:.6g}\n")
    path = out / "policy.yaml"
    path.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    return path


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _fmt(v: Any, ci: Any = None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    s = f"{v:.{digits}f}"
    if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def report_md(m: dict[str, Any]) -> str:
    level = m["quality"]
    lines = [f"# Routing tune report", "",
             f"Source: `{m['source']}`: {m['rows']} paired calls; search split {m['search_rows']}, held-out "
             f"{m['held_out_rows']} (split by {m['split_unit']}, seed {m['seed']}). Thresholds were chosen on the "
             "search split; every figure below is on the held-out split, with task-bootstrap 95% intervals.", "",
             f"Quality: **{level} level**. " + (
                 "Episode level is predicted by composing each episode's calls: an episode succeeds under a routing "
                 "when it succeeded as observed and no call routed away from the observed tier was wrong where the "
                 "observed tier was right (with an always-LLM arm: its outcome holds and no SLM-routed call was "
                 "wrong where the LLM was right). Call level is also given." if level == "episode" else
                 "Call level: the mean outcome of the paired calls (episode outcomes were not available)."),
             "Cost: " + ("mean USD per call from the log (a cascade pays both calls when it escalates)."
                         if m["has_cost"] else "the share of LLM calls (no cost columns)."), ""]
    if m["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in m["notes"]] + [""]
    b = m["baselines"]
    lines += ["## Baselines (held-out)", "", "| routing | quality (call) | quality (episode) | cost/call | SLM share |",
              "|---|---|---|---|---|"]
    for name, r in (("always-LLM", b["always_llm"]), ("always-SLM", b["always_slm"])):
        lines.append(f"| {name} | {_fmt(r['quality_call'], r.get('quality_call_ci'))} | "
                     f"{_fmt(r.get('quality_episode'), r.get('quality_episode_ci'))} | {_fmt(r['cost'], digits=6)} | "
                     f"{_fmt(r['slm_share'])} |")
    c = m["chosen"]
    ho = c["held_out"]
    r = ho.get("quality_ratio_to_llm", {})
    lines += ["", f"## Operating point (budget: quality >= {m['budget']} x always-LLM)", "",
              f"Chosen on the search split: **{c['kind']}** tau={_fmt(c['tau'])} settings {json.dumps(c['params'])}. "
              f"Policy file: `policy.yaml`.", "",
              "| held-out | value [95% CI] |", "|---|---|",
              f"| quality (call) | {_fmt(ho['quality_call'], ho.get('quality_call_ci'))} |",
              f"| quality (episode) | {_fmt(ho.get('quality_episode'), ho.get('quality_episode_ci'))} |",
              f"| quality / always-LLM | {_fmt(r.get('value'), r.get('ci'))} |",
              f"| SLM share | {_fmt(ho['slm_share'])} (LLM share CI {_fmt(ho['llm_share'], ho.get('llm_share_ci'))}) |",
              f"| cost per call | {_fmt(ho['cost'], ho.get('cost_ci'), 6)} |", "",
              f"Meets the budget on held-out tasks: **{ {True: 'yes', False: 'no', None: 'n/a'}[c['meets_budget_held_out']] }**"
              " (point estimate; see the interval).", ""]
    for lvl in ("episode", "call") if level == "episode" else ("call",):
        lines += [f"## Policies ({lvl}-level quality, held-out)", "",
                  "| policy | APGR | CPT(50%) | CPT(80%) | AIQ | settings |", "|---|---|---|---|---|---|"]
        for kind, p in m["policies"].items():
            if lvl not in p:
                continue
            q = p[lvl]
            lines.append(f"| {p['label']} | {_fmt(q['apgr'], q.get('apgr_ci'))} | {_fmt(q['cpt50'], q.get('cpt50_ci'))}"
                         f" | {_fmt(q['cpt80'], q.get('cpt80_ci'))} | {_fmt(q['aiq'], q.get('aiq_ci'))} | "
                         f"`{json.dumps(p['params'])}` |")
        lines.append("")
    t = m["tune"]
    lines += ["## Search", "", f"Ray Tune + Optuna (two objectives: quality max, cost min), {t['trials']} trials in "
              f"{t['wall_s']:.0f} s ({t['trials_per_s']:.2f} trials/s; {t['replayed_points']} thresholds replayed, "
              f"{t['points_per_s']:.0f}/s). Every replayed point: `trials.parquet`; its Pareto front: `pareto.json`.",
              "", "Metrics: PGR = (q - q_SLM)/(q_LLM - q_SLM) per point; APGR = (AUC - AUC_SLM)/(AUC_LLM - AUC_SLM) "
              "over the LLM-call share (RouteLLM, lm-sys/RouteLLM routellm/evals); CPT(x) = the LLM-call share "
              "needed to recover x of the gap; AIQ = area under the non-decreasing convex hull of (cost, quality) "
              "over the cost range (RouterBench, withmartian/routerbench). Definitions: docs/routing.md.", "",
              "![curves](curves.png)", "", "![pareto](pareto.png)", ""]
    return "\n".join(lines)


def _plots(out: Path, policies: dict, baselines: dict, chosen: dict, trials: pd.DataFrame, primary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = "episode" if primary == "quality_episode" else "call"
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_xlabel("LLM calls (share)")
    ax.set_ylabel(f"{level}-level quality (held-out)")
    ax.set_title("Quality vs LLM-call share (held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(trials["cost"], trials[primary], s=4, color="lightgrey", label="replayed thresholds")
    front = trials[trials["pareto"]].sort_values("cost")
    for kind, g in front.groupby("kind"):
        ax.scatter(g["cost"], g[primary], s=16, label=f"front: {kind}")
    ax.plot(front["cost"], front[primary], color="black", linewidth=0.8)
    s = chosen.get("search") or {}
    if s:
        ax.plot([s["cost"]], [s.get(primary, s["quality_call"])], marker="*", markersize=14, color="black",
                linestyle="none", label="chosen point")
    ax.set_xlabel("cost per call")
    ax.set_ylabel(f"{level}-level quality (search split)")
    ax.set_title("Pareto front found by Ray Tune")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)


def _print_summary(console: Any, m: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    level = m["quality"]
    t = Table(title=f"routing policies on held-out tasks ({level}-level quality, 95% CI)")
    for h in ("policy", "APGR", "CPT(50%)", "CPT(80%)", "AIQ"):
        t.add_column(h)
    for p in m["policies"].values():
        q = p.get(level) or p["call"]
        t.add_row(p["label"], _fmt(q["apgr"], q.get("apgr_ci")), _fmt(q["cpt50"]), _fmt(q["cpt80"]), _fmt(q["aiq"]))
    console.print(t)
    c, b = m["chosen"], m["baselines"]
    ho = c["held_out"]
    key = f"quality_{level}"
    r = ho.get("quality_ratio_to_llm", {})
    console.print(f"chosen: {c['kind']} tau={_fmt(c['tau'])}: held-out quality {_fmt(ho.get(key), ho.get(key + '_ci'))} "
                  f"vs always-LLM {_fmt(b['always_llm'].get(key))} (ratio {_fmt(r.get('value'), r.get('ci'))}, budget "
                  f"{m['budget']}); SLM share {ho['slm_share']:.3f}; cost/call {ho['cost']:.6g} vs "
                  f"{b['always_llm']['cost']:.6g}", soft_wrap=True, highlight=False)
    console.print(f"Report: {out}/report.md  Policy: {out}/policy.yaml  (use: router: {{policies: [{{file: "
                  f"{out}/policy.yaml}}]}})", soft_wrap=True, highlight=False)


# --- calibration and verification -------------------------------------------------------------------------------


def calibrate(table: PairedTable, llm_share: float, opts: TuneOptions | None = None) -> dict[str, dict[str, float]]:
    """RouteLLM's calibration: per scored policy (default settings, fitted on the search split), the tau that sends
    `llm_share` of the table's calls to the LLM, and the share it gives on the search and held-out splits."""
    opts = opts or TuneOptions()
    if not 0 <= llm_share <= 1:
        raise SlmshiftError(f"--llm-share must lie in [0, 1], got {llm_share}")
    search, held, _ = split(table, opts.holdout, opts.seed)
    need = table.requirements()
    out = {}
    for kind in ("threshold", "threshold_cluster", "learned", "cascade"):
        if need.get(kind) or kind not in opts.kinds:
            continue
        f = fit_scorer(kind, {}, table, search, seed=opts.seed)
        every = np.arange(len(table))
        scores = f.effective(every)
        if f.valid is not None:  # a cascade escalates a failed check whatever tau is: those count as LLM calls
            scores = np.where(f.valid, scores, -1.0)
        tau = max(0.0, rm.calibrate_tau(scores, llm_share))
        out[kind] = {"tau": tau, "llm_share_all": float(1 - f.mask(every, np.array([tau])).mean()),
                     "llm_share_held_out": float(1 - f.mask(held, np.array([tau])).mean()),
                     "distinct_scores": int(len(np.unique(f.scores)))}
    return out


def verify(run_dir: str, out_dir: str, *, episodes: int | None = None, console: Any = None,
           address: str | None = None) -> dict[str, Any]:
    """Re-run real episodes at the chosen point and at always-LLM on tasks the tuned run never saw, through the
    normal runner, and compare with the held-out prediction."""
    import yaml
    from rich.console import Console

    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import load_config
    from slmshift.platform.log import read_interactions
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
    metrics = json.loads((out / "metrics.json").read_text())
    data = yaml.safe_load(cfg_path.read_text())
    seen = sorted({str(t) for t in read_interactions(run_dir, include_shadow=True)["task_id"].dropna() if str(t)})
    data["experiment"]["name"] = f"{data['experiment']['name']}-verify"
    data["router"] = {"policies": [{"file": str(policy_path.resolve())}, {"kind": "llm", "name": "always-llm"}]}
    for s in data["scenarios"]:
        s["exclude_tasks"] = sorted(set(s.get("exclude_tasks") or []) | set(seen))
        if episodes:
            s["episodes"] = episodes
    vpath = out / "verify.yaml"
    vpath.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(vpath, scenario_options())
    chosen_label = cfg.router.policies[0].label
    result = run_experiment(cfg, address=address, console=console)
    if result.interrupted:  # Ctrl-C: the partial verify run is on disk; do not compare a part with the prediction
        raise KeyboardInterrupt
    df = read_interactions(result.run_dir)
    df = df[~df["infra_error"].astype(bool)]
    from slmshift.platform.log import read_episodes
    from slmshift.platform.scorers import outcome

    eps = read_episodes(result.run_dir)
    rows = {}
    for label in (chosen_label, "always-llm"):
        g = df[df["policy"] == label]
        final = g[~g["escalated"].astype(bool)]  # a cascade's rejected attempt is not an answer
        oks = [outcome(c, v) for c, v in zip(final["correct"], final["valid"])]
        known = [o for o in oks if o is not None]
        e = eps[eps["policy"] == label]
        rows[label] = {"episodes": int(len(e)), "quality_episode": float(e["success"].mean()) if len(e) else float("nan"),
                       "quality_call": float(np.mean(known)) if known else float("nan"),
                       "cost": float(g["cost_usd"].sum() / len(final)) if len(final) else float("nan"),
                       "slm_share": float((final["tier"] == "slm").mean()) if len(final) else float("nan")}
    pred = {chosen_label: metrics["chosen"]["held_out"], "always-llm": metrics["baselines"]["always_llm"]}
    from rich.table import Table

    t = Table(title="verify: predicted (held-out replay) vs measured (new episodes on unseen tasks)")
    for h in ("arm", "quality (episode) pred / meas", "quality (call) pred / meas", "cost/call pred / meas",
              "SLM share pred / meas"):
        t.add_column(h)
    for label in rows:
        p, mm = pred[label], rows[label]
        t.add_row(label, f"{_fmt(p.get('quality_episode'))} / {_fmt(mm['quality_episode'])}",
                  f"{_fmt(p.get('quality_call'))} / {_fmt(mm['quality_call'])}",
                  f"{_fmt(p.get('cost'), digits=6)} / {_fmt(mm['cost'], digits=6)}",
                  f"{_fmt(p.get('slm_share'))} / {_fmt(mm['slm_share'])}")
    console.print(t)
    doc = {"run_dir": result.run_dir, "excluded_tasks": len(seen), "predicted": pred, "measured": rows}
    (out / "verify.json").write_text(json.dumps(_clean(doc), indent=2))
    with open(out / "report.md", "a") as f:
        f.write("\n## Verification on unseen tasks\n\n| arm | quality (episode) pred / meas | quality (call) pred / meas |"
                " cost/call pred / meas | SLM share pred / meas |\n|---|---|---|---|---|\n")
        for label in rows:
            p, mm = pred[label], rows[label]
            f.write(f"| {label} | {_fmt(p.get('quality_episode'))} / {_fmt(mm['quality_episode'])} | "
                    f"{_fmt(p.get('quality_call'))} / {_fmt(mm['quality_call'])} | {_fmt(p.get('cost'), digits=6)} / "
                    f"{_fmt(mm['cost'], digits=6)} | {_fmt(p.get('slm_share'))} / {_fmt(mm['slm_share'])} |\n")
        f.write(f"\nNew run: `{result.run_dir}` ({rows[chosen_label]['episodes']} episodes per arm, {len(seen)} tasks "
                "of the tuned run excluded).\n")
    return doc


def cli_tune(run_dir: str | None, pairs: str | None, out: str | None, opts: TuneOptions, *, llm_share: float | None,
             verify_run: bool, verify_episodes: int | None, console: Any) -> None:
    """What `slmshift tune` does; errors are SlmshiftError (exit 2)."""
    from slmshift.train.pairs import paired_from_file, paired_from_run

    if (run_dir is None) == (pairs is None):
        raise SlmshiftError("slmshift tune: give either RUN_DIR (a run with paired outcomes) or --pairs FILE --out DIR.")
    if pairs is not None and out is None:
        raise SlmshiftError("slmshift tune --pairs FILE needs --out DIR (where the tune outputs go).")
    if verify_run and run_dir is None:
        raise SlmshiftError("slmshift tune --verify re-runs a run's episodes: give RUN_DIR, not --pairs.")
    out = out or str(Path(run_dir) / "tune")
    with console.status("reading paired outcomes"):
        table = paired_from_run(run_dir) if run_dir is not None else paired_from_file(pairs)
    if llm_share is not None:
        from rich.table import Table

        cal = calibrate(table, llm_share, opts)
        t = Table(title=f"tau for an LLM-call share of {llm_share} (route to the SLM when score >= tau)")
        for h in ("policy", "tau", "LLM share (all calls)", "LLM share (held-out)", "distinct scores"):
            t.add_column(h)
        for kind, r in cal.items():
            t.add_row(LABELS[kind], f"{r['tau']:.4f}", f"{r['llm_share_all']:.3f}", f"{r['llm_share_held_out']:.3f}",
                      str(r["distinct_scores"]))
        console.print(t)
        return
    tune_routing(table, out, opts, console)
    if verify_run:
        verify(run_dir, out, episodes=verify_episodes, console=console)
