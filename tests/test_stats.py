"""Statistics on known values, against scipy, and calibration of the permutation null."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from mechlib.stats import (
    StatsInputError,
    bootstrap_ci,
    cohens_d,
    format_p,
    mcnemar_exact,
    permutation_null,
    rank_association_within_strata,
    spearman,
    top_abs_mean,
    wilson_ci,
)


def test_cohens_d_hand_example():
    # a: mean 4, var 4; b: mean 2, var 1; pooled var = (2·4 + 2·1) / 4 = 2.5
    d = cohens_d(np.array([[2.0], [4.0], [6.0]]), np.array([[1.0], [2.0], [3.0]]))
    assert d.shape == (1,)
    assert d[0] == pytest.approx(2 / math.sqrt(2.5), rel=1e-12)


def test_cohens_d_unequal_groups_and_sign():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(12, 5)) + 1.0
    d = cohens_d(a, b)
    for j in range(5):
        sp = math.sqrt((6 * a[:, j].var(ddof=1) + 11 * b[:, j].var(ddof=1)) / 17)
        assert d[j] == pytest.approx((a[:, j].mean() - b[:, j].mean()) / sp, rel=1e-12)
    np.testing.assert_allclose(cohens_d(b, a), -d)


def test_cohens_d_zero_variance_is_zero_not_inf():
    a = np.array([[3.0, 1.0], [3.0, 2.0], [3.0, 3.0]])
    b = np.array([[5.0, 1.0], [5.0, 2.5], [5.0, 2.0]])
    d = cohens_d(a, b)
    assert d[0] == 0.0 and np.isfinite(d).all() and d[1] != 0.0
    # round-off on a large constant column must not turn into an effect either
    big = np.full((4, 1), 1e8 + 0.1)
    assert cohens_d(big, big * (1 + 1e-16))[0] == 0.0


def test_cohens_d_rejects_tiny_groups_and_nan():
    with pytest.raises(StatsInputError, match="at least 2"):
        cohens_d(np.ones((1, 3)), np.ones((4, 3)))
    with pytest.raises(StatsInputError, match="NaN"):
        cohens_d(np.array([[np.nan], [1.0]]), np.ones((2, 1)))


def test_top_abs_mean():
    d = np.array([[0.1, -3.0, 2.0, -0.5], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(top_abs_mean(d, 2), [2.5, 1.0])
    with pytest.raises(StatsInputError):
        top_abs_mean(d, 5)


def test_mcnemar_exact_equals_binomial_sum():
    # 2 vs 8 discordant: p = 2 · P(X ≤ 2 | n=10, 1/2) = 2 · (1 + 10 + 45) / 1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (23, 50), (1, 1), (140, 200)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_ci(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_known_value_and_errors():
    z2 = sps.norm.ppf(0.975) ** 2
    assert wilson_ci(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    with pytest.raises(StatsInputError):
        wilson_ci(3, 0)


def test_permutation_observed_equals_cohens_d():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(20, 3, 16)) + 1e4  # a large mean offset must not cost precision
    y = np.arange(20) % 3 == 0
    pn = permutation_null(h, y, n_permutations=30, seed=0, top_n=4)
    for layer in range(3):
        ref = top_abs_mean(cohens_d(h[y, layer], h[~y, layer]), 4)
        assert pn.observed[layer] == pytest.approx(float(ref), rel=1e-9)
    assert pn.null.shape == (30, 3) and pn.null_max.shape == (30,)
    np.testing.assert_allclose(pn.null_max, pn.null.max(axis=1))
    # a permutation's row equals Cohen's d of that relabelling (the vectorised path is exact)
    rng2 = np.random.default_rng(0)
    y0 = rng2.permutation(y)
    ref0 = [float(top_abs_mean(cohens_d(h[y0, layer], h[~y0, layer]), 4)) for layer in range(3)]
    np.testing.assert_allclose(pn.null[0], ref0, rtol=1e-9)


def test_permutation_chunking_does_not_change_result():
    rng = np.random.default_rng(3)
    h, y = rng.normal(size=(14, 2, 8)), np.arange(14) < 6
    a = permutation_null(h, y, n_permutations=25, seed=5, top_n=3)
    b = permutation_null(h, y, n_permutations=25, seed=5, top_n=3, chunk_bytes=1)
    np.testing.assert_allclose(a.null, b.null, rtol=1e-12)  # BLAS may sum in another order


def test_permutation_p_is_uniform_under_random_labels():
    """Calibration: with no real effect, P(p_peak ≤ α) ≈ α for every α."""
    rng = np.random.default_rng(42)
    ps = []
    for rep in range(150):
        h = rng.normal(size=(16, 3, 6))
        y = rng.permutation(np.arange(16) < 7)
        ps.append(permutation_null(h, y, n_permutations=39, seed=rep, top_n=2).p_peak)
    ps = np.array(ps)
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    assert 0.02 <= (ps <= 0.1).mean() <= 0.2


def test_permutation_finds_planted_layer():
    rng = np.random.default_rng(7)
    h = rng.normal(size=(40, 4, 32))
    y = np.arange(40) % 2 == 0
    h[y, 2, :3] += 1.5
    pn = permutation_null(h, y, n_permutations=99, seed=0, top_n=3)
    assert pn.peak == 2
    assert pn.p_peak == pytest.approx(1 / 100)
    assert pn.p_layer[2] == pytest.approx(1 / 100)
    assert (pn.null_quantile(0.95) < pn.observed[2]).all()


def test_permutation_rejects_bad_labels():
    h = np.zeros((5, 2, 3))
    with pytest.raises(StatsInputError, match="2 samples per group"):
        permutation_null(h, [True, False, False, False, False])
    with pytest.raises(StatsInputError, match="entries"):
        permutation_null(h, [True, False])


def test_bootstrap_ci_covers_true_delta():
    """Coverage of the paired percentile interval at n = 100 is close to 95 %."""
    rng = np.random.default_rng(11)
    true_delta = 0.1  # P(wrong→right) = 0.2, P(right→wrong) = 0.1
    hits = 0
    reps = 200
    for rep in range(reps):
        before = rng.random(100) < 0.5
        u = rng.random(100)
        after = np.where(before, u >= 0.2, u < 0.4)  # right stays right w.p. .8; wrong→right w.p. .4
        # expected delta = 0.5·0.4 − 0.5·0.2 = 0.1
        ci = bootstrap_ci(before, after, n_bootstrap=500, seed=rep)
        hits += ci.low <= true_delta <= ci.high
        assert ci.low <= ci.estimate <= ci.high
    assert 0.88 <= hits / reps <= 0.99


def test_bootstrap_degenerate_and_errors():
    ci = bootstrap_ci([1, 0, 1], [1, 0, 1], n_bootstrap=50)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)
    with pytest.raises(StatsInputError):
        bootstrap_ci([1, 0], [1, 0, 1])


def test_spearman_matches_scipy_and_handles_constants():
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = (x + rng.normal(size=30) > 0).astype(int)
    res = spearman(x, y)
    ref = sps.spearmanr(x, y)
    assert res.rho == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue) and res.n == 30
    assert spearman([1, 2, 3, 4], [2, 4, 6, 9]).rho == pytest.approx(1.0)
    const = spearman([1.0, 2.0, 3.0], [1, 1, 1])
    assert math.isnan(const.rho) and const.as_dict() == {"rho": None, "p": None, "n": 3}


def test_stratified_null_separates_confound_from_effect():
    """States depend only on a question's type, and types differ in accuracy: the plain null calls
    that an effect, the within-type null does not (its p stays ~uniform); a real within-type effect
    is still found."""
    from mechlib.stats import _permutations

    plain_p, within_p, real_p = [], [], []
    for rep in range(40):
        rng = np.random.default_rng(rep)
        kind = np.repeat(["easy", "hard"], 40)
        y = np.where(kind == "easy", rng.random(80) < 0.8, rng.random(80) < 0.2)
        h = rng.normal(size=(80, 2, 12))
        h[kind == "easy", :, :4] += 3.0  # the type is visible in the states; correctness itself is not
        plain_p.append(permutation_null(h, y, n_permutations=49, seed=rep, top_n=3).p_peak)
        within_p.append(permutation_null(h, y, n_permutations=49, seed=rep, top_n=3, strata=kind).p_peak)
        h[y, 1, 6:9] += 3.0  # now a real correctness effect at layer 1
        real = permutation_null(h, y, n_permutations=49, seed=rep, top_n=3, strata=kind)
        real_p.append(real.p_peak if real.peak == 1 else 1.0)
    plain_p, within_p, real_p = map(np.array, (plain_p, within_p, real_p))
    assert (plain_p <= 0.05).mean() >= 0.9
    assert (within_p <= 0.05).mean() <= 0.2 and sps.kstest(within_p, "uniform").pvalue > 1e-3
    assert (real_p <= 0.05).mean() >= 0.9
    # within-stratum shuffles keep every stratum's label counts
    perms = _permutations(y, 20, np.random.default_rng(0), kind)
    for k in ("easy", "hard"):
        assert (perms[:, kind == k].sum(1) == y[kind == k].sum()).all()
    with pytest.raises(StatsInputError, match="strata"):
        permutation_null(h, y, n_permutations=5, strata=kind[:10])


@pytest.mark.parametrize("n", [3, 6, 7, 12, 40, 60, 97])
def test_wilson_edges_are_exact(n):
    # the textbook formula left lo ≈ 5.6e-17 at 0/n and hi = 0.9999999999999999 at n/n for these n,
    # which made chapter 04's error bars negative
    assert wilson_ci(0, n)[0] == 0.0
    assert wilson_ci(n, n)[1] == 1.0


@given(
    st.integers(min_value=1, max_value=5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]),
)
@settings(max_examples=300, deadline=None)
def test_wilson_bounds_hold_exactly(kn, confidence):
    k, n = kn
    lo, hi = wilson_ci(k, n, confidence)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


def test_wilson_rejects_fractions_and_bad_confidence():
    with pytest.raises(StatsInputError):
        wilson_ci(2.5, 10)
    with pytest.raises(StatsInputError):
        wilson_ci(2, 10, confidence=1.0)


def test_format_p_never_prints_zero():
    assert format_p(0.0312) == "0.031" and format_p(1.0) == "1.000" and format_p(0.001) == "0.001"
    assert format_p(1 / 1001) == "0.001" and format_p(0.00049) == "4.9e-04" and format_p(1.9e-06) == "1.9e-06"
    assert format_p(None) == "n/a"


def test_within_strata_test_sees_through_a_score_that_only_reads_the_type():
    rng = np.random.default_rng(0)
    strata = ["easy"] * 30 + ["hard"] * 30
    y = np.r_[rng.random(30) < 0.8, rng.random(30) < 0.2]
    type_only = np.r_[np.full(30, 5.0), np.zeros(30)] + rng.normal(0, 0.1, 60)  # knows the type, not the answer
    assert spearman(type_only, y).p < 0.001  # the plain test is fooled
    assert rank_association_within_strata(type_only, y, strata, seed=1).p > 0.05
    knows = type_only + 2.0 * y  # also knows correctness inside each type
    res = rank_association_within_strata(knows, y, strata, n_permutations=999, seed=1)
    assert res.p == pytest.approx(1 / 1000) and (res.n_permutations, res.n_strata) == (999, 2)


def test_within_strata_p_matches_full_enumeration():
    """Two strata of 4 with 2 correct each: all 36 label arrangements, weighted equally, give the exact p."""
    from itertools import combinations

    x = np.array([0.3, 2.0, 1.1, 0.2, 5.0, 3.3, 4.4, 0.9])
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    strata = ["a"] * 4 + ["b"] * 4
    ranks = np.argsort(np.argsort(x)) + 1.0
    expected = 2 * ranks[:4].mean() + 2 * ranks[4:].mean()
    stat = lambda lab: abs(ranks[list(lab)].sum() - expected)  # noqa: E731
    arrangements = [a + b for a in combinations(range(4), 2) for b in combinations(range(4, 8), 2)]
    exact = np.mean([stat(lab) >= stat(np.flatnonzero(y)) - 1e-9 for lab in arrangements])
    res = rank_association_within_strata(x, y, strata, n_permutations=20000, seed=0)
    assert res.p == pytest.approx(exact, abs=0.015)


def test_many_scores_match_full_enumeration_column_by_column():
    """``rank_associations_within_strata`` on an [8, 4] matrix: each column's p equals the exact p of that
    column alone (ranked within its column, ties averaged), and one call per column gives the same p."""
    from itertools import combinations

    from mechlib.stats import rank_associations_within_strata

    x = np.array(
        [
            [0.3, 5.0, 1.0, -0.3],
            [2.0, 3.3, 1.0, -2.0],
            [1.1, 4.4, 2.0, -1.1],
            [0.2, 0.9, 0.0, -0.2],
            [5.0, 0.3, 2.0, -5.0],
            [3.3, 2.0, 0.0, -3.3],
            [4.4, 1.1, 1.0, -4.4],
            [0.9, 0.2, 2.0, -0.9],
        ]
    )  # column 2 has ties, column 3 is column 0 reversed (same |S - E|, same p)
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    strata = ["a"] * 4 + ["b"] * 4
    arrangements = [a + b for a in combinations(range(4), 2) for b in combinations(range(4, 8), 2)]
    many = rank_associations_within_strata(x, y, strata, n_permutations=20000, seed=0)
    for j in range(x.shape[1]):
        ranks = sps.rankdata(x[:, j])
        expected = 2 * ranks[:4].mean() + 2 * ranks[4:].mean()
        stat = lambda lab: abs(ranks[list(lab)].sum() - expected)  # noqa: B023, E731
        exact = np.mean([stat(lab) >= stat(np.flatnonzero(y)) - 1e-9 for lab in arrangements])
        assert many[j].p == pytest.approx(exact, abs=0.015), j
        assert many[j] == rank_association_within_strata(x[:, j], y, strata, n_permutations=20000, seed=0)
    assert many[0].p == many[3].p and many[0].p != many[1].p


def test_within_strata_needs_two_strata_and_two_classes():
    assert rank_association_within_strata([1.0, 2.0, 3.0], [1, 0, 1], ["a", "a", "a"]) is None
    assert rank_association_within_strata([1.0, 2.0, 3.0], [1, 1, 1], ["a", "b", "a"]) is None
    with pytest.raises(StatsInputError, match="differ in length"):
        rank_association_within_strata([1.0, 2.0], [1, 0], ["a"])
