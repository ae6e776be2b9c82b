"""Stage Gate 1 readouts: AUROC, Spearman, bootstrap intervals, permutation p-values, the verdict, the figures."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from scipy import stats as sps

from mechlib.plots_reward import (
    ArmAccuracy,
    CurvePoints,
    RewardPlotError,
    plot_accuracy_change,
    plot_feature_reward_summary,
    plot_stage_gate,
    plot_training_curves,
)
from mechlib.readouts import (
    ReadoutScore,
    auroc,
    score_readout,
    stage_gate,
    stage_gate_table,
    stage_gate_verdict,
)
from mechlib.stats import StatsInputError, format_p


def _brute_auroc(x: np.ndarray, y: np.ndarray) -> float:
    pos, neg = x[y], x[~y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _labelled(seed: int, n: int, signal: float, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.45
    y[:2] = [True, False]  # both classes present whatever the draw
    x = signal * y + rng.normal(size=n)
    return (np.round(x) if ties else x), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_the_pair_count_with_ties_and_flips_with_the_sign(seed):
    x, y = _labelled(seed, 37, 0.7, ties=True)  # rounding leaves many ties
    assert len(np.unique(x)) < len(x)
    assert auroc(x, y) == pytest.approx(_brute_auroc(x, y), abs=1e-12)
    assert auroc(-x, y) == pytest.approx(1 - auroc(x, y), abs=1e-12)
    u = sps.mannwhitneyu(x[y], x[~y]).statistic
    assert auroc(x, y) == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_auroc_is_nan_and_the_row_undefined_when_one_class_is_empty():
    x = np.arange(6.0)
    assert math.isnan(auroc(x, np.ones(6, bool)))
    row = score_readout("r", x, np.zeros(6, bool), n_bootstrap=50, n_permutations=50)
    assert (row.auroc, row.spearman_rho, row.auroc_p_perm, row.n_bootstrap) == (None, None, None, 0)
    assert "one class" in row.direction


def test_spearman_and_auroc_match_scipy_and_intervals_contain_the_estimates():
    x, y = _labelled(3, 80, 0.8, ties=True)
    row = score_readout("feature", x, y, n_bootstrap=500, n_permutations=500)
    assert row.spearman_rho == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert row.auroc == pytest.approx(_brute_auroc(x, y), abs=1e-12)
    assert row.spearman_ci is not None and row.auroc_ci is not None
    assert row.spearman_ci[0] <= row.spearman_rho <= row.spearman_ci[1]
    assert row.auroc_ci[0] <= row.auroc <= row.auroc_ci[1]
    assert row.auroc_ci[1] - row.auroc_ci[0] > 0.02  # 80 questions: a real interval, not a point
    assert (row.n, row.n_correct, row.n_permutations) == (80, int(y.sum()), 500)


def test_vectorised_bootstrap_equals_a_loop_over_resamples_with_scipy():
    x, y = _labelled(4, 12, 0.5, ties=True)  # small n: some resamples hold one class and are skipped
    n_boot, seed = 300, 7
    row = score_readout("r", x, y, n_bootstrap=n_boot, n_permutations=10, seed=seed)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))  # the same draws
    rhos, aucs = [], []
    for i in idx:
        xb, yb = x[i], y[i]
        if yb.all() or not yb.any():
            continue
        aucs.append(_brute_auroc(xb, yb))
        if np.ptp(xb) > 0:
            rhos.append(sps.spearmanr(xb, yb).statistic)
    assert row.n_bootstrap == len(aucs) < n_boot
    assert row.auroc_ci == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)
    assert row.spearman_ci == pytest.approx(tuple(np.quantile(rhos, [0.025, 0.975])), abs=1e-12)


def test_permutation_p_matches_exact_enumeration_with_scipy():
    # 8 questions, 3 correct: all 56 labelings can be enumerated; the Monte-Carlo p must agree with them
    x = np.array([0.3, 1.2, 1.2, -0.5, 2.0, 0.3, 0.9, -1.1])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    rho_obs, auc_obs = sps.spearmanr(x, y).statistic, _brute_auroc(x, y)
    as_extreme_rho = as_extreme_auc = total = 0
    for pos in itertools.combinations(range(8), 3):
        lab = np.zeros(8, bool)
        lab[list(pos)] = True
        as_extreme_rho += abs(sps.spearmanr(x, lab).statistic) >= abs(rho_obs) - 1e-12
        as_extreme_auc += abs(_brute_auroc(x, lab) - 0.5) >= abs(auc_obs - 0.5) - 1e-12
        total += 1
    n_perm = 20000
    row = score_readout("r", x, y, n_bootstrap=10, n_permutations=n_perm, seed=1)
    for exact, got in ((as_extreme_rho / total, row.spearman_p_perm), (as_extreme_auc / total, row.auroc_p_perm)):
        assert got is not None
        assert abs(got - exact) < 4 * math.sqrt(exact * (1 - exact) / n_perm) + 2 / n_perm


def test_separating_score_has_auroc_one_and_the_smallest_p_random_score_does_not():
    y = np.array([True] * 20 + [False] * 20)
    perfect = score_readout("perfect", y + 0.01 * np.arange(40), y, n_bootstrap=300, n_permutations=999)
    assert perfect.auroc == 1.0 and perfect.auroc_ci == (1.0, 1.0)
    assert perfect.auroc_p_perm == perfect.spearman_p_perm == pytest.approx(1 / 1000)
    noise = score_readout("noise", np.random.default_rng(5).normal(size=40), y, n_bootstrap=300, n_permutations=999)
    assert noise.auroc_p_perm is not None and noise.auroc_p_perm > 0.05
    assert noise.auroc_ci is not None and noise.auroc_ci[0] < 0.5 < noise.auroc_ci[1]


def test_constant_scores_give_none_without_warnings_and_encode_to_json():
    _, y = _labelled(6, 30, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = score_readout("constant", np.full(30, 2.5), y, n_bootstrap=200, n_permutations=200)
    assert row.spearman_rho is None and row.spearman_ci is None and row.spearman_p_perm is None
    assert row.auroc == 0.5 and row.auroc_p_perm == 1.0  # all ties: each pair counts one half
    assert "constant" in row.direction
    decoded = json.loads(json.dumps(dataclasses.asdict(row), allow_nan=False))
    assert decoded["spearman_rho"] is None and decoded["name"] == "constant"


def test_bad_input_raises_one_clear_error():
    with pytest.raises(StatsInputError, match="same length"):
        score_readout("r", [1.0, 2.0, 3.0], [True, False])
    with pytest.raises(StatsInputError, match="0/1"):
        auroc([1.0, 2.0], [0, 2])
    with pytest.raises(StatsInputError, match="NaN"):
        auroc([1.0, float("nan")], [0, 1])


def _row(name: str, auc: float, ci: tuple[float, float], p: float, n: int = 100) -> ReadoutScore:
    rho = (auc - 0.5) * 1.7
    return ReadoutScore(name, n, 40, rho, (rho - 0.1, rho + 0.1), p, auc, ci, p, 2000, 2000, "d")


def test_verdict_follows_the_numbers():
    strong = _row("feature reward", 0.72, (0.62, 0.81), 0.0005)
    weak = _row("feature reward", 0.55, (0.45, 0.65), 0.30)
    reversed_ = _row("feature reward", 0.30, (0.20, 0.40), 0.001)
    length_weak = _row("answer length", 0.52, (0.41, 0.61), 0.7)
    projection_close = _row("CAA projection", 0.68, (0.58, 0.78), 0.001)
    length_long_wrong = _row("answer length", 0.20, (0.10, 0.30), 0.0005)

    text = stage_gate_verdict(strong, [length_weak, projection_close])
    assert "predicted correctness on held-out" in text and "0.72" in text
    assert "beat answer length" in text
    assert "not distinguishable from CAA projection on 100 questions" in text
    assert "did not predict" in stage_gate_verdict(weak, [])
    assert "sign reversed" in stage_gate_verdict(reversed_, [])
    # a baseline below 0.5 is compared with its better sign: 1 - 0.20 = 0.80 beats the feature's 0.72
    flipped = stage_gate_verdict(_row("feature reward", 0.60, (0.52, 0.68), 0.01), [length_long_wrong])
    assert "answer length (sign flipped" in flipped and "did better (AUROC 0.60 vs 0.80" in flipped
    # CI excludes 0.5 but the permutation p does not pass: not a pass
    assert "did not predict" in stage_gate_verdict(_row("f", 0.60, (0.51, 0.69), 0.08), [])


def test_stage_gate_judges_the_trained_selection_against_the_baselines_only():
    """Rows keep their order; the verdict is the trained selection's against the non-candidate readouts (the
    other selection, though it scores better, is not a baseline); each row equals score_readout's."""
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.5
    scores = {
        "sae A": y + rng.normal(0, 0.8, 60),
        "sae B": y + rng.normal(0, 0.3, 60),
        "length": rng.normal(0, 1, 60),
    }
    kw = dict(n_bootstrap=200, n_permutations=300, seed=1)
    gate = stage_gate(scores, y, None, candidates=["sae A", "sae B"], trained="sae A", **kw)
    assert [r.name for r in gate.rows] == ["sae A", "sae B", "length"]
    assert gate.trained == score_readout("sae A", scores["sae A"], y, **kw) and gate.other == gate.rows[1]
    assert gate.verdict == stage_gate_verdict(gate.rows[0], [gate.rows[2]])
    assert "sae B" not in gate.verdict and "length" in gate.verdict
    one = stage_gate(scores, y, None, candidates=["sae B"], trained="sae B", **kw)
    assert one.other is None and one.verdict == stage_gate_verdict(one.rows[1], [one.rows[0], one.rows[2]])
    with pytest.raises(StatsInputError, match="must be one of the candidates"):
        stage_gate(scores, y, None, candidates=["sae A"], trained="length", **kw)
    with pytest.raises(StatsInputError, match=r"readouts \['sae C'\] have no scores"):
        stage_gate(scores, y, None, candidates=["sae A", "sae C"], trained="sae A", **kw)


def test_table_has_a_line_per_readout_and_marks_undefined_values():
    x, y = _labelled(8, 50, 1.0)
    rows = [score_readout("feature reward", x, y, n_bootstrap=100, n_permutations=100)]
    rows.append(score_readout("constant", np.zeros(50), y, n_bootstrap=100, n_permutations=100))
    lines = stage_gate_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("feature reward") and f"{rows[0].auroc:.3f}" in lines[2]
    assert lines[3].startswith("constant") and "n/a" in lines[3]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_figures_draw_one_mark_per_readout_arm_and_condition():
    x, y = _labelled(9, 40, 1.0)
    gate = [
        score_readout("feature reward", x, y, n_bootstrap=100, n_permutations=100),
        score_readout("answer length", -x + np.random.default_rng(0).normal(size=40), y, n_bootstrap=100),
        score_readout("all right", x, np.ones(40, bool)),  # undefined: no bar
    ]
    fig, ax = plot_stage_gate(gate)
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 2
    plt.close(fig)

    curves = [
        CurvePoints("correctness", [0, 1, 2], [0.2, 0.3, 0.4], [float("nan")] * 3),
        CurvePoints("correctness+feature", [0, 1, 2], [0.2, 0.25, 0.3], [0.1, 0.3, 0.5]),
        CurvePoints("feature", [0, 1, 2], [0.2, 0.1, 0.1], [0.1, 0.6, 0.9]),
    ]
    fig, axes = plot_training_curves(curves)
    assert len(axes[0, 0].lines) == 3 and len(axes[0, 1].lines) == 2  # the correctness arm has no reward line
    assert [ln.get_label() for ln in axes[0, 0].lines] == [c.arm for c in curves]  # no two curves coincide
    plt.close(fig)

    same = [*curves[1:], CurvePoints("copy", [0, 1, 2], [0.2, 0.25, 0.3], [0.1, 0.3, 0.5])]  # equals the first
    fig, axes = plot_training_curves(same)
    for ax in axes[0, :2]:
        assert [ln.get_label() for ln in ax.lines] == ["correctness+feature", "feature", "copy (= correctness+feature)"]
        assert ax.lines[0].get_markersize() > ax.lines[2].get_markersize()  # the later one nests inside
    plt.close(fig)

    arms = [ArmAccuracy(c.arm, 50, 0.3, (0.19, 0.44), 0.3 + 0.05 * i, (0.2, 0.6)) for i, c in enumerate(curves)]
    fig, ax = plot_accuracy_change(arms)
    assert len(ax.patches) == 2 * len(arms)
    plt.close(fig)

    fig, axes = plot_feature_reward_summary(gate, curves, arms)
    assert axes.shape == (1, 4) and len(axes[0, 3].patches) == 2 * len(arms)
    plt.close(fig)


def test_figures_reject_inconsistent_rows():
    with pytest.raises(RewardPlotError, match="one value per step"):
        plot_training_curves([CurvePoints("a", [0, 1], [0.1], [0.2, 0.3])])
    with pytest.raises(RewardPlotError, match="outside its interval"):
        plot_accuracy_change([ArmAccuracy("a", 10, 0.9, (0.1, 0.2), 0.5, (0.4, 0.6))])
    plt.close("all")


def test_a_readout_that_only_reads_the_question_type_fails_the_within_type_test():
    """The default run's CAA projection: AUROC 0.82 on held-out answers, nearly all of it between types."""
    rng = np.random.default_rng(3)
    types = ["easy"] * 40 + ["hard"] * 40
    y = np.r_[rng.random(40) < 0.8, rng.random(40) < 0.2]
    reads_type = np.r_[np.ones(40), np.zeros(40)] + rng.normal(0, 0.1, 80)
    row = score_readout("CAA projection", reads_type, y, n_bootstrap=200, n_permutations=500, types=types)
    assert row.auroc_p_perm is not None and row.auroc_p_perm < 0.01  # the plain test passes it
    assert row.p_within_type is not None and row.p_within_type > 0.05
    text = stage_gate_verdict(row, [])
    assert "predicted correctness on held-out" in text
    assert "Within question types it does not, detectably (labels shuffled within type: p = " in text
    reads_answer = score_readout("f", reads_type + y, y, n_bootstrap=200, n_permutations=500, types=types)
    assert "It does so within question types too" in stage_gate_verdict(reads_answer, [])
    assert score_readout("f", reads_type, y, n_bootstrap=200, n_permutations=500).p_within_type is None
    one_type = score_readout("f", reads_type, y, n_bootstrap=200, n_permutations=500, types=["gsm8k"] * 80)
    assert one_type.p_within_type is None and "question types" not in stage_gate_verdict(one_type, [])
    table = stage_gate_table([row]).splitlines()
    assert "p_type" in table[0] and format_p(row.p_within_type) in table[2]
