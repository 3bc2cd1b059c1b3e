"""Paired outcomes: one row per call whose outcome is known on both tiers, the input of `slmshift tune`.

Two sources:
- a run directory (`paired_from_run`): a call and its shadow (`<id>` + `<id>:shadow`, the same request sent to the
  other tier by a policy with `shadow: slm|llm|both`), and a cascade escalation (the rejected SLM attempt
  `<id>:cascade` + the LLM's answer `<id>`). Rows with an infrastructure error on either side, or an outcome
  neither the scenario's check nor its grader could tell, are left out and counted in `notes`.
  The task cluster comes from RUN_DIR/convert/clusters when `slmshift convert` wrote one.
- a file (`paired_from_file`): CSV or Parquet with columns `prompt`, `slm_correct`, `llm_correct` and optional
  `slm_cost`, `llm_cost`, `call_kind`, `cluster`, `task_id`, `episode_id`, `episode_success`, `slm_logprob`
  (mean token log-prob of the SLM's answer, for a cascade) and `slm_valid` (did the SLM's answer pass the call's
  check). Without cost columns, cost is the share of LLM calls (SLM 0, LLM 1 per call).

The table's columns: row, task, group (the unit that splits and bootstraps resample: the task, or its family
for `family#instance` ids such as MiniWoB's, so new seeds of a trained task type are never "unseen"), scenario,
episode, call_index (the call's order in its episode), call_kind, prompt, cluster (nullable int), slm_ok, llm_ok,
slm_cost, llm_cost, slm_logprob, slm_valid (nullable bool), obs_tier (the tier whose answer the episode used; None
from a file), episode_success (the episode's observed outcome, where known), weight (1 / the probability that
this pair was sampled), full_episode (every call of the row's episode is paired, so its outcome can be composed
under a routing) and graded (the scenario graded both answers; a call judged only by its validity, such as a
multi-turn summary, is kept to fit scorers but counts in no quality figure and in a share of its own, never in the
headline SLM share), agreement (no scenario graded the call, e.g. gateway traffic: the LLM's valid answer is the
reference, right by definition, and the SLM's answer is right when it agrees with it, `train/evaluate.agreement`;
such a pair is graded, and every figure built on it is agreement with the teacher, not correctness), slm_attempts
(the attempt the SLM's answer came from: 1, or more after verifier-guided retries), slm_attempt_cap (the most
attempts its arm allowed: `shadow_attempts` on a shadow, else `slm_attempts`) and slm_tries_cost (the rejected
attempts' cost). `PairedTable.at_attempts(k)` reads them as the table a policy with `slm_attempts: k` would give.

Sampling. Shadows are sampled by episode (`shadow_rate`): all calls of a sampled episode, or none. A cascade's
escalations are paired whatever the sample, its accepted answers only in sampled episodes, so an unweighted table
over-represents hard calls; each pair carries weight 1 / P(paired) (Horvitz-Thompson) and every call-level
estimate weights by it. Episode-level estimates use only fully paired episodes, which are a uniform sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slmshift.platform.errors import SlmshiftError, one_line_error
from slmshift.platform.scorers import outcome
from slmshift.train.evaluate import agreement

COLUMNS = ["row", "task", "group", "scenario", "episode", "call_index", "call_kind", "prompt", "cluster", "slm_ok", "llm_ok",
           "slm_cost", "llm_cost", "slm_logprob", "slm_valid", "obs_tier", "episode_success", "weight", "full_episode",
           "graded", "agreement", "slm_attempts", "slm_attempt_cap", "slm_tries_cost"]
ATTEMPT_DEFAULTS = {"slm_attempts": 1, "slm_attempt_cap": 1, "slm_tries_cost": 0.0}
REQUIRED = ("slm_correct", "llm_correct")
OPTIONAL = ("prompt", "slm_cost", "llm_cost", "call_kind", "cluster", "task_id", "episode_id", "episode_success",
            "slm_logprob", "slm_valid")
HOW_TO_PAIR = ("Fix: run the experiment with paired outcomes, e.g. a policy arm `- {kind: llm, name: paired, "
               "shadow: slm}` (every LLM call is also sent to the SLM and graded) or a cascade arm `- {kind: "
               "cascade, shadow: llm}`, then run `slmshift tune RUN_DIR` on the new run. Or give paired data from "
               "elsewhere with `slmshift tune --pairs FILE --out DIR`.")


@dataclass
class PairedTable:
    """Paired outcomes plus what is known about where they came from."""

    df: pd.DataFrame
    source: str
    has_cost: bool
    clusters_dir: str | None = None
    notes: list[str] = field(default_factory=list)
    run_dir: str | None = None
    _emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.df)

    @property
    def has_prompt(self) -> bool:
        return bool(self.df["prompt"].notna().any())

    @property
    def has_cluster(self) -> bool:
        return bool(self.df["cluster"].notna().any())

    @property
    def has_logprob(self) -> bool:
        return bool(self.df["slm_logprob"].notna().any())

    @property
    def has_episodes(self) -> bool:
        """Whether episode-level quality can be composed: some fully paired episodes with a known outcome."""
        return bool(self.episode_rows().any())

    def episode_rows(self) -> np.ndarray:
        """Rows of fully paired episodes with a known outcome (the only ones an episode can be composed from)."""
        df = self.df
        return (df["episode"].notna() & df["episode_success"].notna() & df["full_episode"].astype(bool)).to_numpy()

    def embeddings(self) -> np.ndarray:
        """MiniLM embeddings of each row's prompt, exactly as the router embeds a call (`prompt_text`)."""
        if self._emb is None:
            from slmshift.platform.artifacts import prompt_text
            from slmshift.platform.embeddings import embed

            self._emb = embed([prompt_text(p) for p in self.df["prompt"].fillna("")])
        return self._emb

    @property
    def max_attempts(self) -> int:
        """The most SLM attempts per call the collect logged (k_max): `slmshift tune` searches slm_attempts up to it."""
        return int(self.df["slm_attempt_cap"].max()) if len(self.df) else 1

    def at_attempts(self, k: int) -> "PairedTable":
        """The table as an SLM answering up to `k` times (`slm_attempts: k`) would have made it. A row whose answer
        came at attempt n > k has its k-th attempt instead: one the call's check rejected (invalid, wrong, no log-
        prob), costing k of its n - 1 rejected attempts. A row whose arm allowed fewer than k attempts and used them
        all keeps its last (wrong) answer: pessimistic for retries; `paired_from_run` notes how many."""
        import dataclasses

        df = self.df
        n = df["slm_attempts"].to_numpy(int)
        if (n <= k).all() and not (df["slm_tries_cost"].to_numpy(float) > 0).any():
            return self
        df = df.copy()
        over = n > k
        tries = df["slm_tries_cost"].to_numpy(float)
        df["slm_cost"] = np.where(over, tries * k / np.maximum(n - 1, 1), df["slm_cost"].to_numpy(float) + tries)
        df.loc[over, "slm_ok"] = False
        df["slm_valid"] = pd.array(np.where(over, False, df["slm_valid"].astype(object)), dtype="boolean")
        df.loc[over, "slm_logprob"] = np.nan
        return dataclasses.replace(self, df=df)

    def requirements(self) -> dict[str, str | None]:
        """Policy variant -> why it cannot be evaluated on this table (None when it can)."""
        return {
            "threshold": None,
            "threshold_cluster": None if self.has_cluster else "no cluster per call (no RUN_DIR/convert/clusters "
                                                                "and no `cluster` column)",
            "learned": None if self.has_prompt else "no `prompt` column",
            "cascade": None if self.has_logprob else "no SLM log-prob per call (`slm_logprob`; a cascade also reads "
                                                      "`slm_valid`)",
            "random": None,
        }


def _empty_to_none(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else v


def paired_from_run(run_dir: str, *, clusters_dir: str | None = None) -> PairedTable:
    """Pairs from a run's S1 log (shadow pairs and cascade escalations)."""
    from slmshift.platform.log import read_interactions

    try:
        df = read_interactions(run_dir, include_shadow=True)
    except SlmshiftError:
        raise
    except Exception as e:
        raise SlmshiftError(f"{run_dir}: cannot read the interaction log ({type(e).__name__}: {e}). Fix: pass a run "
                            "directory printed by `slmshift run`.") from None
    if df.empty:
        raise SlmshiftError(f"{run_dir}: no interaction log found. Fix: pass a run directory printed by `slmshift run`.")
    notes: list[str] = []
    infra = df["infra_error"].astype(bool)
    if infra.any():
        notes.append(f"{int(infra.sum())} record(s) with an infrastructure error left out")
    doc = _config(run_dir)
    arms = _arms(doc)
    rates, scenarios, caps = _shadow_rates(arms), _scenario_labels(doc), _attempt_caps(arms)
    by_id = df[~infra].set_index("id", drop=False)
    # main record id -> (slm record, llm record, tier the episode used, P(this pair is in the log))
    pairs: dict[str, tuple[pd.Series, pd.Series, str, float]] = {}
    shadows = by_id[by_id["shadow"].astype(bool) & ~by_id["escalated"].astype(bool)]  # not a shadow's rejected tries
    for _, s in shadows.iterrows():
        m = by_id.loc[s["shadow_of"]] if s["shadow_of"] in by_id.index else None
        if m is None or m["tier"] == s["tier"]:
            continue
        p = rates.get(str(m["policy"]), 1.0)
        pairs[str(m["id"])] = (s, m, "llm", p) if s["tier"] == "slm" else (m, s, "slm", p)
    esc = by_id[by_id["escalated_from"].notna() & ~by_id["shadow"].astype(bool)]
    for _, llm in esc.iterrows():
        a = llm["escalated_from"]
        if a in by_id.index:  # an escalation is paired whether or not its episode was sampled
            pairs[str(llm["id"])] = (by_id.loc[a], llm, "llm", 1.0)
    if not pairs:
        n = int((~df["shadow"].astype(bool)).sum())
        raise SlmshiftError(f"{run_dir}: {n} call(s) logged but no paired outcomes (no shadow records, no cascade "
                            f"escalations): tune needs each call's outcome on both tiers. {HOW_TO_PAIR}")
    # An episode is fully paired when each of its answered calls has a pair; an infra error leaves it incomplete.
    primary = df[~df["shadow"].astype(bool) & ~df["escalated"].astype(bool)]
    ep_key = primary["experiment_id"].astype(str) + "/" + primary["episode_id"].astype(str)
    complete = (primary["id"].astype(str).isin(pairs) & ~primary["infra_error"].astype(bool)).groupby(ep_key).all()
    rows, unknown, short = [], 0, 0
    k_max = max([c for pair in caps.values() for c in pair] or [1])
    for slm, llm, obs, p in pairs.values():
        s_ok, l_ok = outcome(slm["correct"], slm["valid"]), outcome(llm["correct"], llm["valid"])
        by_agreement = _empty_to_none(slm["correct"]) is None and _empty_to_none(llm["correct"]) is None \
            and l_ok is True and not bool(llm["simulated"]) and str(llm["scenario"]) not in scenarios
        if by_agreement:  # no scenario grades it: the teacher's valid answer is the reference
            s_ok = bool(s_ok) and agreement(str(llm["output"]), str(slm["output"]), str(llm["expect"])).correct
        if s_ok is None or l_ok is None:
            unknown += 1
            continue
        main = llm if obs == "llm" else slm
        episode = f"{main['experiment_id']}/{main['episode_id']}"
        n, tries_cost = _attempts(slm, by_id)
        slm_arm, shadow_arm = caps.get(str(main["policy"]), (n, n))
        cap = max(n, shadow_arm if bool(slm["shadow"]) else slm_arm)
        short += cap < k_max and n == cap and _empty_to_none(slm["valid"]) is not None and not bool(slm["valid"])
        rows.append({
            "row": str(main["id"]), "task": str(main["task_id"]) or None, "scenario": str(main["scenario"]),
            "episode": episode, "call_index": int(main["call_index"]), "call_kind": str(main["call_kind"]),
            "prompt": str(main["prompt"]), "cluster": None, "slm_ok": bool(s_ok), "llm_ok": bool(l_ok),
            "slm_cost": float(slm["cost_usd"]), "llm_cost": float(llm["cost_usd"]),
            "slm_logprob": _empty_to_none(slm["mean_logprob"]), "slm_valid": _empty_to_none(slm["valid"]),
            "obs_tier": obs, "episode_success": _empty_to_none(main["episode_success"]),
            "weight": 1.0 / p if p > 0 else 1.0, "full_episode": bool(complete.get(episode, False)),
            "graded": by_agreement or not (_empty_to_none(slm["correct"]) is None
                                           or _empty_to_none(llm["correct"]) is None),
            "agreement": by_agreement, "slm_attempts": n, "slm_attempt_cap": cap, "slm_tries_cost": tries_cost})
    if short:
        notes.append(f"{short} pair(s) whose SLM side used every attempt its arm allowed (fewer than the {k_max} "
                     "other calls had) without a valid answer: held at that answer for more attempts (pessimistic "
                     "for retries)")
    if unknown:
        notes.append(f"{unknown} pair(s) left out: an outcome neither the check nor the grader could tell")
    if not rows:
        raise SlmshiftError(f"{run_dir}: {len(pairs)} paired call(s), but none has a known outcome on both tiers "
                            "(the scenario's check gave no verdict and it has no `grade_call`). Fix: pair calls of a "
                            "scenario that grades calls (operator, metagpt, cradle).")
    out = _frame(rows)
    clusters_dir = clusters_dir or _default_clusters(run_dir)
    table = PairedTable(out, source=str(run_dir), has_cost=True, clusters_dir=clusters_dir, notes=notes,
                        run_dir=str(run_dir))
    if clusters_dir:
        _assign_clusters(table)
    return table


def _config(run_dir: str) -> dict:
    import yaml

    from slmshift.platform.storage import join, read_text

    try:
        return yaml.safe_load(read_text(join(str(run_dir), "config.yaml"))) or {}
    except Exception:  # pairs from a run dir without its config
        return {}


def _arms(doc: dict) -> dict[str, dict]:
    """Policy label -> its settings, from the run's config (none without one)."""
    pols = ((doc.get("router") or {}).get("policies")) or []
    return {str(p.get("name") or p.get("kind")): p for p in pols if isinstance(p, dict)}


def _shadow_rates(arms: dict[str, dict]) -> dict[str, float]:
    """Policy label -> its shadow_rate (1.0 where it says none; every pair counts once without a config)."""
    return {label: float(p.get("shadow_rate", 1.0)) for label, p in arms.items()}


def _attempt_caps(arms: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """Policy label -> (slm_attempts, shadow_attempts)."""
    return {label: (int(p.get("slm_attempts", 1)), int(p.get("shadow_attempts", 1))) for label, p in arms.items()}


def _attempts(slm: pd.Series, by_id: pd.DataFrame) -> tuple[int, float]:
    """(the attempt the SLM's answer came from, the cost of the rejected attempts before it): retries are logged as
    '<base>:try1' ... '<base>:try<m>' and the answer names the last in `retried_from`."""
    last = _empty_to_none(slm.get("retried_from"))
    if not last or ":try" not in str(last):
        return 1, 0.0
    base, m = str(last).rsplit(":try", 1)
    ids = [f"{base}:try{j}" for j in range(1, int(m) + 1)]
    return int(m) + 1, float(sum(float(by_id.loc[i, "cost_usd"]) for i in ids if i in by_id.index))


def _scenario_labels(doc: dict) -> set[str]:
    """The run's scenarios by label: their calls are graded by the scenario (or judged by validity), never by
    agreement; any other workload (gateway traffic) has no grader."""
    return {str(s.get("name") or s.get("kind")) for s in doc.get("scenarios") or [] if isinstance(s, dict)}


def family(task: Any) -> Any:
    """The unit tasks are split and resampled by: a `family#instance` id's family (MiniWoB's task type), else the id."""
    return task.split("#", 1)[0] if isinstance(task, str) and "#" in task else task


def _default_clusters(run_dir: str) -> str | None:
    d = Path(run_dir) / "convert" / "clusters"
    return str(d) if (d / "clusters.json").is_file() else None


def _assign_clusters(table: PairedTable) -> None:
    from slmshift.platform.artifacts import ClusterIndex

    index = ClusterIndex.load(table.clusters_dir)  # raises SlmshiftError naming the dir
    table.df["cluster"] = pd.array([c for c, _ in index.assign_vectors(table.embeddings(), list(table.df["call_kind"]))],
                                   dtype="Int64")


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["group"] = df["task"].map(family)
    df["cluster"] = pd.array(df["cluster"], dtype="Int64")
    df["slm_valid"] = pd.array(df["slm_valid"], dtype="boolean")
    df["slm_logprob"] = pd.to_numeric(df["slm_logprob"], errors="coerce").astype(float)
    df["agreement"] = df["agreement"].fillna(False).astype(bool)
    for c, v in ATTEMPT_DEFAULTS.items():
        df[c] = df[c].fillna(v).astype(type(v))
    for c in ("slm_ok", "llm_ok"):
        df[c] = df[c].astype(bool)
    return df.reset_index(drop=True)


_TRUE = {"true", "1", "yes", "t", "y", "1.0"}
_FALSE = {"false", "0", "no", "f", "n", "0.0"}


def _booleans(path: str, col: str, s: pd.Series, *, nullable: bool = False) -> pd.Series:
    """A column of booleans (true/false, 1/0, yes/no); anything else is an error naming the file, column and row."""
    out = []
    for i, v in enumerate(s.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or (isinstance(v, str) and not v.strip()):
            if nullable:
                out.append(None)
                continue
            raise SlmshiftError(f"{path}: column {col!r}, row {i + 1}: empty; every row needs an outcome (true/false). "
                                "Fix: drop the rows whose outcome is unknown.")
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
            continue
        key = str(v).strip().lower()
        if isinstance(v, (int, float, np.integer, np.floating)) and float(v) in (0.0, 1.0):
            out.append(bool(v))
        elif key in _TRUE:
            out.append(True)
        elif key in _FALSE:
            out.append(False)
        else:
            raise SlmshiftError(f"{path}: column {col!r}, row {i + 1}: {v!r} is not a boolean. Fix: write each outcome "
                                "as true/false (or 1/0).")
    return pd.Series(pd.array(out, dtype="boolean"), index=s.index)


def _numbers(path: str, col: str, s: pd.Series) -> pd.Series:
    x = pd.to_numeric(s, errors="coerce")
    bad = x.isna() & s.notna() & (s.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SlmshiftError(f"{path}: column {col!r}, row {i + 1}: {s.iloc[i]!r} is not a number.")
    return x.astype(float)


def paired_from_file(path: str) -> PairedTable:
    """Pairs from a CSV or Parquet file; bad input raises SlmshiftError naming the file and column."""
    p = Path(path)
    if not p.is_file():
        raise SlmshiftError(f"{path}: file not found. Fix: pass a CSV or Parquet file with columns prompt, "
                            "slm_correct, llm_correct.")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            raw = pd.read_parquet(p)
        else:
            raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:
        kind = "Parquet" if p.suffix.lower() in (".parquet", ".pq") else "CSV"
        raise SlmshiftError(f"{path}: cannot read it as {kind} ({one_line_error(e)}). "
                            "Fix: pass a .csv (comma-separated, header row) or .parquet file.") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise SlmshiftError(f"{path}: missing column(s) {', '.join(missing)}; it has {', '.join(raw.columns) or 'none'}. "
                            f"Fix: give columns {', '.join(REQUIRED)} (required) and optionally {', '.join(OPTIONAL)}.")
    if raw.empty:
        raise SlmshiftError(f"{path}: no rows. Fix: one row per call with its outcome on both tiers.")
    notes = []
    ignored = [c for c in raw.columns if c not in REQUIRED + OPTIONAL]
    if ignored:
        notes.append(f"column(s) ignored: {', '.join(ignored)}")
    n = len(raw)

    def col(name: str) -> pd.Series | None:
        if name not in raw.columns:
            return None
        s = raw[name]
        return None if s.astype(str).str.strip().eq("").all() else s

    slm_ok, llm_ok = _booleans(path, "slm_correct", raw["slm_correct"]), _booleans(path, "llm_correct", raw["llm_correct"])
    has_cost = col("slm_cost") is not None and col("llm_cost") is not None
    if (col("slm_cost") is None) != (col("llm_cost") is None):
        notes.append("only one of slm_cost/llm_cost given: cost is the share of LLM calls")
    if has_cost:
        slm_cost, llm_cost = _numbers(path, "slm_cost", raw["slm_cost"]), _numbers(path, "llm_cost", raw["llm_cost"])
        for name, c in (("slm_cost", slm_cost), ("llm_cost", llm_cost)):
            if c.isna().any() or (c < 0).any():
                i = int(np.flatnonzero((c.isna() | (c < 0)).to_numpy())[0])
                raise SlmshiftError(f"{path}: column {name!r}, row {i + 1}: cost must be a number >= 0.")
    else:
        slm_cost, llm_cost = pd.Series(np.zeros(n)), pd.Series(np.ones(n))
    cluster = col("cluster")
    if cluster is not None:
        num = _numbers(path, "cluster", cluster)
        if ((num.dropna() % 1) != 0).any():
            raise SlmshiftError(f"{path}: column 'cluster': cluster ids must be integers.")
        cluster = pd.array(num.round(), dtype="Int64")
    kinds = col("call_kind")
    prompt = col("prompt")
    ep_ok = col("episode_success")
    episode = col("episode_id")
    df = pd.DataFrame({
        "row": [str(i) for i in range(n)],
        "task": raw["task_id"].astype(str).where(raw["task_id"].astype(str).str.strip() != "", None)
        if col("task_id") is not None else None,
        "episode": episode.astype(str) if episode is not None else None,
        "call_kind": kinds.astype(str).where(kinds.astype(str).str.strip() != "", "call") if kinds is not None else "call",
        "prompt": prompt.astype(str) if prompt is not None else None,
        "cluster": cluster if cluster is not None else pd.array([None] * n, dtype="Int64"),
        "slm_ok": slm_ok.astype(bool).to_numpy(), "llm_ok": llm_ok.astype(bool).to_numpy(),
        "slm_cost": slm_cost.to_numpy(), "llm_cost": llm_cost.to_numpy(),
        "slm_logprob": _numbers(path, "slm_logprob", raw["slm_logprob"]).to_numpy()
        if col("slm_logprob") is not None else np.nan,
        "slm_valid": _booleans(path, "slm_valid", raw["slm_valid"], nullable=True).to_numpy()
        if col("slm_valid") is not None else pd.array([None] * n, dtype="boolean"),
        "obs_tier": None,
        "episode_success": _booleans(path, "episode_success", raw["episode_success"], nullable=True).to_numpy()
        if ep_ok is not None else None,
    })
    if not has_cost:
        notes.append("no cost columns: cost is the share of LLM calls")
    if ep_ok is not None and episode is not None:
        df["obs_tier"] = "llm"  # a file's episode outcome is read as its always-LLM outcome
    # A file's pairs are taken as a complete sample: each pair counts once and its episodes are fully paired.
    df["group"] = df["task"].map(family)
    df["scenario"], df["weight"], df["full_episode"], df["graded"] = None, 1.0, True, True
    df["agreement"] = False  # a file's outcomes are taken as given
    df["call_index"] = np.arange(n)  # a file's rows are in call order within each episode
    for c, v in ATTEMPT_DEFAULTS.items():  # a file gives one SLM answer per call
        df[c] = v
    df["cluster"] = pd.array(df["cluster"], dtype="Int64")
    df["slm_valid"] = pd.array(df["slm_valid"], dtype="boolean")
    return PairedTable(df[COLUMNS], source=str(path), has_cost=has_cost, notes=notes)
