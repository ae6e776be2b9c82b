"""Held-out accuracy of a GRPO arm, before and after, decoded the same way.

Why: "the reward went up" says nothing about the held-out questions; chapter 08 compares each
arm's greedy answers with chapter 04's greedy answers to the *same* held-out questions. Both
must come from the same decoding, so the trained adapter is merged into a fresh base model and
the book's own :func:`mechlib.records.run_baseline` generates — same prompts, same stop rule,
same parser. Its records cache is keyed by the model's name, so the merged model is named after
the adapter's content hash: a retrained adapter can never pass off the old answers as its own.

Shortcut (``base_records``): after a few GRPO steps most greedy answers are the base model's, so
:func:`evaluate_arm_verified` first checks, in one teacher-forced forward of the merged model, which
base answers it would reproduce token for token (:mod:`mechlib.greedy_check`, the verification step
of speculative decoding); only the others are generated. Exact up to the float noise generation
already has between batch compositions.

The comparison is paired (each question answered before and after): Wilson intervals for the
two accuracies, the exact McNemar test on the questions that changed, and a paired bootstrap
interval for the change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mechlib.greedy_check import verify_records
from mechlib.grpo import ADAPTER_FILE
from mechlib.gsm8k import Question
from mechlib.io import sha256_file
from mechlib.models import LoadedModel
from mechlib.prompts import build_prompt
from mechlib.records import Record, open_records, run_baseline, settings_for, write_records
from mechlib.stats import BootstrapCI, bootstrap_ci, mcnemar_exact, wilson_ci
from mechlib.trainer_display import quiet_training


class GrpoEvalError(ValueError):
    """An adapter folder or a pair of record sets the evaluation cannot use; the message names it."""


def adapter_hash(adapter_dir: str | os.PathLike[str]) -> str:
    """The first 12 hex digits of the adapter weights' sha256 (what the merged model is named after)."""
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.is_file():
        raise GrpoEvalError(f"{adapter_dir} holds no {ADAPTER_FILE}: not a saved adapter")
    return sha256_file(path)[:12]


def merged_model(loaded_factory: Callable[[], LoadedModel], adapter_dir: str | os.PathLike[str]) -> LoadedModel:
    """A fresh base model with the adapter in ``adapter_dir`` merged into its weights (no peft layers
    left, so generation runs at the base model's speed), named ``<base>+lora:<adapter hash>``."""
    from peft import PeftModel  # heavy import, only when an adapter is evaluated

    tag = adapter_hash(adapter_dir)
    base = loaded_factory()
    with quiet_training():
        merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
    merged.eval().requires_grad_(False)
    return LoadedModel(
        model=merged,
        tokenizer=base.tokenizer,
        name=f"{base.name}+lora:{tag}",
        n_layers=base.n_layers,
        d_model=base.d_model,
    )


def evaluate_arm(
    loaded_factory: Callable[[], LoadedModel],
    adapter_dir: str | os.PathLike[str],
    questions: Sequence[Question],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    out_path: str | os.PathLike[str],
    progress: bool = True,
    *,
    base_records: Mapping[str, Record] | None = None,
) -> list[Record]:
    """Greedy answers of the arm's merged model to ``questions``, cached in ``out_path`` (JSONL).

    The same call as chapter 04's baseline (:func:`mechlib.records.run_baseline`), so "before" and
    "after" differ only in the weights; the cache is reused only for the same adapter content.
    With ``base_records`` (the base model's records by question id, same prompt format and
    ``max_new_tokens``) the base answers the merged model reproduces are verified, not generated
    (:func:`evaluate_arm_verified`, which also says how many).
    """
    if base_records is not None:
        return evaluate_arm_verified(
            loaded_factory,
            adapter_dir,
            questions,
            base_records,
            prompt_format,
            max_new_tokens,
            batch_size,
            out_path,
            progress=progress,
        ).records
    loaded = merged_model(loaded_factory, adapter_dir)
    return _generate(loaded, questions, prompt_format, max_new_tokens, batch_size, out_path, progress, adapter_dir)


@dataclass(frozen=True)
class EvalResult:
    """An arm's records (question order) and where each came from: the cache of an earlier call,
    a verified base answer, or generation."""

    records: list[Record]
    n_cached: int
    n_verified: int
    n_regenerated: int


def evaluate_arm_verified(
    loaded_factory: Callable[[], LoadedModel],
    adapter_dir: str | os.PathLike[str],
    questions: Sequence[Question],
    base_records: Mapping[str, Record],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    out_path: str | os.PathLike[str],
    progress: bool = True,
) -> EvalResult:
    """:func:`evaluate_arm`, generating only the answers the merged model does not reproduce.

    The records file keeps :func:`mechlib.records.run_baseline`'s format and cache key (the merged
    model's name holds the adapter hash): records cached for this adapter are reused as they are;
    the rest are checked against ``base_records`` (:func:`mechlib.greedy_check.verify_records`),
    the verified ones written to ``out_path``, and ``run_baseline`` — which then finds them there —
    generates the others.
    """
    loaded = merged_model(loaded_factory, adapter_dir)
    settings = settings_for(loaded, prompt_format, max_new_tokens)
    prompts = {q.id: build_prompt(loaded.tokenizer, q.question, prompt_format) for q in questions}
    if len(prompts) != len(questions):
        raise GrpoEvalError("question ids must be unique")
    done = open_records(out_path, settings, questions, prompts)
    todo = [q for q in questions if q.id not in done]
    verified = verify_records(loaded, todo, base_records, prompt_format, max_new_tokens, batch_size).records
    done.update(verified)
    write_records(out_path, [done[q.id] for q in questions if q.id in done])
    records = _generate(loaded, questions, prompt_format, max_new_tokens, batch_size, out_path, progress, adapter_dir)
    n_cached = len(questions) - len(todo)
    return EvalResult(records, n_cached, len(verified), len(todo) - len(verified))


def _generate(
    loaded: LoadedModel,
    questions: Sequence[Question],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    out_path: str | os.PathLike[str],
    progress: bool,
    adapter_dir: str | os.PathLike[str],
) -> list[Record]:
    """The book's greedy generation (chapter 04's call) for the questions ``out_path`` does not hold yet."""
    desc = f"evaluate {Path(adapter_dir).name}"
    return run_baseline(
        loaded, questions, prompt_format, max_new_tokens, batch_size, out_path, progress=progress, desc=desc
    )


@dataclass(frozen=True)
class AccuracyChange:
    """Paired accuracy before vs after on the same questions."""

    n: int
    k_before: int
    k_after: int
    ci_before: tuple[float, float]  # Wilson 95 %
    ci_after: tuple[float, float]
    b: int  # wrong before, right after
    c: int  # right before, wrong after
    p_mcnemar: float  # exact two-sided, from b and c
    change: BootstrapCI  # paired bootstrap of accuracy(after) − accuracy(before)

    @property
    def accuracy_before(self) -> float:
        return self.k_before / self.n

    @property
    def accuracy_after(self) -> float:
        return self.k_after / self.n


def compare_accuracy(
    before: Sequence[Record], after: Sequence[Record], n_bootstrap: int = 2000, seed: int = 0
) -> AccuracyChange:
    """Pair ``before`` and ``after`` by question id and compare their accuracies.

    Both must answer exactly the same questions (each once): a paired test on partly different
    questions would be wrong silently, so the error names the ids that differ.
    """
    by_before = {r.id: r for r in before}
    by_after = {r.id: r for r in after}
    if len(by_before) != len(before) or len(by_after) != len(after):
        raise GrpoEvalError("each question id must appear once in before and once in after")
    if by_before.keys() != by_after.keys():
        only_b = sorted(by_before.keys() - by_after.keys())
        only_a = sorted(by_after.keys() - by_before.keys())
        raise GrpoEvalError(
            f"before and after answer different questions: only before {only_b[:5]}, only after {only_a[:5]}"
        )
    if not by_before:
        raise GrpoEvalError("no records to compare")
    ids = [r.id for r in before]
    x = [by_before[i].correct for i in ids]
    y = [by_after[i].correct for i in ids]
    n, k_before, k_after = len(ids), sum(x), sum(y)
    b = sum(1 for xb, ya in zip(x, y) if not xb and ya)
    c = sum(1 for xb, ya in zip(x, y) if xb and not ya)
    return AccuracyChange(
        n=n,
        k_before=k_before,
        k_after=k_after,
        ci_before=wilson_ci(k_before, n),
        ci_after=wilson_ci(k_after, n),
        b=b,
        c=c,
        p_mcnemar=mcnemar_exact(b, c),
        change=bootstrap_ci(x, y, n_bootstrap=n_bootstrap, seed=seed),
    )
