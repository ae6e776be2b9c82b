"""Plot helpers survive interval edges a round-off away from their point estimate."""

from __future__ import annotations

import matplotlib.pyplot as plt

from mechlib.plots import plot_baseline, plot_dose_response


def test_plot_baseline_accepts_interval_edges_past_the_estimate():
    # what the old wilson_ci(0, 60) gave: lo = 5.6e-17 > accuracy 0 → a negative error bar
    fig, _ = plot_baseline(["a", "b"], [0.0, 1.0], [5.551115123125783e-17, 0.9], [0.06, 0.9999999999999999],
                           [60, 60], [3, 4], [5, 6], max_new_tokens=16, overall=0.5, overall_ci=(0.4, 0.6))
    plt.close(fig)


def test_plot_dose_response_accepts_interval_edges_past_the_estimate():
    fig, _ = plot_dose_response([0.1, 0.2], [0.0, 1.0], [1e-17, 0.8], [0.1, 1.0 - 1e-16], baseline=0.5,
                                baseline_ci=(0.4, 0.6), layer=3)
    plt.close(fig)
