"""Chapter 08's GRPO arms: the same LoRA policy trained on correctness, on correctness + the feature
reward, and on the feature reward alone, with both rewards logged at every step of every arm.

Why this shape: reward hacking shows as the feature reward rising while correctness does not, so
each arm must *log* both rewards even when one of them carries weight 0 (TRL computes every
reward function and only weights them when it sums the advantages). Each arm starts from a fresh
base model and the same seeded adapter init, sees the same prompts in the same order, and differs
only in its reward weights — so the curves differ because of the reward, nothing else.

TRL's ``GRPOTrainer`` does the work (generation, group-normalised advantages, the clipped policy
loss); this module only builds its inputs, reads its log in one place (:func:`step_logs_from_history`)
into typed :class:`StepLog` rows, and saves the adapter atomically with a JSON of the run and every
sampled completion with both rewards (:mod:`mechlib.grpo_samples`), so a rerun with the same
settings, arm and prompts reloads instead of training again.
The held-out evaluation of a saved adapter lives in :mod:`mechlib.grpo_eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias, get_args

import torch
from torch import nn

from mechlib.answers import answers_match, extract_answer
from mechlib.grpo_samples import RewardFn, Sample, SampleRecorder, SamplesError, write_samples
from mechlib.io import read_json
from mechlib.models import LoadedModel, model_device
from mechlib.trainer_display import quiet_training, step_bar

ArmName = Literal["correctness", "correctness+feature", "feature"]
ARM_NAMES: tuple[ArmName, ...] = get_args(ArmName)
FeatureRewardFactory: TypeAlias = Callable[[nn.Module], RewardFn]  # called with the peft-wrapped policy
ARM_RUN_FILE = "arm_run.json"
ADAPTER_FILE = "adapter_model.safetensors"


class GrpoError(ValueError):
    """Settings, arms or prompts the GRPO run cannot use; the message names the value."""


@dataclass(frozen=True)
class GrpoSettings:
    """Everything one arm's training depends on besides its reward weights (hashed for resuming)."""

    steps: int = 4
    """Optimizer steps per arm; each step generates one fresh group batch."""
    prompts_per_step: int = 1
    """Distinct prompts per step (the batch holds ``prompts_per_step * num_generations`` completions)."""
    num_generations: int = 4
    """Completions per prompt: GRPO's group, whose mean reward is the baseline of the advantage."""
    max_completion_length: int = 48
    """Tokens generated per completion at most (generation dominates a CPU step's time)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA weights."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scale numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names that get an adapter (SmolLM2/Llama attention projections)."""
    temperature: float = 1.0
    """Sampling temperature of the completions (GRPO needs diverse groups; greedy gives zero advantage)."""
    beta: float = 0.0
    """KL penalty towards the base model; 0 skips the reference forward pass (cheaper on CPU)."""
    seed: int = 0
    """Seeds the adapter init, the prompt order and the sampling: identical for every arm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (TRL's default): saves memory on a large model on a GPU,
    costs a second forward; off for the small CPU runs."""

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "num_generations", "max_completion_length", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise GrpoError(f"GrpoSettings.{name} must be a whole number >= 1, got {value!r}")
        if self.num_generations < 2:
            raise GrpoError("GrpoSettings.num_generations must be >= 2 (a group of one has no advantage), got 1")
        if not self.learning_rate > 0 or not self.temperature > 0 or self.beta < 0:
            raise GrpoError(
                f"GrpoSettings needs learning_rate > 0, temperature > 0, beta >= 0; got "
                f"{self.learning_rate!r}, {self.temperature!r}, {self.beta!r}"
            )
        if not self.lora_targets:
            raise GrpoError("GrpoSettings.lora_targets must name at least one module")


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: which rewards drive the advantage (both are always computed and logged)."""

    name: ArmName
    correctness_weight: float
    feature_weight: float

    def __post_init__(self) -> None:
        if self.name not in ARM_NAMES:
            raise GrpoError(f"unknown arm {self.name!r}; choose one of {', '.join(ARM_NAMES)}")
        if self.correctness_weight < 0 or self.feature_weight < 0 or self.correctness_weight + self.feature_weight == 0:
            raise GrpoError(
                f"arm {self.name!r} needs weights >= 0, not both 0; got "
                f"{self.correctness_weight!r}, {self.feature_weight!r}"
            )

    @property
    def slug(self) -> str:
        """A folder name for the arm ("correctness+feature" → "correctness-feature")."""
        return self.name.replace("+", "-")


def standard_arms(feature_weight: float = 1.0) -> tuple[Arm, Arm, Arm]:
    """The chapter's three arms; ``feature_weight`` scales the feature reward in the mixed arm only
    (it sets how much the feature reward counts against one correct answer)."""
    return (
        Arm("correctness", 1.0, 0.0),
        Arm("correctness+feature", 1.0, feature_weight),
        Arm("feature", 0.0, 1.0),
    )


ARMS = standard_arms()


def correctness_reward(
    prompts: Sequence[str], completions: Sequence[str], gold: Sequence[float], **kwargs: Any
) -> list[float]:
    """1.0 when the completion's answer (the book's parser) matches the gold answer, else 0.0.

    ``gold`` is the dataset column of that name (TRL passes every column as a keyword); ``kwargs``
    takes the rest of what TRL passes (``completion_ids``, ``trainer_state``, ...).
    """
    return [1.0 if answers_match(extract_answer(c), g) else 0.0 for c, g in zip(completions, gold, strict=True)]


correctness_reward.__name__ = "correct"  # TRL logs it as "rewards/correct/mean"


@dataclass(frozen=True)
class StepLog:
    """One optimizer step as TRL logged it (means over that step's completions)."""

    step: int
    correct_mean: float
    feature_mean: float
    reward_mean: float  # the weighted sum the advantages were computed from
    completion_length: float  # tokens
    clipped_ratio: float  # fraction of completions cut at max_completion_length
    seconds: float


# TRL's log keys, named once: ``rewards/<reward __name__>/mean`` and its completion/timing stats.
_KEY_CORRECT = f"rewards/{correctness_reward.__name__}/mean"
_KEY_FEATURE = "rewards/sae_features/mean"
_KEY_REWARD = "reward"
_KEY_LENGTH = "completions/mean_length"
_KEY_CLIPPED = "completions/clipped_ratio"
_KEY_SECONDS = "step_time"


def step_logs_from_history(history: Sequence[Mapping[str, Any]]) -> list[StepLog]:
    """The per-step rows of ``trainer.state.log_history`` (the one place its keys are read).

    Rows without a reward (the final ``train_runtime`` summary) are skipped; a missing key in a
    step row is an error naming it, since a silently absent curve would look like a flat one.
    """
    out = []
    for row in history:
        if _KEY_REWARD not in row:
            continue
        missing = [k for k in (_KEY_CORRECT, _KEY_FEATURE, _KEY_LENGTH, _KEY_CLIPPED, _KEY_SECONDS) if k not in row]
        if missing:
            raise GrpoError(f"TRL's log at step {row.get('step')} lacks {', '.join(missing)} (got {sorted(row)})")
        out.append(
            StepLog(
                step=int(row["step"]),
                correct_mean=float(row[_KEY_CORRECT]),
                feature_mean=float(row[_KEY_FEATURE]),
                reward_mean=float(row[_KEY_REWARD]),
                completion_length=float(row[_KEY_LENGTH]),
                clipped_ratio=float(row[_KEY_CLIPPED]),
                seconds=float(row[_KEY_SECONDS]),
            )
        )
    return out


@dataclass(frozen=True)
class ArmRun:
    """One trained arm: its curves, where its adapter lies, and whether it was trained now or reloaded."""

    arm: Arm
    settings: GrpoSettings
    base_model: str
    key: str  # hash of settings, arm and prompts: a saved arm with the same key is reloaded
    steps: tuple[StepLog, ...]
    adapter_dir: str
    train_seconds: float
    resumed: bool = field(default=False, compare=False)

    def summary(self) -> dict[str, Any]:  # a JSON value; the one place the file's keys are written
        out = asdict(self)
        del out["resumed"]
        return out

    @classmethod
    def from_summary(cls, obj: Mapping[str, Any], adapter_dir: str) -> ArmRun:
        """The run saved by :meth:`summary`, marked as reloaded (``adapter_dir`` where it lies now)."""
        # imported here: mechlib.results imports this module (its FeatureRewardResult holds GrpoSettings)
        from mechlib.results.codec import ResultsError, read_dataclass

        try:
            run = read_dataclass(cls, {**obj, "adapter_dir": adapter_dir}, f"{adapter_dir}/{ARM_RUN_FILE}")
        except ResultsError as exc:
            raise GrpoError(f"not a saved arm run: {exc}") from exc
        return replace(run, resumed=True)


def run_key(
    settings: GrpoSettings, arm: Arm, prompts: Sequence[str], golds: Sequence[float | int], cache_tag: str = ""
) -> str:
    """What a saved arm must match to be reused: the settings, the arm's weights, the exact prompts/golds,
    and ``cache_tag`` (what the arguments cannot show, see :func:`train_arm`)."""
    blob = json.dumps(
        {
            "cache_tag": cache_tag,
            "settings": asdict(settings),
            "arm": asdict(arm),
            "prompts": list(prompts),
            "golds": [float(g) for g in golds],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_saved_arm(arm_dir: str | os.PathLike[str], key: str) -> ArmRun | None:
    """The arm saved in ``arm_dir`` if it is complete (adapter + JSON) and made with ``key``; else None."""
    arm_dir = Path(arm_dir)
    if not (arm_dir / ADAPTER_FILE).is_file() or not (arm_dir / ARM_RUN_FILE).is_file():
        return None
    try:
        obj = read_json(arm_dir / ARM_RUN_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        return None
    return ArmRun.from_summary(obj, str(arm_dir))


def _save_arm_atomically(model: nn.Module, run: ArmRun, arm_dir: Path, samples: Sequence[Sample] = ()) -> None:
    """Write the adapter, the run's JSON and the sampled completions into a temp folder next to
    ``arm_dir``, then rename it into place: a killed run leaves either the old arm or the new one,
    never half of one."""
    arm_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arm_dir.name}.", suffix=".tmp", dir=arm_dir.parent))
    try:
        model.save_pretrained(str(tmp))  # type: ignore[operator]  # a PeftModel: saves the adapter only
        (tmp / ARM_RUN_FILE).write_text(json.dumps(run.summary(), indent=1))
        write_samples(tmp, samples)
        if arm_dir.exists():
            old = arm_dir.with_name(f".{arm_dir.name}.old-{os.getpid()}")
            os.replace(arm_dir, old)
            os.replace(tmp, arm_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, arm_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_arm(
    loaded_factory: Callable[[], LoadedModel],
    arm: Arm,
    settings: GrpoSettings,
    prompts: Sequence[str],
    golds: Sequence[float | int],
    feature_reward_factory: FeatureRewardFactory,
    out_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    cache_tag: str = "",
) -> ArmRun:
    """Train one arm with TRL's GRPO on ``prompts`` (chat-templated text) and save its adapter.

    A fresh base model per arm (``loaded_factory()``), a LoRA adapter initialised under
    ``settings.seed`` (every arm starts from the same weights), rewards ``[correct, feature]``
    weighted by the arm. The feature reward is built by ``feature_reward_factory(policy)`` from the
    peft-wrapped policy, so it can read the frozen base through ``disable_adapter()`` without a
    second copy of the model. Saved to ``out_dir/<arm slug>/``; a complete saved arm with the same
    :func:`run_key` is reloaded instead (``ArmRun.resumed``). Neither the model factory nor the
    feature reward can be hashed, so ``cache_tag`` names them (e.g. the base model, the SAE
    checkpoint's hash and the chosen features): change it and the arm is trained again.
    """
    if len(prompts) != len(golds) or not prompts:
        raise GrpoError(f"need one gold per prompt and at least one prompt, got {len(prompts)} and {len(golds)}")
    key = run_key(settings, arm, prompts, golds, cache_tag)
    arm_dir = Path(out_dir) / arm.slug
    saved = load_saved_arm(arm_dir, key)
    if saved is not None:
        return saved

    from datasets import Dataset  # heavy imports, only when an arm is actually trained
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    loaded = loaded_factory()
    torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn here: the same init for every arm
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.lora_targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with quiet_training():
        policy = get_peft_model(loaded.model, lora)
        recorder = SampleRecorder(prompts)  # what each step sampled and how both rewards scored it
        feature_reward = recorder.wrap(feature_reward_factory(policy), "feature")
        # Any: TRL types a reward as returning list[float | None], and a list's item type is invariant
        reward_funcs: list[Any] = [recorder.wrap(correctness_reward, "correct"), feature_reward]
        dataset = Dataset.from_dict({"prompt": list(prompts), "gold": [float(g) for g in golds]})
        with tempfile.TemporaryDirectory(prefix="grpo-") as scratch:  # TRL needs an output_dir; nothing is kept
            config = GRPOConfig(
                output_dir=scratch,
                max_steps=settings.steps,
                per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
                gradient_accumulation_steps=1,
                num_generations=settings.num_generations,
                max_completion_length=settings.max_completion_length,
                temperature=settings.temperature,
                learning_rate=settings.learning_rate,
                beta=settings.beta,
                reward_weights=[arm.correctness_weight, arm.feature_weight],
                seed=settings.seed,
                use_cpu=model_device(loaded.model).type != "cuda",  # train where the params put the model
                bf16=False,  # TRL's default is bf16; the book's models run in their loaded dtype
                report_to=[],
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,  # its bar prints every log dict; _StepBar shows progress instead
                dataloader_num_workers=0,
                gradient_checkpointing=settings.gradient_checkpointing,
            )
            trainer = GRPOTrainer(
                model=policy,
                reward_funcs=reward_funcs,
                args=config,
                train_dataset=dataset,
                processing_class=loaded.tokenizer,
            )
            trainer.remove_callback(PrinterCallback)  # prints every step's 25-key log dict
            trainer.add_callback(
                step_bar(f"GRPO {arm.name}", disable=not progress, postfix=(_KEY_CORRECT, _KEY_FEATURE))
            )
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
        steps = step_logs_from_history(trainer.state.log_history)
    policy.eval()
    run = ArmRun(
        arm=arm,
        settings=settings,
        base_model=loaded.name,
        key=key,
        steps=tuple(steps),
        adapter_dir=str(arm_dir),
        train_seconds=seconds,
    )
    try:
        samples = recorder.samples()
    except SamplesError as exc:  # TRL called the rewards differently: keep the trained arm, say what is missing
        warnings.warn(f"GRPO {arm.name}: its sampled completions are not saved: {exc}", stacklevel=2)
        samples = []
    _save_arm_atomically(policy, run, arm_dir, samples)
    return run
