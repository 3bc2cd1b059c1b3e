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


def test_report_shows_before_conversion_and_after_on_the_same_tasks(tmp_path):
    """A verify run with the three arms (written through the real S1 writer): the table has row 0 (tuned router, base
    SLM) and row 1 (the same router serving adapters), each with its own SLM share and success."""
    from slmshift.loop import LoopState, write_report
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import EpisodeResult, Interaction, record_id

    run = tmp_path / "verify"
    log = LogWriter(str(run), flush_every=10_000, flush_interval_s=3600)
    # (arm, SLM calls of 2, success) per episode: the adapters take more calls at the same success
    arms = {"all-llm": (0, True), BEFORE_ARM: (1, True), "tuned": (2, True)}
    for arm, (n_slm, ok) in arms.items():
        for i in range(10):
            ep = f"{arm}-{i}"
            log.add([Interaction(
                id=record_id("v", ep, k), experiment_id="v", episode_id=ep, call_index=k, scenario="operator",
                task_id=f"t{i}", policy=arm, role="planner", call_kind="intent", category="", expect="json",
                prompt="[]", output="x", engine_latency_s=0.1, flops=0.0,
                model="slm" if k < n_slm else "llm", tier="slm" if k < n_slm else "llm", backend="hf",
                route_kind="x", route_reason="", tokens_in=1, tokens_out=1, latency_s=0.1, cost_usd=0.001,
                simulated=k >= n_slm, valid=True, correct=True).model_dump() for k in range(2)])
            log.add_episode(EpisodeResult(experiment_id="v", episode_id=ep, scenario="operator", task_id=f"t{i}",
                                          policy=arm, success=ok, reward=1.0, n_calls=2))
    log.close()
    state = LoopState(tmp_path)
    state.doc["config"] = load_config(SMALL).model_dump(mode="json")
    state.update(1, "convert", status="done", registry=str(tmp_path / "registry.json"), clusters=[],
                 earlier_failures=["SlmshiftError: LoRA training of 'x' failed: OOM"], wall_s=12.0)
    state.update(1, "verify", status="done", run_dir=str(run))
    write_report(tmp_path, state)
    md = (tmp_path / "report.md").read_text()
    assert "| 0: before conversion | Open Operator | 40% | 50% [" in md
    assert "| 1: after conversion | Open Operator | 40% | 100% [" in md
    # a stage that finished on a rerun says so, and does not show the old failure as its own reason
    assert "| 1 | convert | done | 12 | 1 earlier attempt(s) failed (last: SlmshiftError: LoRA training" in md
