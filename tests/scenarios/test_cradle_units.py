"""Cradle scenario without a browser: the action grammar (valid, invalid, hostile), the page rendering, the call
checkers, skill retrieval, options validation and the missing-browser error."""

from __future__ import annotations

from pathlib import Path

import pytest

import slmshift.scenarios  # noqa: F401
from slmshift.platform.config import ScenarioSpec, load_config
from slmshift.platform.errors import ConfigError, SlmshiftError
from slmshift.platform.scenario import scenario_class, scenario_options
from slmshift.scenarios.cradle import CradleScenario, prompts
from slmshift.scenarios.cradle.actions import Action, ParseError, action_constraint, parse_action
from slmshift.scenarios.cradle.browser import browser_paths
from slmshift.scenarios.cradle.observe import clickable_refs, render
from slmshift.scenarios.cradle.teacher import TASKS, distractor_actions, solve

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ["click-button", "click-link", "click-checkboxes", "click-option", "click-tab", "enter-text",
            "enter-password", "focus-text", "login-user", "choose-list", "click-dialog", "click-collapsible",
            "use-spinner", "simple-arithmetic", "click-button-sequence"]


def _el(ref, tag, text="", value=None, depth=3, parent=3, leaf=True, **kw):
    return {"ref": ref, "parent": parent, "depth": depth, "tag": tag, "text": text, "value": value,
            "id": kw.get("id", ""),
            "classes": kw.get("classes", ""), "focused": kw.get("focused", False), "tampered": False, "leaf": leaf,
            "left": 0, "top": 0, "width": 10, "height": 10}


CHECKBOXES = {
    "utterance": "Select DKkQH and click Submit.",
    "fields": [["target 0", "DKkQH"], ["button", "submit"]],
    "elements": [_el(1, "body", depth=0, parent=0, leaf=False), _el(2, "div", depth=1, parent=1, leaf=False),
                 _el(5, "label", depth=3, parent=4, leaf=False),
                 _el(6, "input_checkbox", value=False, depth=4, parent=5), _el(-1, "t", "USa", depth=4, parent=5),
                 _el(7, "label", depth=3, parent=4, leaf=False),
                 _el(8, "input_checkbox", value=False, depth=4, parent=7), _el(-2, "t", "DKkQH", depth=4, parent=7),
                 _el(9, "button", "Submit", id="subbtn")],
}


@pytest.mark.parametrize("text,want", [
    ("click(4)", Action("click", (4,))),
    ("Action: click(4)\nbecause it is the OK button", Action("click", (4,))),
    ('```\ntype(5, "Jerald")\n```', Action("type", (5, "Jerald"))),
    ('type(ref=5, text="a)b")', Action("type", (5, "a)b"))),
    ('press("Enter")', Action("press", ("Enter",))),
    ("press('<Tab>')", Action("press", ("Tab",))),
    ('press("Ctrl+C")', Action("press", ("Ctrl+C",))),
    ("press('ctrl-v')", Action("press", ("Ctrl+V",))),
    ('click("4")', Action("click", (4,))),
])
def test_valid_actions(text, want):
    got = parse_action(text, {4, 5})
    assert got == want
    assert parse_action(str(got), {4, 5}) == got  # the canonical form parses back to itself


@pytest.mark.parametrize("text,reason", [
    ("", "empty output"),
    ("I would click the OK button", "no action found"),
    ("click(99)", "no element with ref 99"),
    ("click(4, 5)", "takes 1 argument"),
    ("type(4)", "takes 2 arguments"),
    ("click(True)", "literal int"),
    ('type(4, "x" * 100)', "literal str"),
    ("click(ref=4, force=1)", "no argument 'force'"),
    ('press("F13")', "not allowed"),
    (f'type(4, "{"x" * 65}")', "at most 64"),
    ("scroll(4)", "no action found"),
])
def test_invalid_actions(text, reason):
    with pytest.raises(ParseError, match=reason):
        parse_action(text, {4, 5})


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/slmshift-pwned')",
    "click(__import__('os').system('touch /tmp/slmshift-pwned'))",
    "type(4, open('/etc/passwd').read())",
    "click(*[4])",
    "click((lambda: 4)())",
    "exec('click(4)')",
    "type(4, f'{__import__(\"os\").getcwd()}')",
])
def test_hostile_strings_are_rejected_without_running(text, tmp_path):
    with pytest.raises(ParseError):
        parse_action(text, {4, 5})
    assert not Path("/tmp/slmshift-pwned").exists()


def test_render_lists_actionable_elements_with_refs():
    text = render(CHECKBOXES)
    assert text.splitlines()[0] == "Task: Select DKkQH and click Submit."
    assert '[6] checkbox "USa" unchecked' in text and '[8] checkbox "DKkQH" unchecked' in text
    assert '[9] button "Submit"' in text
    assert "body" not in text  # layout containers are left out
    assert clickable_refs(CHECKBOXES) == {1, 2, 5, 6, 7, 8, 9}


def test_solver_and_checkers_agree():
    plan = solve("click-checkboxes", CHECKBOXES, [])
    assert plan.action == Action("click", (8,)) and "[8]" in plan.subtask
    refs = clickable_refs(CHECKBOXES)
    assert prompts.check_action(str(plan.action), refs, str(plan.action)).correct is True
    for wrong in distractor_actions(CHECKBOXES, plan):
        assert prompts.check_action(str(wrong), refs, str(plan.action)).correct is False
    assert prompts.check_action("click the box", refs, None).valid is False
    assert prompts.check_info('[8] checkbox "DKkQH"', refs, 8).correct is True
    assert prompts.check_info("the checkbox", refs, 8).valid is False
    assert prompts.check_reflection("Yes.", True).correct is True
    assert prompts.check_reflection("maybe", True).valid is False
    assert prompts.check_inference(plan.subtask, 8, None).correct is True
    checked = {**CHECKBOXES, "elements": [dict(e, value=True) if e["ref"] == 8 else e for e in CHECKBOXES["elements"]]}
    assert solve("click-checkboxes", checked, [plan.action]).action == Action("click", (9,))


def test_action_constraint_holds_the_grammar_and_the_pages_refs(breaks_constraint):
    refs = clickable_refs(CHECKBOXES)
    c = action_constraint(refs)
    plan = solve("click-checkboxes", CHECKBOXES, [])
    for ok in [str(plan.action), 'type(6, "Jerald \\"J\\" é")', 'press("Ctrl+A")', f'type(9, "{"x" * 64}")']:
        assert breaks_constraint(c, ok) is None, ok
        assert parse_action(ok, refs)  # what the constraint allows, the scenario's parser accepts
    for bad in ["click(3)", "Action: click(8)", 'press("F5")', f'type(9, "{"x" * 65}")', "click(8) click(9)"]:
        assert breaks_constraint(c, bad) is not None, bad


def test_declared_tasks_cover_the_issue():
    assert set(REQUIRED) <= set(TASKS)


def test_tasks_are_ids_with_seeds_and_cycle():
    spec = ScenarioSpec(kind="cradle", episodes=5, options={"tasks": ["click-button", "enter-text"]})
    tasks = scenario_class("cradle")(spec, seed=2).tasks()
    assert [t.id for t in tasks] == ["click-button#200000", "enter-text#200000", "click-button#200001",
                                     "enter-text#200001", "click-button#200002"]
    assert tasks == CradleScenario(spec, seed=2).tasks()  # deterministic
    assert CradleScenario(spec, seed=2)._pool is None  # listing tasks starts no browser


def test_skills_recall_the_same_kind_of_task():
    from slmshift.scenarios.cradle.skills import Skill, SkillLibrary, generalize

    lib = SkillLibrary()
    key = generalize('Enter "Jerald" into the text field and press Submit.', [["target", "Jerald"]])
    assert key == 'Enter "X" into the text field and press Submit.'
    lib.add(Skill("enter-text", 'Enter "Jerald" into the text field and press Submit.',
                  ('type(5, "Jerald")  # textbox', 'click(6)  # button "Submit"'), key=key))
    lib.add(Skill("click-checkboxes", "Select Jerald and click Submit.", ("click(8)",),
                  key=generalize("Select Jerald and click Submit.", [["target 0", "Jerald"]])))
    got = lib.retrieve(generalize('Enter "Mona" into the text field and press Submit.', [["target", "Mona"]]), k=1)
    assert [s.task for s in got] == ["enter-text"]
    assert "type(5" in got[0].as_example()
    assert not lib.add(Skill("enter-text", got[0].utterance, got[0].steps, key=key))  # no duplicates


def _load(tmp_path, options: str):
    p = tmp_path / "exp.yaml"
    p.write_text("experiment: {name: t}\nmodels: [{name: big, tier: llm, backend: simulated}]\n"
                 "router: {policies: [{kind: llm}]}\n"
                 f"scenarios:\n  - kind: cradle\n    options: {options}\n")
    return load_config(p, scenario_options())


def test_bad_options_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "{tasks: [click-button, book-a-flight], max_steps: 0, modules: [info_gathering], foo: 1}")
    msg = str(e.value)
    assert "scenarios[0].options.tasks" in msg and "book-a-flight" in msg and "miniwob registers 128" in msg
    assert "book-flight" in msg  # the listing names the real tasks
    assert "scenarios[0].options.max_steps" in msg
    assert "scenarios[0].options.modules" in msg and "action_planning is required" in msg
    assert "scenarios[0].options.foo" in msg and "unknown key" in msg


def test_shipped_yaml_loads():
    cfg = load_config(ROOT / "scenarios" / "cradle.yaml", scenario_options())
    assert {p.label for p in cfg.router.policies} == {"all-llm", "all-slm", "reasoning-on-slm"}
    assert cfg.scenarios[0].kind == "cradle"


def test_missing_browser_names_packages_and_env_vars(monkeypatch):
    monkeypatch.setenv("MINIWOB_CHROME_BINARY", "/nonexistent/chromium")
    monkeypatch.setenv("MINIWOB_CHROMEDRIVER", "/nonexistent/chromedriver")
    with pytest.raises(SlmshiftError) as e:
        browser_paths()
    msg = str(e.value)
    for needle in ("apt-get install -y chromium chromium-driver", "MINIWOB_CHROME_BINARY", "MINIWOB_CHROMEDRIVER"):
        assert needle in msg


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, slmshift.scenarios; print(any(m.split('.')[0] in ('selenium', 'miniwob') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_missing_browser_fails_before_any_episode(monkeypatch):
    monkeypatch.setenv("MINIWOB_CHROMEDRIVER", "/nonexistent/chromedriver")
    spec = ScenarioSpec(kind="cradle", episodes=2)
    with pytest.raises(SlmshiftError, match="chromium-driver"):
        CradleScenario(spec, seed=0).tasks()  # what the runner calls in the driver, before any actor starts


# ---------------------------------------------------------------- every MiniWoB++ task, and who may play it


def test_catalog_is_miniwobs_registered_ids():
    from slmshift.scenarios.cradle.catalog import UNSUPPORTED, all_tasks, supported_tasks

    tasks = all_tasks()
    assert len(tasks) == 128 and {"book-flight", "click-pie", "terminal", "flight.AA"} <= set(tasks)
    assert set(UNSUPPORTED) <= set(tasks)  # every unsupported entry is a real task
    assert set(TASKS) <= set(supported_tasks()) and len(supported_tasks()) == 128 - len(UNSUPPORTED)
    assert {"drag-box", "draw-line", "highlight-text", "scroll-text-2", "circle-center"} <= set(UNSUPPORTED)
    assert "copy-paste" not in UNSUPPORTED  # the clipboard chords express it


def test_options_take_any_expressible_task_and_refuse_the_rest():
    from slmshift.scenarios.cradle.catalog import supported_tasks

    o = CradleScenario.Options.model_validate({"tasks": ["book-flight", "click-pie", "terminal"]})
    assert o.tasks == ["book-flight", "click-pie", "terminal"]
    assert CradleScenario.Options.model_validate({"tasks": "all"}).tasks == list(supported_tasks())
    with pytest.raises(ValueError) as e:
        CradleScenario.Options.model_validate({"tasks": ["drag-box", "highlight-text", "click-button"]})
    msg = str(e.value)
    assert "drag-box needs a mouse drag" in msg and "highlight-text needs selecting text" in msg
    assert "cannot express" in msg and "click-button" not in msg.split("Fix")[0]


ARMS = """models:
  - {name: tiny, tier: slm, backend: hf, source: /nonexistent/tiny}
  - {name: teacher, tier: llm, backend: simulated}
router:
  policies:
    - {kind: slm, name: all-slm}
    - {kind: llm, name: all-llm}
    - {kind: call_kind, name: split, map: {info_gathering: slm, self_reflection: slm, task_inference: slm,
                                           action_planning: llm}}
    - {kind: call_kind, name: slm-acts, map: {action_planning: slm}, default: slm}
    - {kind: slm, name: shadowed, shadow: llm}
"""


def _arms(tmp_path, tasks):
    p = tmp_path / "arms.yaml"
    p.write_text("experiment: {name: t}\n" + ARMS + f"scenarios:\n  - kind: cradle\n    options: {{tasks: {tasks}}}\n")
    cfg = load_config(p)  # without the scenario options check, to see the hook's own answer
    problems = CradleScenario.check_models(cfg.scenarios[0], cfg.models, cfg.router.policies)
    # the same hook on the validated options model, which is what the config loader calls
    opts = scenario_options()["cradle"].model_validate(cfg.scenarios[0].options)
    assert opts.check_models(cfg.models, cfg.router.policies) == problems
    if problems:  # ...and the loader refuses the YAML with each problem under its field path
        with pytest.raises(ConfigError) as e:
            load_config(p, scenario_options())
        assert str(e.value).count("scenarios[0].options.tasks") == len(problems)
    else:
        load_config(p, scenario_options())
    return problems


def test_a_simulated_teacher_arm_is_refused_outside_the_solvers_tasks(tmp_path):
    problems = _arms(tmp_path, "[click-button, book-flight]")
    assert {f for f, _ in problems} == {"options.tasks"}
    arms = [m.split("'")[1] for _, m in problems]
    assert arms == ["all-llm", "split", "shadowed"]  # real-only arms ('all-slm', 'slm-acts') are fine
    msg = problems[0][1]
    assert "simulated teacher 'teacher' (llm)" in msg and "book-flight" in msg and "click-button," in msg
    assert "route every cradle call kind of that arm (and its shadow) to a real model" in msg
    assert _arms(tmp_path, "[click-button, enter-text]") == []  # the solver's tasks: every arm may play
    assert len(_arms(tmp_path, "all")) == 3


# ---------------------------------------------------------------- grade_call


def test_grade_call_action_validity_and_the_solvers_next_action():
    sc = CradleScenario(ScenarioSpec(kind="cradle", episodes=1), seed=0)
    ctx = {"obs": CHECKBOXES, "taken": []}
    right = sc.grade_call("click-checkboxes#7", "action_planning", "Action: click(8)", context=ctx)
    assert right.valid and right.correct is True
    wrong = sc.grade_call("click-checkboxes#7", "action_planning", "click(6)", context=ctx)
    assert wrong.valid and wrong.correct is False and "click(8)" in wrong.reason
    off_page = sc.grade_call("click-checkboxes#7", "action_planning", "click(99)", context=ctx)
    assert not off_page.valid and off_page.correct is False and "no element with ref 99" in off_page.reason
    # no page: grammar only
    assert sc.grade_call("click-checkboxes#7", "action_planning", "click(99)").valid
    assert sc.grade_call("click-checkboxes#7", "action_planning", "click(99)").correct is None
    # a task the solver does not know: validity on the page, correctness unknown
    other = sc.grade_call("book-flight#3", "action_planning", "click(9)", context=ctx)
    assert other.valid and other.correct is None
    # the history reaches the solver: after checking 8, the next right action is Submit
    checked = {**CHECKBOXES, "elements": [dict(e, value=True) if e["ref"] == 8 else e for e in CHECKBOXES["elements"]]}
    assert sc.grade_call("click-checkboxes#7", "action_planning", "click(9)",
                         context={"obs": checked, "taken": ["click(8)"]}).correct is True


def test_grade_call_other_modules():
    sc = CradleScenario(ScenarioSpec(kind="cradle", episodes=1), seed=0)
    ctx = {"obs": CHECKBOXES, "taken": []}
    assert sc.grade_call("click-checkboxes#1", "info_gathering", '[8] checkbox "DKkQH"', context=ctx).correct is True
    assert sc.grade_call("click-checkboxes#1", "info_gathering", "[6] checkbox", context=ctx).correct is False
    assert sc.grade_call("click-checkboxes#1", "info_gathering", "[8]").correct is None
    assert sc.grade_call("click-checkboxes#1", "task_inference", "check DKkQH [8]", context=ctx).correct is True
    assert sc.grade_call("click-checkboxes#1", "self_reflection", "Yes.", context={"expected": True}).correct is True
    assert sc.grade_call("click-checkboxes#1", "self_reflection", "no", context={"expected": True}).correct is False
    assert sc.grade_call("click-checkboxes#1", "self_reflection", "no").correct is None
    assert sc.grade_call("click-checkboxes#1", "intent", "x") is None


@pytest.mark.parametrize("output", ["", "click(", "__import__('os').system('touch /tmp/slmshift-pwned')",
                                    "click(__import__('os'))", "\x00" * 20, "x" * 50_000, None, 3])
@pytest.mark.parametrize("context", [None, {"obs": CHECKBOXES, "taken": []}, {"obs": {"elements": 5}},
                                     {"obs": CHECKBOXES, "taken": ["exec('x')"]}, "junk"])
@pytest.mark.parametrize("kind", ["action_planning", "info_gathering", "task_inference", "self_reflection"])
def test_grade_call_never_raises(kind, output, context):
    v = CradleScenario(ScenarioSpec(kind="cradle", episodes=1), seed=0).grade_call(
        "click-checkboxes#1", kind, output, context=context)
    assert v is not None and v.correct is not True and isinstance(v.reason, str)
    assert not Path("/tmp/slmshift-pwned").exists()
