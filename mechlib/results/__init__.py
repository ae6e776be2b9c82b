"""One typed result per chapter: the notebook writes it, ``REPORT.md`` and the model card read it back.

Why: a metrics dict built by hand in a notebook and read back through string keys in the report
drifts silently (a renamed key shows as "—", a stale one survives). Each chapter's
``metrics/NN_*.json`` is a frozen dataclass here whose field names are the file's keys
(:mod:`mechlib.results.codec`); :func:`save` writes it, :func:`read` / :func:`load` check it on the
way back, and a malformed file fails with one line naming the file and the key.

=========================  ===================================  =================
file                       class                                chapter
=========================  ===================================  =================
``01_collect.json``        :class:`Collected`                   collection
``02_train_sae.json``      :class:`Trained`                     SAE training
``03_evaluate_sae.json``   :class:`Evaluated`                   SAE evaluation
``04_gsm8k_baseline.json`` :class:`Baseline`                    baseline
``05_contrastive_…json``   :class:`Layers`                      contrastive layers
``06_steering.json``       :class:`Steering`                    CAA steering
``07_logit_lens.json``     :class:`Lens`                        logit lens
``08_feature_reward.json`` :class:`FeatureRewardResult`         feature reward, Stage Gate 1, GRPO
=========================  ===================================  =================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mechlib.io import atomic_write_json
from mechlib.results.codec import Json, Record, ResultsError, copy_fields
from mechlib.results.gsm8k import Accuracy, Baseline, Layers, Lens, RuleCount
from mechlib.results.reward import ArmResult, FeatureRewardResult, GateInputs
from mechlib.results.sae import CardSnippet, Collected, Evaluated, Example, FeatureExamples, Trained
from mechlib.results.steering import (
    CardHookSummary,
    Overlap,
    PairedCounts,
    RandomControl,
    RandomDirection,
    RuleRow,
    ScaleRow,
    ScaleVerdict,
    SteeredRow,
    Steering,
)

if TYPE_CHECKING:
    from mechlib.paths import RunPaths

ChapterResult = Collected | Trained | Evaluated | Baseline | Layers | Steering | Lens | FeatureRewardResult
CHAPTER_RESULTS: tuple[type[ChapterResult], ...] = (
    Collected,
    Trained,
    Evaluated,
    Baseline,
    Layers,
    Steering,
    Lens,
    FeatureRewardResult,
)
R = TypeVar("R", Collected, Trained, Evaluated, Baseline, Layers, Steering, Lens, FeatureRewardResult)

__all__ = [
    "CHAPTER_RESULTS",
    "Accuracy",
    "ArmResult",
    "Baseline",
    "CardHookSummary",
    "CardSnippet",
    "ChapterResult",
    "Collected",
    "Evaluated",
    "Example",
    "FeatureExamples",
    "FeatureRewardResult",
    "GateInputs",
    "Json",
    "Layers",
    "Lens",
    "Overlap",
    "PairedCounts",
    "RandomControl",
    "RandomDirection",
    "Record",
    "ResultsError",
    "RuleCount",
    "RuleRow",
    "ScaleRow",
    "ScaleVerdict",
    "SteeredRow",
    "Steering",
    "Trained",
    "copy_fields",
    "load",
    "path_of",
    "read",
    "save",
]


def path_of(metrics_dir: Path, cls: type[ChapterResult]) -> Path:
    """``metrics_dir/NN_name.json`` of a chapter's result class."""
    return Path(metrics_dir) / f"{cls.FILE}.json"


def save(paths: RunPaths, result: ChapterResult) -> Path:
    """Write ``result`` to the run's ``metrics/NN_name.json`` (atomic, key-sorted); returns the path."""
    path = path_of(paths.metrics, type(result))
    atomic_write_json(path, result.to_json())
    return path


def read(metrics_dir: Path, cls: type[R]) -> R | None:
    """The chapter's result from ``metrics_dir``, or None when the chapter has not run (no file)."""
    path = path_of(metrics_dir, cls)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: could not read the metrics ({type(exc).__name__}: {exc})") from None
    return cls.from_json(d, str(path))


def load(metrics_dir: Path, cls: type[R]) -> R:
    """:func:`read`, for a chapter that must have run (a later chapter's input): a missing file is an error."""
    result = read(metrics_dir, cls)
    if result is None:
        raise ResultsError(f"{path_of(metrics_dir, cls)} not found: run chapter {cls.FILE[:2]} first")
    return result
