"""The routing estimators on simulated worlds whose answer is known (`slmshift.train.routing.worlds`): the episode
replay against exact truth, the chosen policy against the known best one, and the coverage of the held-out 95%
intervals of the chosen point's episode success and SLM share against fresh episodes, over 40 seeds per world."""

import numpy as np
import pandas as pd
import pytest

from slmshift.train.routing.estimate import split
from slmshift.train.routing.pairs import PairedTable
from slmshift.train.routing.replay import Replay
from slmshift.train.routing.tune import Planner, TuneOptions
from slmshift.train.routing.worlds import World

TWO_KINDS = World({"A": (0.97, 0.97), "B": (0.5, 0.95)}, {"A": (1, 4), "B": (1, 2)}, upstream_penalty=0.5)
THREE_KINDS = World({"plan": (0.99, 0.99), "act": (0.93, 0.97), "check": (0.6, 0.95)},
                    {"plan": (1, 1), "act": (2, 5), "check": (1, 1)}, upstream_penalty=0.6)
# name: (world, collect episodes, shadow rate, the collect router's SLM kinds, the best routing under a 0.95 budget)
CASES = {
    "two kinds, always-LLM collect": (TWO_KINDS, 400, 0.5, set(), {"A"}),
    "three kinds, sparse shadows": (THREE_KINDS, 1500, 0.15, set(), {"plan"}),
    "two kinds, tuned (mixed) collect": (TWO_KINDS, 600, 0.3, {"A"}, {"A"}),
}
SEEDS = 40


def plan(world: World, episodes: int, rate: float, seed: int, collect_slm: set[str]):
    """The estimator without Ray Tune: fit per-kind thresholds, replay a grid on the choose part, choose, report on
    the held-out part. Returns (quality level, chosen point, the kinds it routes to the SLM)."""
    df = world.collect(episodes, rate, seed, to_slm=collect_slm)
    table = PairedTable(df, "world", has_cost=True)
    opts = TuneOptions(seed=seed, n_boot=500)
    parts = split(table, opts.holdout, opts.choose, seed)
    p = Planner(table, parts, opts)
    level = p.level
    chosen = p.choose_on(pd.DataFrame(p.grid_points("threshold", {}, 40)))
    if chosen["kind"] == "llm":
        return level, chosen, set()
    scores = pd.Series(p.fitted("threshold", {}).scores).groupby(df["call_kind"].to_numpy()).first()
    return level, chosen, {k for k, s in scores.items() if s >= chosen["tau"]}


def test_the_episode_replay_is_unbiased_where_the_old_one_was_not():
    """The issue's world: 7 calls per episode, SLM 0.7 and LLM 0.9 a call, shadows at 15%. The true always-SLM /
    always-LLM episode ratio is 0.7^7 / 0.9^7 = 0.172; call-sampled replay predicted about 0.58."""
    w = World({"x": (0.7, 0.9)}, {"x": (7, 7)})
    truth = w.truth({"x"})["quality_episode"] / w.truth(set())["quality_episode"]
    assert truth == pytest.approx(0.172, abs=0.001)
    r = Replay(w.collect(3000, 0.15, 0))
    ratio = r.evaluate(np.ones((r.n, 1), bool))["quality_episode"][0] / \
        r.evaluate(np.zeros((r.n, 1), bool))["quality_episode"][0]
    assert ratio == pytest.approx(truth, abs=0.04)


def test_a_downstream_penalty_does_not_bias_the_replay_of_a_repaired_episode():
    """Always-LLM collect, the SLM as good as the LLM on A: routing A to the SLM changes nothing in truth. Episodes
    the LLM broke upstream saw a harder context downstream; composing them as observed would predict a loss."""
    preds = []
    for seed in range(10):
        df = TWO_KINDS.collect(600, 1.0, seed)
        r, mask = Replay(df), (df["call_kind"] == "A").to_numpy()
        preds.append(r.evaluate(mask)["quality_episode"][0] - r.evaluate(np.zeros(r.n, bool))["quality_episode"][0])
    assert abs(np.mean(preds)) < 0.01, preds


@pytest.mark.parametrize("name", list(CASES))
def test_chosen_policy_and_interval_coverage(name):
    world, episodes, rate, collect_slm, best = CASES[name]
    truth = world.truth(best)
    hits = {"quality_episode": 0, "slm_share": 0}
    widths = {"quality_episode": [], "slm_share": []}
    chose_best, levels = 0, set()
    for seed in range(SEEDS):
        level, chosen, route = plan(world, episodes, rate, seed, collect_slm)
        levels.add(level)
        chose_best += route == best
        measured = world.measure(route, 10000, 1000 + seed)
        ho = chosen["held_out"]
        for key in hits:
            lo, hi = ho[f"{key}_ci"]
            hits[key] += lo - 1e-9 <= measured[key] <= hi + 1e-9
            widths[key].append(hi - lo)
        # no wider than the held-out sample justifies: 1.3x a binomial interval on the held-out episodes
        p = truth["quality_episode"]
        assert widths["quality_episode"][-1] <= 1.3 * 2 * 1.96 * np.sqrt(p * (1 - p) / ho["episodes"])
    assert levels == {"episode"}
    assert chose_best >= 0.8 * SEEDS, chose_best
    assert hits["quality_episode"] >= 0.9 * SEEDS, (hits, np.mean(widths["quality_episode"]))
    assert hits["slm_share"] >= 0.9 * SEEDS, (hits, np.mean(widths["slm_share"]))


def test_calls_sampled_one_by_one_fall_back_to_call_level():
    """A log whose shadows were sampled per call has no whole episodes to compose: tune says call level."""
    df = TWO_KINDS.collect(400, 0.3, 0, unit="call")
    table = PairedTable(df, "world", has_cost=True)
    assert not df["full_episode"].all()
    parts = split(table, 0.4, 0.3, 0)
    assert Planner(table, parts, TuneOptions(min_episodes=10, n_boot=50)).level == "call"


def test_the_ray_tune_search_chooses_the_known_policy(ray_cluster, tmp_path):
    """`tune_routing` (real Ray Tune + Optuna over threshold and random routing) on a world where sending A to the
    SLM and B to the LLM is best: its policy file routes exactly that, and fresh episodes under it land inside its
    held-out prediction."""
    import yaml
    from rich.console import Console

    from slmshift.train.routing.tune import tune_routing

    df = TWO_KINDS.collect(1200, 0.5, 7)
    res = tune_routing(PairedTable(df, "world", has_cost=True), str(tmp_path),
                       TuneOptions(seed=7, trials=12, time_budget_s=120, kinds=["threshold", "random"], progress=False),
                       Console(quiet=True))
    spec = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    assert spec["kind"] == "threshold"
    from slmshift.platform.scorers import Estimate, ThresholdTable

    t = ThresholdTable([Estimate(**e) for e in spec["estimates"]], spec["prior_strength"])
    assert t.score("A", None) >= spec["tau"] > t.score("B", None)
    ho = res.chosen["held_out"]
    measured = TWO_KINDS.measure({"A"}, 10000, 99)
    for key in ("quality_episode", "slm_share"):
        lo, hi = ho[f"{key}_ci"]
        assert lo <= measured[key] <= hi, (key, ho[key], (lo, hi), measured[key])
    assert res.metrics["quality"] == "episode" and "choose" in res.metrics["split"]


# B's SLM answers are right whenever they hold the format, but 45% of attempts fail the check: one attempt is right
# 0.55 of the time, two 0.80, three 0.91, against the LLM's 0.90. Under a 0.95 budget the best routing sends A alone
# to the SLM at k = 1, and A and B at k = 3 (B once per episode: 0.91 / 0.90 = 1.01; k = 2 gives 0.89).
RETRY = World({"A": (0.97, 0.97), "B": (0.55, 0.90)}, {"A": (1, 4), "B": (1, 1)}, upstream_penalty=0.5,
              invalid={"B": 0.45})


def test_slm_attempts_searched_on_logged_retries_find_the_known_best_k():
    """A collect that logged up to 3 SLM attempts per call (`shadow_attempts: 3`): the planner, searching
    slm_attempts with the thresholds, routes A and B to the SLM at k = 3 where k = 1 alone can route only A; its
    held-out intervals cover fresh episodes under that routing and k, and retries show in the cost."""
    assert RETRY.truth({"A", "B"}, 3)["quality_episode"] / RETRY.truth(set())["quality_episode"] >= 0.95
    assert RETRY.truth({"A", "B"}, 2)["quality_episode"] / RETRY.truth(set())["quality_episode"] < 0.95
    seeds, chose, hits = 20, 0, {"quality_episode": 0, "slm_share": 0}
    for seed in range(seeds):
        table = PairedTable(RETRY.collect(800, 0.5, seed, attempts=3), "world", has_cost=True)
        assert table.max_attempts == 3
        opts = TuneOptions(seed=seed, n_boot=300)
        p = Planner(table, split(table, opts.holdout, opts.choose, seed), opts)
        one = p.choose_on(pd.DataFrame(p.grid_points("threshold", {}, 40)))
        assert one["held_out"]["slm_share"] < 0.85  # B stays on the LLM at k = 1
        grid = [pt for k in (1, 2, 3) for pt in p.grid_points("threshold", {"slm_attempts": k}, 40)]
        chosen = p.choose_on(pd.DataFrame(grid))
        k = chosen["params"].get("slm_attempts", 1)
        f = p.fitted("threshold", chosen["params"])
        scores = pd.Series(f.scores).groupby(table.df["call_kind"].to_numpy()).first()
        route = {c for c, s in scores.items() if s >= chosen["tau"]}
        chose += route == {"A", "B"} and k == 3
        measured = RETRY.measure(route, 10000, 500 + seed, attempts=k)
        ho = chosen["held_out"]
        for key in hits:
            lo, hi = ho[f"{key}_ci"]
            hits[key] += lo - 1e-9 <= measured[key] <= hi + 1e-9
        mask = p.held_mask("threshold", chosen["params"], chosen["tau"])
        if route == {"A", "B"}:  # the same routing costs more with B's retries than with one attempt
            assert p.view({"slm_attempts": 3}).held.point(mask)["cost"] > p.view({}).held.point(mask)["cost"]
    assert chose >= 0.8 * seeds, chose
    assert hits["quality_episode"] >= 0.85 * seeds and hits["slm_share"] >= 0.85 * seeds, hits


def test_the_ray_tune_search_writes_the_known_slm_attempts(ray_cluster, tmp_path):
    """Real Ray Tune + Optuna, with slm_attempts in the search space (the collect logged 3 attempts): the policy file
    routes A and B to the SLM with `slm_attempts: 3`, and loads as a router arm."""
    import yaml
    from rich.console import Console

    from slmshift.platform.policies import policy_spec
    from slmshift.train.routing.tune import tune_routing

    res = tune_routing(PairedTable(RETRY.collect(1200, 0.5, 3, attempts=3), "world", has_cost=True), str(tmp_path),
                       TuneOptions(seed=3, trials=16, time_budget_s=120, kinds=["threshold"], progress=False),
                       Console(quiet=True))
    spec = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    assert spec["kind"] == "threshold" and spec["slm_attempts"] == 3, spec
    assert policy_spec(spec).slm_attempts == 3
    assert res.chosen["held_out"]["slm_share"] == pytest.approx(1.0)
    assert any("slm_attempts searched from 1 to 3" in n for n in res.metrics["notes"])
