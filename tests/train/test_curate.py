"""S2 curation on the synthetic log: counts per step, planted secrets gone, no episode (or task) across the split."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slmshift.platform.log import read_interactions
from slmshift.train.curate import CURATED_COLUMNS, CurateOptions, curate, split_by_group


@pytest.fixture(scope="module")
def log_df(synthetic_log):
    return read_interactions(synthetic_log.run_dir)


def test_counts_per_step(synthetic_log, log_df):
    res = curate(log_df)
    for key, value in synthetic_log.expected.items():
        assert res.counts[key] == value, (key, res.counts)
    assert list(res.rows.columns) == CURATED_COLUMNS and len(res.rows) == synthetic_log.expected["curated"]
    assert res.rows["record_id"].is_unique


def test_only_valid_successful_correct_calls_are_kept(log_df):
    rows = curate(log_df).rows
    src = log_df.set_index("id").loc[rows["record_id"]]
    assert (src["valid"] == True).all() and (src["correct"] != False).all()  # noqa: E712
    assert not rows["episode_id"].str.startswith("fail-").any()
    # the lucky episode's wrong intent is dropped, its right call kept
    assert rows[rows["episode_id"] == "lucky-0"]["call_kind"].tolist() == ["function_call"]


def test_rules_are_configurable(log_df):
    loose = curate(log_df, CurateOptions(rule="valid", drop_incorrect=False))
    assert loose.counts["dropped_by_rule"] == 0
    assert len(loose.rows) > len(curate(log_df).rows)
    llm_only = curate(log_df, CurateOptions(tiers=["slm"]))
    assert llm_only.rows.empty  # every successful call in the log was served by the llm tier


def test_one_call_kind_can_be_converted_alone(log_df):
    every = curate(log_df).rows
    only = curate(log_df, CurateOptions(call_kinds=["function_call"])).rows
    assert set(only["call_kind"]) == {"function_call"}
    assert len(only) == (every["call_kind"] == "function_call").sum() < len(every)


def test_a_logged_budget_is_carried_for_held_out_generation(log_df):
    """The S1 record has no max_tokens yet: curated rows leave it empty (convert fills it from the run's scenarios);
    a log that records it hands each call's own budget on."""
    assert curate(log_df).rows["max_tokens"].isna().all()
    rows = curate(log_df.assign(max_tokens=range(len(log_df)))).rows
    src = log_df.assign(max_tokens=range(len(log_df))).set_index("id").loc[rows["record_id"], "max_tokens"]
    assert rows["max_tokens"].tolist() == src.tolist()


def test_planted_secrets_are_removed(synthetic_log, log_df, planted_secrets):
    res = curate(log_df)
    text = "\n".join(res.rows["messages"]) + "\n".join(res.rows["target"])
    for kind, secret in planted_secrets.items():
        for line in secret.splitlines():
            assert line not in text, kind
    for kind in ("email", "phone", "credit_card", "ipv4", "private_key"):
        assert res.scrub_counts[kind] >= 1, (kind, res.scrub_counts)
    assert res.scrub_counts["secret"] >= 2  # the AWS key and the GitHub token
    # the scrubbed tasks are still there, with placeholders, and their messages still parse
    kept = res.rows[res.rows["task_id"].isin(synthetic_log.secret_tasks)]
    assert len(kept) == 4
    for m in kept["messages"]:
        assert "[EMAIL]" in json.loads(m)[-1]["content"]


def _with_clusters(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["cluster"] = (rows["call_kind"] == "function_call").astype(int)  # stands in for S3's ids here
    return rows


@pytest.mark.parametrize("by", ["task", "episode"])
def test_split_keeps_episodes_and_tasks_whole(log_df, by):
    rows = _with_clusters(curate(log_df).rows)
    rows["split"] = split_by_group(rows, 0.25, seed=0, by=by)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    assert set(train["episode_id"]).isdisjoint(val["episode_id"])
    if by == "task":
        assert set(train["task_id"]).isdisjoint(val["task_id"])
    for c in (0, 1):  # stratified: every cluster gets both train and validation rows
        sides = set(rows[rows["cluster"] == c]["split"])
        assert sides == {"train", "val"}, (c, sides)
    assert 0.15 <= len(val) / len(rows) <= 0.4


def test_split_is_deterministic_and_seeded(log_df):
    rows = _with_clusters(curate(log_df).rows)
    a, b = split_by_group(rows, 0.3, seed=1), split_by_group(rows, 0.3, seed=1)
    assert a.tolist() == b.tolist()
    assert any(split_by_group(rows, 0.3, seed=s).tolist() != a.tolist() for s in range(2, 6))


def test_a_cluster_with_one_group_stays_in_train():
    rows = pd.DataFrame({"episode_id": ["e1", "e1", "e2"], "task_id": ["t1", "t1", "t2"], "cluster": [0, 1, 1]})
    split = split_by_group(rows, 0.5, seed=0)
    assert split[rows["cluster"] == 0].tolist() == ["train"]  # nothing left to train on otherwise


def test_a_cluster_holds_out_the_tasks_promotion_needs_when_it_has_twice_as_many():
    """At the 0.25 share a 24-session workload held out 6 sessions, and its adapter could never be promoted (10 needed)
    whatever its gain: it now holds out 10, while a cluster too small to spare them keeps the share."""
    def cluster(c: int, n: int) -> pd.DataFrame:
        return pd.DataFrame({"episode_id": [f"{c}-{i}" for i in range(n) for _ in range(3)],
                             "task_id": [f"{c}-{i}" for i in range(n) for _ in range(3)], "cluster": c})
    rows = pd.concat([cluster(0, 24), cluster(1, 19), cluster(2, 80)], ignore_index=True)
    held = lambda split, c: rows.loc[(rows["cluster"] == c) & (split == "val"), "task_id"].nunique()  # noqa: E731
    plain, promotable = split_by_group(rows, 0.25, seed=0), split_by_group(rows, 0.25, seed=0, min_val=10)
    assert [held(plain, c) for c in (0, 1, 2)] == [6, 5, 20]
    assert [held(promotable, c) for c in (0, 1, 2)] == [10, 5, 20]  # 19 < 2 x 10: the share stands
    assert (promotable.groupby(rows["task_id"]).nunique() == 1).all()  # whole tasks on one side


def test_json_targets_follow_the_calls_constraint_in_canonical_form(log_df):
    """A JSON answer to a call with a JSON-schema constraint becomes the canonical serialisation the constrained SLM
    is held to; the constraint travels with the row (held-out evaluation enforces it)."""
    from slmshift.platform.types import OutputConstraint

    df = log_df.copy()
    kept = curate(df).rows["record_id"]
    i = df.index[df["id"] == kept.iloc[0]][0]
    c = OutputConstraint(format="json", json_schema={"type": "object"}).to_json()
    df.loc[i, "output"], df.loc[i, "constraint"] = '{"functions": ["f", "g"],\n "n": "é"}', c
    rows = curate(df).rows.set_index("record_id")
    assert rows.loc[kept.iloc[0], "target"] == '{"functions":["f","g"],"n":"é"}'
    assert rows.loc[kept.iloc[0], "constraint"] == c
    assert rows.drop(index=kept.iloc[0])["constraint"].isna().all()


def test_tool_call_targets_are_canonical_and_text_answers_untouched(log_df):
    """A logged tool call (an older teacher's spaced JSON) becomes the canonical form the SLM is held to under
    'auto'; a text answer to a call that offered tools stays as written, even one that is JSON."""
    from slmshift.platform.types import OutputConstraint

    df = log_df.copy()
    kept = curate(df).rows["record_id"]
    c = OutputConstraint(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto").to_json()
    a, b, t = (df.index[df["id"] == kept.iloc[k]][0] for k in range(3))
    df.loc[a, "output"] = '{"tool_calls": [{"name": "f", "arguments": {"x": 1, "y": "é"}}]}'
    df.loc[b, "output"] = '{"answer": 42}'
    df.loc[t, "output"] = "It is 3 degrees."
    df.loc[[a, b, t], "constraint"] = c
    rows = curate(df).rows.set_index("record_id")
    assert rows.loc[kept.iloc[0], "target"] == '{"tool_calls":[{"name":"f","arguments":{"x":1,"y":"é"}}]}'
    assert rows.loc[kept.iloc[1], "target"] == '{"answer": 42}'
    assert rows.loc[kept.iloc[2], "target"] == "It is 3 degrees."


def test_a_simulated_placeholder_is_never_a_training_target(log_df):
    """A simulated model's labelled non-answer (a gateway call without a scenario reference) is dropped under every
    rule, even in a log whose record marked it valid (written before the gateway's check)."""
    placeholder = "[simulated teacher: no scenario reference for this call, so no real answer]"
    df = log_df.copy()
    df.loc[df.index[:6], ["output", "simulated", "valid", "correct", "episode_success"]] = \
        [placeholder, True, True, True, True]
    for rule in ("valid", "episode_or_call", "call"):
        res = curate(df, CurateOptions(rule=rule, drop_incorrect=False))
        assert not res.rows["target"].str.contains("no scenario reference").any(), rule
        assert res.counts["dropped_placeholder"] == 6
    # the same text from a model that is not simulated is an answer like any other
    real = df.assign(simulated=False)
    assert curate(real, CurateOptions(rule="valid", drop_incorrect=False)).counts["dropped_placeholder"] == 0


def test_held_out_tasks_are_first_drawn_from_those_collect_already_answered():
    """S4 reuses collect's shadow answers for the held-out calls they cover: holding the answered tasks out first
    leaves it fewer calls to generate. Which answered tasks are held out is still the seeded draw."""
    rows = pd.DataFrame({"episode_id": [f"e{i}" for i in range(40)], "task_id": [f"t{i}" for i in range(40)],
                         "cluster": 0})
    held = lambda split: set(rows.loc[split == "val", "task_id"])  # noqa: E731
    many = rows["task_id"].isin([f"t{i}" for i in range(15)])  # more answered tasks than the 10 held out
    assert held(split_by_group(rows, 0.25, seed=0, prefer=many)) < set(rows.loc[many, "task_id"])
    assert len(held(split_by_group(rows, 0.25, seed=0, prefer=many))) == 10
    assert held(split_by_group(rows, 0.25, seed=0, prefer=many)) != held(split_by_group(rows, 0.25, seed=1,
                                                                                         prefer=many))
    few = rows["task_id"].isin(["t0", "t1", "t2"])  # fewer: all of them, and 7 drawn from the rest
    split = split_by_group(rows, 0.25, seed=0, prefer=few)
    assert {"t0", "t1", "t2"} < held(split) and len(held(split)) == 10
    none = pd.Series(False, index=rows.index)  # nothing answered: the split without a preference
    assert split_by_group(rows, 0.25, seed=0, prefer=none).tolist() == split_by_group(rows, 0.25, seed=0).tolist()
