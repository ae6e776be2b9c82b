"""Plot helpers survive interval edges a round-off away from their point estimate."""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import matplotlib.pyplot as plt
import pytest

from mechlib import plots
from mechlib.lens import LensResult
from mechlib.plots import plot_baseline, plot_dose_response, plot_feature_examples
from mechlib.records import GroupAccuracy
from mechlib.results import Example, FeatureExamples, ScaleRow
from mechlib.sae.history import HistoryRow


def test_plot_baseline_accepts_interval_edges_past_the_estimate():
    # what the old wilson_ci(0, 60) gave: lo = 5.6e-17 > accuracy 0 → a negative error bar
    groups = [
        GroupAccuracy("a", 60, 0, 0.0, (5.551115123125783e-17, 0.06)),
        GroupAccuracy("b", 60, 60, 1.0, (0.9, 0.9999999999999999)),
    ]
    fig, _ = plot_baseline(groups, [3, 4], [5, 6], max_new_tokens=16, overall=0.5, overall_ci=(0.4, 0.6))
    assert _error_bars(fig) == [[(0.0, 0.0), (0.0, 0.06)], [(1.0, 0.9), (1.0, 1.0)]]  # clipped at the estimate
    plt.close(fig)
    assert plots._yerr([0.0, 1.0, 0.5], [5.6e-17, 0.9, 0.4], [0.06, 1 - 1e-16, 0.7]) == [
        [0.0, pytest.approx(0.1), pytest.approx(0.1)],
        [pytest.approx(0.06), 0.0, pytest.approx(0.2)],
    ]


def _error_bars(fig) -> list[list[tuple[float, float]]]:
    """The vertical error-bar segments drawn in ``fig``, as ((x, y_low), (x, y_high)) pairs, rounded."""
    from matplotlib.collections import LineCollection

    return [
        [(round(float(x), 6), round(float(y), 6)) for x, y in seg]
        for ax in fig.axes
        for c in ax.collections
        if isinstance(c, LineCollection)
        for seg in c.get_segments()
    ]


def test_plot_dose_response_accepts_interval_edges_past_the_estimate():
    def row(scale: float, accuracy: float, ci95: tuple[float, float]) -> ScaleRow:
        return ScaleRow(scale, 100 * scale, 10, accuracy, ci95, 0.0, (0.0, 0.0), 0, 5, 0, 0, 1.0, [], [])

    fig, _ = plot_dose_response(
        [row(0.2, 1.0, (0.8, 1.0 - 1e-16)), row(0.1, 0.0, (1e-17, 0.1))],
        baseline=0.5,
        baseline_ci=(0.4, 0.6),
        layer=3,
        controls=[row(0.1, 0.3, (0.1, 0.5))],
    )
    # x is the scale in % of the mean norm; no bar crosses its estimate
    assert sorted(_error_bars(fig)) == [[(10.0, 0.0), (10.0, 0.1)], [(20.0, 0.8), (20.0, 1.0)]]
    plt.close(fig)


def test_whitespace_tokens_are_visible():
    assert plots.visible_token(" the") == "\u2423the" and plots.visible_token("\n") == "\u21b5"
    assert plots.visible_token("\t") == "\u2192" and plots.visible_token("Berlin") == "Berlin"


def test_flat_training_panels_say_why_instead_of_drawing_a_line_at_zero():
    history = [HistoryRow(s, 1e-3, 1.0 / (s + 1), 1.0 / (s + 1), 0.1, 0.0, 0) for s in range(5)]
    _fig, axes = plots.plot_training_curves(history, d_sae=64)
    texts = [t.get_text() for ax in axes.flat for t in ax.texts]
    assert any("AuxK stayed 0" in t for t in texts) and any("no latent was dead" in t for t in texts)
    history[3] = dataclasses.replace(history[3], n_dead=2)
    _fig, axes = plots.plot_training_curves(history, d_sae=64)
    texts = [t.get_text() for ax in axes.flat for t in ax.texts]
    assert not any("dead at any step" in t for t in texts), "a panel with data must plot it"


def test_contrast_legend_sits_below_the_axes():
    import numpy as np

    d = np.linspace(0.3, 0.7, 6)
    fig, ax = plots.plot_layer_contrast(d, d - 0.2, d - 0.1, 0.6, peak=5, strata_max_q95=0.65)
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend is not None
    assert legend.get_window_extent().y1 < ax.get_window_extent().y0, "the legend must not cover the curve"


def test_plot_feature_examples_labels_each_context_with_its_token():
    feats = [FeatureExamples(7, 0.01, [Example(3.5, "\n", "x = $1"), Example(1.0, " the", "in")])]
    fig, axes = plot_feature_examples(feats)
    labels = [t.get_text() for t in axes[0, 0].get_yticklabels()]
    assert labels == [r"x = \$1[[↵]]", "in[[\u2423the]]"] and "feature 7" in axes[0, 0].get_title()
    plt.close(fig)


def _lens(n_layers: int, n_pos: int, token: str) -> LensResult:
    grid = [[token] * n_pos for _ in range(n_layers)]
    return LensResult(
        prompt="",
        input_ids=list(range(n_pos)),
        input_tokens=[token] * n_pos,
        top_ids=[[0] * n_pos for _ in range(n_layers)],
        top_tokens=grid,
        top_probs=[[0.5] * n_pos for _ in range(n_layers)],
        english=[[False] * n_pos for _ in range(n_layers)],
        scored_positions=list(range(n_pos)),
        softcap=None,
    )


def _row_extents(fig, ax, layer: int) -> list[tuple[float, float]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    cells = [t for t in ax.texts if t.get_position()[1] == layer]
    return sorted((b.x0, b.x1) for b in (t.get_window_extent(renderer) for t in cells))


def test_lens_cells_never_overprint_their_neighbours():
    """A 56-token prompt (the tiny books' byte tokenizer) once drew '<id 416>' labels across each other."""
    for n_pos in (12, 56, 120):
        fig, ax = plots.plot_logit_lens(_lens(3, n_pos, "<id 416>"))
        spans = _row_extents(fig, ax, 1)
        assert len(spans) in (0, n_pos)
        assert all(a1 <= b0 for (_, a1), (b0, _) in pairwise(spans)), n_pos
        plt.close(fig)
    fig, ax = plots.plot_logit_lens(_lens(3, 12, "<id 416>"))
    assert {t.get_text() for t in ax.texts} == {"<id\u2423416>"}  # a short prompt keeps whole labels (space: ␣)
    plt.close(fig)
