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
    SLM) and row 1 (the same router serving adapters), each with its own SLM share and success. The single-turn and
    multi-turn Operator scenarios pool into one Open Operator row, and each keeps its own line below."""
    from slmshift.loop import LoopState, write_report
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import EpisodeResult, Interaction, record_id

    run = tmp_path / "verify"
    log = LogWriter(str(run), flush_every=10_000, flush_interval_s=3600)
    # (scenario, arm): SLM calls of 2 per episode; the adapters take more calls at the same success
    n_slm = {("operator", "all-llm"): 0, ("operator", BEFORE_ARM): 1, ("operator", "tuned"): 2,
             ("mt", "all-llm"): 0, ("mt", BEFORE_ARM): 0, ("mt", "tuned"): 2}
    for (scenario, arm), slm in n_slm.items():
        for i in range(10):
            ep = f"{scenario}-{arm}-{i}"
            log.add([Interaction(
                id=record_id("v", ep, k), experiment_id="v", episode_id=ep, call_index=k, scenario=scenario,
                task_id=f"t{i}", policy=arm, role="planner", call_kind="intent", category="", expect="json",
                prompt="[]", output="x", engine_latency_s=0.1, flops=0.0,
                model="slm" if k < slm else "llm", tier="slm" if k < slm else "llm", backend="hf",
                route_kind="x", route_reason="", tokens_in=1, tokens_out=1, latency_s=0.1, cost_usd=0.001,
                simulated=k >= slm, valid=True, correct=True).model_dump() for k in range(2)])
            log.add_episode(EpisodeResult(experiment_id="v", episode_id=ep, scenario=scenario, task_id=f"t{i}",
                                          policy=arm, success=scenario == "operator" or i < 5, reward=1.0, n_calls=2))
    log.close()
    state = LoopState(tmp_path)
    config = load_config(SMALL).model_dump(mode="json")
    config["scenarios"].append({"kind": "operator_multiturn", "name": "mt"})
    state.doc["config"] = config
    state.update(1, "convert", status="done", registry=str(tmp_path / "registry.json"), clusters=[],
                 earlier_failures=["SlmshiftError: LoRA training of 'x' failed: OOM"], wall_s=12.0)
    state.update(1, "verify", status="done", run_dir=str(run))
    write_report(tmp_path, state)
    md = (tmp_path / "report.md").read_text()
    # pooled over 20 episodes (80 calls) an arm; success 15/20 in every arm, so the ratio is 1
    assert "| 0: before conversion | Open Operator | mt, operator | 40% | 25% [" in md
    assert "| 1: after conversion | Open Operator | mt, operator | 40% | 100% [" in md
    assert md.count("(ratio 1.00) | yes | 20 ep / 40 calls |") == 2
    assert "| 0: before conversion | operator | 50% [" in md and "| 0: before conversion | mt | 0% [" in md
    assert "| 1: after conversion | mt | 100% [" in md and "50% vs 50% (ratio 1.00)" in md
    # a stage that finished on a rerun says so, and does not show the old failure as its own reason
    assert "| 1 | convert | done | 12 | 1 earlier attempt(s) failed (last: SlmshiftError: LoRA training" in md


def test_loop_picks_one_row_and_checks_per_scenario_episodes(tmp_path):
    """`--scenario` narrows a loop to some scenarios (unknown ones: exit 2, naming them); `scenario_episodes` gives a
    scenario its own counts, and must name a scenario of the experiment."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.loop import only_scenarios, split_tasks
    from slmshift.platform.errors import SlmshiftError

    doc = yaml.safe_load(SMALL.read_text())
    doc["scenarios"].append({"kind": "operator_multiturn", "name": "mt", "options": {"categories": ["multi_turn_base"]}})
    doc["loop"]["scenario_episodes"] = {"mt": {"collect": 6, "verify": 3}}
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert cfg.loop.episodes("mt") == (6, 3) and cfg.loop.episodes("operator") == (160, 24)
    split = split_tasks(cfg, cfg.loop)
    assert (len(split["mt"]["train"]), len(split["mt"]["verify"])) == (6, 3)
    assert not set(split["mt"]["train"]) & set(split["mt"]["verify"])
    one = only_scenarios(cfg, ["mt"])
    assert [s.label for s in one.scenarios] == ["mt"] and one.loop.episodes("mt") == (6, 3)
    try:
        only_scenarios(cfg, ["cradle"])
        raise AssertionError("an unknown scenario was accepted")
    except SlmshiftError as e:
        assert "--scenario cradle" in str(e) and "operator, mt" in str(e)

    doc["loop"]["scenario_episodes"] = {"nope": {"collect": 6}}
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "slmshift.cli", "loop", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "loop.scenario_episodes.nope" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "slmshift.cli", "loop", str(SMALL), "--scenario", "cradle"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--scenario cradle" in r.stderr and "Traceback" not in r.stderr


def _convert_dir(root, tasks, promoted=()):
    """A convert dir as S3/S5 leave it: clusters (one centroid per (label, call kind, direction)) and a registry
    whose `promoted` labels have an adapter dir."""
    import numpy as np

    from slmshift.platform.artifacts import DIM, ClusterIndex
    from slmshift.train.registry import AdapterRegistry

    cents = np.zeros((len(tasks), DIM), dtype=np.float32)
    for i, (_, _, axis) in enumerate(tasks):
        cents[i, axis] = 1.0
    ClusterIndex(cents, [{"id": i, "label": lab, "call_kind": kind} for i, (lab, kind, _) in enumerate(tasks)]
                 ).save(root / "clusters")
    reg = AdapterRegistry.create(root / "registry.json", root / "clusters")
    for i, (lab, kind, _) in enumerate(tasks):
        (root / "adapters" / lab).mkdir(parents=True)
        reg.add({"cluster": i, "label": lab, "call_kind": kind, "base_model": "packaged:smollm2-135m",
                 "adapter_dir": str(root / "adapters" / lab), "promoted": lab in promoted, "reason": f"{lab} r"})
    reg.save()
    return root


def test_an_iteration_keeps_earlier_adapters_it_promoted_none_for(tmp_path):
    """Iteration 2 re-clusters (ids in another order) and promotes no new planner adapter: the in-force registry
    serves iteration 1's on iteration 2's cluster of the same task, and the router's checks accept it. A task the new
    clustering does not have, or a new promotion for the task, is not overridden by an old adapter."""
    from slmshift.loop import carry_adapters
    from slmshift.platform.artifacts import AdapterRegistryFile
    from slmshift.platform.policies import registry_problems

    it1 = _convert_dir(tmp_path / "iter-1" / "convert", [("planner-intent", "intent", 0), ("op-call", "function_call", 1),
                                                          ("gone", "intent", 5)], promoted={"planner-intent", "gone"})
    it2 = _convert_dir(tmp_path / "iter-2" / "convert", [("op-call", "function_call", 1), ("planner-intent", "intent", 0)])
    path, carried = carry_adapters(str(it1 / "registry.json"), it2, tmp_path / "iter-2" / "registry.json")
    assert carried == ["planner-intent"] and path == str(tmp_path / "iter-2" / "registry.json")
    doc = AdapterRegistryFile.read(path)
    [e] = [e for e in doc.entries if e.promoted]
    assert e.cluster == 1 and e.reason == "carried from iter-1: planner-intent r"  # iteration 2's id of the task
    assert doc.promoted_dirs(path) == {"planner-intent": str((it1 / "adapters" / "planner-intent").resolve())}
    cfg = load_config(SMALL)
    models = [m.model_copy(update={"registry": path}) if m.tier == "slm" else m for m in cfg.models]
    assert registry_problems("router.policies[1]", path, None, models) == []
    # carried once more by a third iteration: still iteration 1's adapter, still named so
    it3 = _convert_dir(tmp_path / "iter-3" / "convert", [("planner-intent", "intent", 0)])
    path3, carried3 = carry_adapters(path, it3, tmp_path / "iter-3" / "registry.json")
    assert carried3 == ["planner-intent"]
    assert AdapterRegistryFile.read(path3).entries[0].reason == "carried from iter-1: planner-intent r"
    # a new promotion for the task wins; with nothing to carry the convert dir's own registry is in force
    it4 = _convert_dir(tmp_path / "iter-4" / "convert", [("planner-intent", "intent", 0)], promoted={"planner-intent"})
    assert carry_adapters(path3, it4, tmp_path / "iter-4" / "registry.json") == (str(it4 / "registry.json"), [])
    # no cluster of the same call kind near the old one: nothing carried, and no registry promoted anything
    it5 = _convert_dir(tmp_path / "iter-5" / "convert", [("planner-intent", "function_call", 0), ("x", "intent", 9)])
    assert carry_adapters(path3, it5, tmp_path / "iter-5" / "registry.json") == (None, [])
    assert carry_adapters(None, it4, tmp_path / "r.json") == (str(it4 / "registry.json"), [])
