"""S2 curate: keep the calls worth learning from, scrub them, de-duplicate, split by episode.

The keep rule is configurable (`CurateOptions.rule`); by default a call is kept when its output was valid
and its episode succeeded or the call itself was graded correct, and a call graded wrong is dropped even in
a successful episode. All tiers are kept by default: the teacher's outputs are what an SLM should learn,
and an SLM call that succeeded is as good a target.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.types import canonical_json
from slmshift.train.scrub import Scrubber

__all__ = ["CurateOptions", "CurateResult", "curate", "split_by_group", "CURATED_COLUMNS"]

CURATED_COLUMNS = ["record_id", "episode_id", "task_id", "scenario", "role", "call_kind", "category", "expect",
                   "messages", "target", "context", "max_tokens", "constraint"]
Rule = Literal["episode_or_call", "episode", "call", "episode_and_call", "valid"]


class CurateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Rule = Field(default="episode_or_call", description=(
        "Which valid calls to keep: episode_or_call (episode succeeded or call correct), episode, call, "
        "episode_and_call, or valid (every valid call)."))
    drop_incorrect: bool = Field(default=True, description="Drop calls graded wrong even when their episode succeeded.")
    tiers: list[Literal["llm", "slm"]] = Field(default=["llm", "slm"], min_length=1,
                                                description="Keep calls served by these tiers.")
    near_dup_threshold: float = Field(default=0.9, gt=0, le=1, description=(
        "MinHash-estimated Jaccard similarity of (last user turn + output) above which a call is a near duplicate."))
    call_kinds: list[str] | None = Field(default=None, min_length=1, description="Keep only calls of these kinds "
                                         "(e.g. [function_call]: convert one task); None keeps every kind.")
    val_fraction: float = Field(default=0.25, ge=0, lt=1, description="Share of each cluster's episodes held out.")
    split_by: Literal["task", "episode"] = Field(default="task", description=(
        "Unit kept whole on one side of the split: 'task' also keeps repeats of one task (e.g. under several "
        "policy arms) together; each episode has one task, so no episode leaks either way."))
    seed: int = Field(default=0, description="Seeds the split.")


@dataclass
class CurateResult:
    rows: pd.DataFrame
    counts: dict[str, int]
    scrub_counts: dict[str, int]


def _keep_mask(df: pd.DataFrame, o: CurateOptions) -> pd.Series:
    valid = df["valid"].eq(True)
    ep_ok = df["episode_success"].eq(True)
    call_ok = df["correct"].eq(True)
    rule = {"episode_or_call": ep_ok | call_ok, "episode": ep_ok, "call": call_ok,
            "episode_and_call": ep_ok & call_ok, "valid": pd.Series(True, index=df.index)}[o.rule]
    keep = valid & rule & df["tier"].isin(o.tiers) & df["error"].isna()
    if o.call_kinds is not None:
        keep &= df["call_kind"].isin(o.call_kinds)
    # A call lost to the infrastructure is no model's output; a shadow call never fed its episode: neither is S2 data.
    for col in ("infra_error", "shadow"):
        if col in df.columns:
            keep &= ~df[col].fillna(False).astype(bool)
    if o.drop_incorrect:
        keep &= ~df["correct"].eq(False)
    return keep & ~_placeholder(df)


def _placeholder(df: pd.DataFrame) -> pd.Series:
    """A simulated model's labelled non-answer (a call without a scenario reference, e.g. on the gateway): never a
    training target, whatever the rule and whatever validity a log written before the gateway's check says."""
    from slmshift.serve.engines.simulated import PLACEHOLDER

    sim = df["simulated"].fillna(False).astype(bool) if "simulated" in df.columns else pd.Series(True, index=df.index)
    return sim & df["output"].fillna("").astype(str).str.strip().map(lambda t: bool(PLACEHOLDER.match(t)))


def _scrub_messages(raw: str, scrub: Scrubber) -> str | None:
    """Scrub each message's content; None when the prompt is not the JSON list of messages S1 writes."""
    try:
        msgs = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        return None
    return json.dumps([{**m, "content": scrub(m["content"])} for m in msgs], ensure_ascii=False)


def _own_text(messages: str, target: str) -> str:
    """What makes a call itself: its last user turn and its output. Shared system prompts and few-shot
    examples would make every call of a task look alike, so they are left out of near-dup detection."""
    msgs = json.loads(messages)
    last_user = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), msgs[-1]["content"] if msgs else "")
    return f"{last_user}\n{target}"


def _near_dup_mask(texts: list[str], threshold: float, seed: int) -> list[bool]:
    """True for rows that near-duplicate an earlier kept row (MinHash LSH over word 3-shingles)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dup = []
    for i, text in enumerate(texts):
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        shingles = {" ".join(words[j:j + 3]) for j in range(max(1, len(words) - 2))}
        mh = MinHash(num_perm=128, seed=seed)
        for s in shingles:
            mh.update(s.encode())
        hits = lsh.query(mh)
        dup.append(bool(hits))
        if not hits:
            lsh.insert(str(i), mh)
    return dup


def _canonical_target(target: str, constraint: str | None) -> str:
    """A JSON answer to a call with a JSON-schema constraint, or a tool call (`{"tool_calls": ...}`) to a call that
    offered tools, re-serialised canonically (the form the constraint enforces, so a LoRA target never teaches
    whitespace the constrained SLM may not write); anything else as is."""
    schema = isinstance(constraint, str) and '"json_schema"' in constraint
    if not (schema or isinstance(constraint, str) and '"tools"' in constraint):
        return target
    try:
        doc = json.loads(target)
    except ValueError:
        return target
    return canonical_json(doc) if schema or (isinstance(doc, dict) and "tool_calls" in doc) else target


def curate(df: pd.DataFrame, options: CurateOptions | None = None) -> CurateResult:
    """Filter, scrub and de-duplicate S1 records (from `read_interactions`). Returns the kept rows with the
    curated columns (no split or cluster yet) and counts for the report."""
    o = options or CurateOptions()
    counts: dict[str, int] = {"logged": len(df)}
    keep = _keep_mask(df, o) if len(df) else pd.Series([], dtype=bool)
    counts["dropped_invalid"] = int((~df["valid"].eq(True)).sum()) if len(df) else 0
    placeholders = (_placeholder(df) & df["valid"].eq(True)) if len(df) else pd.Series([], dtype=bool)
    counts["dropped_placeholder"] = int(placeholders.sum())  # valid-marked ones (older logs); invalid ones above
    counts["dropped_by_rule"] = int(len(df) - keep.sum() - counts["dropped_invalid"] - counts["dropped_placeholder"])
    kept = df[keep].copy()
    scrub = Scrubber()
    if kept.empty:
        counts.update(dropped_malformed=0, dropped_exact_dup=0, dropped_near_dup=0, curated=0)
        return CurateResult(pd.DataFrame({c: pd.Series(dtype=str) for c in CURATED_COLUMNS}), counts, scrub.totals())
    msgs = [_scrub_messages(p, scrub) for p in kept["prompt"]]
    kept["messages"] = msgs
    kept["target"] = [scrub(t or "") for t in kept["output"]]
    bad = kept["messages"].isna() | kept["target"].str.strip().eq("")
    counts["dropped_malformed"] = int(bad.sum())
    kept = kept[~bad]
    kept = kept.rename(columns={"id": "record_id"})
    for col in ("task_id", "category", "expect"):
        kept[col] = kept[col].fillna("").astype(str)
    if "context" not in kept.columns:  # logs written before calls carried their grading context
        kept["context"] = None
    if "constraint" not in kept.columns:  # logs written before calls carried their output constraint
        kept["constraint"] = None
    kept["target"] = [_canonical_target(t, c) for t, c in zip(kept["target"], kept["constraint"])]
    # The budget the call was served with, where the log records it: held-out calls are generated with it. Logs
    # written before records carried it leave it empty; convert then fills it from the run's scenarios
    # (evaluate.served_max_tokens).
    if "max_tokens" not in kept.columns:
        kept["max_tokens"] = None
    kept["max_tokens"] = kept["max_tokens"].astype("Int64")
    # Exact duplicates: same prompt and same output (e.g. one task replayed under several policy arms).
    key = [hashlib.sha1(f"{m}\x00{t}".encode()).hexdigest() for m, t in zip(kept["messages"], kept["target"])]
    exact = pd.Series(key, index=kept.index).duplicated(keep="first")
    counts["dropped_exact_dup"] = int(exact.sum())
    kept = kept[~exact.to_numpy()]
    near = _near_dup_mask([_own_text(m, t) for m, t in zip(kept["messages"], kept["target"])],
                          o.near_dup_threshold, o.seed) if len(kept) else []
    counts["dropped_near_dup"] = int(sum(near))
    kept = kept[[not d for d in near]] if len(kept) else kept
    counts["curated"] = len(kept)
    rows = kept[CURATED_COLUMNS].reset_index(drop=True)
    return CurateResult(rows=rows, counts=counts, scrub_counts=scrub.totals())


def split_by_group(rows: pd.DataFrame, val_fraction: float, seed: int, *, by: str = "task",
                   strata: str = "cluster", min_val: int = 0, prefer: pd.Series | None = None) -> pd.Series:
    """'train' / 'val' per row, whole groups (tasks or episodes) on one side, so no episode leaks.

    Stratified: clusters are visited smallest first; each gets round(val_fraction x its groups) validation
    groups (at least one when it has two or more groups), counting groups already held out for an earlier
    cluster. A cluster with at least 2 x `min_val` groups holds out at least `min_val` (S5 passes the held-out tasks
    promotion asks for: below that an adapter is trained but can never be promoted, however large its gain), never
    more than half. Deterministic for `seed`.

    `prefer` (a bool per row): groups with such a row are held out before the others, in the same seeded order.
    Convert passes the calls collect already answered on the SLM (its shadows), so S4 generates fewer answers. Collect
    draws its shadowed episodes by a hash of the episode id, blind to the task, so the held-out groups stay a random
    sample of the cluster's groups. Without `prefer` the split is what it was before `prefer` existed.
    """
    if rows.empty:
        return pd.Series([], dtype=str, index=rows.index)
    group = rows["episode_id"].astype(str)
    if by == "task":  # fall back to the episode where a scenario leaves task_id empty
        group = rows["task_id"].astype(str).where(rows["task_id"].astype(str) != "", "episode:" + group)
    strata_of = rows[strata] if strata in rows else pd.Series(0, index=rows.index)
    groups_of = {c: sorted(set(group[strata_of == c])) for c in sorted(set(strata_of))}
    clusters_of: dict[str, set] = {}
    for g, c in zip(group, strata_of):
        clusters_of.setdefault(g, set()).add(c)
    preferred = set(group[prefer.astype(bool)]) if prefer is not None else set()
    val: set[str] = set()
    rng = random.Random(f"slmshift-split:{seed}")

    def keeps_train(g: str) -> bool:  # holding g out must leave every cluster it touches a train group
        return all(sum(1 for h in groups_of[c] if h not in val and h != g) >= 1 for c in clusters_of[g])

    if val_fraction > 0:
        for c in sorted(groups_of, key=lambda c: (len(groups_of[c]), str(c))):
            groups = groups_of[c]
            if len(groups) < 2:
                continue
            want = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
            if want < min_val <= len(groups) // 2:
                want = min_val
            free = [g for g in groups if g not in val]
            rng.shuffle(free)
            free.sort(key=lambda g: g not in preferred)  # stable: the seeded order within each side
            for g in free:
                if sum(1 for h in groups if h in val) >= want:
                    break
                if keeps_train(g):
                    val.add(g)
    return pd.Series(["val" if g in val else "train" for g in group], index=rows.index)
