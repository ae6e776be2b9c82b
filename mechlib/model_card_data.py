"""One run's parameters and chapter results, for the Hugging Face model card (:mod:`mechlib.model_card`).

Why typed: the card's renderer must not know the JSON keys. Each chapter's metrics file is read once,
here, into its :mod:`mechlib.results` class (the same one the chapter wrote and ``REPORT.md`` reads);
a chapter that has not run is ``None``, so the renderer says so instead of failing on a missing key or
printing a stale number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mechlib.params import BookParams, load_params
from mechlib.results import (
    Baseline,
    Collected,
    Evaluated,
    FeatureRewardResult,
    Layers,
    Lens,
    ResultsError,
    Steering,
    Trained,
    read,
)


class ModelCardError(ValueError):
    """A run folder the card cannot be written from (named in the message)."""


CHAPTERS = {
    "01_collect": "collection",
    "02_train_sae": "SAE training",
    "03_evaluate_sae": "SAE evaluation",
    "04_gsm8k_baseline": "baseline accuracy",
    "05_contrastive_layers": "contrastive layers",
    "06_steering": "steering",
    "07_logit_lens": "logit lens",
    "08_feature_reward": "feature reward",
}


@dataclass(frozen=True)
class RunResults:
    """Everything the card says about one run: its parameters and each chapter's metrics (None: not run)."""

    params: BookParams
    collected: Collected | None
    trained: Trained | None
    evaluated: Evaluated | None
    baseline: Baseline | None
    layers: Layers | None
    steering: Steering | None
    lens: Lens | None
    reward: FeatureRewardResult | None
    steering_vector: str | None  # file name under checkpoints/ (e.g. steering_vec_L22.pt)
    contrastive_features: str | None  # file name under metrics/
    has_browser: bool = False  # outputs/<run>/browser/index.html exists (chapter 03's feature browser)

    @property
    def missing(self) -> list[str]:
        """Chapters without metrics, as ``NN (what)``."""
        have = {
            "01_collect": self.collected,
            "02_train_sae": self.trained,
            "03_evaluate_sae": self.evaluated,
            "04_gsm8k_baseline": self.baseline,
            "05_contrastive_layers": self.layers,
            "06_steering": self.steering,
            "07_logit_lens": self.lens,
            "08_feature_reward": self.reward,
        }
        return [f"{name[:2]} ({CHAPTERS[name]})" for name, value in have.items() if value is None]


def read_run(root: Path) -> RunResults:
    """Read ``root`` (``outputs/<run>``): its ``params.yaml`` (required) and whatever metrics exist."""
    if not root.is_dir():
        raise ModelCardError(
            f"{root}: no such run folder (run the book first: python -m mechlib.book params/<run>.yaml)"
        )
    params_file = root / "params.yaml"
    if not params_file.is_file():
        raise ModelCardError(f"{params_file} not found: not a run folder written by mechlib.book")
    params = load_params(params_file, run=root.name)
    m = root / "metrics"
    try:
        collected, trained, evaluated = read(m, Collected), read(m, Trained), read(m, Evaluated)
        baseline, layers, steering, lens = read(m, Baseline), read(m, Layers), read(m, Steering), read(m, Lens)
        reward = read(m, FeatureRewardResult)
    except ResultsError as exc:
        raise ModelCardError(str(exc)) from None
    vec = root / "checkpoints" / f"steering_vec_L{layers.peak_layer}.pt" if layers else None
    feats = m / f"contrastive_features_L{params.layer}.json"
    return RunResults(
        params,
        collected,
        trained,
        evaluated,
        baseline,
        layers,
        steering,
        lens,
        reward,
        vec.name if vec is not None and vec.is_file() else None,
        feats.name if feats.is_file() else None,
        (root / "browser" / "index.html").is_file(),
    )
