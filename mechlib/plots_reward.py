"""Figures for chapter 08 (the feature reward): the Stage Gate, the GRPO curves, held-out accuracy per arm.

Why: the chapter's claim has three parts a reader must see together — the reward predicted
correctness before training (Stage Gate 1), what training did to the reward and to sampled
accuracy step by step (reward hacking is the first rising while the second does not), and whether
held-out accuracy moved. Each part has its own figure function, and ``plot_feature_reward_summary``
draws all of them side by side. Inputs are small typed rows defined here, so this module depends
on neither TRL nor the GRPO code; the look (sizes, grids, error bars) follows ``mechlib.plots``,
whose ``save_figure`` writes the PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mechlib.plots import AxesGrid, _yerr, new_figure, new_grid
from mechlib.readouts import ReadoutScore


class RewardPlotError(ValueError):
    """Input a chapter 08 figure cannot be drawn from (mismatched lengths, an interval not around its value)."""


class CurvePoints(NamedTuple):
    """One training arm's logged means per GRPO step (what ``plot_training_curves`` draws).

    ``correct``: mean correctness of the completions sampled at that step; ``feature``: mean
    feature reward of the same completions (NaN where an arm did not compute it).
    """

    arm: str
    steps: Sequence[int]
    correct: Sequence[float]
    feature: Sequence[float]


class ArmAccuracy(NamedTuple):
    """Held-out accuracy of one arm before and after training, with Wilson 95 % intervals."""

    arm: str
    n: int
    before: float
    before_ci: tuple[float, float]
    after: float
    after_ci: tuple[float, float]


# --------------------------------------------------------------------------------------------
# Drawing onto given axes (shared by the single figures and the summary)
# --------------------------------------------------------------------------------------------


def draw_stage_gate(ax: Axes, rows: Sequence[ReadoutScore]) -> None:
    """AUROC per readout as bars with their bootstrap 95 % intervals; 0.5 (chance) dashed.

    The first row — the feature reward, in the chapter's order — is drawn in colour and the simpler
    readouts in grey, so its bar does not share a colour with an arm of the training figures.
    A readout whose AUROC is undefined (one class only) gets no bar and the word "undefined".
    """
    xs = list(range(len(rows)))
    for x, row in zip(xs, rows):
        if row.auroc is None:
            ax.text(x, 0.5, "undefined", ha="center", va="bottom", fontsize=8, color="0.3", rotation=90)
            continue
        lo, hi = row.auroc_ci if row.auroc_ci is not None else (row.auroc, row.auroc)
        ax.bar([x], [row.auroc], color="C4" if x == 0 else "0.6", alpha=0.85)
        ax.errorbar([x], [row.auroc], yerr=_yerr([row.auroc], [lo], [hi]), fmt="none", ecolor="k", capsize=4, lw=1)
        if row.auroc_p_perm is not None:
            ax.text(x, min(hi, 1.0) + 0.02, f"p={row.auroc_p_perm:.2g}", ha="center", va="bottom", fontsize=7)
    ax.axhline(0.5, color="0.3", ls="--", lw=1)
    # labelled on the line, not in a legend box that would sit on a bar
    ax.text(1.0, 0.5, " chance", transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8, color="0.3")
    n = rows[0].n if rows else 0
    ax.set_xticks(xs, [r.name for r in rows], fontsize=8, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"AUROC for correctness ({n} held-out questions)")
    ax.set_title("Stage Gate 1: which readout predicts correctness", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _check_curve(curve: CurvePoints) -> None:
    if not len(curve.steps) == len(curve.correct) == len(curve.feature):
        raise RewardPlotError(
            f"arm {curve.arm!r}: steps, correct and feature must have one value per step, got "
            f"{len(curve.steps)}, {len(curve.correct)}, {len(curve.feature)}"
        )


_LINE_STYLES = ("-", "--", ":", "-.")


def _same_as(arm: int, values: Sequence[Sequence[float]], names: Sequence[str]) -> str:
    """`` (= correctness)`` when arm ``arm``'s values equal an earlier arm's, else ``""``.

    Why: after a few steps from the same seed, arms often sample the same completions, and their
    curves then coincide; the legend says so instead of leaving the reader to wonder where a line went.
    """
    mine = [float(v) for v in values[arm]]
    for j in range(arm):
        other = [float(v) for v in values[j]]
        if len(other) == len(mine) and all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(mine, other)):
            return f" (= {names[j]})"
    return ""


def draw_training_curves(ax_correct: Axes, ax_feature: Axes, curves: Sequence[CurvePoints]) -> None:
    """Per arm, sampled accuracy (left axes) and feature reward (right axes) over GRPO steps, same colour per arm.

    Arms drawn later get smaller markers and other line styles, so a curve that lies on an earlier
    one still shows (nested markers), and its legend entry names the arm it equals.
    """
    names = [c.arm for c in curves]
    for curve in curves:
        _check_curve(curve)
    for i, curve in enumerate(curves):
        steps = list(curve.steps)
        ms, ls, colour = max(3.0, 7.0 - 2.0 * i), _LINE_STYLES[i % len(_LINE_STYLES)], f"C{i % 10}"
        label = curve.arm + _same_as(i, [c.correct for c in curves], names)
        ax_correct.plot(steps, list(curve.correct), marker="o", ms=ms, lw=1, ls=ls, color=colour, label=label)
        feature = [float(v) for v in curve.feature]
        if all(math.isnan(v) for v in feature):  # an arm that never computed the reward draws nothing there
            continue
        label = curve.arm + _same_as(i, [c.feature for c in curves], names)
        ax_feature.plot(steps, feature, marker="o", ms=ms, lw=1, ls=ls, color=colour, label=label)
    ax_correct.set_ylim(-0.02, 1.02)
    ax_correct.set_ylabel("accuracy of sampled completions")
    ax_correct.set_title("sampled accuracy during training", fontsize=9)
    ax_feature.set_ylabel("mean feature reward")
    ax_feature.set_title("feature reward during training", fontsize=9)
    for ax in (ax_correct, ax_feature):
        ax.set_xlabel("GRPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)


def draw_accuracy_change(ax: Axes, rows: Sequence[ArmAccuracy]) -> None:
    """Held-out accuracy before (grey) and after (colour) training per arm, Wilson 95 % intervals as error bars."""
    width = 0.38
    for i, row in enumerate(rows):
        for value, ci, dx, colour, label in (
            (row.before, row.before_ci, -width / 2, "0.6", "before"),
            (row.after, row.after_ci, width / 2, f"C{i % 10}", "after"),
        ):
            if not ci[0] - 1e-9 <= value <= ci[1] + 1e-9:
                raise RewardPlotError(f"arm {row.arm!r}: {label} accuracy {value} lies outside its interval {ci}")
            ax.bar([i + dx], [value], width=width, color=colour, alpha=0.85, label=label if i == 0 else None)
            ax.errorbar([i + dx], [value], yerr=_yerr([value], [ci[0]], [ci[1]]), fmt="none", ecolor="k", capsize=3)
    ax.set_xticks(list(range(len(rows))), [f"{r.arm}\n(n={r.n})" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy before / after training", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_stage_gate(rows: Sequence[ReadoutScore]) -> tuple[Figure, Axes]:
    """Chapter 08, Stage Gate 1: AUROC per readout with bootstrap intervals against chance."""
    fig, ax = new_figure(6.0, 4.5)
    draw_stage_gate(ax, rows)
    fig.tight_layout()
    return fig, ax


def plot_training_curves(curves: Sequence[CurvePoints]) -> tuple[Figure, AxesGrid]:
    """Chapter 08: sampled accuracy and feature reward per GRPO step, one line per arm in each panel."""
    fig, axes = new_grid(11.0, 4.0, ncols=2, sharex=True)
    draw_training_curves(axes[0, 0], axes[0, 1], curves)
    fig.tight_layout()
    return fig, axes


def plot_accuracy_change(rows: Sequence[ArmAccuracy]) -> tuple[Figure, Axes]:
    """Chapter 08: held-out accuracy before and after training, per arm."""
    fig, ax = new_figure(6.0, 4.5)
    draw_accuracy_change(ax, rows)
    fig.tight_layout()
    return fig, ax


def plot_feature_reward_summary(
    gate: Sequence[ReadoutScore], curves: Sequence[CurvePoints], accuracy: Sequence[ArmAccuracy]
) -> tuple[Figure, AxesGrid]:
    """The chapter's one figure: Stage Gate | sampled accuracy | feature reward | held-out accuracy, left to right."""
    fig, axes = new_grid(18.0, 4.5, ncols=4, width_ratios=[1.0, 1.1, 1.1, 1.0])
    draw_stage_gate(axes[0, 0], gate)
    draw_training_curves(axes[0, 1], axes[0, 2], curves)
    draw_accuracy_change(axes[0, 3], accuracy)
    fig.tight_layout()
    return fig, axes
