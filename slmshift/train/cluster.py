"""S3: cluster calls into recurring tasks, and the index the router loads.

Task grain (`cluster_tasks`): calls whose role, call kind or output format differ are never one task (their
outputs differ completely: a PRD's JSON, code, a test file), so they are separated first. Within each such group,
prompts are embedded with the packaged all-MiniLM-L6-v2 (`platform.embeddings.embed`) and clustered with faiss
spherical k-means, k chosen by the highest cosine silhouette over k in [k_min, k_max] (`cluster_calls`); the group
is split only where that shows sub-tasks: silhouette >= `split_min_silhouette` and every part at least `min_size`
calls. Clusters are labelled by role and call kind (`planner-intent`, `-2` for a sub-task), unique per run, with
their purity by call kind. With an adapter registry in force, the calls the router would send to one of its promoted
adapters stay one task, that adapter's (`incumbent_tasks`), and only the rest are clustered anew.

Persisted under `clusters/`: `centroids.npy` (k x 384 float32, normalised), `index.faiss` (an
`IndexFlatIP` over the centroids, so inner product = cosine similarity) and `clusters.json`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.artifacts import ClusterIndex, normalise as _normalise, prompt_text
from slmshift.platform.embeddings import DIM, embed

__all__ = ["ClusterOptions", "Clustering", "ClusterIndex", "prompt_text", "embed_texts", "cluster_calls",
           "cluster_tasks", "incumbent_tasks", "label_clusters"]


class ClusterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k_min: int = Field(default=2, ge=1, description="Smallest k tried.")
    k_max: int = Field(default=8, ge=1, description="Largest k tried (clamped to the number of distinct prompts - 1).")
    niter: int = Field(default=25, ge=1, description="k-means iterations.")
    seed: int = Field(default=0, description="k-means seed.")
    split_min_silhouette: float = Field(default=0.25, ge=-1, le=1, description="A role/call-kind/format group is split "
                                        "into sub-tasks only at this cosine silhouette or more (0.25: weak but real "
                                        "structure, by the usual reading of the score).")
    min_size: int = Field(default=16, ge=1, description="...and only when every sub-task keeps this many calls (a "
                          "smaller one could not be trained on).")


def embed_texts(texts: list[str], *, progress: Any = None, batch_size: int = 64) -> np.ndarray:
    """Embed in batches, advancing a rich `Progress` (if given) as batches finish."""
    if progress is None:
        return embed(texts, batch_size=batch_size)
    task = progress.add_task("embedding prompts", total=len(texts))
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(embed(texts[i:i + batch_size], batch_size=batch_size))
        progress.advance(task, len(texts[i:i + batch_size]))
    return np.ascontiguousarray(np.concatenate(out) if out else np.zeros((0, DIM), np.float32))


@dataclass
class Clustering:
    """The result of S3 on one set of vectors."""

    labels: np.ndarray  # cluster id per row, 0..k-1
    centroids: np.ndarray  # (k, 384), normalised
    k: int
    scores: dict[Any, float] = field(default_factory=dict)  # silhouette per k tried (per group: its best)
    criterion: str = ""


def _kmeans(x: np.ndarray, k: int, opts: ClusterOptions) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=opts.niter, seed=opts.seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    labels = assign[:, 0].astype(np.int64)
    # Drop empty clusters and renumber, so ids are 0..k-1 and every centroid has members.
    used = sorted(set(labels.tolist()))
    remap = {old: new for new, old in enumerate(used)}
    labels = np.array([remap[v] for v in labels], dtype=np.int64)
    centroids = np.stack([x[labels == c].mean(axis=0) for c in range(len(used))])
    return labels, _normalise(centroids)


def cluster_calls(x: np.ndarray, opts: ClusterOptions | None = None, *, progress: Any = None) -> Clustering:
    """Choose k by cosine silhouette over [k_min, k_max] and cluster `x` (normalised, float32)."""
    from sklearn.metrics import silhouette_score

    opts = opts or ClusterOptions()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_distinct = len(np.unique(np.round(x, 5), axis=0)) if len(x) else 0
    k_hi = min(opts.k_max, n_distinct - 1)
    ks = list(range(max(2, opts.k_min), k_hi + 1))
    if not ks:  # silhouette needs 2 <= k <= distinct points - 1
        labels = np.zeros(len(x), dtype=np.int64)
        cent = _normalise(x.mean(axis=0, keepdims=True)) if len(x) else np.zeros((0, DIM), np.float32)
        why = "k_max is 1 (one cluster asked for)" if opts.k_max < 2 else \
            f"{n_distinct} distinct prompt(s), too few to compare clusterings by silhouette"
        return Clustering(labels, cent, 1 if len(x) else 0, {}, f"k=1: {why}")
    task = progress.add_task("clustering (k-means, silhouette)", total=len(ks)) if progress else None
    best: tuple[float, int, np.ndarray, np.ndarray] | None = None
    scores: dict[int, float] = {}
    for k in ks:
        labels, cent = _kmeans(x, k, opts)
        k_eff = len(cent)
        score = float(silhouette_score(x, labels, metric="cosine")) if 1 < k_eff < len(x) else -1.0
        scores[k] = round(score, 4)
        if best is None or score > best[0] + 1e-6:  # ties keep the smaller k
            best = (score, k_eff, labels, cent)
        if progress:
            progress.advance(task)
    score, k, labels, cent = best
    crit = (f"k={k}: highest mean cosine silhouette ({score:.3f}) over k in [{ks[0]}, {ks[-1]}]")
    return Clustering(labels, cent, k, scores, crit)


def cluster_tasks(x: np.ndarray, groups: list[tuple[str, ...]], opts: ClusterOptions | None = None, *,
                  progress: Any = None, whole: frozenset = frozenset()) -> Clustering:
    """Task-grain S3 over `x` (normalised rows) with one (role, call kind, output format) key per row: each key's
    calls are one cluster, split further where `cluster_calls` finds sub-tasks (see the module doc). Keys in
    `whole` are kept as one cluster, never split (a task already in force: `incumbent_tasks`)."""
    opts = opts or ClusterOptions()
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.zeros(len(x), dtype=np.int64)
    cents: list[np.ndarray] = []
    scores: dict[str, float] = {}
    keys = list(dict.fromkeys(groups))
    split = 0
    task = progress.add_task("clustering (by role, call kind, format; then k-means)", total=len(keys)) \
        if progress else None
    for key in keys:
        idx = np.flatnonzero([g == key for g in groups])
        sub = cluster_calls(x[idx], opts) if len(idx) >= 2 * opts.min_size and key not in whole else None
        best = max(sub.scores.values(), default=-1.0) if sub else -1.0
        name = "/".join(str(k) for k in key)
        if sub and sub.k > 1:
            scores[name] = round(best, 4)
        sizes = np.bincount(sub.labels) if sub else np.array([len(idx)])
        if sub and sub.k > 1 and best >= opts.split_min_silhouette and sizes.min() >= opts.min_size:
            labels[idx] = len(cents) + sub.labels
            cents += list(sub.centroids)
            split += 1
        else:
            labels[idx] = len(cents)
            cents.append(_normalise(x[idx].mean(axis=0, keepdims=True))[0])
        if progress:
            progress.advance(task)
    crit = (f"k={len(cents)}: {len(keys)} role/call-kind/format group(s), {split} split into sub-tasks (cosine "
            f"silhouette >= {opts.split_min_silhouette}, parts of >= {opts.min_size} calls)")
    return Clustering(labels, np.stack(cents) if cents else np.zeros((0, DIM), np.float32), len(cents), scores, crit)


def incumbent_tasks(x: np.ndarray, call_kinds: list[str], registry: Any) -> list[str | None]:
    """Per row, the label of the promoted adapter (of `registry`, the one in force) whose task the router places
    the call in, else None. A later iteration's S3 keeps those calls together as that task, so the new adapter is
    judged against the one in force on the same task: re-clustering from scratch may pair the calls otherwise
    (three similar gateway workloads made two clusters, paired differently in two iterations)."""
    promoted = {e.cluster: e.label for e in registry.promoted()}
    if not promoted or len(x) == 0:
        return [None] * len(x)
    index = ClusterIndex.load(registry.clusters_dir)
    return [promoted.get(c) for c, _ in index.assign_vectors(x, list(call_kinds))]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "calls"


def label_clusters(labels: np.ndarray, roles: list[str], call_kinds: list[str]) -> list[dict[str, Any]]:
    """One entry per cluster: id, a unique slug label from its dominant role and call kind, size, shares."""
    out, seen = [], Counter()
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = np.flatnonzero(labels == c)
        role, r_n = Counter(roles[i] for i in idx).most_common(1)[0]
        kind, k_n = Counter(call_kinds[i] for i in idx).most_common(1)[0]
        base = f"{_slug(role)}-{_slug(kind)}"
        seen[base] += 1
        label = base if seen[base] == 1 else f"{base}-{seen[base]}"
        out.append({"id": c, "label": label, "size": int(len(idx)), "role": role, "call_kind": kind,
                    "role_share": round(r_n / len(idx), 3), "call_kind_share": round(k_n / len(idx), 3)})
    return out
