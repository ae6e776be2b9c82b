"""Figures for the book.

Why: figures must show inline in executed notebooks *and* land as PNG under
``outputs/<run>/figures``. ``save_figure`` writes atomically and leaves the figure open, so the
notebook still displays it; sizes and dpi are fixed so nbval's ``<Figure size …>`` text is stable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from mechlib.io import atomic_path
from mechlib.results import FeatureExamples

if TYPE_CHECKING:  # lens imports torch and the model helpers; only the type is needed here
    from mechlib.lens import LensResult
    from mechlib.sae.history import HistoryRow

DPI = 110

# a 2-D array of matplotlib Axes, ``axes[row, col]``: numpy's stubs give object arrays no element type
AxesGrid = np.ndarray


class AccuracyRow(Protocol):
    """One steering condition (``steering.SteeringRow``, or ``results.ScaleRow``): what the dose–response draws."""

    @property
    def scale(self) -> float: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def accuracy_ci95(self) -> tuple[float, float]: ...


class GroupRow(Protocol):
    """Accuracy of one question kind (``records.GroupAccuracy``)."""

    @property
    def group(self) -> str: ...
    @property
    def n(self) -> int: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def ci95(self) -> tuple[float, float]: ...


def new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Axes]:
    """A figure of fixed size with one plot; returns ``(fig, ax)`` like ``plt.subplots()``."""
    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def new_grid(
    width: float,
    height: float,
    nrows: int = 1,
    ncols: int = 1,
    *,
    sharex: bool = False,
    width_ratios: Sequence[float] | None = None,
) -> tuple[Figure, AxesGrid]:
    """A figure of fixed size with a grid of plots; ``axes[row, col]`` is always 2-D (``squeeze=False``)."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, height), sharex=sharex, width_ratios=width_ratios, squeeze=False
    )
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as PNG atomically (no half-written figure) and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def visible_token(token: str) -> str:
    """A token as a reader can see it: spaces ␣, newlines ↵, tabs →. A lone " " or "\n" would
    otherwise print as nothing, and the commonest tokens of a lens map would be blank cells."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u2192")


def _yerr(values: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> list[list[float]]:
    """``[[below], [above]]`` error-bar lengths for ``values`` inside ``[lows, highs]``, never negative.

    Why: matplotlib refuses a negative ``yerr``, and an interval edge a round-off away from its
    point estimate (lo = 5.6e-17 at an accuracy of 0) would otherwise crash a chapter after all
    its generation has finished.
    """
    below = [max(0.0, float(v) - float(lo)) for v, lo in zip(values, lows)]
    above = [max(0.0, float(hi) - float(v)) for v, hi in zip(values, highs)]
    return [below, above]


def plot_layer_contrast(
    top_abs_d, null_q50, null_q95, null_max_q95: float, peak: int, top_n: int = 10, strata_max_q95: float | None = None
) -> tuple[Figure, Axes]:
    """Chapter 05: top-n mean |Cohen's d| per layer against its label-permutation null.

    The shaded band runs from the null's median to its 95th percentile per layer; the dashed line
    is the 95th percentile of the max-over-layers null — the bar the peak must clear, since it was
    picked by looking at every layer. ``strata_max_q95`` (dotted) is the same bar for the null that
    shuffles labels only within question types.
    """
    fig, ax = new_figure(8.0, 4.5)
    layers = list(range(len(top_abs_d)))
    ax.fill_between(layers, null_q50, null_q95, color="0.8", label="permutation null, median–95th pct")
    ax.plot(layers, null_q50, color="0.5", lw=1)
    ax.axhline(null_max_q95, color="0.3", ls="--", lw=1, label="95th pct of max-over-layers null")
    if strata_max_q95 is not None:
        ax.axhline(strata_max_q95, color="C2", ls=":", lw=1.5, label="same, labels shuffled within question type")
    ax.plot(layers, top_abs_d, marker="o", ms=3, color="C0", label="observed (correct − wrong)")
    ax.plot([peak], [top_abs_d[peak]], marker="*", ms=14, color="C3", ls="none", label=f"peak: layer {peak}")
    ax.set_xlabel("decoder layer (residual stream after it)")
    ax.set_ylabel(f"mean of top-{top_n} |Cohen's d|")
    # below the axes: inside, the legend would sit on the curve wherever the peak happens to be
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_dose_response(
    rows: Sequence[AccuracyRow],
    baseline: float,
    baseline_ci: tuple[float, float],
    layer: int,
    controls: Sequence[AccuracyRow] = (),
) -> tuple[Figure, Axes]:
    """Chapter 06: held-out accuracy per steering scale (Wilson 95 % intervals) and the baseline.

    ``controls``: the rows of random-direction sweeps, drawn as crosses beside the CAA curve.
    """
    fig, ax = new_figure(7.0, 4.5)
    rows = sorted(rows, key=lambda r: r.scale)
    x = [100 * r.scale for r in rows]
    y = [r.accuracy for r in rows]
    err = _yerr(y, [r.accuracy_ci95[0] for r in rows], [r.accuracy_ci95[1] for r in rows])
    ax.axhspan(baseline_ci[0], baseline_ci[1], color="0.85", label="baseline 95% CI")
    ax.axhline(baseline, color="0.3", ls="--", lw=1, label=f"baseline {baseline:.2f}")
    ax.errorbar(x, y, yerr=err, marker="o", capsize=4, color="C0", label="CAA direction")
    ax.plot([0.0], [baseline], marker="s", color="0.3", ls="none", label="no steering (scale 0)")
    if controls:
        ax.plot(
            [100 * c.scale for c in controls],
            [c.accuracy for c in controls],
            marker="x",
            ms=8,
            color="C3",
            ls="none",
            label="random directions (same norm)",
        )
    ax.set_xlabel(f"perturbation at layer {layer} (% of mean residual norm)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_training_curves(history: Sequence[HistoryRow], d_sae: int) -> tuple[Figure, AxesGrid]:
    """Chapter 02: loss and FVU (log scale), dead-latent count and learning rate per step."""
    fig, axes = new_grid(10.0, 6.0, nrows=2, ncols=2, sharex=True)
    steps = [h.step for h in history]
    (a, b), (c, d) = axes
    a.plot(steps, [h.loss for h in history], lw=1, label="loss = FVU + aux_coef·AuxK")
    a.plot(steps, [h.fvu for h in history], lw=1, label="FVU (train batch)")
    a.set_yscale("log")
    a.set_title("loss")
    a.legend(fontsize=8)
    b.plot(steps, [h.aux_loss for h in history], lw=1, color="C2")
    b.set_title("AuxK loss (0 while no latent is dead)")
    c.plot(steps, [h.n_dead for h in history], lw=1, color="C3")
    c.set_title(f"dead latents (of {d_sae})")
    b.set_ylim(bottom=0)
    c.set_ylim(bottom=0)
    for ax, values, words in (
        (b, [h.aux_loss for h in history], "AuxK stayed 0: no latent was dead long enough to need it"),
        (c, [h.n_dead for h in history], "no latent was dead at any step"),
    ):
        if all(v == 0 for v in values):  # a flat line at 0 reads as a broken plot: say it instead
            ax.text(0.5, 0.5, words, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
            ax.set_yticks([0])
    c.set_xlabel("step")
    d.plot(steps, [h.lr for h in history], lw=1, color="C4")
    d.set_title("learning rate")
    d.set_xlabel("step")
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, axes


def plot_feature_density(counts: ArrayLike, n_tokens: int) -> tuple[Figure, Axes]:
    """Chapter 03: histogram of log10 firing frequency per latent; never-fired latents counted apart."""
    counts = np.asarray(counts, dtype=float)
    fired = counts[counts > 0]
    fig, ax = new_figure(7.0, 4.0)
    if fired.size:
        ax.hist(np.log10(fired / n_tokens), bins=50, color="C0")
    ax.axvline(np.log10(1.0 / n_tokens), color="0.4", ls=":", lw=1, label="fires once")
    ax.set_xlabel(f"log10 firing frequency on {n_tokens} held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density ({int((counts == 0).sum())} of {counts.size} latents never fired)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_feature_examples(examples: Sequence[FeatureExamples], width: int = 60) -> tuple[Figure, AxesGrid]:
    """Chapter 03: each feature's top activations as bars labelled with the context (max token in [[ ]])."""
    n = max(len(examples), 1)
    fig, axes = new_grid(10.0, 1.6 * n + 0.6, nrows=n, ncols=1)
    for ax, feat in zip(axes[:, 0], examples):
        ex = feat.examples
        labels = [
            (e.context.replace("\n", "↵") + "[[" + visible_token(e.token) + "]]")[-width:].replace("$", r"\$")
            for e in ex
        ]
        ax.barh(range(len(ex)), [e.activation for e in ex], color="C1")
        ax.set_yticks(range(len(ex)), labels, fontsize=7, family="monospace")
        ax.invert_yaxis()
        ax.set_title(f"feature {feat.feature} (fires on {100 * feat.frequency:.2f}% of tokens)", fontsize=9)
    axes[-1, 0].set_xlabel("activation")
    fig.tight_layout()
    return fig, axes


def plot_logit_lens(result: LensResult, commitment_layer: int | None = None, max_chars: int = 8) -> tuple[Figure, Axes]:
    """Chapter 07: logit-lens heat map — rows are decoder layers, columns prompt positions.

    Colour is the probability of each cell's top token; the token itself is written in the cell
    (English-word tokens in bold), cut to what fits the cell: a long prompt widens the figure (up to
    24 inches) and then shortens the labels, so that neighbouring cells' tokens never overprint.
    """
    probs = np.array(result.top_probs)
    n_layers, n_pos = probs.shape
    width = min(max(11.0, 2.0 + 0.3 * n_pos), 24.0)
    cell_chars = int(width * 0.6 * 72 / n_pos / 4.0)  # 6-pt text: ~3.5 pt a character; the axes: ~60 % of the width
    chars = min(max_chars, cell_chars)
    fig, ax = new_figure(width, 8.0)
    im = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
    for layer in range(n_layers if chars > 0 else 0):
        for pos in range(n_pos):
            tok = visible_token(result.top_tokens[layer][pos])[:chars]
            ax.text(
                pos,
                layer,
                tok,
                ha="center",
                va="center",
                fontsize=6,
                color="black" if probs[layer, pos] > 0.6 else "white",
                fontweight="bold" if result.english[layer][pos] else "normal",
            )
    ax.set_xticks(range(n_pos))
    ax.set_xticklabels([visible_token(t)[:max_chars] for t in result.input_tokens], rotation=60, fontsize=7)
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_xlabel("prompt position (input token)")
    ax.set_ylabel("decoder layer (residual stream after it)")
    if commitment_layer is not None:
        ax.axhline(commitment_layer - 0.5, color="C3", lw=1.5, ls="--")
        ax.text(
            -0.45,
            commitment_layer - 0.45,
            f"English commitment: layer {commitment_layer}",
            color="C3",
            fontsize=7,
            va="bottom",
            ha="left",
            bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "lw": 0},
        )
    fig.colorbar(im, ax=ax, label="top-token probability")
    return fig, ax


def plot_baseline(
    groups: Sequence[GroupRow],
    lengths_correct: Sequence[int],
    lengths_wrong: Sequence[int],
    max_new_tokens: int,
    overall: float,
    overall_ci: tuple[float, float],
) -> tuple[Figure, tuple[Axes, Axes]]:
    """Chapter 04: accuracy per question kind (Wilson 95 % intervals) and generated lengths.

    Left: one bar per kind (GSM8K is one kind; the generated task has one per template) with the
    overall accuracy and its interval behind. Right: how many tokens each answer took, correct vs
    wrong; a pile at ``max_new_tokens`` means answers cut off by the token limit.
    """
    fig, axes = new_grid(11.0, 4.2, ncols=2, width_ratios=[1.3, 1])
    ax, bx = axes[0]
    xs = list(range(len(groups)))
    accuracies = [g.accuracy for g in groups]
    ax.axhspan(overall_ci[0], overall_ci[1], color="0.88", label="overall 95% CI")
    ax.axhline(overall, color="0.3", ls="--", lw=1, label=f"overall {overall:.2f}")
    err = _yerr(accuracies, [g.ci95[0] for g in groups], [g.ci95[1] for g in groups])
    ax.bar(xs, accuracies, color="C0", alpha=0.8)
    ax.errorbar(xs, accuracies, yerr=err, fmt="none", ecolor="k", capsize=4, lw=1)
    ax.set_xticks(xs, [f"{g.group}\n(n={g.n})" for g in groups], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    bins = list(range(0, max_new_tokens + 2, max(1, (max_new_tokens + 1) // 24)))
    bx.hist(
        [list(lengths_correct), list(lengths_wrong)],
        bins=bins,
        stacked=True,
        color=["C2", "C3"],
        label=["correct", "wrong"],
    )
    bx.axvline(max_new_tokens, color="0.3", ls=":", lw=1, label="max_new_tokens")
    bx.set_xlabel("generated tokens")
    bx.set_ylabel("questions")
    bx.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig, (ax, bx)
