"""Typed readers of one run's metrics, for the Hugging Face model card (:mod:`mechlib.model_card`).

Why typed: the card's renderer must not know the JSON keys. Each chapter's metrics file is read once,
here, into a frozen dataclass; a chapter that has not run is ``None``, so the renderer says so instead
of failing on a missing key or printing a stale number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechlib.params import BookParams, load_params


class ModelCardError(ValueError):
    """A run folder the card cannot be written from (named in the message)."""


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _pair(d: dict[str, Any], key: str) -> tuple[float, float] | None:
    v = d.get(key)
    return (float(v[0]), float(v[1])) if isinstance(v, list) and len(v) == 2 else None


def _text(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    return v if isinstance(v, str) else ""


@dataclass(frozen=True)
class Collected:  # chapter 01
    n_tokens: int | None
    heldout_tokens: int | None
    d_model: int | None
    mean_norm: float | None
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Collected":
        return cls(_int(d, "n_tokens"), _int(d, "heldout_tokens"), _int(d, "d_model"), _num(d, "mean_norm"),
                   _text(d, "finding"))


@dataclass(frozen=True)
class Trained:  # chapter 02
    sae_source: str
    steps: int | None
    tokens: int | None
    final_batch_fvu: float | None
    dead_fraction_at_end: float | None
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Trained":
        return cls(_text(d, "sae_source"), _int(d, "n_steps"), _int(d, "tokens"), _num(d, "final_batch_fvu"),
                   _num(d, "dead_fraction_at_end"), _text(d, "finding"))


@dataclass(frozen=True)
class Evaluated:  # chapter 03
    var_explained: float | None
    var_explained_global: float | None
    pca_var_explained: float | None
    mse: float | None
    l0: float | None
    coverage: float | None
    dead_fraction: float | None
    delta_ce_loss: float | None
    kl: float | None
    ce_loss_recovered: float | None
    n_tokens: int | None
    d_sae: int | None
    k: int | None
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Evaluated":
        return cls(*(_num(d, k) for k in ("var_explained", "var_explained_global", "pca_var_explained", "mse", "l0",
                                          "coverage", "dead_fraction", "delta_ce_loss", "kl", "ce_loss_recovered")),
                   _int(d, "n_tokens"), _int(d, "d_sae"), _int(d, "k"), _text(d, "finding"))


@dataclass(frozen=True)
class RuleAccuracy:
    rule: str
    n: int | None
    n_correct: int | None
    accuracy: float | None


@dataclass(frozen=True)
class Baseline:  # chapter 04
    task: str
    prompt_format: str
    n: int | None
    n_correct: int | None
    accuracy: float | None
    ci95: tuple[float, float] | None
    finished: float | None
    by_rule: tuple[RuleAccuracy, ...]
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Baseline":
        rules = d.get("by_scoring_rule") if isinstance(d.get("by_scoring_rule"), dict) else {}
        by_rule = tuple(RuleAccuracy(name, _int(v, "n"), _int(v, "n_correct"), _num(v, "accuracy"))
                        for name, v in sorted(rules.items()) if isinstance(v, dict))
        return cls(_text(d, "task"), _text(d, "prompt_format"), _int(d, "n"), _int(d, "n_correct"),
                   _num(d, "accuracy"), _pair(d, "ci95"), _num(d, "finished"), by_rule, _text(d, "finding"))


@dataclass(frozen=True)
class Layers:  # chapter 05
    peak_layer: int | None
    n_layers: int
    peak_top_abs_d: float | None
    null_p: float | None
    null_p_mc_se: float | None
    spearman_rho: float | None
    spearman_p: float | None
    n_correct: int | None
    n_wrong: int | None
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Layers":
        top = [float(v) for v in d.get("top10_abs_d") or [] if isinstance(v, (int, float))]
        peak = _int(d, "peak_layer")
        at_peak = top[peak] if peak is not None and 0 <= peak < len(top) else None
        return cls(peak, len(top), at_peak, _num(d, "null_p"), _num(d, "null_p_mc_se"), _num(d, "spearman_rho"),
                   _num(d, "spearman_p"), _int(d, "n_correct"), _int(d, "n_wrong"), _text(d, "finding"))


@dataclass(frozen=True)
class SteeringRow:
    scale: float | None
    perturbation_pct: float | None
    accuracy: float | None
    delta: float | None
    delta_ci95: tuple[float, float] | None
    recovered: int | None
    n_baseline_wrong: int | None
    net_flips: int | None
    mcnemar_p: float | None

    @classmethod
    def read(cls, d: dict[str, Any]) -> "SteeringRow":
        return cls(_num(d, "scale"), _num(d, "perturbation"), _num(d, "accuracy"), _num(d, "delta"),
                   _pair(d, "delta_ci95"), _int(d, "recovered"), _int(d, "n_baseline_wrong"), _int(d, "net_flips"),
                   _num(d, "mcnemar_p"))


@dataclass(frozen=True)
class Steering:  # chapter 06
    layer: int | None
    mean_resid_norm: float | None
    baseline_accuracy: float | None
    n_heldout: int | None
    rows: tuple[SteeringRow, ...]
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Steering":
        rows = tuple(SteeringRow.read(r) for r in d.get("rows") or [] if isinstance(r, dict))
        return cls(_int(d, "layer"), _num(d, "mean_resid_norm"), _num(d, "baseline_accuracy"), _int(d, "n_heldout"),
                   rows, _text(d, "finding"))


@dataclass(frozen=True)
class Lens:  # chapter 07
    english_commitment_layer: int | None
    n_layers: int | None
    finding: str

    @classmethod
    def read(cls, d: dict[str, Any]) -> "Lens":
        return cls(_int(d, "english_commitment_layer"), _int(d, "n_layers"), _text(d, "finding"))


CHAPTERS = {"01_collect": "collection", "02_train_sae": "SAE training", "03_evaluate_sae": "SAE evaluation",
            "04_gsm8k_baseline": "baseline accuracy", "05_contrastive_layers": "contrastive layers",
            "06_steering": "steering", "07_logit_lens": "logit lens"}


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
    steering_vector: str | None  # file name under checkpoints/ (e.g. steering_vec_L22.pt)
    contrastive_features: str | None  # file name under metrics/
    has_browser: bool = False  # outputs/<run>/browser/index.html exists (chapter 03's feature browser)

    @property
    def missing(self) -> list[str]:
        """Chapters without metrics, as ``NN (what)``."""
        have = {"01_collect": self.collected, "02_train_sae": self.trained, "03_evaluate_sae": self.evaluated,
                "04_gsm8k_baseline": self.baseline, "05_contrastive_layers": self.layers,
                "06_steering": self.steering, "07_logit_lens": self.lens}
        return [f"{name[:2]} ({CHAPTERS[name]})" for name, value in have.items() if value is None]


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{path}: could not read the metrics ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise ModelCardError(f"{path}: expected a JSON object")
    return d


def read_run(root: Path) -> RunResults:
    """Read ``root`` (``outputs/<run>``): its ``params.yaml`` (required) and whatever metrics exist."""
    if not root.is_dir():
        raise ModelCardError(f"{root}: no such run folder (run the book first: python -m mechlib.book params/<run>.yaml)")
    params_file = root / "params.yaml"
    if not params_file.is_file():
        raise ModelCardError(f"{params_file} not found: not a run folder written by mechlib.book")
    params = load_params(params_file, run=root.name)
    m = root / "metrics"

    def read(name: str, cls: Any) -> Any:
        d = _load(m, name)
        return None if d is None else cls.read(d)

    layers = read("05_contrastive_layers", Layers)
    vec = root / "checkpoints" / f"steering_vec_L{layers.peak_layer}.pt" if layers and layers.peak_layer is not None \
        else None
    feats = m / f"contrastive_features_L{params.layer}.json"
    return RunResults(params, read("01_collect", Collected), read("02_train_sae", Trained),
                      read("03_evaluate_sae", Evaluated), read("04_gsm8k_baseline", Baseline), layers,
                      read("06_steering", Steering), read("07_logit_lens", Lens),
                      vec.name if vec is not None and vec.is_file() else None,
                      feats.name if feats.is_file() else None, (root / "browser" / "index.html").is_file())
