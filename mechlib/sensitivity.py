"""How much each headline result depends on how answers are scored — and a verdict in plain words.

Why: chapter 05's peak layer and chapter 06's steering rows are built on "correct vs wrong",
which is a parser's reading of free text. Before a reader believes "steering at +10 % harms", the
book recomputes it under every rule of :mod:`mechlib.scoring` (primary, lm-eval strict, lm-eval
flexible, finished answers only) and says whether the conclusion survives. The verdict
sentences are generated from the numbers of the run at hand, never written for one run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import Tensor

from mechlib.records import Record
from mechlib.scoring import RULE_LABELS, RULES, ScoringRule, paired_verdicts, verdicts
from mechlib.stats import PermutationNull, adaptive_permutation_null, format_p
from mechlib.steering import SteeringRow, steering_row

ALPHA = 0.05
MIN_GROUP = 2  # Cohen's d needs two questions on each side

Effect = Literal["helps", "harms", "no significant change"]


@dataclass(frozen=True)
class PeakUnderRule:
    """Chapter 05's layer ranking recomputed with one scoring rule's labels (None: a group is too small)."""

    rule: ScoringRule
    n_correct: int
    n_wrong: int
    peak_layer: int | None
    top_abs_d: float | None  # the peak layer's mean top-n |d|
    p_peak: float | None  # against the max-over-layers permutation null
    p_mc_se: float | None  # Monte-Carlo standard error of p_peak
    n_permutations: int

    @classmethod
    def from_null(cls, rule: ScoringRule, null: PermutationNull, n_correct: int, n_wrong: int) -> PeakUnderRule:
        """The row of a null already computed (chapter 05's own, for the primary rule)."""
        return cls(
            rule,
            n_correct,
            n_wrong,
            null.peak,
            float(null.observed[null.peak]),
            null.p_peak,
            null.p_peak_mc_se,
            null.n_permutations,
        )


def peak_under_rules(
    states: Tensor | np.ndarray,
    ids: Sequence[str],
    records: Mapping[str, Record],
    *,
    top_n: int,
    seed: int,
    min_permutations: int,
    rules: Sequence[ScoringRule] = RULES,
) -> list[PeakUnderRule]:
    """The peak layer, its top-|d| and permutation p under each of ``rules``.

    ``states`` is ``[len(ids), L, D]`` (the contrast set's pooled states, in ``ids`` order);
    ``records`` the baseline records by id. Questions a rule leaves out are dropped from its fit.
    """
    h = np.asarray(states)
    out = []
    for rule in rules:
        v = verdicts([records[i] for i in ids], rule)
        keep = [n for n, i in enumerate(ids) if i in v]
        y = np.array([v[ids[n]] for n in keep], dtype=bool)
        n_ok, n_bad = int(y.sum()), int((~y).sum())
        if min(n_ok, n_bad) < MIN_GROUP:
            out.append(PeakUnderRule(rule, n_ok, n_bad, None, None, None, None, 0))
            continue
        null = adaptive_permutation_null(h[keep], y, min_permutations=min_permutations, seed=seed, top_n=top_n)
        out.append(PeakUnderRule.from_null(rule, null, n_ok, n_bad))
    return out


def _p_text(p: float | None, se: float | None) -> str:
    if p is None:
        return "p n/a"
    return f"p {format_p(p)}" + (f" ± {se:.3f}" if se is not None else "")


def peak_verdict(rows: Sequence[PeakUnderRule], alpha: float = ALPHA) -> str:
    """One paragraph: the peak under each rule, whether it moves, and whether it stays significant."""
    primary = rows[0]
    if primary.peak_layer is None:
        return (
            f"Under the primary rule one side of the contrast has fewer than {MIN_GROUP} questions "
            f"({primary.n_correct} correct, {primary.n_wrong} wrong): there is no peak layer to test."
        )
    parts = []
    for r in rows[1:]:
        parts.append(
            f"{RULE_LABELS[r.rule]}: "
            + (
                "too few questions on one side"
                if r.peak_layer is None
                else f"layer {r.peak_layer} (|d| {r.top_abs_d:.3f}, {_p_text(r.p_peak, r.p_mc_se)})"
            )
        )
    usable = [r for r in rows if r.peak_layer is not None]
    n_alt, n_usable_alt = len(rows) - 1, len(usable) - 1
    moved = [r for r in usable if r.peak_layer != primary.peak_layer]
    significant = [r for r in usable if r.p_peak is not None and r.p_peak < alpha]
    text = (
        f"Under the primary rule the peak is layer {primary.peak_layer} (mean top-|d| {primary.top_abs_d:.3f}, "
        f"{_p_text(primary.p_peak, primary.p_mc_se)}, {primary.n_permutations} permutations). "
        f"Alternatives — {'; '.join(parts)}. "
    )
    # a rule with too few questions on one side has no peak: it neither keeps nor moves the layer
    where = "" if n_usable_alt == n_alt else f" that can be computed ({n_usable_alt} of {n_alt} alternatives)"
    if not moved:
        text += f"Every rule{where} finds the same peak layer: the choice of layer {primary.peak_layer} survives. "
    else:
        layers = sorted({int(r.peak_layer) for r in moved if r.peak_layer is not None})
        text += (
            f"The peak moves (to layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}) under "
            f"{len(moved)} of {n_alt} alternative rules: the choice of layer "
            f"{primary.peak_layer} — and so the steering layer of chapter 06 — depends on how answers are "
            f"scored. "
        )
    if len(significant) == len(usable):
        text += f"The peak stands out from the permutation null (p < {alpha}) under every rule{where}."
    elif not significant:
        text += f"Under no rule does the peak stand out from the permutation null at p < {alpha}."
    else:
        text += (
            f"It stands out from the permutation null at p < {alpha} under {len(significant)} of {len(usable)} "
            f"rules only ({', '.join(r.rule for r in significant)}): treat it as suggestive, not established."
        )
    return text


# --------------------------------------------------------------------------------------------
# Steering rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowUnderRule:
    """One steering scale's paired comparison with the baseline under one scoring rule."""

    rule: ScoringRule
    row: SteeringRow
    effect: Effect


def effect_of(row: SteeringRow, alpha: float = ALPHA) -> Effect:
    """``helps``/``harms`` when the exact McNemar test is below ``alpha``, else no significant change."""
    if row.mcnemar_p >= alpha or row.net_flips == 0:
        return "no significant change"
    return "helps" if row.net_flips > 0 else "harms"


def rows_under_rules(
    scale: float, baseline: Sequence[Record], steered: Sequence[Record], *, n_bootstrap: int, seed: int
) -> list[RowUnderRule]:
    """The steering row of ``scale`` recomputed under every scoring rule (same questions, paired)."""
    out = []
    for rule in RULES:
        before, after = paired_verdicts(baseline, steered, rule)
        if not before:
            continue
        row = steering_row(scale, before, after, n_bootstrap=n_bootstrap, seed=seed)
        out.append(RowUnderRule(rule, row, effect_of(row)))
    return out


def row_verdict(rows: Sequence[RowUnderRule]) -> str:
    """One sentence for one scale: its effect under the primary rule and whether the alternatives agree."""
    primary = rows[0]
    head = (
        f"{100 * primary.row.scale:+g} %: {primary.effect} under the primary rule "
        f"(Δ {primary.row.delta:+.3f}, net {primary.row.net_flips:+d}, McNemar p {format_p(primary.row.mcnemar_p)})"
    )
    others = [r for r in rows[1:] if r.effect != primary.effect]
    if not others:
        return head + f"; the same under all {len(rows) - 1} alternatives — the conclusion survives."
    diff = "; ".join(
        f"{r.effect} under {r.rule} (Δ {r.row.delta:+.3f}, n {r.row.n}, p {format_p(r.row.mcnemar_p)})" for r in others
    )
    return head + f"; but {diff} — the conclusion depends on how answers are scored."
