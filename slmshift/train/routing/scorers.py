"""Router scorers as `slmshift tune` fits them: a policy kind + settings -> a score per paired row (the SLM answers
when score - offset >= tau). Fitted on one split, scoring every row, so that thresholds are chosen and results
reported on others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from slmshift.train.routing import metrics
from slmshift.train.routing.pairs import PairedTable

KINDS = ("threshold", "threshold_cluster", "learned", "cascade", "random")  # searched; oracle is reported only
LABELS = {"threshold": "threshold (per call kind)", "threshold_cluster": "threshold (per cluster, per-cluster tau)",
          "learned": "learned (MiniLM + call kind)", "cascade": "cascade (check + confidence)", "random": "random",
          "oracle": "oracle (upper bound, not deployable)"}


@dataclass
class Fitted:
    """A scorer fitted on the fit split, able to score any rows of the table."""

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
        m = metrics.route_slm(self.effective(idx), np.asarray(taus, dtype=float))
        if self.valid is not None:
            m = m & self.valid[idx][:, None] if m.ndim == 2 else m & self.valid[idx]
        return m


def fit_scorer(kind: str, params: dict[str, Any], table: PairedTable, search: np.ndarray,
               emb: np.ndarray | None = None, seed: int = 0) -> Fitted:
    """Fit `kind` with `params` on the `search` rows (the fit split); score every row."""
    df = table.df
    n = len(df)
    zeros = np.zeros(n)
    if kind in ("threshold", "threshold_cluster"):
        from slmshift.platform.scorers import ThresholdTable

        use_cluster = kind == "threshold_cluster"
        clusters = [None if pd.isna(c) else int(c) for c in df["cluster"]] if use_cluster else [None] * n
        kinds = df["call_kind"].astype(str).tolist()
        est = ThresholdTable.fit([kinds[i] for i in search], [clusters[i] for i in search],
                                 df["slm_ok"].to_numpy()[search], weights=df["weight"].to_numpy(float)[search])
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
                               C=params.get("C", 1.0), weights=df["weight"].to_numpy(float)[search])
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
