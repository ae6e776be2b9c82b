"""The steering table's rows: one scale's accuracy against the baseline, paired by question.

Why: with n = 50 held-out questions a few flipped answers look like a trend, so each row carries,
beside accuracy and its Wilson interval, the exact McNemar p-value on the discordant pairs and a
paired bootstrap interval for Δ accuracy; and the questions two scales recovered are compared (do
different scales fix the *same* questions, or is it noise?). Pure bookkeeping on per-question
correctness: no model here. :func:`mechlib.steering.run_sweep` makes the records these rows read,
and :mod:`mechlib.steering` re-exports every name.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mechlib.records import Record
from mechlib.stats import bootstrap_ci, mcnemar_exact, wilson_ci
from mechlib.steering_vector import SteeringError

__all__ = ["RecoveredOverlap", "SteeringRow", "correctness", "recovered_overlaps", "steering_row"]


@dataclass(frozen=True)
class SteeringRow:
    """One row of the card's steering table, with the paired statistics it lacked."""

    scale: float
    perturbation: float  # % of the layer's mean residual norm (= 100 × scale)
    n: int
    accuracy: float
    accuracy_ci95: tuple[float, float]  # Wilson
    delta: float  # accuracy − baseline accuracy, same questions
    delta_ci95: tuple[float, float]  # paired percentile bootstrap
    recovered: int  # baseline-wrong → now right
    n_baseline_wrong: int
    broken: int  # baseline-right → now wrong
    net_flips: int  # recovered − broken
    mcnemar_p: float  # exact, on (recovered, broken)
    recovered_ids: list[str]
    broken_ids: list[str]


def correctness(records: Sequence[Record] | Sequence[Mapping[str, object]]) -> dict[str, bool]:
    """``{id: correct}`` from records (:class:`mechlib.records.Record` or their JSON dicts)."""
    out: dict[str, bool] = {}
    for r in records:
        if isinstance(r, Mapping):
            out[str(r["id"])] = bool(r["correct"])
        else:
            out[str(r.id)] = bool(r.correct)
    return out


def steering_row(
    scale: float, baseline: Mapping[str, bool], steered: Mapping[str, bool], *, n_bootstrap: int = 2000, seed: int = 0
) -> SteeringRow:
    """Compare one scale's per-question correctness with the baseline on the same question ids."""
    if set(baseline) != set(steered) or not baseline:
        only_b, only_s = sorted(set(baseline) - set(steered)), sorted(set(steered) - set(baseline))
        raise SteeringError(
            f"baseline and steered runs must cover the same questions; only in baseline: "
            f"{only_b[:5]}, only steered: {only_s[:5]}"
        )
    ids = list(baseline)  # the baseline's order (the held-out set's order)
    before = [baseline[i] for i in ids]
    after = [steered[i] for i in ids]
    recovered_ids = [i for i in ids if not baseline[i] and steered[i]]
    broken_ids = [i for i in ids if baseline[i] and not steered[i]]
    k, n = sum(after), len(ids)
    ci = bootstrap_ci(before, after, n_bootstrap=n_bootstrap, seed=seed)
    return SteeringRow(
        scale=float(scale),
        perturbation=round(100 * float(scale), 6),
        n=n,
        accuracy=k / n,
        accuracy_ci95=wilson_ci(k, n),
        delta=ci.estimate,
        delta_ci95=(ci.low, ci.high),
        recovered=len(recovered_ids),
        n_baseline_wrong=n - sum(before),
        broken=len(broken_ids),
        net_flips=len(recovered_ids) - len(broken_ids),
        mcnemar_p=mcnemar_exact(len(recovered_ids), len(broken_ids)),
        recovered_ids=recovered_ids,
        broken_ids=broken_ids,
    )


@dataclass(frozen=True)
class RecoveredOverlap:
    """How far the questions two scales recovered coincide (chapter 06 stores it as ``results.Overlap``)."""

    scale_a: float
    scale_b: float
    n_a: int
    n_b: int
    intersection: int
    shared_ids: list[str]
    jaccard: float  # 0 when both sets are empty


def recovered_overlaps(rows: Sequence[SteeringRow]) -> list[RecoveredOverlap]:
    """Pairwise overlap of the recovered sets: sizes, intersection, Jaccard (0 when both are empty)."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        sa, sb = set(a.recovered_ids), set(b.recovered_ids)
        union, shared = sa | sb, sa & sb
        jaccard = len(shared) / len(union) if union else 0.0
        out.append(RecoveredOverlap(a.scale, b.scale, len(sa), len(sb), len(shared), sorted(shared), jaccard))
    return out
