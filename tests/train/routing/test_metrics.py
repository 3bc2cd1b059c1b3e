"""Routing metrics on a constructed five-call example whose answers are worked out by hand in the comments."""

import numpy as np
import pytest

from slmshift.train.routing import metrics as rm

# Five calls. SLM right on 0, 1, 3 (weak quality 3/5); LLM right on all but 1 (strong quality 4/5).
SCORES = np.array([0.9, 0.8, 0.6, 0.4, 0.2])
SLM_OK = np.array([1, 1, 0, 1, 0])
LLM_OK = np.array([1, 0, 1, 1, 1])
SLM_COST, LLM_COST = np.full(5, 1.0), np.full(5, 10.0)
TAUS = np.array([0.2, 0.5, 0.7, np.inf])


def example():
    return rm.curve(SCORES, SLM_OK, LLM_OK, SLM_COST, LLM_COST, taus=TAUS)


def test_curve_points_by_hand():
    c = example()
    # tau 0.2: all SLM -> 3/5. tau 0.5: SLM on 0,1,2 (1,1,0) + LLM on 3,4 (1,1) -> 4/5 at LLM share 2/5.
    # tau 0.7: SLM on 0,1 (1,1) + LLM on 2,3,4 (1,1,1) -> 5/5 at share 3/5. inf: all LLM -> 4/5.
    assert c.llm_share.tolist() == pytest.approx([0.0, 0.4, 0.6, 1.0])
    assert c.quality.tolist() == pytest.approx([0.6, 0.8, 1.0, 0.8])
    assert c.cost.tolist() == pytest.approx([1.0, 4.6, 6.4, 10.0])  # 0.6*1 + 0.4*10, 0.4*1 + 0.6*10
    assert c.tau.tolist() == [0.2, 0.5, 0.7, np.inf]


def test_pgr_apgr_cpt_by_hand():
    c = example()
    assert rm.pgr(c.quality, 0.6, 0.8).tolist() == pytest.approx([0.0, 1.0, 2.0, 1.0])
    # AUC = .4*(.6+.8)/2 + .2*(.8+1)/2 + .4*(1+.8)/2 = .28 + .18 + .36 = .82; weak .6, strong .8 over [0, 1]
    assert rm.auc(c.llm_share, c.quality) == pytest.approx(0.82)
    assert rm.apgr(c.llm_share, c.quality, 0.6, 0.8) == pytest.approx((0.82 - 0.6) / 0.2)
    # CPT(50%): target .7 on the first segment (0, .6)-(.4, .8) -> .2; CPT(80%): target .76 -> .32
    assert rm.cpt(c.llm_share, c.quality, 0.5, 0.6, 0.8) == pytest.approx(0.2)
    assert rm.cpt(c.llm_share, c.quality, 0.8, 0.6, 0.8) == pytest.approx(0.32)
    assert np.isnan(rm.cpt([0, 1], [0.6, 0.65], 0.5, 0.6, 0.8))  # never reached
    assert np.isnan(rm.apgr(c.llm_share, c.quality, 0.7, 0.7))  # models tie: undefined


def test_cpt_matches_routellm_interp_on_a_monotone_curve():
    share, q = np.array([0, 0.3, 0.5, 1.0]), np.array([0.5, 0.62, 0.7, 0.75])
    for x in (0.2, 0.5, 0.8):
        target = 0.5 + x * (0.75 - 0.5)
        assert rm.cpt(share, q, x, 0.5, 0.75) == pytest.approx(np.interp(target, q, share))


def test_aiq_by_hand():
    c = example()
    # (4.6, .8) lies under the chord (1, .6)-(6.4, 1.0) (.867 there): the hull is (1, .6), (6.4, 1.0), then flat
    # (the (10, .8) point falls). Area = 5.4*(.6+1)/2 + 3.6*1 = 7.92 over the range 9.
    hull = rm.nondecreasing_hull(c.cost, c.quality)
    assert hull.tolist() == [[1.0, 0.6], [6.4, 1.0]]
    assert rm.aiq(c.cost, c.quality) == pytest.approx(7.92 / 9)
    assert rm.aiq([2.0, 2.0], [0.5, 0.7]) == pytest.approx(0.7)  # one cost: its best quality


def test_threshold_grid_spans_all_slm_to_all_llm():
    s = np.linspace(0, 1, 101)
    grid = rm.threshold_grid(s, 10)
    assert len(grid) == 12 and grid[0] == 0 and np.isinf(grid[-1])
    shares = 1 - rm.route_slm(s, grid).mean(axis=0)
    assert shares[0] == 0 and shares[-1] == 1 and np.all(np.diff(shares) >= 0)
    assert rm.threshold_grid(np.full(7, 0.5)).tolist() == [0.5, np.inf]  # duplicate edges collapse


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.8])
def test_calibration_hits_the_target_llm_share_within_two_points(target):
    scores = np.random.default_rng(1).beta(2, 5, size=5000)
    tau = rm.calibrate_tau(scores, target)
    assert abs((scores < tau).mean() - target) <= 0.02
    held = np.random.default_rng(2).beta(2, 5, size=5000)  # and on fresh calls from the same distribution
    assert abs((held < tau).mean() - target) <= 0.02


def test_pareto_mask():
    q = np.array([0.5, 0.7, 0.6, 0.7, 0.9, 0.9])
    c = np.array([1.0, 2.0, 3.0, 2.0, 5.0, 6.0])
    # (3, .6) is dominated by (2, .7); (6, .9) by (5, .9); the duplicate (2, .7) points both stay
    assert rm.pareto_mask(q, c).tolist() == [True, True, False, True, True, False]


def test_bootstrap_resamples_whole_groups():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    w = rm.bootstrap_groups(groups, n_boot=200, seed=0)
    assert w.shape == (200, 6)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 5])  # a task's calls move together
    assert np.all(w[:, [0, 2, 3]].sum(axis=1) == 3)  # three groups drawn per resample
    vals = np.array([1, 1, 0, 1, 1, 1.0])
    lo, hi = rm.interval(rm.weighted_mean(w, vals))
    assert 0 <= lo <= vals.mean() <= hi <= 1


def test_calibration_with_tied_scores_takes_the_nearest_share():
    s = np.array([0.2] * 5 + [0.5] * 5)  # a plain 30% quantile (0.2) would send no call to the LLM
    assert rm.calibrate_tau(s, 0.3) == 0.5 and (s < 0.5).mean() == 0.5
    assert rm.calibrate_tau(s, 0.2) == 0.2  # 0% is nearer than 50%
    assert np.isinf(rm.calibrate_tau(s, 1.0)) and rm.calibrate_tau(s, 0.0) == 0.2
