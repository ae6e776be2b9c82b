"""Statistics for the contrast and steering chapters: effect sizes, a permutation null, paired tests.

Why: the study ranks 42 layers by the largest |Cohen's d| over 2560 dimensions with ~50–100
questions, and reports steering deltas on 50 questions without intervals. Both are noisy in a
predictable direction — the top of many noisy |d| values is large even with random labels, and a
few flipped answers look like a trend. This module supplies the honest comparisons: a label
permutation null for the layer statistic (per layer *and* for the max over layers, which is what
picking a peak implies), Wilson intervals for accuracies, an exact McNemar test and a paired
bootstrap interval for accuracy differences, and Spearman's ρ with its p-value.

Everything works in float64 NumPy; inputs may be NumPy arrays or CPU torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps


def format_p(p: float | None) -> str:
    """A p-value as the book prints it: three decimals, or two significant digits where those would read 0.000.

    Why: a p-value is never zero, so a fixed ``.3f`` turning 4e-05 into "0.000" misstates it; the same
    helper everywhere keeps tables, printouts and findings agreeing. The smallest p of 1000 permutations,
    1/1001, still reads 0.001. ``"n/a"`` when none was computed.
    """
    if p is None:
        return "n/a"
    text = f"{p:.3f}"
    return text if text != "0.000" else f"{p:.1e}"


class StatsInputError(ValueError):
    """Input a statistic cannot be computed on (too few samples, mismatched shapes)."""


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise StatsInputError(f"{name} contains NaN or inf values")
    return arr


def _as_bool(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if arr.ndim != 1:
        raise StatsInputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise StatsInputError(f"{name} must hold booleans or 0/1 values")
    return arr.astype(bool)


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` when it is undefined (NaN) — JSON metrics reject NaN."""
    return None if x is None or not math.isfinite(x) else float(x)


# --------------------------------------------------------------------------------------------
# Effect sizes
# --------------------------------------------------------------------------------------------


def cohens_d(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Cohen's d of ``a`` − ``b`` for every dimension (samples along axis 0).

    ``d_j = (mean(a_j) − mean(b_j)) / s_j`` with the pooled standard deviation
    ``s_j = sqrt(((n_a − 1)·var(a_j) + (n_b − 1)·var(b_j)) / (n_a + n_b − 2))`` and ``var`` the
    unbiased (ddof = 1) sample variance. A dimension with ``s_j = 0`` (constant in both groups)
    has no defined effect size; it gets ``d_j = 0`` so it can never be ranked as an effect.
    """
    a, b = _as_f64(a, "a"), _as_f64(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise StatsInputError(f"a and b must have the same trailing shape, got {a.shape} and {b.shape}")
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        raise StatsInputError(f"Cohen's d needs at least 2 samples per group, got n_a={n_a}, n_b={n_b}")
    pooled_var = ((n_a - 1) * a.var(axis=0, ddof=1) + (n_b - 1) * b.var(axis=0, ddof=1)) / (n_a + n_b - 2)
    scale = np.maximum(np.abs(a).max(axis=0), np.abs(b).max(axis=0))
    return _safe_ratio(a.mean(axis=0) - b.mean(axis=0), np.sqrt(pooled_var), scale)


def _safe_ratio(num: np.ndarray, sd: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # "Zero" variance relative to the values' own magnitude ``scale`` (max |x| of the dimension):
    # float64 round-off on a constant column leaves sd ~ 1e-16·|x| rather than exactly 0.
    ok = sd > 1e-10 * scale
    return np.where(ok, num / np.where(ok, sd, 1.0), 0.0)


def top_abs_mean(d: ArrayLike, n: int = 10) -> np.ndarray:
    """Mean of the ``n`` largest |d| along the last axis (the study's per-layer statistic)."""
    a = np.abs(_as_f64(d, "d"))
    if not 1 <= n <= a.shape[-1]:
        raise StatsInputError(f"top n must be in [1, {a.shape[-1]}], got {n}")
    return -np.partition(-a, n - 1, axis=-1)[..., :n].mean(axis=-1)


# --------------------------------------------------------------------------------------------
# Label-permutation null for the layer statistic
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationNull:
    """Observed per-layer statistic and its label-permutation null.

    ``null[p, l]`` is the top-n mean |d| of layer ``l`` under permutation ``p``; ``null_max[p]`` the
    max over layers of that row. ``p_layer[l]`` compares layer ``l`` with its own null;
    ``p_peak`` compares the observed *maximum* with ``null_max`` — the right test once the peak
    was chosen by looking at all layers. p-values use ``(1 + #{null ≥ observed}) / (1 + P)``.
    """

    observed: np.ndarray  # [L]
    null: np.ndarray  # [P, L]
    null_max: np.ndarray  # [P]
    p_layer: np.ndarray  # [L]
    p_peak: float
    peak: int
    top_n: int

    @property
    def n_permutations(self) -> int:
        return int(self.null.shape[0])

    def null_quantile(self, q: float) -> np.ndarray:
        """Per-layer quantile of the null (e.g. ``0.95`` for the band in the figure)."""
        return np.quantile(self.null, q, axis=0)

    @property
    def p_peak_mc_se(self) -> float:
        """Monte-Carlo standard error of ``p_peak``: ``sqrt(p (1 − p) / P)`` (a finite P is a sample)."""
        return mc_standard_error(self.p_peak, self.n_permutations)


def mc_standard_error(p: float, n_permutations: int) -> float:
    """Standard error of a permutation p-value estimated from ``n_permutations`` draws."""
    return float(np.sqrt(p * (1.0 - p) / n_permutations))


def adaptive_permutation_null(
    states: ArrayLike,
    labels: ArrayLike,
    *,
    min_permutations: int = 1000,
    max_permutations: int = 16000,
    alpha: float = 0.05,
    seed: int = 0,
    top_n: int = 10,
    strata: Sequence[Hashable] | None = None,
) -> PermutationNull:
    """:func:`permutation_null` with as many permutations as the decision at ``alpha`` needs.

    Why: with 200 permutations a p of 0.055 carries a Monte-Carlo error of about ±0.016, so
    "above or below 0.05" is a coin toss of the sampling, not of the data. Start with
    ``min_permutations``; while ``|p − alpha|`` is within two standard errors and fewer than
    ``max_permutations`` were drawn, double the count. The permutations are one seeded stream,
    so a larger run extends a smaller one (its first draws are the same).
    """
    if min_permutations < 1 or max_permutations < min_permutations:
        raise StatsInputError(
            f"need 1 <= min_permutations <= max_permutations, got {min_permutations}, {max_permutations}"
        )
    n = min_permutations
    while True:
        res = permutation_null(states, labels, n, seed, top_n, strata=strata)
        if n >= max_permutations or abs(res.p_peak - alpha) > 2 * res.p_peak_mc_se:
            return res
        n = min(2 * n, max_permutations)


def permutation_null(
    states: ArrayLike,
    labels: ArrayLike,
    n_permutations: int = 200,
    seed: int = 0,
    top_n: int = 10,
    chunk_bytes: int = 256 << 20,
    strata: Sequence[Hashable] | None = None,
) -> PermutationNull:
    """Per-layer top-``top_n`` mean |Cohen's d| (label True − False) and its permutation null.

    ``states`` is ``[n, L, D]`` (or ``[n, D]`` for one layer). Permutations shuffle the labels
    (keeping the group sizes) and are evaluated together: group sums and sums of squares are
    one matrix product of a ``[P, n]`` 0/1 matrix with the ``[n, L·D]`` states, in chunks of
    permutations that fit ``chunk_bytes``. States are centred per dimension first (d does not
    change) so the sums of squares lose no precision to large mean directions.

    ``strata`` (one key per sample, e.g. the question's template) restricts permutations to
    shuffles *within* each stratum. The null then keeps any link between strata and labels, and
    asks whether correctness differs beyond what the strata explain: with a task whose question
    types differ in difficulty, a plain null cannot tell "predicts correctness" from "recognises
    the question type".
    """
    h = _as_f64(states, "states")
    if h.ndim == 2:
        h = h[:, None, :]
    if h.ndim != 3:
        raise StatsInputError(f"states must be [n, L, D] or [n, D], got shape {h.shape}")
    y = _as_bool(labels, "labels")
    n, n_layers, dim = h.shape
    if y.shape[0] != n:
        raise StatsInputError(f"labels has {y.shape[0]} entries but states has {n} samples")
    n_a = int(y.sum())
    n_b = n - n_a
    if n_a < 2 or n_b < 2:
        raise StatsInputError(f"need at least 2 samples per group, got {n_a} with label True and {n_b} with False")
    if n_permutations < 1:
        raise StatsInputError(f"n_permutations must be >= 1, got {n_permutations}")

    flat = h.reshape(n, n_layers * dim)
    scale = np.abs(flat).max(axis=0)
    flat = flat - flat.mean(axis=0)
    flat_sq = flat * flat
    tot, tot_sq = flat.sum(axis=0), flat_sq.sum(axis=0)

    def stat(member: np.ndarray) -> np.ndarray:  # member [p, n] of 0/1 → [p, L]
        s_a, q_a = member @ flat, member @ flat_sq
        s_b, q_b = tot - s_a, tot_sq - q_a
        ss_a = np.maximum(q_a - s_a * s_a / n_a, 0.0)  # (n_a − 1)·var_a
        ss_b = np.maximum(q_b - s_b * s_b / n_b, 0.0)
        sd = np.sqrt((ss_a + ss_b) / (n - 2))
        d = _safe_ratio(s_a / n_a - s_b / n_b, sd, scale)
        return top_abs_mean(d.reshape(-1, n_layers, dim), top_n)

    observed = stat(y[None, :].astype(np.float64))[0]
    rng = np.random.default_rng(seed)
    perms = _permutations(y, n_permutations, rng, strata).astype(np.float64)
    per_chunk = max(1, chunk_bytes // (8 * 6 * flat.shape[1]))
    null = np.concatenate([stat(perms[i : i + per_chunk]) for i in range(0, n_permutations, per_chunk)])
    null_max = null.max(axis=1)
    peak = int(np.argmax(observed))
    p_layer = (1 + (null >= observed[None, :]).sum(axis=0)) / (1 + n_permutations)
    p_peak = float((1 + (null_max >= observed[peak]).sum()) / (1 + n_permutations))
    return PermutationNull(observed, null, null_max, p_layer, p_peak, peak, top_n)


def _permutations(
    y: np.ndarray, n_permutations: int, rng: np.random.Generator, strata: Sequence[Hashable] | None
) -> np.ndarray:
    """``[P, n]`` label vectors: ``y`` shuffled as a whole, or within each stratum."""
    if strata is None:
        return np.stack([rng.permutation(y) for _ in range(n_permutations)])
    keys = np.asarray([str(k) for k in strata])
    if keys.shape != y.shape:
        raise StatsInputError(f"strata has {keys.size} entries but labels has {y.size}")
    groups = [np.flatnonzero(keys == k) for k in np.unique(keys)]
    out = np.empty((n_permutations, y.size), dtype=bool)
    for p in range(n_permutations):
        for idx in groups:
            out[p, idx] = y[rng.permutation(idx)]
    return out


# --------------------------------------------------------------------------------------------
# Accuracies and paired comparisons
# --------------------------------------------------------------------------------------------


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``, with ``0 <= lo <= k/n <= hi <= 1`` exactly.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps near-nominal
    coverage at n ≈ 50 and accuracies near 0 or 1. Computed by scipy (``binomtest(...).proportion_ci``),
    which returns the edges exactly (0/n → lo = 0, n/n → hi = 1); the textbook formula
    ``centre ± half`` leaves round-off there (lo ≈ 5.6e-17 at k = 0), and a plot's error bar
    ``p − lo`` then turns negative, which matplotlib refuses. The final clamp keeps the invariant
    whatever the scipy version does.
    """
    if n <= 0 or not 0 <= k <= n or int(k) != k or int(n) != n:
        raise StatsInputError(f"need whole numbers 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise StatsInputError(f"confidence must be in (0, 1), got {confidence}")
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    p = k / n
    lo = 0.0 if k == 0 else min(max(0.0, float(ci.low)), p)
    hi = 1.0 if k == n else max(min(1.0, float(ci.high)), p)
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    ``b`` = pairs that went wrong → right, ``c`` = right → wrong. Under "the intervention changes
    nothing", each discordant pair is equally likely to go either way, so ``b ~ Binomial(b + c,
    1/2)``; the exact binomial test is right for the small counts steering on 50 questions gives
    (the χ² version is not). No discordant pairs → p = 1.
    """
    if b < 0 or c < 0:
        raise StatsInputError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(sps.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float
    low: float
    high: float
    confidence: float
    n_bootstrap: int


def bootstrap_ci(
    before: ArrayLike, after: ArrayLike, n_bootstrap: int = 2000, seed: int = 0, confidence: float = 0.95
) -> BootstrapCI:
    """Percentile bootstrap interval for the paired accuracy change ``mean(after) − mean(before)``.

    Questions are resampled with replacement *as pairs* (the same question before and after), so
    the interval reflects that both arms saw the same questions.
    """
    x, y = _as_bool(before, "before"), _as_bool(after, "after")
    if x.shape != y.shape or x.size == 0:
        raise StatsInputError(f"before and after must be non-empty and paired, got {x.shape} and {y.shape}")
    if n_bootstrap < 1:
        raise StatsInputError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    diff = y.astype(np.float64) - x.astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_bootstrap, diff.size))
    boot = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return BootstrapCI(float(diff.mean()), float(low), float(high), confidence, n_bootstrap)


@dataclass(frozen=True)
class SpearmanResult:
    rho: float  # NaN when undefined (a constant input)
    p: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"rho": finite_or_none(self.rho), "p": finite_or_none(self.p), "n": self.n}


def spearman(x: ArrayLike, y: ArrayLike) -> SpearmanResult:
    """Spearman's rank correlation with its two-sided p-value (``scipy.stats.spearmanr``).

    With a binary ``y`` (correct / wrong) this is a rank version of the point-biserial
    correlation: does a higher projection go with being right? A constant input has no defined
    ρ; it is returned as NaN (and ``as_dict`` writes ``None``) rather than letting scipy warn.
    """
    a, b = _as_f64(x, "x").ravel(), _as_f64(y, "y").ravel()
    if a.shape != b.shape:
        raise StatsInputError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return SpearmanResult(float("nan"), float("nan"), int(a.size))
    res = sps.spearmanr(a, b)
    return SpearmanResult(float(res.statistic), float(res.pvalue), int(a.size))


@dataclass(frozen=True)
class WithinStrata:
    """A permutation test of "higher score, more often correct" with labels shuffled inside strata only."""

    p: float
    n_permutations: int
    n_strata: int


def rank_association_within_strata(
    scores: ArrayLike, labels: ArrayLike, strata: Sequence[Hashable], *, n_permutations: int = 2000, seed: int = 0
) -> WithinStrata | None:
    """Does a score order correct before wrong answers *within* each stratum (question type)?

    Why: on a task that mixes easy and hard question types, any score that reads the type "predicts"
    correctness: the default run's steering-direction projection has Spearman ρ 0.53 against correctness
    on held-out questions, nearly all of it between types. This test keeps each stratum's count of
    correct answers and shuffles the labels inside it, so what the type explains is the same in every
    permutation. The statistic is the rank sum ``S`` of the correct answers (average ranks over all
    answers): AUROC and Spearman ρ against a 0/1 label are both affine in ``S``, so the p-value serves
    both. Its null mean ``E[S] = Σ_k n1_k · mean rank in stratum k`` is exact, and the two-sided p is
    ``(1 + #{|S* − E| ≥ |S − E|}) / (1 + n_permutations)``. ``None`` with one stratum (then this is the
    plain permutation test) or when every answer is in one class.
    """
    x = _as_f64(scores, "scores").ravel()
    return rank_associations_within_strata(x[:, None], labels, strata, n_permutations=n_permutations, seed=seed)[0]


def rank_associations_within_strata(
    scores: ArrayLike, labels: ArrayLike, strata: Sequence[Hashable], *, n_permutations: int = 2000, seed: int = 0
) -> list[WithinStrata | None]:
    """:func:`rank_association_within_strata` of each column of the ``[n, k]`` ``scores`` (chapter 05's top
    SAE features): one set of within-stratum permutations serves every column, so k scores cost one draw."""
    x, y = _as_f64(scores, "scores"), _as_bool(labels, "labels")
    keys = np.asarray([str(k) for k in strata])
    if x.ndim != 2 or not x.shape[0] == y.size == keys.size:
        raise StatsInputError(f"scores [n, k], labels and strata differ in length: {x.shape}, {y.size}, {keys.size}")
    if n_permutations < 1:
        raise StatsInputError(f"n_permutations must be >= 1, got {n_permutations}")
    groups = np.unique(keys)
    if groups.size < 2 or y.all() or not y.any():
        return [None] * x.shape[1]
    ranks = np.asarray(sps.rankdata(x, axis=0), dtype=np.float64)  # [n, k]
    expected = sum(y[keys == k].sum() * ranks[keys == k].mean(0) for k in groups)  # [k]
    observed = np.abs(y @ ranks - expected)
    perms = _permutations(y, n_permutations, np.random.default_rng(seed), strata).astype(np.float64)
    null = np.abs(perms @ ranks - expected)  # [P, k]
    as_extreme = null >= observed - 1e-9 * np.maximum(observed, 1.0)  # ties of the rank sum count as extreme
    ps = (1 + as_extreme.sum(0)) / (1 + n_permutations)
    return [WithinStrata(float(p), n_permutations, int(groups.size)) for p in ps]
