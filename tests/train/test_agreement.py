"""Agreement with the logged answer: how S4/S5 grade calls no scenario can grade (gateway traffic), and how tune pairs
an SLM shadow with the teacher's answer on such calls. Tool calls and JSON compare as parsed values, text by token F1
>= TEXT_AGREEMENT_F1; every figure built on it is labelled agreement."""

import json

import pytest

from slmshift.train.evaluate import (AGREEMENT, TEXT_AGREEMENT_F1, EvalResult, ScenarioGrader, agreement,
                                     parse_tool_calls, token_f1)

CALL = json.dumps({"tool_calls": [{"name": "track", "arguments": {"carrier": "DHL", "n": 2}}]})


@pytest.mark.parametrize("output", [
    '{"tool_calls": [{"name": "track", "arguments": {"n": 2.0, "carrier": "DHL"}}]}',  # key order, 2 == 2.0
    '{"tool_calls": [{"name": "track", "arguments": "{\\"carrier\\": \\"DHL\\", \\"n\\": 2}"}]}',  # arguments as a string
    '```json\n{"name": "track", "arguments": {"carrier": "DHL", "n": 2}}\n```',  # a bare call, fenced
    "track(carrier='DHL', n=2)",  # Python call syntax, read with ast
])
def test_tool_calls_agree_as_parsed_values(output):
    g = agreement(CALL, output)
    assert g.valid and g.correct and g.by == AGREEMENT


@pytest.mark.parametrize("output,why", [
    ('{"tool_calls": [{"name": "track", "arguments": {"carrier": "UPS", "n": 2}}]}', "same functions, different arg"),
    ('{"tool_calls": [{"name": "lookup", "arguments": {"carrier": "DHL", "n": 2}}]}', "different functions called"),
    ("The parcel is with DHL.", "the logged answer is a tool call; this output is not"),
    ('{"tool_calls": [{"name": "track", "arguments": {"carrier": "DHL", "n": 2}}, {"name": "track", "arguments": {}}]}',
     "different"),
    ("__import__('os').system('true')", "not"),  # untrusted text is parsed, never evaluated
])
def test_tool_calls_that_differ_disagree(output, why):
    g = agreement(CALL, output)
    assert not g.correct and why in g.reason


def test_parallel_calls_agree_in_any_order():
    a = {"name": "f", "arguments": {"x": 1}}
    b = {"name": "g", "arguments": {"y": [1, 2]}}
    assert agreement(json.dumps({"tool_calls": [a, b]}), json.dumps({"tool_calls": [b, a]})).correct
    assert parse_tool_calls("not a call") is None and parse_tool_calls('{"name": 3}') is None


def test_json_compares_values_and_text_uses_token_f1():
    assert agreement('{"a": [1, 2], "b": "x"}', '{"b": "x", "a": [1, 2.0]}', "json").correct
    assert not agreement('{"a": 1}', '{"a": 2}', "json").correct
    g = agreement('{"a": 1}', "no json here", "json")
    assert not g.valid and not g.correct
    ref = "Order A1 is shipped: the parcel is in Leipzig hub and should arrive on 2026-12-13."
    assert agreement(ref, "order a1 is shipped; the parcel is in Leipzig hub and should arrive on 2026-12-13").correct
    g = agreement(ref, "Order A1 is shipped.")
    assert not g.correct and f"< {TEXT_AGREEMENT_F1}" in g.reason
    # one wrong figure reaches F1 0.8 on a short answer, but the numbers must match too
    assert token_f1("12 EUR is 15.81 USD.", "12 EUR is 15.18 USD.") >= TEXT_AGREEMENT_F1
    assert "different numbers" in agreement("12 EUR is 15.81 USD.", "12 EUR is 15.18 USD.").reason
    assert agreement("12 EUR is 15.81 USD.", "12 eur is 15.81 usd").correct
    assert token_f1("15.81", "15.81") == 1.0 and token_f1("15.81", "15 81") == 0.0  # a number is one token
    assert not agreement(ref, "   ").valid


def test_the_grader_labels_calls_no_scenario_grades_as_agreement():
    grader = ScenarioGrader()
    g = grader({"scenario": "travel-desk", "target": CALL, "expect": "text"}, CALL)
    assert g.correct and g.by == AGREEMENT and grader.method == "agreement: 1"
    verdicts = [{"correct": True, "by": AGREEMENT}, {"correct": False, "by": ""}]  # '' = an engine error
    assert EvalResult("m", None, 2, 0.5, 0.5, verdicts=verdicts).measure == "agreement"
    assert EvalResult("m", None, 2, 0.5, 0.5, verdicts=verdicts + [{"by": "scenario"}]).measure \
        == "accuracy + agreement"
    assert EvalResult("m", None, 1, 1, 1, verdicts=[{"by": "scenario"}]).summary()["measure"] == "accuracy"
