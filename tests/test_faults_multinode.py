"""A worker node removed mid-run on a real multi-node Ray (`ray.cluster_utils.Cluster`: head + 2 workers in one
machine): the run finishes and the log holds every finished call exactly once."""

from __future__ import annotations

import threading
import time

import pytest

import slmshift.scenarios  # noqa: F401  fills the scenario registry
from slmshift.platform.config import load_config
from slmshift.platform.scenario import scenario_options
from slmshift.runner import run_experiment
from multinode import three_nodes
from test_faults import actors, assert_logged_exactly_once

# Each model replica takes a whole CPU, and the head has none: the replicas live on the worker nodes.
CONFIG = """\
experiment: {{name: multinode, seed: 5, storage: {storage}}}
models:
  - {{name: small, tier: slm, backend: simulated, resources: {{num_cpus: 1}},
     profile: {{accuracy: {{default: 0.6}}, latency_base_s: 0.25}}}}
  - {{name: big, tier: llm, backend: simulated, resources: {{num_cpus: 1}},
     profile: {{accuracy: {{default: 1.0}}, latency_base_s: 0.25}}}}
router: {{policies: [{{kind: llm, name: llm}}]}}
scenarios: [{{kind: operator, episodes: 30, teams: 2, concurrency: 3}}]
"""


@pytest.fixture(scope="module")
def cluster():
    with three_nodes(worker_cpus=2) as (c, workers):
        yield c, workers


def test_worker_node_removed_mid_run(cluster, tmp_path):
    c, workers = cluster
    removed: list[str] = []
    log_nodes: list[str] = []

    def remove_later() -> None:  # the node that serves the teacher, once episodes are running
        deadline = time.time() + 120
        # the writer too: on a loaded machine the GCS table once listed the teams but no live LogWriter yet
        while time.time() < deadline and not (actors("TeamActor") and actors("ServeReplica:big")
                                               and actors("LogWriter")):
            time.sleep(0.1)
        time.sleep(1.0)
        node_id = actors("ServeReplica:big")[0]["Address"]["NodeID"]
        log_nodes.extend(a["Address"]["NodeID"] for a in actors("LogWriter"))
        node = next(w for w in workers if w.node_id == node_id)
        c.remove_node(node, allow_graceful=False)
        removed.append(node_id)

    t = threading.Thread(target=remove_later, daemon=True)
    t.start()
    path = tmp_path / "exp.yaml"
    path.write_text(CONFIG.format(storage=tmp_path / "runs"))
    res = run_experiment(load_config(path, scenario_options()), keep_ray=True)
    t.join(10)
    assert removed, "no worker node was removed"
    # The writer lives with the driver (the head here), never on a worker whose loss could take it along with a
    # team actor holding the only other copy of finished episodes' records.
    import ray

    assert log_nodes == [ray.get_runtime_context().get_node_id()]
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    infra = df[df["infra_error"]]
    assert res.summary["arms"][0]["valid_rate"] == 1.0  # the lost node's failures are not the teacher's
    assert res.summary["arms"][0]["infra_errors"] == len(infra)
