"""Chapter 08: the SAE-feature reward, its Stage Gate 1 readouts, and the three GRPO arms.

The rows are the domain types themselves where they are already frozen dataclasses of JSON-able
fields (:class:`mechlib.feature_reward.RewardFeature`, :class:`mechlib.readouts.ReadoutScore`,
:class:`mechlib.grpo.StepLog`, :class:`mechlib.grpo.GrpoSettings`,
:class:`mechlib.grpo_eval.AccuracyChange`), so what the chapter computed is what the file holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from mechlib.feature_reward import RewardFeature
from mechlib.grpo import GrpoSettings, StepLog
from mechlib.grpo_eval import AccuracyChange
from mechlib.readouts import ReadoutScore
from mechlib.results.codec import OMIT_NONE, Record


class Trend(NamedTuple):
    """How an arm's logged feature reward moved with the step: Spearman ρ, and the one-sided p of a rise."""

    rho: float
    p: float


@dataclass(frozen=True)
class ArmResult(Record):
    """One GRPO arm: its reward weights, the per-step training log, and held-out accuracy before → after."""

    arm: str  # correctness | correctness+feature | feature
    correctness_weight: float
    feature_weight: float
    steps: list[StepLog]
    train_seconds: float
    resumed: bool  # reloaded from a saved adapter with the same settings, not trained in this run
    adapter: str  # the LoRA adapter's folder, relative to the run
    heldout: AccuracyChange  # chapter 04's greedy answers (before) vs the adapted model's (after), paired
    records: str  # the adapted model's held-out answers (JSONL), relative to the run
    n_changed: int  # held-out answers whose text the adapter changed
    hacking: bool | None  # feature reward rose significantly while held-out accuracy did not; None: cannot tell
    # Spearman ρ of the logged feature reward with the step, and its one-sided p for a rise (None: no trend)
    feature_trend_rho: float | None = field(default=None, kw_only=True)
    feature_trend_p: float | None = field(default=None, kw_only=True)
    # every sampled completion with both rewards (JSONL, relative to the run); None: an arm saved before they were
    samples: str | None = field(default=None, kw_only=True, metadata=OMIT_NONE)

    @property
    def trend(self) -> Trend | None:
        """``feature_trend_rho`` and ``_p`` as one value; None where no trend was computed."""
        if self.feature_trend_rho is None or self.feature_trend_p is None:
            return None
        return Trend(self.feature_trend_rho, self.feature_trend_p)


@dataclass(frozen=True)
class GateInputs(Record):
    """What Stage Gate 1 scored, one entry per held-out answer.

    Why saved: the SAE readouts need the model, the SAE and a forward pass over every answer to
    recompute, so without these a reader could not recheck one AUROC, ρ or permutation p of the gate
    from the run's files. With them, every row of ``stage_gate`` is a few lines of scipy away.
    """

    ids: list[str]  # the held-out question ids, in the order of each score list
    correct: list[bool]  # the labels the gate scored (placeholder labels when the run uses them)
    scores: list[list[float]]  # scores[r][i]: the readout of stage_gate[r] on the answer to ids[i]
    # each question's type (p_within_type shuffles labels within them); [] in files from before it
    types: list[str] = field(default_factory=list, kw_only=True)


@dataclass(frozen=True)
class FeatureRewardResult(Record):
    """``metrics/08_feature_reward.json``."""

    FILE: ClassVar[str] = "08_feature_reward"

    finding: str
    labels: str  # parser | placeholder
    placeholder_labels: float
    model: str
    layer: int  # the SAE's layer, where the reward reads the residual stream
    hook_model: str  # base | policy: whose residual stream the reward reads during GRPO
    reward_features: str  # chapter05 | answer_tokens: the selection GRPO trained with
    weighting: str
    cap_quantile: float
    features: list[RewardFeature]  # the trained-with selection, after calibration
    dropped: list[int]  # selected features that never fired on the contrast answers
    bound: tuple[float, float]  # every completion's reward lies in [lo, hi]
    spec_file: str
    n_contrast: int
    n_heldout: int
    stage_gate: list[ReadoutScore]  # the feature rewards first, then the simpler readouts
    stage_gate_verdict: str
    grpo: GrpoSettings
    arms: list[ArmResult]
    training_verdict: str
    # None in files written before they were saved
    gate_inputs: GateInputs | None = field(default=None, kw_only=True, metadata=OMIT_NONE)
    other_spec_file: str | None = field(default=None, kw_only=True, metadata=OMIT_NONE)  # the untrained selection
