"""The adapter registry: JSON round trip, relative paths (a convert dir can move), replace-by-cluster."""

from __future__ import annotations

import json
import shutil

import pytest

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.artifacts import AdapterRegistryFile
from slmshift.train.registry import AdapterEntry, AdapterMetrics, AdapterRegistry


def entry(cluster: int, label: str, adapter_dir: str, promoted: bool = True) -> AdapterEntry:
    return AdapterEntry(cluster=cluster, label=label, role="planner", call_kind="intent",
                        base_model="packaged:smollm2-135m", adapter_dir=adapter_dir, promoted=promoted,
                        reason="accuracy 0.40 -> 0.70", metrics=AdapterMetrics(
                            val_accuracy_before=0.4, val_accuracy_after=0.7, val_loss_before=2.0, val_loss_after=0.5,
                            n_train=30, n_val=8, val_valid_after=0.9))


def test_round_trip_with_relative_paths_survives_a_move(tmp_path):
    conv = tmp_path / "run" / "convert"
    for label in ("planner-intent", "executor-call"):
        (conv / "adapters" / label).mkdir(parents=True)
    reg = AdapterRegistry.create(conv / "registry.json", conv / "clusters")
    reg.add(entry(0, "planner-intent", str(conv / "adapters" / "planner-intent")))
    reg.add(entry(1, "executor-call", str(conv / "adapters" / "executor-call"), promoted=False))
    reg.save()
    raw = json.loads((conv / "registry.json").read_text())
    assert raw["clusters_dir"] == "clusters"
    assert [e["adapter_dir"] for e in raw["entries"]] == ["adapters/planner-intent", "adapters/executor-call"]
    assert raw["entries"][0]["metrics"]["val_valid_after"] == 0.9  # extra metrics are kept

    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "run"), str(moved))
    back = AdapterRegistry.load(moved / "convert" / "registry.json")
    assert [e.label for e in back.promoted()] == ["planner-intent"]
    assert back.adapter_path("planner-intent") == moved / "convert" / "adapters" / "planner-intent"
    assert back.clusters_dir == moved / "convert" / "clusters"
    assert back.get("executor-call").metrics.val_accuracy_after == 0.7
    assert AdapterRegistryFile.read(back.path).promoted_dirs(back.path) == {
        "planner-intent": str(moved / "convert" / "adapters" / "planner-intent")}


def test_add_replaces_by_cluster_and_rejects_label_clash(tmp_path):
    reg = AdapterRegistry.create(tmp_path / "registry.json")
    reg.add(entry(0, "a", "adapters/a", promoted=False))
    reg.add(entry(0, "a", "adapters/a", promoted=True))
    assert len(reg.entries) == 1 and reg.entries[0].promoted
    with pytest.raises(SlmshiftError, match="label 'a' is already used by cluster 0"):
        reg.add(entry(1, "a", "adapters/a2"))


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(SlmshiftError, match="registry.json: file not found. Fix: run `slmshift convert"):
        AdapterRegistry.load(tmp_path / "registry.json")
    (tmp_path / "registry.json").write_text('{"entries": [{"cluster": 0}]}')
    with pytest.raises(SlmshiftError, match=r"entries\.0\.label: Field required .*Fix: regenerate"):
        AdapterRegistry.load(tmp_path / "registry.json")
    with pytest.raises(SlmshiftError, match="no adapter 'x'; registered: none"):
        AdapterRegistry.create(tmp_path / "r2.json").get("x")
