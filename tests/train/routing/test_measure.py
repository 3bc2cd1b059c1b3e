"""A verify run's figures (`routing/measure.py`): the arm against always-LLM on the same tasks."""

import pandas as pd
import pytest

from slmshift.train.routing.measure import arm_vs_llm


def _calls(arm, episode, kinds):
    """kinds: (call kind, tier, valid, correct) in call order."""
    return [{"policy": arm, "episode_id": episode, "call_index": i, "scenario": "operator", "task_id": episode[-2:],
             "role": "operator", "call_kind": k, "tier": t, "valid": v, "correct": c, "escalated": False,
             "cost_usd": 0.01 if t == "llm" else 0.001, "latency_s": 0.1, "simulated": t == "llm"}
            for i, (k, t, v, c) in enumerate(kinds)]


def test_a_retry_after_an_invalid_answer_is_not_a_step_of_its_own():
    """The SLM's unparsable call and its retry are one step: the share's denominator is the same in both arms."""
    rows = []
    for i in range(12):
        rows += _calls("all-llm", f"l-t{i}", [("intent", "llm", True, True), ("function_call", "llm", True, True)])
        rows += _calls("tuned", f"s-t{i}", [("intent", "slm", True, True), ("function_call", "slm", False, False),
                                            ("function_call", "llm", True, True)])
    eps = pd.DataFrame([{"policy": r["policy"], "episode_id": r["episode_id"], "scenario": "operator",
                         "task_id": r["task_id"], "success": True} for r in rows if r["call_index"] == 0])
    r = arm_vs_llm(pd.DataFrame(rows), eps, "tuned", 0.95)
    assert r["retries"] == 12 and r["calls_graded"] == 24  # two steps an episode, as always-LLM's
    assert r["slm_share"] == 1.0  # both steps first answered by the SLM
    assert r["ratio"]["value"] == 1.0 and r["ratio"]["verdict"] == "yes"
    assert r["cost_per_call"] == pytest.approx((0.001 * 2 + 0.01) / 2)  # everything paid, per graded step


def test_a_tie_on_too_few_tasks_is_not_shown():
    """Arms that tie on every task give a bootstrap interval of [1, 1] however few the tasks: below 10 tasks (two
    MiniWoB families in a verify run) that is not evidence of meeting the budget."""
    from slmshift.train.routing.report import verdict_text

    rows = []
    for i in range(4):
        rows += _calls("all-llm", f"l-t{i}", [("intent", "llm", True, True)])
        rows += _calls("tuned", f"s-t{i}", [("intent", "slm", True, True)])
    eps = pd.DataFrame([{"policy": r["policy"], "episode_id": r["episode_id"], "scenario": "operator",
                         "task_id": r["task_id"], "success": True} for r in rows])
    ratio = arm_vs_llm(pd.DataFrame(rows), eps, "tuned", 0.95)["ratio"]
    assert ratio["ci"] == (1.0, 1.0) and ratio["verdict"] == "not shown"
    assert verdict_text(ratio) == "not shown (only 4 tasks: an interval needs 10 or more)"
