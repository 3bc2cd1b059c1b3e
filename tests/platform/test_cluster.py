"""The shipped cluster.yaml is valid for `ray up` (Ray's own schema; there is no `ray up --dry-run`)."""

import json
import os
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml


def test_cluster_yaml_matches_ray_schema():
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "local" and "scripts/setup.sh" in " ".join(cfg["setup_commands"])


def test_a_taken_dashboard_port_is_a_clear_error_and_the_default_moves_on():
    """Two embedded clusters on one machine: a fixed port another process holds fails with the field to change;
    left unset, the port is Ray's first free one from 8265 (the run starts)."""
    import socket
    import subprocess
    import sys

    from slmshift.platform.cluster import start_ray
    from slmshift.platform.config import RaySection
    from slmshift.platform.errors import RayConnectError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        try:
            start_ray(RaySection(num_cpus=1, dashboard=True, dashboard_port=port))
        except RayConnectError as e:
            assert "already occupied" in str(e) and "ray.dashboard_port" in str(e)
        else:
            raise AssertionError("started on a port another process holds")
    assert RaySection().dashboard_port is None  # so ray.init tries 8265, then the next free ports
    # the same in a fresh process while 8265 itself is held (skipped if something else already holds it)
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 8265))
        except OSError:
            return
        held.listen()
        code = ("from slmshift.platform.cluster import start_ray; from slmshift.platform.config import RaySection; "
                "import ray; i = start_ray(RaySection(num_cpus=1)); print('URL', i.dashboard_url); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "URL" in out.stdout and ":8265" not in out.stdout
