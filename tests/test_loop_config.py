"""`slmshift loop`'s input checks (exit 2 with the field, before Ray starts) and the configs it derives for verify:
the tuned router with the promoted adapters, and its "before conversion" twin on the base SLM."""

import subprocess
import sys
from pathlib import Path

import yaml

from slmshift.loop import BEFORE_ARM, tuned_policy, verify_config
from slmshift.platform.config import load_config

SMALL = Path(__file__).parents[1] / "scenarios" / "paper-table-small.yaml"


def loop_cli(tmp_path, *args, **changes):
    doc = yaml.safe_load(SMALL.read_text())
    doc["experiment"]["storage"] = str(tmp_path / "runs")
    doc["loop"].update(changes)
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return subprocess.run([sys.executable, "-m", "slmshift.cli", "loop", str(cfg), *args], capture_output=True,
                          text=True, timeout=120)


def test_a_budget_outside_0_1_is_exit_2_naming_the_field(tmp_path):
    r = loop_cli(tmp_path, budget=1.5)
    assert r.returncode == 2 and "loop.budget" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_fewer_than_one_iteration_is_exit_2(tmp_path):
    r = loop_cli(tmp_path, "--iterations", "0")
    assert r.returncode == 2 and "--iterations" in r.stderr and "Traceback" not in r.stderr


def test_verify_measures_before_conversion_on_the_same_tasks(tmp_path):
    cfg = load_config(SMALL)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("kind: cascade\nname: chosen\ntau: 0.4\n")
    registry = str(tmp_path / "convert" / "registry.json")
    tuned, before = tuned_policy(str(policy_file), registry), tuned_policy(str(policy_file), None)
    assert tuned.registry == registry and before.registry is None  # a cascade serves the adapters too
    seen = {"operator": {"t1"}}
    arms = verify_config(cfg, cfg.loop, seen, tuned, registry, before).router.policies
    assert [a.name for a in arms] == ["all-llm", "tuned", BEFORE_ARM]
    assert arms[1].registry == registry and arms[2].registry is None and arms[2].tau == arms[1].tau == 0.4
    assert [a.name for a in verify_config(cfg, cfg.loop, seen, tuned, registry).router.policies] == ["all-llm", "tuned"]
