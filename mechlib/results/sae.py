"""Chapters 01–03: what was collected, how the SAE was trained, how good it is on held-out tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mechlib.results.codec import OMIT_NONE, Json, Record


@dataclass(frozen=True)
class Collected(Record):
    """``metrics/01_collect.json``: the residual stream collected after ``layer``."""

    FILE: ClassVar[str] = "01_collect"

    model: str
    layer: int
    d_model: int
    seq_len: int
    n_tokens: int  # training tokens (0 in collect_mode stream)
    finding: str
    heldout_tokens: int
    collect_mode: str  # disk | stream
    activation_dtype: str
    exclude_special_tokens: bool
    exclude_first_positions: int
    max_norm: float
    mean_norm: float
    bos_norm_ratio: float  # BOS norm / kept tokens' mean norm, same rows
    # timings (not checked): of this run's computed tokens; a resumed run keeps the first run's numbers
    model_load_s: float
    collect_s: float | None
    tokens_per_s: float | None


@dataclass(frozen=True)
class Trained(Record):
    """``metrics/02_train_sae.json``: the SAE trained (or loaded) by chapter 02.

    The training counters (``steps`` … ``dead_fraction_at_end``) exist only for a trained SAE,
    ``sae_pretrained`` and ``layer`` only for a loaded one; the file leaves out what does not apply.
    """

    FILE: ClassVar[str] = "02_train_sae"

    sae_source: str  # train | pretrained
    d_model: int
    d_sae: int
    k: int
    step_path: str  # reference | fast | none (pretrained)
    finding: str
    n_steps: int  # length of the training history
    final_batch_fvu: float | None
    n_dead_last_step: int | None
    checkpoint: str
    export: str
    train_config: dict[str, Json]
    steps: int | None = field(default=None, metadata=OMIT_NONE)
    tokens: int | None = field(default=None, metadata=OMIT_NONE)
    seconds: float | None = field(default=None, metadata=OMIT_NONE)
    resumed_from: int | None = field(default=None, metadata=OMIT_NONE)
    final_fvu: float | None = field(default=None, metadata=OMIT_NONE)
    dead_fraction_at_end: float | None = field(default=None, metadata=OMIT_NONE)
    sae_pretrained: str | None = field(default=None, metadata=OMIT_NONE)
    layer: int | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class CardSnippet(Record):
    """The card's usage snippet run on one held-out row, against mechlib's encoding."""

    n_tokens: int
    same_topk_fraction: float
    max_recon_diff: float
    max_activation_diff: float


@dataclass(frozen=True)
class Example(Record):
    activation: float
    token: str
    context: str  # up to a window of tokens before ``token``


@dataclass(frozen=True)
class FeatureExamples(Record):
    """One latent's top-activating held-out contexts."""

    feature: int
    frequency: float  # fraction of held-out tokens it fires on
    examples: list[Example]


@dataclass(frozen=True)
class Evaluated(Record):
    """``metrics/03_evaluate_sae.json``: held-out reconstruction, sparsity, PCA baseline, spliced loss."""

    FILE: ClassVar[str] = "03_evaluate_sae"

    var_explained: float  # per-dimension, held-out
    var_explained_global: float  # the seed's formula: 1 - mse / x.var()
    pca_var_explained: float
    mse: float
    l0: float
    coverage: float
    dead_fraction: float  # training counters if known, else never fired on held-out
    delta_ce_loss: float
    kl: float
    finding: str
    n_tokens: int
    never_fired_fraction: float
    var_explained_excl_outliers: float
    n_outlier_tokens: int
    outlier_norm_ratio: float
    pca_var_explained_excl_outliers: float
    dead_fraction_training_counters: float | None  # None for a pretrained SAE
    dead_fraction_source: str
    sae_beats_pca: bool
    pca_fit_on: str
    k: int
    d_sae: int
    layer: int
    sae_source: str
    formulas: dict[str, str]
    ce_clean: float
    ce_spliced: float
    ce_mean_ablation: float
    ce_loss_recovered: float | None
    ce_n_tokens: int
    card_snippet: CardSnippet | None  # None: the checkpoint is not a card-format .pt
    feature_examples: list[FeatureExamples]
