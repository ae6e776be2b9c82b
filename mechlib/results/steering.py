"""Chapter 06: the CAA sweep, its paired statistics, the card's hook check and the random-direction control.

The rows of the file are :class:`mechlib.steering.SteeringRow` flattened, with what each table adds
(cut-off rate; scoring rule and effect; random direction index, cosine and comparison with CAA):
:class:`ScaleRow` is ``SteeringRow`` as a result record (the fields are declared once, there), the
subclasses add their fields, so every row of the file reads back into one typed object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from mechlib.results.codec import Record, copy_fields
from mechlib.scoring import ScoringRule

# the domain rows whose fields these records share (no cycle: steering_rows imports no results module)
from mechlib.steering_rows import RecoveredOverlap, SteeringRow

if TYPE_CHECKING:  # the domain types these rows are made from (only named in signatures here)
    from mechlib.sensitivity import RowUnderRule
    from mechlib.steering_controls import RandomDirectionResult

Effect = Literal["helps", "harms", "no significant change"]  # mechlib.sensitivity.effect_of


@dataclass(frozen=True)
class ScaleRow(SteeringRow, Record):
    """One steering condition against the unsteered baseline, paired by question, as the metrics file holds it.

    Its fields are :class:`mechlib.steering.SteeringRow`'s, declared once there (the library computes the
    row; this class only adds the JSON reading and writing of :class:`Record`).
    """


@dataclass(frozen=True)
class SteeredRow(ScaleRow):
    """A row of the steering table: one scale along the CAA direction."""

    truncated: float  # fraction of its answers cut off at max_new_tokens

    @classmethod
    def of(cls, row: SteeringRow, truncated: float) -> SteeredRow:
        """From a :class:`mechlib.steering.SteeringRow` and that scale's cut-off rate."""
        return copy_fields(cls, row, truncated=truncated)


@dataclass(frozen=True)
class RuleRow(ScaleRow):
    """One scale's row recomputed under one scoring rule (``mechlib.sensitivity.RowUnderRule``)."""

    rule: ScoringRule
    effect: Effect

    @classmethod
    def of(cls, under: RowUnderRule) -> RuleRow:
        return copy_fields(cls, under.row, rule=under.rule, effect=under.effect)


@dataclass(frozen=True)
class ScaleVerdict(Record):
    """One scale under every scoring rule, with the generated sentence."""

    scale: float
    verdict: str
    rules: list[RuleRow]


@dataclass(frozen=True)
class Overlap(RecoveredOverlap, Record):
    """How far the recovered sets of two scales coincide: :class:`mechlib.steering.RecoveredOverlap` (its
    fields, declared once there) as a result record."""


@dataclass(frozen=True)
class CardHookSummary(Record):
    """The card's own hook on our vector file against mechlib's steered answers."""

    scale: float
    n: int
    n_equal: int
    n_steering_changed: int  # the check's power: answers steering changed


@dataclass(frozen=True)
class PairedCounts(Record):
    """CAA (a) against a random direction (b), same questions (``steering_controls.PairedComparison``)."""

    a_only: int
    b_only: int
    mcnemar_p: float


@dataclass(frozen=True)
class RandomDirection(ScaleRow):
    """One random direction pushed as hard as CAA at the control scale."""

    index: int
    cos_with_caa: float
    vs_caa: PairedCounts | None  # None when the CAA sweep did not include the control scale
    truncated: float

    @classmethod
    def of(cls, result: RandomDirectionResult) -> RandomDirection:
        vs = result.vs_caa
        return copy_fields(
            cls,
            result.row,
            index=result.index,
            cos_with_caa=result.cos_with_caa,
            truncated=result.truncated,
            vs_caa=None if vs is None else copy_fields(PairedCounts, vs),
        )


@dataclass(frozen=True)
class RandomControl(Record):
    scale: float
    seed: int
    caa_accuracy: float | None  # None when steering_scales lacks the control scale
    directions: list[RandomDirection]


@dataclass(frozen=True)
class Steering(Record):
    """``metrics/06_steering.json``: CAA at one layer on the held-out questions."""

    FILE: ClassVar[str] = "06_steering"

    finding: str
    # parser | placeholder; files from before placeholder labels existed read as parser labels
    labels: str = field(default="parser", kw_only=True)
    placeholder_labels: float = field(default=0.0, kw_only=True)
    layer: int
    peak_layer: int  # chapter 05's
    model: str
    mean_resid_norm: float  # the unit of the scales
    steering_vector: str  # relative to the run folder
    n_heldout: int
    baseline_accuracy: float
    baseline_ci95: tuple[float, float]
    n_bootstrap: int
    baseline_truncated: float
    rows: list[SteeredRow]
    overlaps: list[Overlap]
    card_hook_check: CardHookSummary
    scoring_sensitivity: list[ScaleVerdict]
    random_control: RandomControl
