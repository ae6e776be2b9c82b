"""Random-direction controls for CAA: is the contrastive direction special, or is any push the same?

Why: adding ``scale × ‖h‖ × v`` changes the model whatever ``v`` is. If +10 % along the
correct-minus-wrong direction costs 20 points of accuracy, that says nothing about the direction
until a *random* unit direction of the same size is tried on the same questions: if it costs as
much, the effect is perturbation damage, not the direction's meaning. The card has no such
control. Each random direction is a seeded Gaussian unit vector (in d ≥ a few hundred it is
nearly orthogonal to the CAA vector; the cosine is reported) swept with the same hook, layer,
norm unit and questions as the CAA scales, and compared two ways, both paired on the questions:
against the unsteered baseline (the CAA table's columns) and against the CAA direction at the same
scale (exact McNemar on the questions where exactly one of the two is right).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Unpack

import torch
from torch import Tensor

from mechlib.gsm8k import Question
from mechlib.models import LoadedModel
from mechlib.records import Record
from mechlib.scoring import truncation_rate
from mechlib.stats import mcnemar_exact
from mechlib.steering import (
    SteeringError,
    SteeringRow,
    SweepCondition,
    SweepOptions,
    correctness,
    run_conditions,
    steering_row,
)
from mechlib.steering_vector import SteeringVector


def random_directions(d_model: int, n: int, seed: int) -> Tensor:
    """``n`` unit vectors ``[n, d_model]`` drawn from an isotropic Gaussian; the same for the same seed."""
    if n < 0 or d_model <= 0:
        raise SteeringError(f"need n >= 0 random directions in d_model > 0 dims, got n={n}, d_model={d_model}")
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True)).float()


def random_conditions(caa: SteeringVector, scale: float, n_directions: int, seed: int) -> list[SweepCondition]:
    """The controls as sweep conditions: direction ``i`` at ``scale`` × ``caa``'s norm unit, tag ``_rand{i}``.

    Why a function: chapter 06 hands these to the CAA sweep (``run_sweep(..., also=...)``) so that they
    share its batches (and, on a GPU, its captured graphs), and :func:`run_random_control` must then
    name exactly the same conditions to find their records.
    """
    unit = torch.as_tensor(caa.unit).float()
    dirs = random_directions(unit.shape[0], n_directions, seed)
    return [SweepCondition(caa.with_unit(v), float(scale), f"_rand{i}") for i, v in enumerate(dirs)]


@dataclass(frozen=True)
class PairedComparison:
    """Two steering conditions on the same questions: who gets which right, exact McNemar p."""

    a_only: int  # questions only condition A gets right
    b_only: int  # questions only condition B gets right
    mcnemar_p: float


def paired_comparison(a: Mapping[str, bool], b: Mapping[str, bool]) -> PairedComparison:
    if set(a) != set(b) or not a:
        raise SteeringError("paired comparison needs the same non-empty set of questions on both sides")
    a_only = sum(a[i] and not b[i] for i in a)
    b_only = sum(b[i] and not a[i] for i in a)
    return PairedComparison(a_only, b_only, mcnemar_exact(a_only, b_only))


@dataclass(frozen=True)
class RandomDirectionResult:
    """One random direction at the control scale: its table row and its comparison with CAA."""

    index: int
    cos_with_caa: float
    row: SteeringRow
    vs_caa: PairedComparison | None  # None when the CAA sweep did not include the control scale
    truncated: float  # fraction of its answers cut off at max_new_tokens


def run_random_control(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    caa: SteeringVector,
    scale: float,
    n_directions: int,
    seed: int,
    baseline: Mapping[str, bool],
    caa_at_scale: Mapping[str, bool] | None,
    n_bootstrap: int = 2000,
    relabel: Callable[[list[Record]], list[Record]] | None = None,
    **options: Unpack[SweepOptions],
) -> list[RandomDirectionResult]:
    """Sweep ``n_directions`` random unit directions at ``scale`` and compare each with baseline and CAA.

    Each direction is pushed at ``caa``'s layer by the same unit of scale (``caa.mean_norm``). The
    generation settings (``options``) are :func:`mechlib.steering.run_sweep`'s, and all directions go through one
    :func:`mechlib.steering.run_conditions` (one hook; on a GPU they share batches). Direction ``i``'s
    records go to ``steer_L{layer}_rand{i}_{scale}.jsonl`` and resume like the CAA sweep's (chapter 06
    generates them with its CAA sweep, :func:`random_conditions`, so here they are only read back); a
    changed seed or layer norm discards them. ``relabel`` (e.g. :func:`mechlib.placeholder.relabel_steered`
    bound to the baseline) replaces each direction's parser verdicts before they are compared, as the
    chapter does for the CAA scales.
    """
    unit = torch.as_tensor(caa.unit).float()
    conditions = random_conditions(caa, scale, n_directions, seed)
    generated = run_conditions(loaded, questions, conditions, **options)
    out = []
    for i, (c, records) in enumerate(zip(conditions, generated)):
        v = torch.as_tensor(c.vector.unit).float()
        if relabel is not None:
            records = relabel(records)
        steered = correctness(records)
        row = steering_row(scale, baseline, steered, n_bootstrap=n_bootstrap, seed=seed)
        vs = None if caa_at_scale is None else paired_comparison(caa_at_scale, steered)
        cos = float(torch.dot(v, unit / unit.norm()))
        out.append(RandomDirectionResult(i, cos, row, vs, truncation_rate(records)))
    return out
