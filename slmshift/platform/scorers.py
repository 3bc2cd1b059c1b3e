"""Routing scores: the estimated probability that the SLM's output for a call is acceptable.

Fitted by `slmshift tune` from paired outcomes and read by the router's `threshold` and `learned` policies, so
both sides compute a score the same way. Pure functions and small classes over numpy/pandas; no Ray.

- `ThresholdTable`: per (cluster, call kind) success rate of the SLM, Beta-smoothed hierarchically: a cell's
  prior mean is its parent's estimate (cell -> call kind -> all calls -> 0.5), with `prior_strength` pseudo-trials.
- `LearnedScorer`: logistic regression (scikit-learn) on the prompt's MiniLM embedding plus a one-hot call kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.policies import Estimate


def outcome(correct: Any, valid: Any) -> bool | None:
    """A call's acceptability: the scenario's correctness where it can tell, else whether the output was valid."""
    for v in (correct, valid):
        if v is not None and not (isinstance(v, float) and np.isnan(v)) and v is not pd.NA:
            return bool(v)
    return None


class ThresholdTable:
    def __init__(self, estimates: Iterable[Estimate], prior_strength: float = 2.0):
        self.k = prior_strength
        cells: dict[tuple[int | None, str | None], list[float]] = {}
        for e in estimates:
            c = cells.setdefault((e.cluster, e.call_kind), [0.0, 0.0])
            c[0] += e.successes
            c[1] += e.trials
        # A parent level (call kind, all calls) not given explicitly pools the finer cells below it.
        pooled: dict[tuple[int | None, str | None], list[float]] = {}
        for (cluster, kind), (s, t) in cells.items():
            for parent in {(None, kind), (None, None)}:
                if parent != (cluster, kind) and parent not in cells:
                    p = pooled.setdefault(parent, [0.0, 0.0])
                    p[0] += s
                    p[1] += t
        self.cells = {**{k: tuple(v) for k, v in pooled.items()}, **{k: tuple(v) for k, v in cells.items()}}

    def _mean(self, key: tuple[int | None, str | None], parent_mean: float) -> float:
        s, t = self.cells.get(key, (0.0, 0.0))
        return (s + self.k * parent_mean) / (t + self.k)

    def score(self, call_kind: str | None, cluster: int | None) -> float:
        """Beta posterior mean of the SLM's success for this cell, its prior centred on the parent's estimate."""
        m = self._mean((None, None), 0.5)
        if call_kind is not None:
            m = self._mean((None, call_kind), m)
        if cluster is not None:
            m = self._mean((cluster, call_kind), m)
        return float(m)

    @staticmethod
    def fit(call_kinds: Iterable[str], clusters: Iterable[int | None], slm_ok: Iterable[bool],
            weights: Iterable[float] | None = None) -> list[Estimate]:
        """Outcome counts per (cluster, call kind) cell; clusters may be None (then per call kind only). `weights`:
        each pair's 1 / P(sampled), so that a cell's rate is not pulled towards the calls sampled more often."""
        counts: dict[tuple[int | None, str], list[float]] = {}
        call_kinds = list(call_kinds)
        ws = [1.0] * len(call_kinds) if weights is None else list(weights)
        for kind, cluster, ok, w in zip(call_kinds, clusters, slm_ok, ws):
            cluster = None if cluster is None or pd.isna(cluster) else int(cluster)
            c = counts.setdefault((cluster, str(kind)), [0.0, 0.0])
            c[0] += float(w) * float(bool(ok))
            c[1] += float(w)
        return [Estimate(cluster=c, call_kind=k, successes=s, trials=t)
                for (c, k), (s, t) in sorted(counts.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, kv[0][1]))]


class LearnedScorer:
    """P(SLM acceptable | prompt embedding, call kind). Saved with joblib next to the tune output."""

    VERSION = 1

    def __init__(self, clf: Any, kinds: list[str]):
        self.clf, self.kinds = clf, list(kinds)

    def features(self, embeddings: np.ndarray, call_kinds: list[str]) -> np.ndarray:
        onehot = np.zeros((len(call_kinds), len(self.kinds)), dtype=np.float32)
        for i, k in enumerate(call_kinds):
            if k in self.kinds:
                onehot[i, self.kinds.index(k)] = 1.0
        return np.hstack([np.asarray(embeddings, dtype=np.float32).reshape(len(call_kinds), -1), onehot])

    @classmethod
    def fit(cls, embeddings: np.ndarray, call_kinds: list[str], y: np.ndarray, *, seed: int = 0,
            C: float = 1.0, weights: np.ndarray | None = None) -> LearnedScorer:
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y).astype(int)
        me = cls(None, sorted(set(call_kinds)))
        if len(set(y.tolist())) < 2:  # one class only: a constant scorer, said plainly
            me.clf = float(y.mean()) if len(y) else 0.5
            return me
        clf = LogisticRegression(C=C, max_iter=1000, random_state=seed)
        clf.fit(me.features(embeddings, call_kinds), y, sample_weight=weights)
        me.clf = clf
        return me

    def score_batch(self, embeddings: np.ndarray, call_kinds: list[str]) -> np.ndarray:
        if isinstance(self.clf, float):
            return np.full(len(call_kinds), self.clf)
        return self.clf.predict_proba(self.features(embeddings, call_kinds))[:, 1]

    def save(self, path: str | Path) -> Path:
        import joblib

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        joblib.dump({"version": self.VERSION, "clf": self.clf, "kinds": self.kinds}, path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LearnedScorer:
        import joblib

        try:
            doc = joblib.load(path)  # our own file, written by `slmshift tune`; never load one from elsewhere
            return cls(doc["clf"], doc["kinds"])
        except Exception as e:
            raise SlmshiftError(f"learned scorer {path}: cannot load it ({type(e).__name__}: {e}). Fix: run "
                                "`slmshift tune RUN_DIR` again and point at RUN_DIR/tune/learned.joblib.") from None
