"""S4 selection: the candidate registry, and that measuring candidates picks the one that really answers better."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from slmshift.platform.types import Price
from slmshift.train.candidates import Candidate, candidate_for_source, get_candidate
from slmshift.train.evaluate import CallGrade, EvalResult, ScenarioGrader, evaluate, exact_match
from slmshift.train.select import choose, select_candidates

QA = [("Capital of France?", "Paris"), ("Two plus two?", "4"), ("Colour of the sky?", "blue"),
      ("Opposite of hot?", "cold")]


def _rows() -> pd.DataFrame:
    return pd.DataFrame({
        "record_id": [f"r{i}" for i in range(len(QA))], "episode_id": [f"e{i}" for i in range(len(QA))],
        "task_id": [f"t{i}" for i in range(len(QA))], "scenario": "qa", "role": "answerer", "call_kind": "answer",
        "category": "template", "expect": "text",
        "messages": [json.dumps([{"role": "user", "content": q}]) for q, _ in QA], "target": [a for _, a in QA]})


def _teach(src: str, dst: str, steps: int = 120) -> str:
    """Copy the tiny model and train it (full fine-tune, plain torch) to give QA's answers: a measurably
    better candidate for a real reason, built in a few seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    torch.manual_seed(0)
    batch = []
    for q, a in QA:
        prompt = tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        batch.append((torch.tensor(prompt + answer), len(prompt)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, n_prompt in batch:
            labels = ids.clone()
            labels[:n_prompt] = -100
            loss = loss + model(input_ids=ids[None], labels=labels[None]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def two_candidates(tiny_model_dir, tmp_path_factory):
    taught = _teach(tiny_model_dir, str(tmp_path_factory.mktemp("taught") / "llama"))
    price = Price(input_per_m=0.01, output_per_m=0.02)
    common = dict(params=1e5, license="Apache-2.0", memory_mb=1.0, context_length=1024, price=price)
    return Candidate(name="tiny-random", source=tiny_model_dir, **common), Candidate(name="tiny-taught", source=taught, **common)


def test_packaged_smollm2_is_registered():
    c = get_candidate("smollm2-135m")
    assert c.source == "packaged:smollm2-135m" and c.license == "Apache-2.0" and c.context_length == 8192
    assert c.params == 134.5e6 and c.memory_mb > 400 and c.price.output_per_m > 0
    assert candidate_for_source("packaged:smollm2-135m") is c


def test_a_local_model_dir_becomes_a_candidate(tiny_model_dir):
    c = candidate_for_source(tiny_model_dir)
    assert c.source == tiny_model_dir and c.context_length == 4096 and 1e4 < c.params < 1e6
    spec = c.model_spec(threads=1, adapters={"x": tiny_model_dir})
    assert spec.backend == "hf" and spec.tier == "slm" and spec.adapters == {"x": tiny_model_dir}


def test_selection_picks_the_better_of_two_tiny_candidates(two_candidates):
    random_c, taught_c = two_candidates
    grader = ScenarioGrader()  # no scenario checker for 'qa': agreement with the logged output
    sel = select_candidates(_rows(), 0, [random_c, taught_c], grader, threads=1)
    by_name = {r["candidate"]: r for r in sel.table}
    assert by_name["tiny-taught"]["accuracy"] >= 0.75, sel.table
    assert by_name["tiny-random"]["accuracy"] == 0.0
    assert sel.chosen.name == "tiny-taught" and by_name["tiny-taught"]["chosen"]
    assert sel.before.correct_rate == by_name["tiny-taught"]["accuracy"]
    assert grader.by == {"agreement": 8}
    # verdicts carry each output, so a report can show what the model said
    assert {v["output"].strip() for v in sel.before.verdicts if v["correct"]} <= {a for _, a in QA}


def test_ties_go_to_the_cheaper_candidate():
    cheap = Candidate(name="a", source="x", params=1e6, license="l", memory_mb=1, context_length=1,
                      price=Price(input_per_m=1, output_per_m=1))
    dear = cheap.model_copy(update={"name": "b", "price": Price(input_per_m=2, output_per_m=2)})
    ev = EvalResult("m", None, 4, valid_rate=0.0, correct_rate=0.0, tokens_in=100, tokens_out=10)
    assert choose([(dear, ev), (cheap, ev)])[0].name == "a"  # both useless: the cheaper one
    good = EvalResult("m", None, 4, valid_rate=1.0, correct_rate=1.0, tokens_in=100, tokens_out=10)
    assert choose([(cheap, ev), (dear, good)])[0].name == "b"  # quality per cost: 1.1/2 beats 0/1


def test_exact_match_normalises_and_compares_json():
    assert exact_match('{"a": [1, 2]}', '{"a":[1,2]}', "json").correct
    assert exact_match("Paris", "  Paris\n").correct and not exact_match("Paris", "paris!").correct
    assert not exact_match("Paris", "").valid


def test_engine_errors_for_every_call_are_a_clear_failure(two_candidates):
    from slmshift.platform.errors import SlmshiftError

    random_c, _ = two_candidates
    with pytest.raises(SlmshiftError, match="failed for every call"):
        evaluate(_rows(), random_c.model_spec(threads=1), "no-such-adapter", ScenarioGrader())


def test_a_call_its_checker_cannot_judge_is_graded_by_validity():
    """A multi-turn summary has no right answer in BFCL (correct None): held-out accuracy counts a valid answer as
    right, like routing's paired outcomes, instead of counting every summary wrong."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import ScenarioSpec
    from slmshift.platform.scenario import scenario_class

    sc = scenario_class("operator_multiturn")(ScenarioSpec(kind="operator_multiturn", episodes=1), 0)
    grader = ScenarioGrader({"mt": sc})
    row = {"scenario": "mt", "task_id": "multi_turn_base_0", "call_kind": "summary", "context": '{"turn": 0}'}
    assert grader(row, "I moved the file for you.") == CallGrade(True, True, "")
    assert not grader(row, "[mv(source='a', destination='b')]").correct
    assert grader.by == {"scenario": 2}


def test_collects_graded_answers_stand_for_the_calls_they_cover(two_candidates, tmp_path):
    """S4 reuses the base SLM's shadows (graded in collect) and generates only the held-out calls they miss; an
    adapter's answer (a later iteration's shadow) is not the base candidate's and is not reused."""
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import Interaction
    from slmshift.train.select import answered_calls, collected_answers

    random_c, _ = two_candidates
    rows = _rows()
    (tmp_path / "config.yaml").write_text(f"models:\n  - {{name: small, source: {random_c.source}}}\n")

    def rec(i: int, **kw) -> Interaction:
        base = dict(id=rows.record_id[i], experiment_id="x", episode_id=rows.episode_id[i], call_index=0,
                    scenario="qa", task_id=rows.task_id[i], policy="p", role="answerer", call_kind="answer",
                    category="template", expect="text", prompt=rows.messages[i], output=rows.target[i],
                    model="teacher", tier="llm", backend="simulated", route_kind="llm", route_reason="",
                    tokens_in=10, tokens_out=2, latency_s=0.1, engine_latency_s=0.1, cost_usd=0.0, flops=0.0,
                    valid=True, correct=True)
        return Interaction(**{**base, **kw})

    slm = dict(model="small", tier="slm", backend="hf", tokens_in=7, tokens_out=3)
    log = LogWriter(str(tmp_path), flush_every=10_000, flush_interval_s=3600)
    log.add([rec(i) for i in range(4)] + [
        rec(0, id="r0:shadow", shadow=True, shadow_of="r0", output="Paris", **slm),  # right, by the run's grader
        # a shadow that answered twice (shadow_attempts): S4 grades one answer per call, so the first attempt
        rec(1, id="r1:shadow:try1", shadow=True, shadow_of="r1", output="V", correct=False, valid=False,
            escalated=True, **slm),
        rec(1, id="r1:shadow", shadow=True, shadow_of="r1", output="five", retried_from="r1:shadow:try1", **slm),
        rec(2, id="r2:cascade", escalated=True, output="blue", adapter="tuned", **slm)])  # an adapter's answer
    log.close()

    from slmshift.platform.log import read_interactions

    answers = collected_answers(read_interactions(str(tmp_path), include_shadow=True), str(tmp_path))
    assert sorted(answers["call_id"]) == ["r0", "r1", "r2"] and set(answers["source"]) == {random_c.source}
    assert answered_calls(answers, [random_c]) == {"r0", "r1"}  # the split holds these tasks out first
    sel = select_candidates(rows, 0, [random_c], ScenarioGrader(), threads=1, answers=answers)
    got = {v["record_id"]: v for v in sel.before.verdicts}
    assert [v["record_id"] for v in sel.before.verdicts] == list(rows.record_id)  # row order kept
    assert {r: v["source"] for r, v in got.items()} == {"r0": "collect", "r1": "collect", "r2": "generated",
                                                       "r3": "generated"}
    assert got["r0"]["correct"] and not got["r1"]["correct"] and got["r1"]["output"] == "V"
    assert sel.before.n == 4 and sel.before.tokens_in >= 14  # collect's tokens count in the candidate's cost


def test_ungraded_shadows_are_reused_graded_by_agreement(two_candidates, tmp_path):
    """Gateway traffic: no scenario graded the SLM's shadows in collect (`correct` missing). S4 still reuses them and
    grades each as it grades a generated answer, by agreement with the held-out row's logged answer, labelled so."""
    from slmshift.platform.log import LogWriter, read_interactions
    from slmshift.platform.types import Interaction
    from slmshift.train.select import collected_answers

    random_c, _ = two_candidates
    rows = _rows()
    (tmp_path / "config.yaml").write_text(f"models:\n  - {{name: small, source: {random_c.source}}}\n")
    base = dict(experiment_id="x", call_index=0, scenario="desk", policy="p", role="agent", call_kind="tool_call",
                category="template", expect="text", route_kind="llm", route_reason="", latency_s=0.1,
                engine_latency_s=0.1, cost_usd=0.0, flops=0.0, valid=True, correct=None)
    log = LogWriter(str(tmp_path), flush_every=10_000, flush_interval_s=3600)
    log.add([Interaction(**base, id=rows.record_id[i], episode_id=rows.episode_id[i], task_id=rows.task_id[i],
                         prompt=rows.messages[i], output=rows.target[i], model="teacher", tier="llm",
                         backend="workload", tokens_in=10, tokens_out=2) for i in range(4)] + [
        Interaction(**{**base, "valid": ok}, id=f"{rows.record_id[i]}:shadow", episode_id=rows.episode_id[i],
                    task_id=rows.task_id[i], prompt=rows.messages[i], output=out, model="small", tier="slm",
                    backend="hf", tokens_in=7, tokens_out=3, shadow=True, shadow_of=rows.record_id[i])
        for i, out, ok in [(0, rows.target[0], True), (1, "no idea", True), (2, "", False)]])
    log.close()
    answers = collected_answers(read_interactions(str(tmp_path), include_shadow=True), str(tmp_path))
    assert sorted(answers["call_id"]) == ["r0", "r1", "r2"] and answers["correct"].isna().all()
    sel = select_candidates(rows.assign(scenario="desk"), 0, [random_c], ScenarioGrader(), threads=1, answers=answers)
    got = {v["record_id"]: v for v in sel.before.verdicts}
    assert {r: v["source"] for r, v in got.items()} == {"r0": "collect", "r1": "collect", "r2": "collect",
                                                       "r3": "generated"}
    assert got["r0"]["correct"] and not got["r1"]["correct"] and not got["r2"]["valid"]
    assert {v["by"] for v in got.values()} == {"agreement"} and sel.before.measure == "agreement"


def test_packaged_gemma3_is_registered_under_its_own_terms():
    g, s = get_candidate("gemma3-270m"), get_candidate("smollm2-135m")
    assert g.source == "packaged:gemma3-270m" and g.license == "Gemma Terms of Use" and g.context_length == 32768
    assert g.params == 268.1e6 and g.memory_mb > 1.9 * s.memory_mb and g.price == s.price  # same compute per call
    assert candidate_for_source("packaged:gemma3-270m") is g


def test_licence_and_footprint_gates_leave_candidates_out_before_measuring(two_candidates):
    """RULE's gates: the worse candidate wins when the better one's licence is not allowed; it is never evaluated."""
    from slmshift.platform.errors import SlmshiftError
    from slmshift.train.select import eligible

    random_c, taught_c = two_candidates
    restricted = taught_c.model_copy(update={"license": "Gemma Terms of Use"})
    sel = select_candidates(_rows(), 0, [random_c, restricted], ScenarioGrader(), threads=1, licenses=["Apache-2.0"])
    assert sel.chosen.name == "tiny-random" and [r["candidate"] for r in sel.table] == ["tiny-random"]
    assert sel.excluded == {"tiny-taught": "licence 'Gemma Terms of Use' not in convert.licenses ['Apache-2.0']"}
    assert sel.summary()["excluded"] == sel.excluded
    gemma, smol = get_candidate("gemma3-270m"), get_candidate("smollm2-135m")
    assert eligible([smol, gemma], max_memory_mb=600) == ([smol], {"gemma3-270m": "memory 1023 MB over "
                                                                   "convert.max_memory_mb 600"})
    with pytest.raises(SlmshiftError, match=r"no SLM candidate passes .*\(gemma3-270m: licence 'Gemma Terms of Use' "
                                            r"not in convert.licenses \['MIT'\]; smollm2-135m: .* Fix: widen"):
        eligible([gemma, smol], licenses=["MIT"])


def test_ties_go_to_the_smaller_footprint_then_the_permissive_licence():
    a = Candidate(name="z-small", source="x", params=2e6, license="Gemma Terms of Use", memory_mb=10,
                  context_length=1, price=Price(input_per_m=1, output_per_m=1))
    big = a.model_copy(update={"name": "a-big", "memory_mb": 20, "license": "Apache-2.0"})
    open_ = a.model_copy(update={"name": "z-open", "license": "Apache-2.0", "params": 3e6})
    ev = EvalResult("m", None, 4, valid_rate=1.0, correct_rate=0.5, tokens_in=100, tokens_out=10)
    assert choose([(big, ev), (a, ev)])[0].name == "z-small"  # same score and cost: the smaller footprint
    assert choose([(a, ev), (open_, ev)])[0].name == "z-open"  # same footprint too: no use restrictions first
