"""The adapter registry: cluster -> adapter -> metrics -> promoted or not, as one JSON file.

The file format (`AdapterRegistryFile`) lives in `platform/artifacts.py` because config validation, the hf engine
and the router read it too; this module is the writer's side. Paths are stored relative to the registry file,
so a whole convert dir can be moved or copied to shared storage and still resolve.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.artifacts import AdapterEntry, AdapterMetrics, AdapterRegistryFile

__all__ = ["AdapterEntry", "AdapterMetrics", "AdapterRegistry", "SAME_TASK_MIN_SIMILARITY", "same_task_adapters"]

SAME_TASK_MIN_SIMILARITY = 0.9  # cosine between an old and a new cluster's centroids for them to be the same task


class AdapterRegistry:
    """A registry file in memory. `add` replaces the entry of the same cluster (a re-run of one cluster)."""

    def __init__(self, path: str | Path, doc: AdapterRegistryFile | None = None):
        self.path = Path(path).resolve()
        self.doc = doc or AdapterRegistryFile()

    @classmethod
    def load(cls, path: str | Path) -> AdapterRegistry:
        """Read an existing registry (SlmshiftError naming the file when missing or malformed)."""
        return cls(path, AdapterRegistryFile.read(path))

    @classmethod
    def create(cls, path: str | Path, clusters_dir: str | Path | None = None) -> AdapterRegistry:
        """A new, empty registry to be saved at `path`; `clusters_dir` defaults to `<dir of path>/clusters`."""
        reg = cls(path)
        if clusters_dir is not None:
            reg.doc = AdapterRegistryFile(clusters_dir=reg._relative(clusters_dir))
        return reg

    # --- reading --------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def entries(self) -> list[AdapterEntry]:
        return list(self.doc.entries)

    @property
    def clusters_dir(self) -> Path:
        return (self.root / self.doc.clusters_dir).resolve()

    def promoted(self) -> list[AdapterEntry]:
        return [e for e in self.doc.entries if e.promoted]

    def adapter_path(self, entry: AdapterEntry | str) -> Path:
        """Absolute adapter dir of an entry (or of the entry with that label)."""
        e = self.get(entry) if isinstance(entry, str) else entry
        return (self.root / e.adapter_dir).resolve()

    def get(self, label: str) -> AdapterEntry:
        for e in self.doc.entries:
            if e.label == label:
                return e
        raise SlmshiftError(f"adapter registry {self.path}: no adapter {label!r}; registered: "
                            f"{', '.join(e.label for e in self.doc.entries) or 'none'}")

    # --- writing --------------------------------------------------------------------------------

    def add(self, entry: AdapterEntry | dict) -> AdapterEntry:
        """Add (or replace, by cluster) an entry. An absolute `adapter_dir` is stored relative to the file."""
        e = entry if isinstance(entry, AdapterEntry) else AdapterEntry.model_validate(entry)
        e = e.model_copy(update={"adapter_dir": self._relative(e.adapter_dir)})
        clash = [x for x in self.doc.entries if x.label == e.label and x.cluster != e.cluster]
        if clash:
            raise SlmshiftError(f"adapter registry {self.path}: label {e.label!r} is already used by cluster "
                                f"{clash[0].cluster}; labels must be unique.")
        kept = [x for x in self.doc.entries if x.cluster != e.cluster]
        self.doc = self.doc.model_copy(update={"entries": sorted(kept + [e], key=lambda x: x.cluster)})
        return e

    def save(self) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a registry."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(self.doc.model_dump(mode="json"), f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)
        return self.path

    def _relative(self, path: str | Path) -> str:
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()  # already relative to the registry
        return Path(os.path.relpath(p.resolve(), self.root)).as_posix()


def same_task_adapters(prev: AdapterRegistry, clusters_dir: str | Path) -> dict[int, AdapterEntry]:
    """`prev`'s promoted adapters by the cluster of a new clustering (`clusters_dir`) that holds the same task.

    A new cluster that S3 kept as an old adapter's task (`task_of`, when convert had `--incumbent`) is that
    adapter's. Otherwise an old adapter's task is the new cluster whose centroid is nearest its own, of the same call
    kind, with cosine >= SAME_TASK_MIN_SIMILARITY; where two old adapters fall on one new cluster, the nearer one
    wins. An old task with no such cluster is left out."""
    from slmshift.platform.artifacts import ClusterIndex

    old_index, new_index = ClusterIndex.load(prev.clusters_dir), ClusterIndex.load(clusters_dir)
    kinds = [c.get("call_kind") for c in new_index.clusters]
    kept = {c["task_of"]: j for j, c in enumerate(new_index.clusters) if c.get("task_of")}
    best: dict[int, tuple[float, AdapterEntry]] = {}
    for e in prev.promoted():
        if e.label in kept:
            best[kept[e.label]] = (2.0, e)  # above any cosine: S3 kept this very task
            continue
        sims = new_index.centroids @ old_index.centroids[e.cluster]
        j = max((j for j in range(len(sims)) if kinds[j] == e.call_kind), key=lambda j: sims[j], default=None)
        if j is not None and sims[j] >= SAME_TASK_MIN_SIMILARITY and float(sims[j]) > best.get(j, (-2.0, None))[0]:
            best[j] = (float(sims[j]), e)
    return {j: e for j, (_, e) in best.items()}
