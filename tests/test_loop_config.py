"""`slmshift loop`'s input checks (exit 2 with the field, before Ray starts) and the configs it derives for verify:
the tuned router with the promoted adapters, and its "before conversion" twin on the base SLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    # whatever kind tune chose, the next collect's SLM side (its shadows) is the adapter in force, not the base SLM
    policy_file.write_text("kind: random\nslm_share: 0.03\n")
    assert tuned_policy(str(policy_file), registry).registry == registry


@pytest.mark.parametrize("constrain", ["slm", "none", "all"])
def test_loop_constrain_reaches_every_arm_and_convert(tmp_path, constrain):
    """loop.constrain sets collect's, verify's and the before-conversion arm's `constrain`, and convert grades
    held-out calls constrained unless the SLM is served free."""
    from slmshift.loop import collect_config, convert_options
    from slmshift.platform.policies import policy_spec

    cfg = load_config(SMALL)
    cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"constrain": constrain})})
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("kind: cascade\nname: chosen\ntau: 0.4\n")
    tuned = tuned_policy(str(policy_file), None)
    arms = verify_config(cfg, cfg.loop, {}, tuned, None, tuned).router.policies
    split = {"operator": {"train": ["t1", "t2"], "verify": ["t3"]}}
    collect = collect_config(cfg, cfg.loop, split, policy_spec(kind="llm"), None, 1, {}, {}).router.policies
    assert {a.constrain for a in [*arms, *collect]} == {constrain}
    assert convert_options(cfg.loop).constrain is (constrain != "none")
    assert load_config(SMALL).loop.constrain == "slm"


def test_loop_slm_attempts_max_is_what_collect_shadows_log_and_tune_searches(tmp_path):
    """loop.slm_attempts_max sets the collect arm's `shadow_attempts` (k_max); a tuned policy's own slm_attempts
    reaches verify unchanged."""
    from slmshift.loop import collect_config
    from slmshift.platform.policies import policy_spec

    cfg = load_config(SMALL)
    assert cfg.loop.slm_attempts_max == 1
    cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"slm_attempts_max": 3})})
    split = {"operator": {"train": ["t1", "t2"], "verify": ["t3"]}}
    (arm,) = collect_config(cfg, cfg.loop, split, policy_spec(kind="llm"), None, 1, {}, {}).router.policies
    assert arm.shadow_attempts == 3 and arm.shadow == "both"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("kind: cascade\nname: chosen\ntau: 0.4\nslm_attempts: 2\n")
    arms = verify_config(cfg, cfg.loop, {}, tuned_policy(str(policy_file), None), None).router.policies
    assert [a.slm_attempts for a in arms] == [1, 2]


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
    assert md.count("| 75% vs 75% | 1.00 [1.00, 1.00] | yes | - | - / 0.001000 [0.001000, 0.001000] | 20 ep / 20 "
                    "tasks / 40 graded calls |") == 2
    assert "| 0: before conversion | operator | 50% [" in md and "| 0: before conversion | mt | 0% [" in md
    assert "| 1: after conversion | mt | 100% [" in md and "50% vs 50% | 1.00 [1.00, 1.00] | yes" in md
    # the simulated teacher's declared profile is printed above the table it shapes
    assert "`teacher` (llm): accuracy default 0.9, function_call 0.97, intent 0.98" in md and "upstream_penalty" in md
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
    # S3 kept the task in force (`task_of`, convert --incumbent): it is that adapter's whatever the centroids say
    it6 = _convert_dir(tmp_path / "iter-6" / "convert", [("other", "function_call", 1), ("agent-x", "intent", 9)])
    info = json.loads((it6 / "clusters" / "clusters.json").read_text())
    info[1]["task_of"] = "planner-intent"
    (it6 / "clusters" / "clusters.json").write_text(json.dumps(info))
    path6, carried6 = carry_adapters(path3, it6, tmp_path / "iter-6" / "registry.json")
    assert carried6 == ["planner-intent"] and AdapterRegistryFile.read(path6).entries[-1].cluster == 1


def _verify_log(run, arms):
    """A verify run through the real S1 writer: arms = {arm: (per-task success list, call indices the SLM answers,
    is the summary graded?)}; call 0 is an intent (graded), call 1 a summary."""
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import EpisodeResult, Interaction, record_id

    log = LogWriter(str(run), flush_every=10_000, flush_interval_s=3600)
    for arm, (success, slm, graded) in arms.items():
        for i, ok in enumerate(success):
            ep = f"{arm}-{i}"
            log.add([Interaction(
                id=record_id("v", ep, k), experiment_id="v", episode_id=ep, call_index=k, scenario="operator",
                task_id=f"t{i}", policy=arm, role="planner", call_kind="intent" if k == 0 else "summary", category="",
                expect="json", prompt="[]", output="x", engine_latency_s=0.1, flops=0.0,
                model="slm" if k in slm else "llm", tier="slm" if k in slm else "llm", backend="hf", route_kind="x",
                route_reason="", tokens_in=1, tokens_out=1, latency_s=0.1, cost_usd=0.001, simulated=k not in slm,
                valid=True, correct=(True if k == 0 or graded else None)).model_dump() for k in range(2)])
            log.add_episode(EpisodeResult(experiment_id="v", episode_id=ep, scenario="operator", task_id=f"t{i}",
                                          policy=arm, success=ok, reward=float(ok), n_calls=2))
    log.close()


def test_report_budget_is_non_inferiority_and_ungraded_calls_stand_apart(tmp_path):
    """18/20 a side on different tasks: the ratio is 1.00 but its paired interval reaches below 0.95, so the budget
    is 'not shown' (with the tasks the effect would need), not 'yes'. The summary call (no grader verdict) the
    tuned arm sends to the SLM is its own column, never in the headline share. Tune's prediction stands beside the
    measurement, and a measurement outside it is named."""
    from slmshift.loop import LoopState, write_report

    llm = [i not in (0, 1) for i in range(20)]
    tuned = [i not in (2, 3) for i in range(20)]
    _verify_log(tmp_path / "verify", {"all-llm": (llm, set(), False), "tuned": (tuned, {1}, False)})
    state = LoopState(tmp_path)
    state.doc["config"] = load_config(SMALL).model_dump(mode="json")
    state.update(1, "tune", status="done", chosen={"held_out": {
        "slm_share": 0.2, "slm_share_ci": [0.1, 0.3], "quality_episode": 0.9, "quality_episode_ci": [0.8, 0.97]}})
    state.update(1, "verify", status="done", run_dir=str(tmp_path / "verify"))
    write_report(tmp_path, state)
    md = (tmp_path / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 1: no adapter promoted"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "0% [0, 0]" and cells[5] == "100% of 20"  # graded share; the summaries apart
    assert cells[6] == "90% vs 90%" and cells[7].startswith("1.00 [")
    assert cells[8].startswith("not shown (the observed effect needs ~") and "have 20" in cells[8]
    assert cells[9] == "20% [10, 30] / 90% [80, 97]" and cells[10] == "n/a / 0.002000 [0.002000, 0.002000]"
    assert "SLM share: measured 0.000" in md and "lies outside the prediction 0.200" in md


def test_cradle_verify_holds_out_whole_families_and_new_seeds_and_collect_runs_fresh_tasks(tmp_path):
    """MiniWoB ids are `family#seed`: about half the verify tasks are families no collect sees, the rest new seeds
    of trained families. Iteration 2's collect excludes every task iteration 1 collected; a pool too small for
    fresh tasks in every iteration is said up front."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.loop import collect_config, pool_warnings, split_tasks
    from slmshift.platform.policies import policy_spec
    from slmshift.scenarios.cradle.browser import browser_missing
    from slmshift.train.routing.pairs import family

    if missing := browser_missing():
        pytest.skip(missing)
    doc = yaml.safe_load(SMALL.read_text())
    doc["scenarios"] = [{"kind": "cradle", "options": {"tasks": ["click-button", "click-checkboxes", "click-link",
                                                                 "enter-text", "focus-text", "click-dialog"]}}]
    doc["loop"].update(collect_episodes=20, verify_episodes=12)
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    split = split_tasks(cfg, cfg.loop, iterations=2)["cradle"]
    train_fams = {family(t) for t in split["train"]}
    verify_fams = {family(t) for t in split["verify"]}
    assert verify_fams - train_fams and verify_fams & train_fams  # new families and new seeds of trained ones
    assert not set(split["train"]) & set(split["verify"])
    # a third of the families held out whole, a few instances each (intervals resample families); half the verify
    new = [t for t in split["verify"] if family(t) not in train_fams]
    assert len({family(t) for t in new}) == 2 and len(new) == 6 and len(split["verify"]) == 12
    assert len(split["train"]) >= 2 * 20  # the pool grew by the held-out families' share
    seen, measured = {"cradle": set(split["train"][:20])}, {"cradle": {"click-button#999"}}
    c2 = collect_config(cfg, cfg.loop, {"cradle": split}, policy_spec(kind="llm"), None, 2, seen, measured)
    skip = set(c2.scenarios[0].exclude_tasks)
    assert seen["cradle"] <= skip and set(split["verify"]) | measured["cradle"] <= skip
    assert not pool_warnings({"cradle": split}, cfg.loop, 2)
    warn = pool_warnings({"cradle": split}, cfg.loop, 10)
    assert warn and "10 x 20 collect episodes on fresh tasks" in warn[0]
    # once fresh tasks run out, a collect re-runs collected ones (never a verify task) rather than collecting nothing
    spent = {"cradle": set(split["train"])}
    c9 = collect_config(cfg, cfg.loop, {"cradle": split}, policy_spec(kind="llm"), None, 9, spent, measured)
    skip = set(c9.scenarios[0].exclude_tasks)
    assert not skip & spent["cradle"] and set(split["verify"]) | measured["cradle"] <= skip


def test_perfect_teacher_is_the_conservative_bound():
    """`--teacher perfect` makes every simulated LLM-tier model right on every call and names the loop for it; an
    unknown setting is exit 2 naming the option."""
    from slmshift.loop import perfect_teacher

    cfg = perfect_teacher(load_config(SMALL))
    teacher = next(m for m in cfg.models if m.tier == "llm")
    assert teacher.profile.accuracy == {"default": 1.0} and cfg.experiment.name.endswith("-perfect-teacher")
    assert next(m for m in cfg.models if m.tier == "slm").backend == "hf"  # the SLM is untouched
    r = subprocess.run([sys.executable, "-m", "slmshift.cli", "loop", str(SMALL), "--teacher", "oracle"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--teacher oracle" in r.stderr and "Traceback" not in r.stderr


def test_accumulate_trains_each_convert_on_every_earlier_collect(tmp_path):
    """loop.convert.accumulate: iteration 3's convert also trains on iterations 1 and 2's collect runs (off by
    default: each iteration's own collect alone); an iteration whose collect left no run adds nothing."""
    from slmshift.loop import LoopState, earlier_collects

    loop = load_config(SMALL).loop
    state = LoopState(tmp_path)
    state.update(1, "collect", status="done", run_dir="/runs/c1")
    state.update(2, "collect", status="done", run_dir="/runs/c2")
    state.update(4, "collect", status="failed")
    assert earlier_collects(loop, state, 3) == []
    on = loop.model_copy(update={"convert": loop.convert.model_copy(update={"accumulate": True})})
    assert earlier_collects(on, state, 1) == [] and earlier_collects(on, state, 3) == ["/runs/c1", "/runs/c2"]
    assert earlier_collects(on, state, 5) == ["/runs/c1", "/runs/c2"]


@pytest.mark.parametrize("yaml_name, iterations, measured_min", [
    ("paper-table.yaml", 1, 130.6),       # BENCHMARKS.md 2026-12-06 night, every cluster of four scenarios
    ("paper-table-small.yaml", 2, 35.5),  # BENCHMARKS.md 2026-12-06 late night
])
def test_the_printed_estimate_is_within_a_fifth_of_the_measured_loops(yaml_name, iterations, measured_min):
    """The loop prints its estimate before hours of work: it must stay near what these configs measured on the
    2-core machine (it said 198 and 57 min before it was recalibrated on them)."""
    from slmshift.loop import estimate_minutes

    cfg = load_config(SMALL.parent / yaml_name)
    assert estimate_minutes(cfg, cfg.loop, iterations) == pytest.approx(measured_min, rel=0.2)
