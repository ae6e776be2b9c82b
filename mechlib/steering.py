"""Contrastive activation addition (CAA): the steering vector for a layer and the scale sweep.

Why: the study adds ``scale × (mean residual norm) × unit(mean(h|correct) − mean(h|wrong))`` to
the residual stream after one decoder layer, at every position, during greedy generation, and
reports accuracy per scale on 50 held-out questions. This module builds the vector for a layer
from chapter 05's states and generates every held-out question at every scale, resumably.

The pieces around it live beside it, and every name is re-exported here (``steering.run_sweep``,
``steering.steering_row``, ... as the chapters call them): the vector itself (layer, direction, unit
of scale, provenance; save/load; ``apply``) and the plain hook in :mod:`mechlib.steering_vector`;
the sweep over scales and controls (one hook, batches shared on a GPU) in :mod:`mechlib.steering_sweep`;
the table's rows with their paired statistics (McNemar, bootstrap Δ, recovered overlaps) in
:mod:`mechlib.steering_rows`; the card's own hook checked against the sweep in
:mod:`mechlib.steering_card`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mechlib.contrast import BaselineSplit, LayerStates, mean_difference
from mechlib.steering_card import CardHookCheck, changed_first, check_card_hook
from mechlib.steering_rows import RecoveredOverlap, SteeringRow, correctness, recovered_overlaps, steering_row
from mechlib.steering_sweep import (
    RowSteering,
    SweepCondition,
    SweepOptions,
    run_conditions,
    run_sweep,
    scale_tag,
    steer_records_path,
)
from mechlib.steering_vector import SteeringError, SteeringVector, steering_delta, steering_hook

__all__ = [
    "CardHookCheck",
    "RecoveredOverlap",
    "RowSteering",
    "SteeringError",
    "SteeringRow",
    "SteeringVector",
    "SweepCondition",
    "SweepOptions",
    "changed_first",
    "check_card_hook",
    "correctness",
    "mean_residual_norm",
    "recovered_overlaps",
    "run_conditions",
    "run_sweep",
    "scale_tag",
    "steer_records_path",
    "steering_delta",
    "steering_hook",
    "steering_row",
    "vector_for_layer",
]


def mean_residual_norm(states: LayerStates, layer: int) -> float:
    """Mean ‖h‖₂ of the residual after ``layer`` over the non-special prompt tokens of every prompt chapter 05
    read (contrast and held-out: the unit takes no label into account).

    Taken from :class:`mechlib.contrast.LayerStates` (recorded in the same forward pass as the
    pooled states). Special tokens (BOS above all) are excluded: their norms are often far larger
    than ordinary tokens' and would inflate the unit in which scales are given.
    """
    norms = states.token_norm_mean
    if not 0 <= layer < len(norms):
        raise SteeringError(f"layer {layer} out of range: the states cover layers 0..{len(norms) - 1}")
    return float(norms[layer])


def vector_for_layer(
    states: LayerStates,
    split: BaselineSplit,
    layer: int,
    checkpoints_dir: str | os.PathLike[str],
    *,
    model: str,
    peak_layer: int,
) -> tuple[SteeringVector, Path]:
    """The steering vector for ``layer``: chapter 05's file at the peak, else built the same way.

    Off the peak, ``unit(mean(h|correct) − mean(h|wrong))`` is computed from chapter 05's cached
    contrast-set states at ``layer`` and saved as ``steering_vec_L{layer}.pt`` beside the peak's.
    """
    path = Path(checkpoints_dir) / f"steering_vec_L{layer}.pt"
    if layer != peak_layer or not path.is_file():
        y = split.labels(split.contrast_ids)
        unit, raw = mean_difference(states.select(split.contrast_ids)[:, layer], y)
        SteeringVector(
            layer,
            unit,
            mean_residual_norm(states, layer),
            model=model,
            n_correct=int(y.sum()),
            n_wrong=int((~y).sum()),
            raw_diff_norm=raw,
            pooling=states.pooling,
        ).save(path)
    vec = SteeringVector.load(path)
    if vec.layer != layer:
        raise SteeringError(f"{path}: holds a vector for layer {vec.layer}, not {layer}")
    return vec, path
