"""A real multi-node Ray in one machine, for the tests that remove a node mid-run."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def three_nodes(worker_cpus: int):
    """A real multi-node Ray in one machine (`ray.cluster_utils.Cluster`): a CPU-less head, where the driver's
    pinned actors live, and two workers; Ray initialised against it. Yields (cluster, [worker nodes])."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * 1024**2})
    workers = [c.add_node(num_cpus=worker_cpus, object_store_memory=150 * 1024**2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="slmshift")
    try:
        yield c, workers
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()
