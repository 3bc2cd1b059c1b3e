"""Replay: what a routing would have given on logged paired outcomes, at call and at episode level.

Call level: the weighted mean outcome of the graded paired calls when each call takes the routed tier's outcome
(weights are 1 / P(pair sampled), see `pairs.py`).

Episode level, over fully paired episodes only, composed from each episode's graded calls in call order. A call's
paired answers were drawn in the context the episode actually had; once the observed answer is wrong, later calls
saw a corrupted context (a wrong intent, a wrong PRD), so their answers say nothing about a routing that repaired it.
- An episode that succeeded as observed succeeds unless a call is routed to a wrong answer where the observed one
  was right (harm).
- An episode that failed as observed, at its first wrong graded call j: it fails under the routing when a call up
  to j is harmed or the routing is wrong at j too. When the routing repairs j, the rest of the episode is unknown
  (censored), and its chance of success is the product, over the later calls, of the routed tier's accuracy for
  that call kind in a clean context (from the calls whose observed prefix was all right). A failure no graded
  call explains stays a failure.
Where an episode succeeds exactly when all its graded calls are right this is unbiased, whatever tier the episode
observed (a tuned collect predicts always-LLM as well as an always-LLM collect does) and however much a wrong answer
upstream makes later calls harder. `worlds.py` holds simulated worlds that check it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class Replay:
    """Vectorised replay of routings over a fixed set of paired rows. A mask (n, k) says, per row and candidate
    routing, whether the SLM's answer is kept; a cascade always pays the SLM and also the LLM when it escalates."""

    def __init__(self, df: pd.DataFrame):
        self.n = len(df)
        self.slm_ok = df["slm_ok"].to_numpy(bool)
        self.llm_ok = df["llm_ok"].to_numpy(bool)
        self.slm_cost = df["slm_cost"].to_numpy(float)
        self.llm_cost = df["llm_cost"].to_numpy(float)
        self.graded = df["graded"].astype(bool).to_numpy() if "graded" in df else np.ones(self.n, bool)
        # quality, cost and share are over graded calls; an ungraded call (validity only) only fits scorers
        self.w = (df["weight"].to_numpy(float) if "weight" in df else np.ones(self.n)) * self.graded
        groups = df["group"] if "group" in df and df["group"].notna().all() else df["row"]
        self.groups = groups.astype(str).to_numpy()
        full = df["full_episode"].astype(bool).to_numpy() if "full_episode" in df else np.ones(self.n, bool)
        rows = np.flatnonzero(full & self.graded & df["episode"].notna().to_numpy()
                              & df["episode_success"].notna().to_numpy())
        self.episodes = len(rows) > 0
        if self.episodes:
            self._episode_index(df, rows)

    def _episode_index(self, df: pd.DataFrame, rows: np.ndarray) -> None:
        sub = df.iloc[rows]
        order = np.lexsort((sub["call_index"].to_numpy() if "call_index" in sub else np.arange(len(sub)),
                            pd.factorize(sub["episode"])[0]))
        self.ep_rows = rows[order]
        sub = df.iloc[self.ep_rows]
        codes, uniq = pd.factorize(sub["episode"])
        m = len(self.ep_rows)
        obs_slm = (sub["obs_tier"] == "slm").to_numpy()
        self.obs_ok = np.where(obs_slm, self.slm_ok[self.ep_rows], self.llm_ok[self.ep_rows])
        start = np.r_[0, np.flatnonzero(np.diff(codes)) + 1]  # rows are grouped by episode, in call order
        self.ep_of = codes
        self.ep_success = sub["episode_success"].astype(bool).to_numpy()[start]
        self.ep_groups = self.groups[self.ep_rows][start]
        pos = np.arange(m) - start[codes]
        wrong_pos = np.where(~self.obs_ok, pos, np.iinfo(np.int64).max)
        first_wrong = np.minimum.reduceat(wrong_pos, start)  # per episode: first observed-wrong call (or max)
        j = first_wrong[codes]
        self.before = pos < j  # rows before the first observed-wrong call: a clean context
        self.at = pos == j
        self.after = pos > j
        self.explained = first_wrong < np.iinfo(np.int64).max
        # clean-context accuracy per (call kind, tier), from rows whose observed prefix was all right
        clean = pos <= j
        kinds = sub["call_kind"].astype(str).to_numpy()
        self.log_acc = np.zeros((m, 2))  # (row, tier: 0 llm, 1 slm)
        for kind in np.unique(kinds):
            sel = kinds == kind
            c = sel & clean if (sel & clean).any() else sel
            for t, ok in ((0, self.llm_ok[self.ep_rows]), (1, self.slm_ok[self.ep_rows])):
                self.log_acc[sel, t] = np.log((ok[c].sum() + 0.5) / (c.sum() + 1.0))
        self.starts = start

    @property
    def n_episodes(self) -> int:
        return len(self.ep_success) if self.episodes else 0

    def _mean(self, vals: np.ndarray) -> np.ndarray:
        tot = self.w.sum()
        return (self.w[:, None] * vals).sum(axis=0) / tot if tot > 0 else np.full(vals.shape[1], np.nan)

    def evaluate(self, mask: np.ndarray, cascade: bool = False) -> dict[str, np.ndarray]:
        mask = mask if mask.ndim == 2 else mask[:, None]
        out = {"quality_call": self._mean(self.outcomes(mask).astype(float)),
               "cost": self._mean(self.costs(mask, cascade)), "llm_share": 1.0 - self._mean(mask.astype(float))}
        if self.episodes:
            out["quality_episode"] = self.episode_ok(mask).mean(axis=0)
        return out

    def costs(self, mask: np.ndarray, cascade: bool = False) -> np.ndarray:
        mask = mask if mask.ndim == 2 else mask[:, None]
        llm = self.llm_cost + (self.slm_cost if cascade else 0.0)
        return np.where(mask, self.slm_cost[:, None], llm[:, None])

    def episode_ok(self, mask: np.ndarray) -> np.ndarray:
        """(n_episodes, k): each fully paired episode's success (a probability where censored) under the routings
        of `mask` (n, k)."""
        mask = mask if mask.ndim == 2 else mask[:, None]
        m = mask[self.ep_rows]
        ok = np.where(m, self.slm_ok[self.ep_rows, None], self.llm_ok[self.ep_rows, None])
        harm = self.obs_ok[:, None] & ~ok

        def per_episode(x: np.ndarray) -> np.ndarray:
            return np.add.reduceat(x.astype(float), self.starts, axis=0)

        harm_any = per_episode(harm) > 0
        harm_before = per_episode(harm & self.before[:, None]) > 0
        fixed_at = per_episode(ok & self.at[:, None]) > 0
        rest = np.exp(per_episode(np.where(self.after[:, None], np.where(m, self.log_acc[:, 1:2],
                                                                         self.log_acc[:, 0:1]), 0.0)))
        success = self.ep_success[:, None]
        repaired = (~success & self.explained[:, None] & ~harm_before & fixed_at) * rest
        return np.where(success, (~harm_any).astype(float), repaired)

    def outcomes(self, mask: np.ndarray) -> np.ndarray:
        mask = mask if mask.ndim == 2 else mask[:, None]
        return np.where(mask, self.slm_ok[:, None], self.llm_ok[:, None])
