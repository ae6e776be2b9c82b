"""Correct-vs-wrong contrasts over layers: per-layer Cohen's d, the CAA direction, the SAE-feature ranking.

Why: the study asks *where* in depth the model's state differs between questions it will answer
right and questions it will answer wrong, and turns the difference at the peak into a steering
vector. This module ranks layers by the top-n mean |Cohen's d| against a label-permutation null
(:mod:`mechlib.stats`), and builds the mean-difference direction and the SAE-feature ranking, over
the pooled states :mod:`mechlib.layer_states` collects (one per question at every decoder layer;
its names are re-exported here, where chapter 05 has always found them).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mechlib.layer_states import (
    POOLINGS,
    BaselineSplit,
    ContrastError,
    LayerStates,
    Pooling,
    cached_layer_states,
    collect_layer_states,
    collect_with_model,
    encode_for_states,
    load_baseline_split,
    load_layer_states,
    match_questions,
    run_settings,
    save_layer_states,
    sha_of_prompts,
)
from mechlib.models import model_device
from mechlib.stats import (
    PermutationNull,
    SpearmanResult,
    WithinStrata,
    adaptive_permutation_null,
    cohens_d,
    format_p,
    rank_association_within_strata,
    rank_associations_within_strata,
    spearman,
)

__all__ = [  # chapter 05's names; those of mechlib.layer_states re-exported, where callers have always found them
    "MIN_GROUP",
    "POOLINGS",
    "BaselineSplit",
    "ContrastError",
    "FeatureContrast",
    "LayerContrast",
    "LayerStates",
    "Pooling",
    "cached_layer_states",
    "collect_layer_states",
    "collect_with_model",
    "contrast_layers",
    "encode_for_states",
    "feature_rows",
    "features_json",
    "features_table",
    "load_baseline_split",
    "load_layer_states",
    "match_questions",
    "mean_difference",
    "projection_scores",
    "rank_sae_features",
    "run_settings",
    "save_layer_states",
    "sha_of_prompts",
    "small_group_warning",
    "with_within_type_p",
]

if TYPE_CHECKING:
    from mechlib.sae import TopKSAE

# --------------------------------------------------------------------------------------------
# Layer ranking and the steering direction
# --------------------------------------------------------------------------------------------


@dataclass
class LayerContrast:
    """Per-layer Cohen's d (correct − wrong) and the layer statistic with its permutation null."""

    d: np.ndarray  # [L, D]
    null: PermutationNull
    n_correct: int
    n_wrong: int

    @property
    def peak_layer(self) -> int:
        return self.null.peak

    @property
    def top_abs_d(self) -> np.ndarray:  # [L]
        return self.null.observed


def contrast_layers(
    states: Tensor | np.ndarray,
    correct: Sequence[bool],
    *,
    top_n: int = 10,
    n_permutations: int = 200,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
) -> LayerContrast:
    """Cohen's d of correct − wrong per layer and dimension; rank layers by top-``top_n`` mean |d|.

    The null draws at least ``n_permutations`` relabellings, more while the peak's p is within its
    Monte-Carlo error of 0.05 (:func:`mechlib.stats.adaptive_permutation_null`). ``strata`` (e.g.
    question templates) makes it shuffle labels within each stratum only.
    """
    y = np.asarray(correct, dtype=bool)
    h = np.asarray(states, dtype=np.float64)
    if h.ndim != 3 or h.shape[0] != y.size:
        raise ContrastError(f"states must be [n, L, D] with n = {y.size} labels, got shape {tuple(h.shape)}")
    d = np.stack([cohens_d(h[y, i], h[~y, i]) for i in range(h.shape[1])])
    null = adaptive_permutation_null(
        h,
        y,
        min_permutations=n_permutations,
        max_permutations=max(16 * n_permutations, 16000),
        seed=seed,
        top_n=top_n,
        strata=strata,
    )
    return LayerContrast(d, null, int(y.sum()), int((~y).sum()))


MIN_GROUP = 10  # below this many questions in a group, per-dimension d is mostly noise


def small_group_warning(n_correct: int, n_wrong: int, minimum: int = MIN_GROUP) -> str | None:
    """A one-line caveat when either side of the contrast is tiny, else None.

    Why: with 3 correct questions (SmolLM2 on real GSM8K) every per-dimension d rests on 3 points,
    the top-10 |d| is large whatever the layer, and the "peak" is the luckiest layer. The
    permutation null measures this, but a reader skimming the peak should see it said plainly.
    """
    small = min(n_correct, n_wrong)
    if small >= minimum:
        return None
    side = "correct" if n_correct <= n_wrong else "wrong"
    return (
        f"caution: only {small} {side} question(s) in the contrast set (< {minimum}); the layer profile, the "
        f"peak and the steering vector rest on them, so read them against the permutation null"
    )


def mean_difference(states_layer: Tensor, correct: Sequence[bool] | np.ndarray) -> tuple[Tensor, float]:
    """``mean(h | correct) − mean(h | wrong)`` at one layer → (unit vector, its raw norm)."""
    y = torch.as_tensor(np.asarray(correct, dtype=bool))
    h = torch.as_tensor(states_layer).double()
    if h.ndim != 2 or h.shape[0] != y.numel() or y.all() or not y.any():
        raise ContrastError(
            f"need [n, D] states and both correct and wrong questions, got {tuple(h.shape)}, "
            f"{int(y.sum())} correct of {y.numel()}"
        )
    diff = h[y].mean(0) - h[~y].mean(0)
    norm = float(diff.norm())
    if norm == 0.0:
        raise ContrastError("correct and wrong states have identical means: no direction to steer along")
    return (diff / norm).float(), norm


def projection_scores(states_layer: Tensor, unit_vector: Tensor) -> np.ndarray:
    """Each question's pooled state projected on the (unit) direction."""
    return (torch.as_tensor(states_layer).double() @ unit_vector.double()).numpy()


@dataclass(frozen=True)
class ProjectionTest:
    """Is the direction readable on held-out questions: does a higher projection go with a correct answer?

    ``rho`` is Spearman's ρ with its p-value; ``within_type`` the same association with labels shuffled
    only within each question type (None: one type), which a direction that merely reads the type fails.
    """

    rho: SpearmanResult
    within_type: WithinStrata | None

    def lines(self) -> str:
        """What chapter 05 prints."""
        r, w = self.rho, self.within_type
        text = f"held-out projection vs correctness: Spearman rho = {r.rho:.3f}, p = {format_p(r.p)} (n = {r.n})"
        if w is not None:
            text += (
                f"\n  labels shuffled within question type ({w.n_strata} types, {w.n_permutations} permutations): "
                f"p = {format_p(w.p)}"
            )
        return text


def projection_test(
    states_layer: Tensor,
    unit_vector: Tensor,
    correct: np.ndarray,
    types: Sequence[Hashable],
    *,
    n_permutations: int,
    seed: int,
) -> ProjectionTest:
    """:class:`ProjectionTest` of the questions' pooled states ``states_layer`` on ``unit_vector``."""
    scores = projection_scores(states_layer, unit_vector)
    within = rank_association_within_strata(scores, correct, types, n_permutations=n_permutations, seed=seed)
    return ProjectionTest(spearman(scores, correct), within)


# --------------------------------------------------------------------------------------------
# SAE features ranked by contrast
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureContrast:
    feature: int
    score: float  # mean activation (correct) − mean activation (wrong)
    d: float  # Cohen's d of the activations (0 when the feature is constant in both groups)
    mean_correct: float
    mean_wrong: float
    fire_rate_correct: float
    fire_rate_wrong: float
    # labels shuffled within question type (``rank_sae_features``): None with one type or none given
    p_within_type: float | None = None


def feature_rows(
    a: np.ndarray, b: np.ndarray, columns: Sequence[int], feature_ids: Sequence[int] | None = None
) -> list[FeatureContrast]:
    """One :class:`FeatureContrast` per column of the ``[n_correct, m]`` / ``[n_wrong, m]`` activations
    ``a`` / ``b``, in the order of ``columns``; ``feature_ids[j]`` names column j (default: j itself)."""
    score, d = a.mean(0) - b.mean(0), cohens_d(a, b)
    return [
        FeatureContrast(
            int(j if feature_ids is None else feature_ids[j]),
            float(score[j]),
            float(d[j]),
            float(a[:, j].mean()),
            float(b[:, j].mean()),
            float((a[:, j] > 0).mean()),
            float((b[:, j] > 0).mean()),
        )
        for j in columns
    ]


@torch.no_grad()
def rank_sae_features(
    sae: TopKSAE,
    states_layer: Tensor,
    correct: Sequence[bool],
    top_n: int = 50,
    *,
    types: Sequence[Hashable] | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> list[FeatureContrast]:
    """SAE features ranked by |mean activation(correct) − mean activation(wrong)|.

    Why the mean difference and not d: TopK activations are sparse, and d of a feature that fires
    on two of 150 questions is dominated by its tiny variance; the mean difference is what the
    study calls the contrastive score, and d is reported alongside. Features that never fire are
    not ranked.

    With ``types`` (each answer's question type) every ranked feature also gets ``p_within_type``:
    :func:`mechlib.stats.rank_association_within_strata` of its activation with the labels shuffled
    only inside each type. On a task whose types differ in difficulty, a feature that merely reads
    the type ranks high; its within-type p is then large. The p is in-sample (the same answers chose
    the feature from thousands), so a large one is the informative reading — "the type explains
    it" — and a small one is not evidence of a correctness feature on its own.
    """
    from mechlib.sae import dense_code  # the SAE side imports torch kernels; chapter 05 needs it only here

    y = np.asarray(correct, dtype=bool)
    x = torch.as_tensor(states_layer).float().to(model_device(sae))
    acts = dense_code(sae.encode(x), sae.d_sae).double().cpu().numpy()  # [n, m]
    a, b = acts[y], acts[~y]
    score = a.mean(0) - b.mean(0)
    fired = np.asarray((acts > 0).any(0))
    order = [int(j) for j in np.argsort(-np.abs(score), kind="stable") if fired[j]][:top_n]
    rows = feature_rows(a, b, order)
    if types is None:
        return rows
    return with_within_type_p(rows, acts[:, order], y, types, n_permutations=n_permutations, seed=seed)


def with_within_type_p(
    rows: Sequence[FeatureContrast],
    activations: np.ndarray,
    correct: np.ndarray,
    types: Sequence[Hashable],
    *,
    n_permutations: int,
    seed: int,
) -> list[FeatureContrast]:
    """``rows`` with ``p_within_type`` set: column j of the ``[n, len(rows)]`` ``activations`` is row j's
    feature on the n answers, tested with :func:`mechlib.stats.rank_associations_within_strata` (one set
    of within-type permutations for all rows). The p stays ``None`` with one type or one class."""
    tests = rank_associations_within_strata(activations, correct, types, n_permutations=n_permutations, seed=seed)
    return [replace(r, p_within_type=None if t is None else t.p) for r, t in zip(rows, tests, strict=True)]


def features_table(features: Sequence[FeatureContrast], n: int = 10) -> str:
    """The top ``n`` ranked features as chapter 05 prints them; ``p type`` only when any row has one."""
    typed = any(f.p_within_type is not None for f in features[:n])
    head = f"{'feature':>8} {'score':>8} {'d':>7} {'mean ok':>8} {'mean bad':>8} {'fires ok':>8} {'fires bad':>9}"
    lines = [head + (f" {'p type':>7}" if typed else "")]
    for f in features[:n]:
        row = (
            f"{f.feature:>8} {f.score:>8.3f} {f.d:>7.2f} {f.mean_correct:>8.3f} {f.mean_wrong:>8.3f} "
            f"{f.fire_rate_correct:>8.2f} {f.fire_rate_wrong:>9.2f}"
        )
        p = "—" if f.p_within_type is None else format_p(f.p_within_type)
        lines.append(row + (f" {p:>7}" if typed else ""))
    return "\n".join(lines)


def features_json(features: Sequence[FeatureContrast], **info: object) -> dict[str, Any]:
    """The card's announced ``contrastive_features_L{layer}.json``: provenance plus the ranked features."""
    return {
        **info,
        "ranking": "abs(mean activation correct - mean activation wrong)",
        "features": [asdict(f) for f in features],
    }
