"""The book's parameters: one typed schema, strict loading, clear errors.

Why: papermill only *warns* about parameters a notebook does not declare, so a misspelt key
in a params file would silently fall back to a default. ``load_params`` rejects unknown keys
(suggesting the close match), checks types, and validates ranges before any chapter runs.
Each chapter declares the subset it uses in its ``parameters`` cell; a test keeps those
defaults equal to the ones here. Reading the file (strict YAML, the type test of a value) is
:mod:`mechlib.params_load`'s, which needs no schema; its names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from mechlib.params_load import ParamsError, read_yaml, type_name, type_ok

# ParamsLoader is re-exported: mechlib.book_checks reads `-p` overrides with it
from mechlib.params_load import ParamsLoader as ParamsLoader
from mechlib.prompts import PROMPT_FORMATS

if TYPE_CHECKING:
    from mechlib.grpo import GrpoSettings
    from mechlib.sae.train import TrainConfig


ModelDtype = Literal["float32", "bfloat16", "float16", "auto"]
CollectMode = Literal["disk", "stream"]
ActivationDtype = Literal["float32", "bfloat16"]
SaeSource = Literal["train", "pretrained"]
Task = Literal["arithmetic", "gsm8k"]
PromptFormat = Literal["chat_template", "chat_oneshot", "gemma_manual"]  # == mechlib.prompts.PROMPT_FORMATS
ContrastPooling = Literal["last", "mean"]
RewardWeighting = Literal["equal", "d"]
RewardFeatures = Literal["chapter05", "answer_tokens"]
RewardHookModel = Literal["base", "policy"]
assert typing.get_args(PromptFormat) == PROMPT_FORMATS, "PromptFormat must list mechlib.prompts.PROMPT_FORMATS"


@dataclass(frozen=True)
class BookParams:
    """Every knob of a run. The YAML file is flat; the comments group the fields by chapter.

    A field typed ``Literal[...]`` accepts exactly those values (:data:`CHOICES` is derived from
    the hints). The SAE-training fields form the :class:`mechlib.sae.train.TrainConfig` section
    (:meth:`train_config`), the collection fields :class:`mechlib.activations.CollectConfig`.
    """

    # --- the run and the model -------------------------------------------------------
    run: str = "default"
    """Output folder name: ``outputs/<run>/``."""
    seed: int = 0
    """Seed of the SAE init and data order, permutations, bootstrap and random controls."""
    model: str = "embedded:smollm2-135m-instruct"
    """The embedded GGUF, ``random:<arch>[:<seed>]``, a Hugging Face hub id, or a local path."""
    model_dtype: ModelDtype = "float32"
    """The model's weights dtype (``auto``: the checkpoint's stored dtype on any device; float32 for ``random:``)."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    # --- 01 collect --------------------------------------------------------------------
    layer: int = 15
    """Residual stream *after* this decoder layer (0-based)."""
    corpus: str = "python-stdlib-docs"
    """``python-stdlib-docs``, ``hf:<dataset id>``, or a local ``.txt`` / ``.jsonl`` path."""
    corpus_config: str | None = None
    """The dataset's config name (``hf:`` corpora)."""
    corpus_split: str = "train"
    """The dataset's split (``hf:`` corpora); the book's train/heldout split is by document."""
    corpus_text_field: str = "text"
    """The text field of a dataset row or ``.jsonl`` line."""
    seq_len: int = 128
    """Tokens per packed row."""
    collect_tokens: int = 100_000
    """Kept tokens collected for SAE training (``collect_mode: disk``)."""
    heldout_tokens: int = 8_192
    """Kept tokens collected from held-out documents (chapter 03)."""
    collect_batch_size: int = 16
    """Packed rows per forward pass."""
    shard_tokens: int = 65_536
    """Tokens per shard file (rounded down to whole rows)."""
    exclude_special_tokens: bool = True
    """Leave out BOS/EOS/pad and every other special token."""
    exclude_first_positions: int = 2
    """Also drop positions 0..N-1 of each packed row (BOS + attention-sink token)."""
    collect_mode: CollectMode = "disk"
    """``disk``: shards written by chapter 01; ``stream``: the model runs inside SAE training."""
    activation_dtype: ActivationDtype = "float32"
    """The dtype of the on-disk shards."""
    # --- 02 train SAE (the TrainConfig section) ------------------------------------------
    sae_source: SaeSource = "train"
    """Train the SAE here, or load ``sae_pretrained``."""
    sae_pretrained: str = ""
    """A local ``sae_final.pt`` or SAELens/sparsify folder, or ``hf:<owner>/<repo>[@<revision>][/<path>]``."""
    d_sae: int = 4608
    """Number of SAE latents."""
    k: int = 32
    """Active latents per token (TopK)."""
    k_aux: int = 256
    """AuxK: dead latents that reconstruct the residual (0: no AuxK)."""
    aux_coef: float = 0.125
    """Weight of the AuxK loss."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    lr_floor: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    train_batch_size: int = 1024
    """Tokens per SAE step."""
    train_tokens: int = 300_000
    """Tokens the SAE trains on (epochs cycle over the collection)."""
    renorm_every: int = 10
    """Steps between decoder-row renormalisations."""
    dead_tokens: int = 100_000
    """A latent is dead after this many tokens without firing."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints."""
    # --- 03 evaluate SAE ---------------------------------------------------------------
    eval_ce_tokens: int = 2048
    """Tokens for the spliced next-token loss / KL."""
    n_feature_examples: int = 4
    """Features shown with their top contexts in chapter 03."""
    browser_max_latents: int = 512
    """Latents that get a page of their own in the feature browser (all are in its index)."""
    browser_contexts: int = 10
    """Top-activating contexts kept per latent page."""
    # --- 04 GSM8K baseline / tasks -----------------------------------------------------
    task: Task = "arithmetic"
    """The generated arithmetic word problems, or GSM8K."""
    gsm8k_path: str = ""
    """``""``: the hub (openai/gsm8k, main); else a folder or ``.jsonl``."""
    gsm8k_split: str = "test"
    """GSM8K split."""
    n_questions: int = 200
    """Questions asked in chapters 04-06."""
    n_heldout: int = 50
    """Of those, held out from the contrast (steering is scored on them)."""
    prompt_format: PromptFormat = "chat_oneshot"
    """How a question becomes a prompt (:mod:`mechlib.prompts`)."""
    max_new_tokens: int = 48
    """Generation budget per answer."""
    gen_batch_size: int = 32
    """Prompts generated at once."""
    placeholder_labels: float = 0.0
    """0 (off): correctness is the parser's. A fraction f in (0, 1): chapters 05-06 use seeded placeholder
    labels (f of the questions marked correct; :mod:`mechlib.placeholder`) and mark every output placeholder,
    for random-weight models (``random:<arch>``), which answer nothing correctly."""
    # --- 05 contrastive layers ---------------------------------------------------------
    n_permutations: int = 1000
    """The minimum: more are drawn while p is within its Monte-Carlo error of 0.05."""
    top_d: int = 10
    """Dimensions with the largest |d| reported per layer."""
    contrast_pooling: ContrastPooling = "last"
    """``last``: the last prompt token; ``mean``: the mean over the prompt's non-special tokens."""
    # --- 06 steering -------------------------------------------------------------------
    steering_layer: int | None = None
    """``None``: the peak layer from 05."""
    steering_scales: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.10, 0.15, -0.05])
    """Steering strengths as fractions of the mean residual norm at the layer."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the accuracy-difference intervals."""
    n_random_directions: int = 2
    """Random unit directions swept at ``random_control_scale`` (0: no control)."""
    random_control_scale: float = 0.10
    """The control's scale, same unit as ``steering_scales``."""
    # --- 07 logit lens -----------------------------------------------------------------
    lens_prompt: str = "The capital of France is Paris. The capital of Germany is"
    """The prompt read layer by layer."""
    english_threshold: float = 0.5
    """Share of top-1 tokens that are English words for a layer to count as committed."""
    # --- 08 feature reward (Stage Gate 1 and GRPO) --------------------------------------
    reward_helpful: int = 8
    """Helpful SAE features (more active on correct answers) the reward adds."""
    reward_harmful: int = 8
    """Harmful SAE features (more active on wrong answers) the reward subtracts."""
    reward_weighting: RewardWeighting = "equal"
    """Feature weights: ``equal``, or proportional to |Cohen's d| on the contrast set (sum |w| = 1 either way)."""
    reward_cap_quantile: float = 0.9
    """A feature's contribution saturates at this quantile of its contrast-set activations (bounds the reward)."""
    reward_features: RewardFeatures = "chapter05"
    """Which selection GRPO trains with: chapter 05's prompt-state features, or features ranked on answer tokens."""
    reward_hook_model: RewardHookModel = "base"
    """The model whose layer the reward reads: the frozen ``base`` model, or the ``policy`` being trained."""
    grpo_steps: int = 2
    """GRPO optimiser steps per arm (all arms take the same)."""
    grpo_prompts_per_step: int = 1
    """Distinct training questions per step."""
    grpo_generations: int = 4
    """Completions sampled per question (the group GRPO compares within; at least 2)."""
    grpo_max_completion_length: int = 48
    """Token budget of a sampled completion."""
    grpo_learning_rate: float = 2e-4
    """LoRA learning rate."""
    grpo_lora_r: int = 8
    """LoRA rank (alpha = 2 r) on the attention projections."""
    grpo_temperature: float = 0.7
    """Sampling temperature of the completions (0.7: the small model gets some samples right, so correctness
    varies within a group and gives GRPO a signal; at 1.0 it rarely does)."""
    grpo_feature_weight: float = 0.5
    """Weight of the feature reward next to correctness (weight 1) in the mixed arm."""
    grpo_gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less GPU memory on a large model, a second forward's time."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        """The SAE-training section of these params (what chapter 02 and ``mechlib.scale train`` train with)."""
        from mechlib.sae.train import TrainConfig  # cycle: TrainConfig takes its defaults from this class

        return TrainConfig.from_params(self)

    def grpo_settings(self) -> GrpoSettings:
        """Chapter 08's GRPO section of these params (LoRA alpha = 2 r; the run's seed)."""
        from mechlib.grpo import GrpoSettings  # heavy (torch), and only chapter 08 needs it

        return GrpoSettings(
            steps=self.grpo_steps,
            prompts_per_step=self.grpo_prompts_per_step,
            num_generations=self.grpo_generations,
            max_completion_length=self.grpo_max_completion_length,
            learning_rate=self.grpo_learning_rate,
            lora_r=self.grpo_lora_r,
            lora_alpha=2 * self.grpo_lora_r,
            temperature=self.grpo_temperature,
            seed=self.seed,
            gradient_checkpointing=self.grpo_gradient_checkpointing,
        )


_FIELDS = {f.name: f for f in dataclasses.fields(BookParams)}
_HINTS = typing.get_type_hints(BookParams, localns={"TrainConfig": object, "GrpoSettings": object})

# The allowed values of every Literal-typed field, read from the type hints (one list of choices).
CHOICES: dict[str, tuple[str, ...]] = {
    name: typing.get_args(hint) for name, hint in _HINTS.items() if typing.get_origin(hint) is Literal
}

POSITIVE_INTS = (
    "seq_len",
    "collect_tokens",
    "heldout_tokens",
    "collect_batch_size",
    "shard_tokens",
    "d_sae",
    "k",
    "train_batch_size",
    "train_tokens",
    "renorm_every",
    "dead_tokens",
    "checkpoint_every",
    "eval_ce_tokens",
    "n_questions",
    "n_heldout",
    "max_new_tokens",
    "gen_batch_size",
    "n_permutations",
    "top_d",
    "n_bootstrap",
    "browser_max_latents",
    "browser_contexts",
    "reward_helpful",
    "reward_harmful",
    "grpo_steps",
    "grpo_prompts_per_step",
    "grpo_max_completion_length",
    "grpo_lora_r",
)

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def known_keys() -> list[str]:
    return list(_FIELDS)


def validate(values: dict[str, Any], source: str = "params") -> BookParams:
    """Check keys, types and ranges; return the filled-in :class:`BookParams`."""
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: expected a mapping of parameter names to values, got {type(values).__name__}")
    for key in values:
        if not isinstance(key, str) or key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ParamsError(f"{source}: unknown parameter '{key}'.{hint}")
    for key, value in values.items():
        if not type_ok(value, _HINTS[key]):
            raise ParamsError(
                f"{source}: parameter '{key}' must be {type_name(_HINTS[key])}, got {value!r} ({type(value).__name__})"
            )
    coerced = {k: (float(v) if _HINTS[k] is float else v) for k, v in values.items()}
    params = BookParams(**cast(dict[str, Any], coerced))  # each value was checked against its field's hint above
    _check_ranges(params, source)
    return params


def _check_ranges(p: BookParams, source: str) -> None:
    for key in _HINTS:
        value = getattr(p, key)
        floats = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in floats):
            raise ParamsError(f"{source}: '{key}' must be a finite number, got {value!r}")
    for key, allowed in CHOICES.items():
        if getattr(p, key) not in allowed:
            raise ParamsError(f"{source}: '{key}' must be one of {', '.join(allowed)}; got {getattr(p, key)!r}")
    for key in POSITIVE_INTS:
        if getattr(p, key) <= 0:
            raise ParamsError(f"{source}: '{key}' must be positive, got {getattr(p, key)}")
    if not DEVICE_PATTERN.fullmatch(p.device):
        raise ParamsError(f"{source}: 'device' must be auto, cpu, cuda, cuda:N or mps; got {p.device!r}")
    if p.layer < 0:
        raise ParamsError(f"{source}: 'layer' must be >= 0, got {p.layer}")
    if p.steering_layer is not None and p.steering_layer < 0:
        raise ParamsError(
            f"{source}: 'steering_layer' must be >= 0 or null (the peak layer from 05), got {p.steering_layer}"
        )
    if not p.steering_scales:
        raise ParamsError(f"{source}: 'steering_scales' must list at least one scale, got []")
    if not 0 <= p.exclude_first_positions < p.seq_len:
        raise ParamsError(
            f"{source}: 'exclude_first_positions' must be in 0..seq_len-1 ({p.seq_len - 1}), "
            f"got {p.exclude_first_positions}"
        )
    if not 0 < p.k < p.d_sae:
        raise ParamsError(f"{source}: need 0 < k < d_sae, got k={p.k}, d_sae={p.d_sae}")
    if p.n_random_directions < 0:
        raise ParamsError(f"{source}: 'n_random_directions' must be >= 0, got {p.n_random_directions}")
    if p.n_random_directions and p.random_control_scale == 0:
        raise ParamsError(f"{source}: 'random_control_scale' must be non-zero (a zero push is no control)")
    if not (p.placeholder_labels == 0 or 0 < p.placeholder_labels < 1):
        raise ParamsError(
            f"{source}: 'placeholder_labels' must be 0 (off) or a fraction in (0, 1) of questions "
            f"marked correct, got {p.placeholder_labels}"
        )
    if p.k_aux < 0:
        raise ParamsError(f"{source}: 'k_aux' must be >= 0, got {p.k_aux}")
    if p.n_heldout >= p.n_questions:
        raise ParamsError(f"{source}: 'n_heldout' ({p.n_heldout}) must be smaller than 'n_questions' ({p.n_questions})")
    if p.lr <= 0 or p.lr_floor < 0 or p.lr_floor > p.lr:
        raise ParamsError(f"{source}: need 0 <= lr_floor <= lr and lr > 0, got lr={p.lr}, lr_floor={p.lr_floor}")
    if p.sae_source == "pretrained" and not p.sae_pretrained:
        raise ParamsError(f"{source}: sae_source is 'pretrained' but 'sae_pretrained' is empty")
    if not 0 < p.reward_cap_quantile <= 1:
        raise ParamsError(f"{source}: 'reward_cap_quantile' must be in (0, 1], got {p.reward_cap_quantile}")
    if p.grpo_generations < 2:
        raise ParamsError(f"{source}: 'grpo_generations' must be >= 2 (GRPO compares completions of a question)")
    if p.grpo_learning_rate <= 0 or p.grpo_temperature <= 0 or p.grpo_feature_weight < 0:
        raise ParamsError(
            f"{source}: need grpo_learning_rate > 0, grpo_temperature > 0 and grpo_feature_weight >= 0, got "
            f"{p.grpo_learning_rate}, {p.grpo_temperature}, {p.grpo_feature_weight}"
        )
    if not p.run or "/" in p.run or p.run.startswith("."):
        raise ParamsError(f"{source}: 'run' must be a plain folder name, got {p.run!r}")


def load_params(path: str | os.PathLike[str], run: str | None = None) -> BookParams:
    """Read a params YAML file. The run name is ``run`` if given, else the file's ``run``, else its stem."""
    path = Path(path)
    values = read_yaml(path)
    values = {} if values is None else values
    if isinstance(values, dict):
        values.setdefault("run", path.stem)
        if run is not None:
            values["run"] = run
    return validate(values, source=str(path))


def from_namespace(namespace: dict[str, Any]) -> BookParams:
    """Validate the parameters a chapter declared (and papermill injected) in its namespace.

    Only names that are schema keys are taken; everything else in ``globals()`` is ignored.
    Keys the chapter did not declare keep the schema defaults.
    """
    values = {k: namespace[k] for k in _FIELDS if k in namespace}
    return validate(values, source=f"chapter parameters (run={values.get('run', 'default')!r})")
