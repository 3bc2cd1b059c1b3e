"""Report figures: infrastructure errors are not the model's, a cascade's rejected attempt is cost but not SLM share,
shadow calls are cost apart from the arms; S2 drops infra and shadow rows. Built on a real S1 log (LogWriter)."""

from __future__ import annotations

import json

import pytest

from slmshift.platform.log import LogWriter, read_episodes, read_interactions
from slmshift.platform.report import summarize, to_markdown
from slmshift.platform.types import EpisodeResult, Interaction, record_id
from slmshift.train.curate import curate


def rec(ep: str, call: int, *, tier: str = "llm", valid: bool | None = True, cost: float = 1.0, latency: float = 1.0,
        suffix: str = "", **kw) -> Interaction:
    base = dict(id=record_id("x", ep, call) + suffix, experiment_id="x", episode_id=ep, call_index=call, scenario="s",
                task_id=f"t-{ep}", policy="p", role="r", call_kind="k", category="template", expect="text",
                prompt=json.dumps([{"role": "user", "content": f"question {ep} {call}"}]),
                output=f"answer {ep} {call}", model="big" if tier == "llm" else "small", tier=tier,
                backend="simulated", route_kind="k", route_reason="", tokens_in=10, tokens_out=5, latency_s=latency,
                engine_latency_s=latency, cost_usd=cost, flops=1.0, valid=valid, correct=valid)
    return Interaction(**(base | kw))


@pytest.fixture
def run(tmp_path):
    """Two episodes. e1: an SLM call, a cascade (rejected SLM attempt + LLM answer), an infra error, and a shadow.
    e2: one LLM call, then lost to dead team actors (an 'infra:' outcome)."""
    w = LogWriter(str(tmp_path), flush_every=1000)
    w.add([
        rec("e1", 0, tier="slm", cost=0.1, latency=0.5),
        rec("e1", 1, tier="slm", valid=False, cost=0.1, latency=0.5, suffix=":cascade", escalated=True),
        rec("e1", 1, tier="llm", cost=2.0, latency=3.0, escalated_from=record_id("x", "e1", 1) + ":cascade"),
        rec("e1", 2, tier="slm", valid=False, cost=0.0, latency=9.0, infra_error=True, error="infra: ActorDiedError"),
        rec("e1", 0, tier="llm", cost=5.0, suffix=":shadow", shadow=True, shadow_of=record_id("x", "e1", 0),
            output="the teacher says something else entirely here"),
        rec("e2", 0, tier="slm", cost=0.1),
    ])
    w.add_episode(EpisodeResult(experiment_id="x", episode_id="e1", scenario="s", task_id="t-e1", policy="p",
                                success=True, reward=1.0, n_calls=3))
    w.add_episode(EpisodeResult(experiment_id="x", episode_id="e2", scenario="s", task_id="t-e2", policy="p",
                                success=False, reward=0.0, n_calls=0, attempt=3,
                                error="infra: the team actor died under each of 3 attempt(s)"))
    w.close()
    return str(tmp_path)


def test_infra_escalated_and_shadow_figures(run):
    everything = read_interactions(run, include_shadow=True)
    shadow = everything["shadow"].astype(bool)
    df = everything[~shadow]
    assert len(df) == 4  # e2's record belongs to a superseded attempt (the outcome is attempt 3)
    s = summarize(df, read_episodes(run), shadow=everything[shadow])
    arm = s["arms"][0]
    assert arm["calls"] == 4 and arm["infra_errors"] == 1 and arm["escalated"] == 1
    # SLM share of answered calls: e1/0 (slm) and e1/1 (the LLM's answer); not the infra error, not the rejected try
    assert arm["slm_share"] == pytest.approx(0.5)
    # validity over calls that reached a model: slm ok, rejected slm invalid, llm ok
    assert arm["valid_rate"] == pytest.approx(2 / 3)
    # cost counts every call made, the escalated attempt included; shadow cost is apart
    assert arm["cost_usd"] == pytest.approx(2.2) and arm["shadow_cost_usd"] == pytest.approx(5.0)
    assert arm["shadow_calls"] == 1
    # latency: the escalated attempt counts, the 9 s spent on a dead replica does not
    assert arm["latency_p95_s"] < 3.0 + 1e-9
    # the episode lost to dead actors is counted, but is not the models' failure
    assert arm["episodes"] == 2 and arm["infra_lost_episodes"] == 1 and arm["episode_errors"] == 1
    assert arm["success_rate"] == 1.0 and arm["cost_per_episode_usd"] == pytest.approx(2.2)
    t = s["totals"]
    assert t["infra_errors"] == 1 and t["escalated"] == 1 and t["shadow_cost_usd"] == pytest.approx(5.0)
    small = next(m for m in s["models"] if m["model"] == "small")
    assert small["infra_errors"] == 1 and small["valid_rate"] == pytest.approx(0.5)
    md = to_markdown(s, "t")
    assert "shadow_cost_usd" in md and "infra_errors" in md and "Interrupted" not in md


def test_interrupted_report_says_how_to_resume(run):
    s = summarize(read_interactions(run), read_episodes(run))
    s["incomplete"] = {"episodes_without_outcome": 7, "resume": "slmshift run --resume /r"}
    md = to_markdown(s, "t")
    assert "7 episode(s) have no outcome yet" in md and "`slmshift run --resume /r`" in md


def test_curate_drops_infra_and_shadow_rows(run):
    everything = read_interactions(run, include_shadow=True)
    kept = curate(everything).rows
    ids = set(kept["record_id"])
    assert not any(i.endswith(":shadow") for i in ids)
    infra_id = everything.loc[everything["infra_error"], "id"].iloc[0]
    assert infra_id not in ids
    assert record_id("x", "e1", 0) in ids  # a valid SLM call of a successful episode is S2 data
