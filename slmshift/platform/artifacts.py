"""Artifacts a run and a conversion share: the text of a call that S3 embeds (`prompt_text`), the chat prompt an
SLM sees in serving and in LoRA training (`chat_prompt`), the S3 cluster index the router loads (`ClusterIndex`),
and the adapter registry file (`AdapterRegistryFile`). They live on the ground floor so that `serve/` (router,
engines) and `train/` (convert) read and write the same formats without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.embeddings import DIM, embed
from slmshift.platform.errors import SlmshiftError

CLUSTER_FILES = ("centroids.npy", "index.faiss", "clusters.json")


def prompt_text(messages: list[dict] | str) -> str:
    """The text of a call that is embedded; S3 and the router must both use this one function.

    Messages are flattened as 'role: content' lines in order. The embedder reads the first 256 word
    pieces, so a call is characterised by its system prompt and first turns: the task template, which is
    what recurs across calls of one task.
    """
    if isinstance(messages, str):
        try:
            parsed = json.loads(messages)
        except ValueError:
            return messages
        messages = parsed if isinstance(parsed, list) else [{"role": "user", "content": str(parsed)}]
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f"{m.get('role', '')}: {m.get('content', '')}")
        else:
            parts.append(str(m))
    return "\n".join(parts)


PLAIN_TURN = "{role}:\n{content}\n\n"  # one turn of `plain_prompt`
PLAIN_GENERATION_PROMPT = "assistant:\n"


def plain_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt format for a base model whose tokenizer has no chat template (Gemma-3-270M base): the tokenizer's
    BOS token (if it has one), then each turn as its role, a colon and a newline, its content and a blank line, then
    `assistant:` and a newline, after which the model writes. For example:

        <bos>system:
        Answer in JSON.

        user:
        Weather in Paris?

        assistant:

    Roles are tagged on a line of their own so multi-line content (code, JSON) cannot be mistaken for a new turn,
    and the prompt ends on a newline rather than a space (a trailing space is a poor token boundary for byte-pair
    and sentencepiece vocabularies alike). BOS is written out because prompts are tokenised without special
    tokens (chat templates write their own); Gemma degrades badly without it. A base model does not follow the
    format until it is fine-tuned on it: LoRA training renders its rows with this same function and ends each
    answer with EOS, so an adapter learns where to stop."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    return bos + "".join(PLAIN_TURN.format(role=m["role"], content=m["content"]) for m in messages) \
        + PLAIN_GENERATION_PROMPT


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text a chat becomes; serving and LoRA training share it so an adapter sees the same prompts.
    The tokenizer's chat template where it has one, else `plain_prompt` (base models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return plain_prompt(tokenizer, messages)


def normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


class ClusterIndex:
    """Nearest-centroid lookup over persisted clusters; what the router loads to place a call."""

    def __init__(self, centroids: np.ndarray, clusters: list[dict[str, Any]], index: Any = None):
        import faiss

        self.centroids = normalise(np.asarray(centroids, dtype=np.float32).reshape(-1, DIM))
        self.clusters = clusters
        self.kinds = [c.get("call_kind") for c in clusters]  # by index position: what `assign_vectors` filters on
        if index is None:
            index = faiss.IndexFlatIP(DIM)
            index.add(self.centroids)
        self.index = index

    def save(self, clusters_dir: str | Path) -> Path:
        import faiss

        d = Path(clusters_dir)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "centroids.npy", self.centroids)
        faiss.write_index(self.index, str(d / "index.faiss"))
        (d / "clusters.json").write_text(json.dumps(self.clusters, indent=2))
        return d

    @classmethod
    def load(cls, clusters_dir: str | Path) -> "ClusterIndex":
        import faiss

        d = Path(clusters_dir)
        missing = [n for n in CLUSTER_FILES if not (d / n).is_file()]
        if missing:
            raise SlmshiftError(f"{d}: not a cluster directory (missing {', '.join(missing)}). Fix: point at the "
                                "`clusters/` folder `slmshift convert` wrote (RUN_DIR/convert/clusters).")
        try:
            clusters = json.loads((d / "clusters.json").read_text())
            centroids = np.load(d / "centroids.npy")
            index = faiss.read_index(str(d / "index.faiss"))
        except (OSError, ValueError, RuntimeError) as e:
            raise SlmshiftError(f"{d}: cannot read the cluster index ({e}). Fix: run `slmshift convert` again.") from None
        if index.ntotal != len(clusters) or len(centroids) != len(clusters):
            raise SlmshiftError(f"{d}: index.faiss has {index.ntotal} centroids, clusters.json {len(clusters)}; "
                                "the folder is inconsistent. Fix: run `slmshift convert` again.")
        return cls(centroids, clusters, index)

    def assign_vectors(self, x: np.ndarray, call_kinds: list[str | None] | None = None) -> list[tuple[int, float]]:
        """(cluster id, cosine similarity) per vector: the nearest centroid, among the clusters of the call's own kind
        where `call_kinds` gives it and the index has such clusters (S3 never mixes kinds in one cluster, so a call
        is never placed in another kind's task however alike the prompts read)."""
        if len(x) == 0 or self.index.ntotal == 0:
            return [(-1, 0.0)] * len(x)
        # every centroid, best first, only where a call's kind may rule out the nearest (the router's hot path)
        k = self.index.ntotal if call_kinds is not None else 1
        sims, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        out = []
        for i, row in enumerate(ids):
            kind = call_kinds[i] if call_kinds is not None else None
            own = [r for r, j in enumerate(row) if self.kinds[j] == kind] if kind is not None else []
            r = own[0] if own else 0
            out.append((int(row[r]), float(sims[i, r])))
        return out

    def assign(self, texts: list[str], call_kinds: list[str | None] | None = None) -> list[tuple[int, float]]:
        """(cluster id, cosine similarity to its centroid) per text (texts from `prompt_text`)."""
        return self.assign_vectors(embed(list(texts)), call_kinds)

    def label(self, cluster_id: int) -> str | None:
        return next((c["label"] for c in self.clusters if c["id"] == cluster_id), None)


# --- the adapter registry file (written by `slmshift convert`, read by engines, router and config) ------


class AdapterMetrics(BaseModel):
    """Held-out quality of the base SLM and of the adapter on the cluster's validation calls."""

    model_config = ConfigDict(extra="allow")

    val_accuracy_before: float | None = None
    val_accuracy_after: float | None = None
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    n_train: int = 0
    n_val: int = 0


class AdapterEntry(BaseModel):
    """One task cluster's adapter. `adapter_dir` is stored relative to the registry file."""

    model_config = ConfigDict(extra="forbid")

    cluster: int = Field(ge=0)
    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique slug; the adapter's served name.")
    role: str = ""
    call_kind: str = ""
    base_model: str = Field(description="The `source` of the SLM the adapter was trained on.")
    adapter_dir: str
    metrics: AdapterMetrics = Field(default_factory=AdapterMetrics)
    promoted: bool = False
    reason: str = ""


class AdapterRegistryFile(BaseModel):
    """The registry.json document. Paths inside are relative to the file, so a convert dir can move."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    clusters_dir: str = Field(default="clusters", description="S3's centroids/index, relative to this file.")
    entries: list[AdapterEntry] = Field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> AdapterRegistryFile:
        """Parse a registry file; raises SlmshiftError naming the file and what is wrong."""
        from pydantic import ValidationError


        p = Path(path)
        if not p.is_file():
            raise SlmshiftError(f"adapter registry {path}: file not found. Fix: run `slmshift convert RUN_DIR` and "
                                f"point at RUN_DIR/convert/registry.json.")
        try:
            return cls.model_validate_json(p.read_text())
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "<top>"
            raise SlmshiftError(f"adapter registry {path}: {where}: {first['msg']} ({e.error_count()} problem(s)). "
                                "Fix: regenerate it with `slmshift convert`.") from None

    def promoted_dirs(self, path: str | Path, base: str | None = None) -> dict[str, str]:
        """label -> absolute adapter dir, for the promoted entries of the file at `path` (with `base`, only those
        trained on that model source: S4 chooses a base per cluster, so one registry may hold several bases')."""
        root = Path(path).resolve().parent
        return {e.label: str((root / e.adapter_dir).resolve()) for e in self.entries
                if e.promoted and (base is None or same_source(e.base_model, base))}


def same_source(a: str, b: str | None) -> bool:
    """Whether two model `source`s name the same weights (equal, or the same local path)."""
    if b is None:
        return False
    return a == b or ("://" not in a and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def served_adapters(spec: Any) -> dict[str, str]:
    """Every adapter a model spec serves: name -> dir. Its `adapters`, plus the promoted entries of its `registry`
    trained on its own `source` (the other entries are served by the model of their base). The engines load these;
    the router sends a cluster's calls to the model that serves its adapter."""
    dirs = dict(spec.adapters)
    if spec.registry:
        dirs.update(AdapterRegistryFile.read(spec.registry).promoted_dirs(spec.registry, base=spec.source))
    return dirs
