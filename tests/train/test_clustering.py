"""S3 clustering: planted prompt families are recovered, k is chosen by silhouette, the index round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmshift.platform.errors import SlmshiftError
from slmshift.train.cluster import (ClusterIndex, ClusterOptions, cluster_calls, embed_texts, label_clusters,
                                    prompt_text)

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Perth", "Quito", "Seoul", "Dakar"]
FUNCS = ["parse_date", "merge_lists", "read_csv", "retry_request", "hash_password", "resize_image", "send_email",
         "sum_column", "flatten_dict", "slugify"]
TABLES = ["orders", "users", "invoices", "flights", "patients", "products", "payments", "reviews", "tickets", "loans"]
FAMILIES = {
    ("forecaster", "weather"): ("You are a weather assistant. Give the forecast for the city asked about.",
                                [f"Will it rain in {c} tomorrow afternoon?" for c in CITIES]),
    ("reviewer", "code_review"): ("You review Python pull requests. Point out bugs and style problems.",
                                  [f"Review this function:\ndef {f}(x):\n    return x" for f in FUNCS]),
    ("analyst", "sql"): ("Translate the question into one SQL query over the given schema.",
                         [f"How many rows in table {t} were created last month?" for t in TABLES]),
}


def _family_calls():
    msgs, roles, kinds, truth = [], [], [], []
    for i, ((role, kind), (system, users)) in enumerate(FAMILIES.items()):
        for u in users:
            msgs.append([{"role": "system", "content": system}, {"role": "user", "content": u}])
            roles.append(role), kinds.append(kind), truth.append(i)
    return msgs, roles, kinds, np.array(truth)


@pytest.fixture(scope="module")
def planted():
    msgs, roles, kinds, truth = _family_calls()
    x = embed_texts([prompt_text(m) for m in msgs])
    return msgs, roles, kinds, truth, x


def test_prompt_text_accepts_messages_or_their_json():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompt_text(msgs) == prompt_text(json.dumps(msgs)) == "system: S\nuser: U"
    assert prompt_text("not json") == "not json"


def test_planted_families_are_recovered(planted):
    from sklearn.metrics import adjusted_rand_score

    msgs, roles, kinds, truth, x = planted
    res = cluster_calls(x, ClusterOptions(k_min=2, k_max=6, seed=0))
    assert res.k == 3, res.scores
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert max(res.scores, key=res.scores.get) == 3 and "silhouette" in res.criterion
    info = label_clusters(res.labels, roles, kinds)
    assert sorted(c["label"] for c in info) == ["analyst-sql", "forecaster-weather", "reviewer-code-review"]
    assert sorted(c["size"] for c in info) == [10, 10, 10]


def test_k_is_clamped_to_the_data(planted):
    *_, x = planted
    one = cluster_calls(x[:1])
    assert one.k == 1 and one.labels.tolist() == [0] and "k=1" in one.criterion
    same = cluster_calls(np.repeat(x[:1], 5, axis=0))  # identical prompts: nothing to separate
    assert same.k == 1
    few = cluster_calls(x[[0, 1, 10, 11]], ClusterOptions(k_max=8))  # 4 points: k tried only up to 3
    assert max(few.scores) <= 3 and few.k == 2
    asked = cluster_calls(x, ClusterOptions(k_max=1))  # one task on purpose (e.g. convert --call-kinds X --k-max 1)
    assert asked.k == 1 and set(asked.labels.tolist()) == {0} and "k_max is 1" in asked.criterion


def test_labels_are_unique_slugs():
    labels = np.array([0, 0, 1, 1])
    info = label_clusters(labels, ["planner"] * 4, ["intent"] * 4)
    assert [c["label"] for c in info] == ["planner-intent", "planner-intent-2"]


def test_index_round_trips_and_routes_new_prompts(planted, tmp_path):
    msgs, roles, kinds, truth, x = planted
    res = cluster_calls(x, ClusterOptions(k_max=5))
    info = label_clusters(res.labels, roles, kinds)
    ClusterIndex(res.centroids, info).save(tmp_path / "clusters")
    assert sorted(p.name for p in (tmp_path / "clusters").iterdir()) == ["centroids.npy", "clusters.json", "index.faiss"]
    cent = np.load(tmp_path / "clusters" / "centroids.npy")
    assert cent.dtype == np.float32 and cent.shape == (3, 384) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)
    idx = ClusterIndex.load(tmp_path / "clusters")
    new = [[{"role": "system", "content": FAMILIES[("analyst", "sql")][0]},
            {"role": "user", "content": "Average ticket price per airline in 2024?"}],
           [{"role": "system", "content": FAMILIES[("forecaster", "weather")][0]},
            {"role": "user", "content": "Is it windy in Berlin?"}]]
    (c1, s1), (c2, s2) = idx.assign([prompt_text(m) for m in new])
    assert idx.label(c1) == "analyst-sql" and idx.label(c2) == "forecaster-weather"
    assert 0.5 < s1 <= 1.0001 and 0.5 < s2 <= 1.0001


def test_loading_a_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SlmshiftError, match="missing centroids.npy, index.faiss, clusters.json"):
        ClusterIndex.load(tmp_path)


def test_task_grain_separates_kinds_and_splits_only_where_embeddings_show_sub_tasks(planted):
    """Two call kinds that share one prompt family are two tasks whatever the embeddings say; one kind holding two
    planted prompt families is split into two sub-tasks; a kind with one family stays whole."""
    from slmshift.train.cluster import cluster_tasks

    msgs, roles, kinds, truth, x = planted
    # weather and sql calls under one (role, kind, format): two sub-tasks; code review as two kinds of one family
    groups = [("analyst", "query", "text") if t != 1 else ("reviewer", "review" if i % 2 else "fix", "code")
              for i, t in enumerate(truth)]
    res = cluster_tasks(x, groups, ClusterOptions(k_max=4, min_size=4))
    info = label_clusters(res.labels, [g[0] for g in groups], [g[1] for g in groups])
    assert res.k == 4, (res.scores, res.criterion)
    assert all(c["call_kind_share"] == 1.0 for c in info)  # no cluster mixes call kinds
    for fam in (0, 2):  # each planted family of the shared kind is exactly one cluster
        assert len(set(res.labels[truth == fam])) == 1
    assert len(set(res.labels[truth == 0]) | set(res.labels[truth == 2])) == 2
    assert "1 split into sub-tasks" in res.criterion
    # too few calls for a sub-task to be trained on: the group stays one task
    whole = cluster_tasks(x, groups, ClusterOptions(k_max=4, min_size=11))
    assert whole.k == 3 and "0 split" in whole.criterion
    # a task already in force (its adapter's) is kept whole, however its embeddings would split
    kept = cluster_tasks(x, groups, ClusterOptions(k_max=4, min_size=4), whole=frozenset({groups[0]}))
    assert kept.k == 3 and "0 split" in kept.criterion


def test_a_later_iteration_keeps_the_tasks_of_the_adapters_in_force(planted, tmp_path):
    """The calls the router would send to a promoted adapter are that adapter's task in the next S3, whatever a new
    clustering would pair; calls of a cluster without a promoted adapter are clustered anew."""
    from slmshift.train.cluster import incumbent_tasks
    from slmshift.train.registry import AdapterEntry, AdapterRegistry

    msgs, roles, kinds, truth, x = planted
    res = cluster_calls(x, ClusterOptions(k_min=3, k_max=3))
    info = label_clusters(res.labels, roles, kinds)
    ClusterIndex(res.centroids, info).save(tmp_path / "clusters")
    reg = AdapterRegistry.create(tmp_path / "registry.json", tmp_path / "clusters")
    promoted = int(res.labels[0])
    for c in info:
        reg.add(AdapterEntry(cluster=c["id"], label=c["label"], base_model="packaged:smollm2-135m",
                             adapter_dir=str(tmp_path / c["label"]), promoted=c["id"] == promoted))
    reg.save()
    tasks = incumbent_tasks(x, kinds, AdapterRegistry.load(tmp_path / "registry.json"))
    label = info[promoted]["label"]
    assert [t == label for t in tasks] == [lab == promoted for lab in res.labels]
    assert set(tasks) == {label, None}
    empty = AdapterRegistry.create(tmp_path / "none.json", tmp_path / "clusters")
    assert incumbent_tasks(x, kinds, empty) == [None] * len(x)


def test_a_call_is_placed_among_its_own_kind_only(planted, tmp_path):
    msgs, roles, kinds, truth, x = planted
    res = cluster_calls(x, ClusterOptions(k_max=5))
    idx = ClusterIndex(res.centroids, label_clusters(res.labels, roles, kinds))
    weather = [prompt_text(msgs[0])]
    assert idx.label(idx.assign(weather)[0][0]) == "forecaster-weather"
    (c, sim), = idx.assign(weather, ["sql"])  # a weather-like prompt on an sql call goes to the sql task
    assert idx.label(c) == "analyst-sql" and sim < 0.9
    assert idx.assign(weather, ["unknown-kind"]) == idx.assign(weather)  # a kind the index lacks: nearest overall
