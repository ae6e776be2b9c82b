"""A bounded reward from SAE features over a completion's answer tokens (chapter 08, issue 18).

Why: chapter 05 found SAE features whose activation differs between questions the model gets
right and wrong. This module turns them into a reward a GRPO trainer can optimise: a forward pass
over prompt + completion, the SAE's code at the **answer positions**, and per position a weighted,
saturating sum of the chosen features. Everything is chosen on the contrast set only (which
features, their weights, their caps), never on held-out questions.

Answer positions: the states from which each answer token is generated — the last prompt token
through the second-to-last completion token — so a completion of ``n`` tokens has ``n`` positions,
and the first is exactly chapter 05's last-prompt-token state. The last completion token's own
state generates nothing of the answer and is not read.

The formula, per position ``t`` and completion::

    r_t = sum_j w_j * min(a_tj / cap_j, 1)       sum_j |w_j| = 1, helpful w_j > 0, harmful w_j < 0
    R   = mean_t r_t                             (0.0 for a completion with no tokens)

Each term lies in ``[min(w_j, 0), max(w_j, 0)]``, so ``R`` lies in ``[sum of negative weights, sum
of positive weights]`` within ``[-1, 1]`` whatever the completion's length: repeating a token that
fires a helpful feature cannot raise the reward past the bound (the cap saturates the activation,
the mean removes the length). Caps are a quantile of each feature's positive activations on the
contrast completions, not the maximum, so one outlier does not make typical firing count for little.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import numpy as np
import torch

from mechlib.contrast import FeatureContrast, feature_rows, with_within_type_p
from mechlib.feature_codes import CompletionCode, FeatureRewardError, completion_codes
from mechlib.io import atomic_write_json, read_json
from mechlib.models import CausalLM, Tokenizer, d_model
from mechlib.sae.model import check_compatible

if TYPE_CHECKING:
    from mechlib.sae.model import TopKSAE

Weighting = Literal["equal", "d"]
WEIGHTINGS: tuple[Weighting, ...] = get_args(Weighting)
HookModel = Literal["base", "policy"]
HOOK_MODELS: tuple[HookModel, ...] = get_args(HookModel)


@dataclass(frozen=True)
class RewardFeature:
    """One SAE feature in the reward: signed weight (helpful > 0, harmful < 0) and saturation cap."""

    feature: int
    weight: float
    cap: float  # the activation at which this feature's contribution saturates

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
            raise FeatureRewardError(f"feature must be a non-negative int, got {self.feature!r}")
        if not math.isfinite(self.weight) or self.weight == 0.0:
            raise FeatureRewardError(f"feature {self.feature}: weight must be finite and non-zero, got {self.weight}")
        if not math.isfinite(self.cap) or self.cap <= 0.0:
            raise FeatureRewardError(f"feature {self.feature}: cap must be finite and > 0, got {self.cap}")


class RewardBound(NamedTuple):
    lo: float  # sum of the negative weights: every harmful feature saturated at every position
    hi: float  # sum of the positive weights: every helpful feature saturated, no harmful one firing


@dataclass(frozen=True)
class FeatureRewardSpec:
    """Everything that defines the reward apart from the SAE and the model; saved next to the run."""

    layer: int
    features: tuple[RewardFeature, ...]
    selection: str  # where the features were chosen (e.g. "chapter 05 last-prompt-token contrast")
    weighting: Weighting
    cap_quantile: float
    n_contrast: int  # contrast completions the caps were calibrated on

    def __post_init__(self) -> None:
        if not self.features:
            raise FeatureRewardError("a feature reward needs at least one feature")
        ids = [f.feature for f in self.features]
        if len(set(ids)) != len(ids):
            raise FeatureRewardError(f"features must be distinct, got {ids}")
        if self.weighting not in WEIGHTINGS:
            raise FeatureRewardError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not 0.0 < self.cap_quantile <= 1.0:
            raise FeatureRewardError(f"cap_quantile must be in (0, 1], got {self.cap_quantile}")
        if self.layer < 0 or self.n_contrast < 0:
            raise FeatureRewardError(f"layer and n_contrast must be >= 0, got {self.layer}, {self.n_contrast}")

    @property
    def bound(self) -> RewardBound:
        w = [f.weight for f in self.features]
        return RewardBound(sum(x for x in w if x < 0), sum(x for x in w if x > 0))

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureRewardSpec:
        raw = read_json(path)
        try:
            feats = tuple(
                RewardFeature(int(f["feature"]), float(f["weight"]), float(f["cap"])) for f in raw["features"]
            )
            return cls(
                int(raw["layer"]),
                feats,
                str(raw["selection"]),
                raw["weighting"],
                float(raw["cap_quantile"]),
                int(raw["n_contrast"]),
            )
        except (KeyError, TypeError) as exc:
            raise FeatureRewardError(f"{path}: not a feature-reward spec ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# Which features, with which weights
# --------------------------------------------------------------------------------------------


def load_contrastive_features(path: str | os.PathLike[str]) -> list[FeatureContrast]:
    """The ranked rows of chapter 05's ``metrics/contrastive_features_L{layer}.json``."""
    try:
        return [FeatureContrast(**row) for row in read_json(path)["features"]]
    except FileNotFoundError as exc:
        raise FeatureRewardError(f"{path} not found: run chapter 05 (contrastive layers) first") from exc
    except (KeyError, TypeError) as exc:
        raise FeatureRewardError(f"{path}: not a contrastive-features file ({type(exc).__name__}: {exc})") from exc


def select_features(
    rows: Sequence[FeatureContrast], n_helpful: int, n_harmful: int, weighting: Weighting = "equal"
) -> list[tuple[int, float]]:
    """``(feature, weight)`` of the top ``n_helpful`` rows with score > 0 and top ``n_harmful`` with score < 0.

    Rows are ranked by |score| (chapter 05's order; a side with fewer rows gives what it has).
    Weights are ±1 (``"equal"``) or ±|d| (``"d"``: Cohen's d, so a feature whose firing separates the
    groups more reliably counts more), then scaled so that sum |w| = 1: the reward's bound is then
    [-1, 1] whatever the number of features.
    """
    if weighting not in WEIGHTINGS:
        raise FeatureRewardError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if n_helpful <= 0 or n_harmful <= 0:
        raise FeatureRewardError(f"n_helpful and n_harmful must be >= 1, got {n_helpful}, {n_harmful}")
    ranked = sorted(rows, key=lambda r: -abs(r.score))
    helpful = [r for r in ranked if r.score > 0][:n_helpful]
    harmful = [r for r in ranked if r.score < 0][:n_harmful]
    for side, chosen in (("helpful (score > 0)", helpful), ("harmful (score < 0)", harmful)):
        if not chosen:
            raise FeatureRewardError(f"no {side} feature among the {len(rows)} contrast rows")
    pairs = [(r.feature, math.copysign(1.0 if weighting == "equal" else abs(r.d), r.score)) for r in helpful + harmful]
    pairs = [(j, w) for j, w in pairs if w != 0.0]  # d = 0: a feature constant in both groups
    total = sum(abs(w) for _, w in pairs)
    if total == 0.0:
        raise FeatureRewardError("every selected feature has Cohen's d = 0: no weights to give with weighting='d'")
    return [(j, w / total) for j, w in pairs]


def _mean_codes(codes: Sequence[CompletionCode]) -> tuple[np.ndarray, np.ndarray]:
    """(feature ids that fire anywhere, [n_codes, n_ids] mean-over-positions activations)."""
    ids = np.unique(np.concatenate([c.indices[c.values > 0].numpy() for c in codes] + [np.zeros(0, np.int64)]))
    means = np.zeros((len(codes), ids.size))
    for i, c in enumerate(codes):
        fired = c.values > 0
        np.add.at(means[i], np.searchsorted(ids, c.indices[fired].numpy()), c.values[fired].double().numpy())
        means[i] /= max(c.n_positions, 1)
    return ids, means


def rank_answer_features(
    codes: Sequence[CompletionCode],
    correct: Sequence[bool],
    top_n: int = 50,
    *,
    types: Sequence[Hashable] | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> list[FeatureContrast]:
    """Features ranked by |mean (over answer positions) activation, correct − wrong completions|.

    The alternative to chapter 05's last-prompt-token ranking: it reads the tokens the reward
    reads. Same row type and ranking as :func:`mechlib.contrast.rank_sae_features`, and like it, with
    ``types`` (each completion's question type), each row's within-type permutation p; a completion's
    fire rate counts it as firing when the feature fired at any of its answer positions.
    Completions with no tokens carry no activation and are left out.
    """
    if len(codes) != len(correct) or (types is not None and len(types) != len(codes)):
        n_types = "" if types is None else f", {len(types)} types"
        raise FeatureRewardError(
            f"need one label (and type) per completion, got {len(codes)} codes, {len(correct)} labels{n_types}"
        )
    keep = [i for i, c in enumerate(codes) if c.n_positions > 0]
    y = np.asarray(correct, dtype=bool)[keep]
    if y.sum() < 2 or (~y).sum() < 2:
        raise FeatureRewardError(f"need >= 2 correct and >= 2 wrong non-empty completions, got {y.sum()}, {(~y).sum()}")
    ids, acts = _mean_codes([codes[i] for i in keep])
    a, b = acts[y], acts[~y]
    order = [int(j) for j in np.argsort(-np.abs(a.mean(0) - b.mean(0)), kind="stable")[:top_n]]
    rows = feature_rows(a, b, order, [int(i) for i in ids])
    if types is None:
        return rows
    kept_types = [types[i] for i in keep]
    return with_within_type_p(rows, acts[:, order], y, kept_types, n_permutations=n_permutations, seed=seed)


class Calibration(NamedTuple):
    spec: FeatureRewardSpec
    dropped: tuple[int, ...]  # selected features that never fired on the contrast completions' answer tokens


def calibrate(
    selected: Sequence[tuple[int, float]],
    codes: Sequence[CompletionCode],
    *,
    layer: int,
    selection: str,
    weighting: Weighting,
    quantile: float = 0.9,
) -> Calibration:
    """Caps from the contrast completions' codes: cap_j = the ``quantile`` of feature j's positive activations.

    A selected feature that never fires at these answer positions cannot contribute and is dropped
    (``dropped`` says which); the remaining weights are renormalised to sum |w| = 1.
    """
    if not 0.0 < quantile <= 1.0:
        raise FeatureRewardError(f"quantile must be in (0, 1], got {quantile}")
    idx = torch.cat([c.indices.reshape(-1) for c in codes] + [torch.zeros(0, dtype=torch.long)])
    val = torch.cat([c.values.reshape(-1) for c in codes] + [torch.zeros(0)])
    caps: dict[int, float] = {}
    for j, _ in selected:
        fired = val[(idx == j) & (val > 0)].double().numpy()
        if fired.size:
            caps[j] = float(np.quantile(fired, quantile))
    kept = [(j, w) for j, w in selected if j in caps]
    if not kept:
        raise FeatureRewardError(f"none of the {len(selected)} selected features fires on the {len(codes)} completions")
    total = sum(abs(w) for _, w in kept)
    feats = tuple(RewardFeature(j, w / total, caps[j]) for j, w in kept)
    spec = FeatureRewardSpec(layer, feats, selection, weighting, quantile, len(codes))
    return Calibration(spec, tuple(j for j, _ in selected if j not in caps))


# --------------------------------------------------------------------------------------------
# Codes at the answer positions (mechlib.feature_codes, re-exported here), and the reward
# --------------------------------------------------------------------------------------------


def score_codes(spec: FeatureRewardSpec, codes: Sequence[CompletionCode]) -> np.ndarray:
    """The reward of each completion: mean over positions of sum_j w_j·min(a_tj / cap_j, 1) (0.0 if empty)."""
    feats = torch.tensor([f.feature for f in spec.features], dtype=torch.long)
    w = torch.tensor([f.weight for f in spec.features], dtype=torch.float64)
    cap = torch.tensor([f.cap for f in spec.features], dtype=torch.float64)
    out = np.zeros(len(codes))
    for i, c in enumerate(codes):
        if c.n_positions == 0:
            continue
        match = c.indices[..., None] == feats  # [T, k, F]: top-k ids are distinct, so at most one k per (t, j)
        a = (c.values.double()[..., None] * match).sum(1)  # [T, F] activation of each reward feature
        out[i] = float(((a / cap).clamp(max=1.0) @ w).mean())
    return out


@dataclass
class FeatureReward:
    """The feature reward as TRL's ``GRPOTrainer`` takes it in ``reward_funcs``.

    ``hook_model`` says which network reads the completion:

    - ``"base"``: the frozen base model. With a peft model (``disable_adapter()``) the forward runs
      with the adapters off — no second copy of the weights in memory. A fixed reward model over
      text: the SAE reads the distribution it was trained on, and the policy can raise the reward
      only by writing different text, not by moving its own internals.
    - ``"policy"``: the policy with its adapters on. This rewards the policy's *own* features — what
      "learning when to fire them" means — but as LoRA moves the representations the SAE drifts
      off its training distribution, and the reward can be gamed through representations that
      fire the features without the behaviour they stood for.

    ``model`` may be replaced after construction (e.g. by the trainer's peft model). The call runs
    in eval mode (no dropout) and restores the model's previous mode; hooks are always removed.
    """

    spec: FeatureRewardSpec
    sae: TopKSAE
    model: CausalLM
    tokenizer: Tokenizer
    batch_size: int = 16
    hook_model: HookModel = "base"

    def __post_init__(self) -> None:
        if self.hook_model not in HOOK_MODELS:
            raise FeatureRewardError(f"hook_model must be one of {', '.join(HOOK_MODELS)}, got {self.hook_model!r}")
        check_compatible(self.sae, d_model(self.model), self.spec.layer, source="feature reward SAE")
        too_big = [f.feature for f in self.spec.features if f.feature >= self.sae.d_sae]
        if too_big:
            raise FeatureRewardError(f"features {too_big} do not exist in an SAE with d_sae={self.sae.d_sae}")

    @property
    def __name__(self) -> str:  # TRL logs ``rewards/<__name__>/mean`` (the class keeps its own name)
        return "sae_features"

    def codes(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]] | None = None
    ) -> list[CompletionCode]:
        """:func:`completion_codes` on the network ``hook_model`` names, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            args = (self.model, self.tokenizer, self.sae, self.spec.layer, prompts, completions, completion_ids)
            disable = getattr(self.model, "disable_adapter", None) if self.hook_model == "base" else None
            if disable is None:
                return completion_codes(*args, batch_size=self.batch_size)
            with disable():
                return completion_codes(*args, batch_size=self.batch_size)
        finally:
            self.model.train(was_training)

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: object,  # TRL's dataset columns, trainer_state, log_extra, log_metric: not needed here
    ) -> list[float]:
        if any(not isinstance(x, str) for x in [*prompts, *completions]):
            raise FeatureRewardError("prompts and completions must be plain text (not conversational messages)")
        return [float(r) for r in score_codes(self.spec, self.codes(prompts, completions, completion_ids))]
