"""The cradle scenario end to end through `run_experiment`: a tiny random hf SLM and a simulated teacher on three
MiniWoB++ tasks in real Chromium, under all-LLM, all-SLM and a call-kind split."""

from __future__ import annotations

import json

import psutil
import pytest

import slmshift.scenarios  # noqa: F401
from slmshift.platform.config import load_config
from slmshift.platform.log import read_episodes, read_interactions
from slmshift.platform.scenario import scenario_options
from slmshift.runner import run_experiment
from slmshift.scenarios.cradle.browser import browser_missing

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))

TASKS = ["click-button", "enter-text", "click-checkboxes"]
CONFIG = """\
experiment: {{name: cradle-e2e, seed: 1, storage: {storage}}}
{models}router:
  policies:
    - {{kind: llm, name: all-llm}}
    - {{kind: slm, name: all-slm, constrain: none}}  # the random model's failure path (constrained: test_constraints)
    - {{kind: call_kind, name: split, map: {{info_gathering: slm, self_reflection: slm, task_inference: slm,
                                             action_planning: llm}}}}
scenarios:
  - kind: cradle
    episodes: 6
    teams: 1
    concurrency: 1
    options: {{tasks: {tasks}, max_steps: 4, browsers_per_team: 1, info_max_tokens: 8, inference_max_tokens: 8,
               action_max_tokens: 8}}
"""


def _browser_procs() -> set[int]:
    out = set()
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and ("chromium" in p.info["name"] or "chromedriver" in p.info["name"]):
            out.add(p.pid)
    return out


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_teacher_models, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    path = storage / "cradle.yaml"
    path.write_text(CONFIG.format(storage=storage, models=tiny_teacher_models, tasks=json.dumps(TASKS)))
    before = _browser_procs()
    result = run_experiment(load_config(path, scenario_options()), keep_ray=True)
    result.browsers_before = before
    return result


def test_teacher_solves_and_tiny_model_fails_cleanly(run):
    ep = read_episodes(run.run_dir)
    assert len(ep) == 18 and ep["episode_id"].is_unique and (ep["error"].isna()).all()
    by_policy = ep.groupby("policy")["success"].mean().to_dict()
    # a teacher declared 100% accurate plays every task to the task's own reward of 1 ...
    assert by_policy["all-llm"] == 1.0
    # ... but not on notes the tiny model wrote: handed wrong upstream notes it loses `upstream_penalty` (0.5) of its
    # accuracy, as a real LLM acting on a bad observer would
    assert by_policy["split"] < 1.0
    assert (ep[ep.policy == "all-llm"]["reward"] == 1.0).all()
    # ... and a random tiny model writes no valid action: failed calls, finished episodes, no env steps
    slm = ep[ep.policy == "all-slm"]
    assert by_policy["all-slm"] == 0.0 and (slm["steps"] == 0).all()
    llm = ep[ep.policy == "all-llm"].set_index("task_id")
    assert (llm.loc[[f"click-checkboxes#{100_000 + i}" for i in range(2)], "steps"] >= 2).all()  # check, submit


def test_cradle_modules_are_logged_per_turn(run):
    df = read_interactions(run.run_dir)
    assert set(df.call_kind) == {"info_gathering", "self_reflection", "task_inference", "action_planning"}
    slm = df[df.policy == "all-slm"]
    bad = slm[(slm.call_kind == "action_planning")]
    assert (bad["valid"] == False).all() and bad["error"].notna().all()  # noqa: E712
    assert (slm.groupby("episode_id").call_kind.apply(lambda k: (k == "action_planning").sum()) == 4).all()
    split = df[df.policy == "split"]
    assert set(split[split.call_kind == "action_planning"].tier) == {"llm"}
    assert set(split[split.call_kind != "action_planning"].tier) == {"slm"}
    llm = df[df.policy == "all-llm"]
    assert (llm[llm.call_kind == "action_planning"]["correct"] == True).all()  # noqa: E712


def _examples(prompt: str) -> list[str]:
    user = json.loads(prompt)[-1]["content"]
    marker = "Example of a solved task:\n"
    return [block.split("\n\n")[0] for block in user.split(marker)[1:]]


def test_skills_are_recalled_as_examples(run):
    df = read_interactions(run.run_dir)
    ep = read_episodes(run.run_dir)
    plans = df[df.call_kind == "action_planning"]
    # an async actor does not run episodes in submission order: order them by when they started
    llm = ep[ep.policy == "all-llm"].assign(start=lambda e: e.ts - e.wall_s).sort_values("start")
    llm = llm.assign(family=llm.task_id.str.split("#").str[0])
    first = plans[plans.episode_id == llm.episode_id.iloc[0]]
    assert not any(_examples(p) for p in first.prompt)  # nothing solved yet
    # once a task has been solved, its next instance recalls that task's own solution first
    marker = {"click-button": "Click on the", "enter-text": "Enter ", "click-checkboxes": "Select "}
    recalled = 0
    for _, e in llm.iterrows():
        if not ((llm.family == e.family) & (llm.ts < e.start)).any():
            continue
        for prompt in plans[plans.episode_id == e.episode_id].prompt:
            shown = _examples(prompt)
            assert shown and shown[0].startswith(f"Task: {marker[e.family]}"), (e.family, shown)
            recalled += 1
    assert recalled >= 3
    # the all-slm arm solved nothing, so it has nothing to recall
    assert not any(_examples(p) for p in plans[plans.policy == "all-slm"].prompt)


def test_report_has_a_row_per_task(run):
    tasks = {(t["policy"], t["task"]): t for t in run.summary["tasks"]}
    for policy in ("all-llm", "all-slm", "split"):
        for task in TASKS:
            assert tasks[(policy, task)]["episodes"] == 2
    assert tasks[("all-llm", "click-checkboxes")]["success_rate"] == 1.0
    assert "click-checkboxes" in open(f"{run.run_dir}/report.md").read()


def test_no_browser_left_after_the_run(run):
    from slmshift.scenarios.cradle.browser import wait_for_pids_gone

    left = wait_for_pids_gone(sorted(_browser_procs() - run.browsers_before), 20)
    assert left == []


# ---------------------------------------------------------------- tasks outside the DOM solver's list

UNSOLVED = ["click-color", "book-flight", "terminal"]  # no DOM solver: only real models may play them
REAL_ONLY = """\
experiment: {{name: cradle-real, seed: 2, storage: {storage}}}
{models}router:
  policies:
    - {{kind: slm, name: real, constrain: none}}
scenarios:
  - kind: cradle
    episodes: 3
    teams: 1
    concurrency: 1
    options: {{tasks: {tasks}, max_steps: 2, browsers_per_team: 1, modules: [info_gathering, action_planning],
               info_max_tokens: 6, action_max_tokens: 8}}
"""


@pytest.fixture(scope="module")
def real_run(run, ray_cluster, tiny_teacher_models, tmp_path_factory):
    """After `run` (one Ray cluster per module): a real model (the tiny hf SLM) on tasks the solver does not know."""
    from slmshift.platform.config import load_config as load
    from slmshift.platform.errors import ConfigError
    from slmshift.scenarios.cradle import CradleScenario

    storage = tmp_path_factory.mktemp("runs-real")
    path = storage / "cradle-real.yaml"
    path.write_text(REAL_ONLY.format(storage=storage, models=tiny_teacher_models, tasks=json.dumps(UNSOLVED)))
    cfg = load(path, scenario_options())
    assert CradleScenario.check_models(cfg.scenarios[0], cfg.models, cfg.router.policies) == []
    # the same tasks under an arm that can call the simulated teacher are refused, naming the arm
    teacher_arm = path.read_text().replace("{kind: slm, name: real, constrain: none}", "{kind: llm, name: teacher-arm}")
    (storage / "teacher.yaml").write_text(teacher_arm)
    with pytest.raises(ConfigError) as e:  # the config check refuses it before anything starts
        load(storage / "teacher.yaml", scenario_options())
    assert "scenarios[0].options.tasks" in str(e.value) and "'teacher-arm'" in str(e.value)
    assert "book-flight" in str(e.value)
    return run_experiment(cfg, keep_ray=True)


def test_a_real_model_plays_tasks_the_solver_does_not_know(real_run):
    ep = read_episodes(real_run.run_dir)
    assert sorted(ep.task_id.str.split("#").str[0]) == sorted(UNSOLVED)
    assert ep["error"].isna().all() and (ep["success"] == False).all()  # noqa: E712  finished, not crashed
    df = read_interactions(real_run.run_dir)
    assert set(df.model) == {"tiny"} and set(df.backend) == {"hf"}  # no call ever reached the teacher
    acts = df[df.call_kind == "action_planning"]
    # two turns each; a random model left unconstrained writes no valid action
    assert len(acts) == 6 and acts["error"].notna().all() and not acts["constrained"].any()
    assert set(df.call_kind) == {"info_gathering", "action_planning"}
