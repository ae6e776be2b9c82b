"""Stage Gate 1 of chapter 08: does a per-question score predict correctness on held-out questions?

Why: a feature reward is only worth training on if, before any training, it already tells right
answers from wrong ones better than chance — and better than readouts that cost nothing (the CAA
projection of chapter 06, the answer's length). This module scores any such readout the same way:
Spearman's ρ with the 0/1 correctness and the AUROC (the probability that a random correct answer
scores above a random wrong one, ties counting one half), each with a percentile bootstrap interval
over questions and a label-permutation p-value, and then writes the table and the verdict the
chapter prints from those numbers.

A note on the two p-values: with a binary label and the labels permuted (so the number of correct
answers stays fixed), ρ and the AUROC are both affine functions of the same rank sum of the correct
answers, so their two-sided permutation p-values coincide. Both are reported because a reader looks
for each beside its statistic; their bootstrap intervals differ (a resample changes both the ranks
and the class sizes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

from mechlib.stats import StatsInputError, finite_or_none, format_p, rank_association_within_strata, spearman

# a permutation statistic within this relative distance of the observed one counts as "as extreme":
# the closed forms below and scipy's differ by round-off, and an identical relabelling must count
_TIE_RTOL = 1e-9


def _scores_and_labels(scores: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise StatsInputError(f"scores and correct must be 1-D of the same length, got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise StatsInputError("scores contain NaN or inf values")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise StatsInputError("correct must hold booleans or 0/1 values")
    return x, y.astype(bool)


def auroc(scores: ArrayLike, correct: ArrayLike) -> float:
    """P(score of a random correct answer > score of a random wrong one), ties counting 1/2.

    This is the Mann–Whitney U of the correct answers divided by ``n_correct · n_wrong``, U taken
    from the average ranks (``scipy.stats.rankdata``; ``mannwhitneyu`` would also compute a p-value,
    which warns on constant scores). NaN when either group is empty: there is no pair to compare.
    """
    x, y = _scores_and_labels(scores, correct)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    u = float(_rank_rows(x)[y].sum()) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


@dataclass(frozen=True)
class ReadoutScore:
    """How well one readout predicts correctness on the held-out questions (one row of the gate's table).

    ``None`` marks a value that is undefined on these data (ρ of a constant score; everything when
    all answers are right or all wrong), so the row encodes to JSON as it is. Intervals are 95 %
    percentile bootstrap intervals over questions; ``n_bootstrap`` counts the resamples they were
    computed from (resamples holding only one class are skipped). p-values are two-sided label
    permutation p-values ``(1 + #{as extreme}) / (1 + n_permutations)``. ``p_within_type`` repeats the
    test with labels shuffled only within each question type
    (:func:`mechlib.stats.rank_association_within_strata`): a readout that only reads the type passes
    the plain test on a mixed task but not this one. ``None``: one type (GSM8K), or a file from before it.
    """

    name: str
    n: int
    n_correct: int
    spearman_rho: float | None
    spearman_ci: tuple[float, float] | None
    spearman_p_perm: float | None
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    auroc_p_perm: float | None
    n_bootstrap: int
    n_permutations: int
    direction: str
    p_within_type: float | None = None


def _rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) along the last axis."""
    return np.asarray(sps.rankdata(x, method="average", axis=-1), dtype=np.float64)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; NaN where a row is constant."""
    da = a - a.mean(axis=-1, keepdims=True)
    db = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1))
    num = (da * db).sum(axis=-1)
    out = np.full(num.shape, np.nan)
    np.divide(num, denom, out=out, where=denom > 0)
    return out


def _percentile_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _bootstrap(
    x: np.ndarray, y: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """ρ and AUROC on ``n_bootstrap`` resamples of the questions, one row of ranks per resample.

    Resamples with a single class are dropped (neither statistic exists there); ρ is NaN on a
    resample whose scores are all equal. Returns ``(rho, auc)`` over the kept resamples.
    """
    idx = rng.integers(0, x.size, size=(n_bootstrap, x.size))
    yb = y[idx]
    n1 = yb.sum(axis=1)
    keep = (n1 > 0) & (n1 < x.size)
    xb, yb, n1 = x[idx[keep]], yb[keep], n1[keep].astype(np.float64)
    ranks = _rank_rows(xb)
    rank_sum = (ranks * yb).sum(axis=1)
    auc = (rank_sum - n1 * (n1 + 1) / 2) / (n1 * (x.size - n1))
    rho = _row_pearson(ranks, yb.astype(np.float64))  # ranks of a 0/1 label are affine in it
    return rho, auc


def _permutation_p_values(
    x: np.ndarray, y: np.ndarray, rho_obs: float, auc_obs: float, n_permutations: int, rng: np.random.Generator
) -> tuple[float | None, float]:
    """Two-sided label-permutation p-values for ρ and the AUROC, all permutations in one matrix product.

    The scores are ranked once (``r``, average ranks). A permuted label row ``L`` keeps ``n1``
    correct answers, so with ``S = L · r``: ``AUROC = (S − n1(n1+1)/2) / (n1 n0)`` and, ρ being the
    Pearson correlation of ``r`` with the (affine) ranks of ``L``,
    ``ρ = (S − n1(n+1)/2) / (n · sd(r) · sqrt(p(1 − p)))`` with ``p = n1/n`` and population sd.
    """
    n, n1 = x.size, int(y.sum())
    n0 = n - n1
    r = _rank_rows(x)
    labels = rng.permuted(np.broadcast_to(y, (n_permutations, n)), axis=1).astype(np.float64)
    s = labels @ r
    auc_perm = (s - n1 * (n1 + 1) / 2) / (n1 * n0)
    p_auc = _p_two_sided(np.abs(auc_perm - 0.5), abs(auc_obs - 0.5))
    sd_r = float(r.std())
    if not math.isfinite(rho_obs) or sd_r == 0:
        return None, p_auc
    frac = n1 / n
    rho_perm = (s - n1 * (n + 1) / 2) / (n * sd_r * math.sqrt(frac * (1 - frac)))
    return _p_two_sided(np.abs(rho_perm), abs(rho_obs)), p_auc


def _p_two_sided(null_abs: np.ndarray, obs_abs: float) -> float:
    as_extreme = null_abs >= obs_abs - _TIE_RTOL * max(obs_abs, 1e-12)
    return float((1 + int(as_extreme.sum())) / (1 + null_abs.size))


def _direction(auc: float | None, rho: float | None) -> str:
    if auc is None:
        return "undefined: all answers are in one class"
    if rho is None:
        return "none: the score is constant"
    if auc > 0.5:
        return "higher score, more often correct"
    if auc < 0.5:
        return "higher score, more often wrong"
    return "no ordering (AUROC exactly 0.5)"


def score_readout(
    name: str,
    scores: ArrayLike,
    correct: ArrayLike,
    *,
    n_bootstrap: int = 2000,
    n_permutations: int = 2000,
    seed: int = 0,
    types: Sequence[str] | None = None,
) -> ReadoutScore:
    """Spearman ρ and AUROC of ``scores`` against ``correct``, with bootstrap CIs and permutation p-values.

    ``scores`` is one number per held-out question (the feature reward, a projection, a length);
    ``correct`` its 0/1 correctness; ``types`` each question's type, for ``p_within_type``. The same
    ``seed`` and the same questions give every readout the same bootstrap resamples and label
    permutations, so their rows are comparable.
    """
    if n_bootstrap < 1 or n_permutations < 1:
        raise StatsInputError(f"n_bootstrap and n_permutations must be >= 1, got {n_bootstrap}, {n_permutations}")
    x, y = _scores_and_labels(scores, correct)
    n, n1 = int(x.size), int(y.sum())
    if n1 == 0 or n1 == n:
        return ReadoutScore(name, n, n1, None, None, None, None, None, None, 0, n_permutations, _direction(None, None))
    rng = np.random.default_rng(seed)
    rho = finite_or_none(spearman(x, y.astype(np.float64)).rho)
    auc = auroc(x, y)
    rho_boot, auc_boot = _bootstrap(x, y, n_bootstrap, rng)
    p_rho, p_auc = _permutation_p_values(x, y, rho if rho is not None else math.nan, auc, n_permutations, rng)
    within = (
        None if types is None else rank_association_within_strata(x, y, types, n_permutations=n_permutations, seed=seed)
    )
    return ReadoutScore(
        name=name,
        n=n,
        n_correct=n1,
        spearman_rho=rho,
        spearman_ci=_percentile_ci(rho_boot) if rho is not None else None,
        spearman_p_perm=p_rho,
        auroc=auc,
        auroc_ci=_percentile_ci(auc_boot),
        auroc_p_perm=p_auc,
        n_bootstrap=int(auc_boot.size),
        n_permutations=n_permutations,
        direction=_direction(auc, rho),
        p_within_type=None if within is None else within.p,
    )


# --------------------------------------------------------------------------------------------
# What the chapter prints
# --------------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ci(ci: tuple[float, float] | None, fmt: str = "+.2f") -> str:
    return "n/a" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def stage_gate_table(rows: Sequence[ReadoutScore]) -> str:
    """A fixed-width text table of the readouts, one line each (what the chapter prints under NBVAL_CHECK_OUTPUT)."""
    width = max([len("readout"), *(len(r.name) for r in rows)])
    header = (
        f"{'readout':<{width}}  {'n':>4}  {'right':>5}  {'rho':>6}  {'95% CI':<16}  {'p_perm':>7}  "
        f"{'AUROC':>5}  {'95% CI':<14}  {'p_perm':>7}  {'p_type':>7}  direction"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.n:>4}  {r.n_correct:>5}  {_num(r.spearman_rho):>6}  {_ci(r.spearman_ci):<16}  "
            f"{format_p(r.spearman_p_perm):>7}  {_num(r.auroc, '.3f'):>5}  {_ci(r.auroc_ci, '.2f'):<14}  "
            f"{format_p(r.auroc_p_perm):>7}  {format_p(r.p_within_type) if r.p_within_type is not None else '—':>7}  "
            f"{r.direction}"
        )
    return "\n".join(lines)


def _predicts(row: ReadoutScore, alpha: float) -> bool:
    """The gate's criterion: the AUROC interval excludes 0.5 and the permutation p is below ``alpha``."""
    if row.auroc_ci is None or row.auroc_p_perm is None:
        return False
    lo, hi = row.auroc_ci
    return (lo > 0.5 or hi < 0.5) and row.auroc_p_perm < alpha


def _overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is None or b is None or (a[0] <= b[1] and b[0] <= a[1])


def _feature_sentence(feature: ReadoutScore, alpha: float) -> str:
    if feature.auroc is None or feature.auroc_ci is None:
        return f"The {feature.name} cannot be judged: all {feature.n} held-out answers are in one class."
    stats = (
        f"AUROC {feature.auroc:.2f}, 95% CI [{feature.auroc_ci[0]:.2f}, {feature.auroc_ci[1]:.2f}], "
        f"permutation p = {format_p(feature.auroc_p_perm)}, n = {feature.n}"
    )
    if feature.spearman_rho is None:
        return (
            f"The {feature.name} was constant on the held-out questions, so it did not predict correctness ({stats})."
        )
    if not _predicts(feature, alpha):
        return f"The {feature.name} did not predict correctness on held-out questions ({stats})."
    if feature.auroc < 0.5:
        return (
            f"The {feature.name} predicted correctness with the sign reversed — higher reward went with "
            f"wrong answers ({stats}) — so as a reward it would push toward wrong answers."
        ) + _within_type_clause(feature, alpha)
    return f"The {feature.name} predicted correctness on held-out questions ({stats})." + _within_type_clause(
        feature, alpha
    )


def _within_type_clause(feature: ReadoutScore, alpha: float) -> str:
    """Whether a readout that passed still orders answers within question types ("" when not tested)."""
    p = feature.p_within_type
    if p is None:
        return ""
    if p < alpha:
        return f" It does so within question types too (labels shuffled within type: p = {format_p(p)})."
    return (
        f" Within question types it does not, detectably (labels shuffled within type: p = {format_p(p)}): "
        f"what it reads may be the question type rather than the answer."
    )


def _oriented(auc: float, ci: tuple[float, float] | None) -> tuple[float, tuple[float, float] | None, bool]:
    """A simpler readout's AUROC and interval with the sign that suits it (``1 − AUROC`` below 0.5), and if flipped."""
    if auc >= 0.5:
        return auc, ci, False
    return 1 - auc, None if ci is None else (1 - ci[1], 1 - ci[0]), True


def _baseline_clause(feature: ReadoutScore, base: ReadoutScore) -> str:
    if base.auroc is None or feature.auroc is None:
        return f"it cannot be compared with {base.name} (undefined AUROC)"
    base_auc, base_ci, flipped = _oriented(base.auroc, base.auroc_ci)
    name = f"{base.name} (sign flipped: lower goes with correct)" if flipped else base.name
    versus = f"{feature.auroc:.2f} vs {base_auc:.2f}"
    if _overlap(feature.auroc_ci, base_ci):
        return f"it is not distinguishable from {name} on {feature.n} questions (AUROC {versus}, CIs overlap)"
    if feature.auroc > base_auc:
        return f"it beat {name} (AUROC {versus}, CIs apart)"
    return f"{name} did better (AUROC {versus}, CIs apart)"


def stage_gate_verdict(feature: ReadoutScore, baselines: Sequence[ReadoutScore], *, alpha: float = 0.05) -> str:
    """One or two plain sentences written from the numbers: did the feature reward pass, and did it beat the rest.

    "Predicted correctness" means the AUROC's 95 % interval excludes 0.5 *and* its permutation p is
    below ``alpha``. Against each simpler readout the AUROC point estimates are compared; when the
    two intervals overlap the difference is called indistinguishable on this many questions
    (overlap is a conservative reading, not a paired test). A simpler readout whose AUROC is below
    0.5 is compared with its sign flipped (longer answers more often wrong is a readout too):
    choosing its sign on these questions favours the baseline, which errs against the feature's claim.
    The feature's own sign is fixed — it is the reward's.
    """
    first = _feature_sentence(feature, alpha)
    if not baselines:
        return first
    clauses = [_baseline_clause(feature, b) for b in baselines]
    return f"{first} Against the simpler readouts: {'; '.join(clauses)}."


@dataclass(frozen=True)
class StageGate:
    """Stage Gate 1: every readout scored on the same held-out answers, and the verdict on the one that trains.

    ``rows`` keep the order they were given in (the SAE selections first, then the simpler readouts);
    ``trained`` is the selection GRPO trains with, ``other`` the other SAE selection (None when there is
    one), and ``verdict`` :func:`stage_gate_verdict` of ``trained`` against the simpler readouts only.
    """

    rows: list[ReadoutScore]
    trained: ReadoutScore
    other: ReadoutScore | None
    verdict: str


def stage_gate(
    scores: Mapping[str, ArrayLike],
    correct: ArrayLike,
    types: Sequence[str] | None,
    *,
    candidates: Sequence[str],
    trained: str,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
    alpha: float = 0.05,
) -> StageGate:
    """:func:`score_readout` of each named score (same seed, so the same resamples for all), then the verdict.

    ``candidates`` names the feature-reward readouts among ``scores`` (one per SAE selection); every other
    score is a simpler readout the trained one is compared with. Why here and not in the chapter: which
    row trains and which rows are baselines is the gate's logic, and a notebook that picks rows by
    position breaks silently when a readout is added.
    """
    missing = [c for c in [*candidates, trained] if c not in scores]
    if missing:
        raise StatsInputError(f"readouts {missing} have no scores (scored: {list(scores)})")
    if trained not in candidates:
        raise StatsInputError(f"the trained readout {trained!r} must be one of the candidates {list(candidates)}")
    rows = [
        score_readout(name, s, correct, n_bootstrap=n_bootstrap, n_permutations=n_permutations, seed=seed, types=types)
        for name, s in scores.items()
    ]
    by_name = {r.name: r for r in rows}
    others = [by_name[c] for c in candidates if c != trained]
    baselines = [r for r in rows if r.name not in candidates]
    verdict = stage_gate_verdict(by_name[trained], baselines, alpha=alpha)
    return StageGate(rows, by_name[trained], others[0] if others else None, verdict)
