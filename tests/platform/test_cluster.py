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
