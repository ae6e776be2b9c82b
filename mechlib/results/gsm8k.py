"""Chapters 04, 05 and 07: the baseline, the contrastive layers, the logit lens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mechlib.records import GroupAccuracy
from mechlib.results.codec import Record, copy_fields, read_also
from mechlib.scoring import RuleAccuracy, ScoringRule
from mechlib.sensitivity import PeakUnderRule  # a row of scoring_sensitivity, as the chapter computes it
from mechlib.stats import finite_or_none
from mechlib.wrong_answers import WrongAnswers


@dataclass(frozen=True)
class Accuracy(Record):
    """Accuracy of a group of answers with its Wilson 95 % interval (None: the group is empty)."""

    n: int
    n_correct: int
    accuracy: float | None
    ci95: tuple[float, float]

    @classmethod
    def of(cls, a: RuleAccuracy | GroupAccuracy) -> Accuracy:
        """From a rule's or a group's accuracy (NaN, for a rule that keeps no answer, becomes None)."""
        return copy_fields(cls, a, accuracy=finite_or_none(a.accuracy), ci95=tuple(a.ci95))


@dataclass(frozen=True)
class RuleCount(Record):
    """How many answers one extraction rule read, and how many of those were right."""

    n: int
    n_correct: int


@dataclass(frozen=True)
class Baseline(Record):
    """``metrics/04_gsm8k_baseline.json``: one greedy answer per question, scored, and the split."""

    FILE: ClassVar[str] = "04_gsm8k_baseline"

    finding: str
    task: str
    prompt_format: str
    model: str
    max_new_tokens: int
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]
    truncated: float  # cut off at max_new_tokens
    finished: float  # ended by EOS or a '#### N' line
    stop_reasons: dict[str, int]
    unparsed: float
    parser_version: str
    by_scoring_rule: dict[ScoringRule, Accuracy]
    by_rule: dict[str, RuleCount]  # by extraction rule (hashes, answer_is, last_number)
    by_kind: dict[str, Accuracy]  # by question type
    contrast_ids: list[str]
    heldout_ids: list[str]
    generation_seconds: float
    # > 0: chapters 05-06 use seeded placeholder labels; files from before the option read as 0
    placeholder_labels: float = field(default=0.0, kw_only=True)
    # generated task: wrong answers by the operation written ([] for GSM8K and for files from before it)
    wrong_answers: list[WrongAnswers] = field(default_factory=list, kw_only=True)


@dataclass(frozen=True)
class Layers(Record):
    """``metrics/05_contrastive_layers.json``: Cohen's d per layer against permutation nulls.

    ``scoring_sensitivity`` holds :class:`mechlib.sensitivity.PeakUnderRule` rows (the primary rule first).
    ``top_abs_d[i]`` is layer i's mean of its ``top_d`` largest |d|. Files before the rename called it
    ``top10_abs_d`` whatever ``top_d`` was; they still read.
    """

    FILE: ClassVar[str] = "05_contrastive_layers"

    finding: str
    # parser | placeholder; files from before placeholder labels existed read as parser labels
    labels: str = field(default="parser", kw_only=True)
    placeholder_labels: float = field(default=0.0, kw_only=True)
    model: str
    pooling: str
    top_d: int
    n_permutations: int
    n_correct: int
    n_wrong: int
    n_heldout: int
    peak_layer: int
    top_abs_d: list[float] = field(metadata=read_also("top10_abs_d"))  # top10_abs_d: runs before the rename
    null_p: float
    null_p_mc_se: float
    null_p_layer: list[float]
    null_q50: list[float]
    null_q95: list[float]
    null_max_q50: float
    null_max_q95: float
    n_question_types: int
    null_p_within_type: float
    null_p_within_type_mc_se: float
    n_permutations_within_type: int
    scoring_sensitivity: list[PeakUnderRule]
    scoring_verdict: str
    null_max_q95_within_type: float
    spearman_rho: float | None
    spearman_p: float | None
    spearman_n: int
    # the same association with labels shuffled within question type; None: one type, or a file from before it
    spearman_p_within_type: float | None = field(default=None, kw_only=True)
    mean_resid_norm: list[float]  # per layer, over the contrast prompts' non-special tokens
    steering_vector: str  # relative to the run folder
    states_file: str
    sae_layer: int
    contrastive_features: str

    @property
    def n_layers(self) -> int:
        return len(self.top_abs_d)

    @property
    def peak_top_abs_d(self) -> float:
        return self.top_abs_d[self.peak_layer]


@dataclass(frozen=True)
class Lens(Record):
    """``metrics/07_logit_lens.json``: each layer's residual read through the final norm and unembedding."""

    FILE: ClassVar[str] = "07_logit_lens"

    model: str
    finding: str
    prompt: str
    input_tokens: list[str]
    n_layers: int
    english_threshold: float
    english_commitment_layer: int | None
    english_fraction: list[float]  # per layer
    top_tokens: list[list[str]]  # [layer][position]
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    softcap: float | None
