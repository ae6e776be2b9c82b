"""One pooled hidden state per question at every decoder layer, in one forward pass (chapter 05's input).

Which states: the **output of each decoder layer** (the residual stream after layer ``i``,
0-based — the same convention as the SAE ``layer`` and the steering hook), captured with forward
hooks. Not ``output_hidden_states``: its last entry is the *final-normed* stream (Gemma 4, Qwen 3.5
and Llama alike), which is on another scale than the others. The forward stops after the last
layer (no final norm, no ``lm_head`` over a 262 k vocabulary).

Which positions (``pooling``): ``"last"`` — the last prompt token, the state from which the first
answer token is generated; or ``"mean"`` — the mean over the prompt's non-special tokens. The same
pass also records each layer's mean token norm ``‖h‖₂`` over non-special prompt tokens, the scale
the steering chapter expresses its perturbations in.

Also here: chapter 04's correct/wrong split as chapter 05 reads it (:class:`BaselineSplit`), and the
states' cache on disk, keyed by the prompts, the model and the run settings. The statistics over these
states live in :mod:`mechlib.contrast`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlib.generate import left_pad
from mechlib.gsm8k import Question
from mechlib.hooks import LayerOutput, StopForward, layer_output_tensor
from mechlib.io import atomic_torch_save, read_json
from mechlib.kv_cache import copy_for_batch, usable_prefix_len
from mechlib.models import CausalLM, Tokenizer, decoder_layers, load_model, model_device, text_config
from mechlib.prompts import encode_prompts, padding_id
from mechlib.records import Record, load_records

if TYPE_CHECKING:
    from transformers import DynamicCache


Pooling = Literal["last", "mean"]
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
Encoder = Callable[["Tokenizer", Sequence[str]], dict[str, Tensor]]  # tokenizer, prompts → input_ids, attention_mask


class ContrastError(ValueError):
    """Input the contrast analysis cannot use; the message names the value or file."""


@dataclass
class LayerStates:
    """Pooled states ``[n, L, D]`` (float32, CPU) for questions ``ids``, plus per-layer token norms."""

    ids: list[str]
    states: Tensor  # [n, L, D]
    token_norm_mean: Tensor  # [L]: mean ‖h‖₂ over non-special prompt tokens of all n prompts
    pooling: Pooling
    model: str
    prompts_sha: str = ""  # sha256 of the prompts: a cache made from other prompts is stale
    settings: str = ""  # how the model ran (dtype, device): other numerics make the cache stale

    @property
    def n_layers(self) -> int:
        return int(self.states.shape[1])

    def select(self, ids: Sequence[str]) -> Tensor:
        """States ``[len(ids), L, D]`` of the given question ids, in that order."""
        where = {q: i for i, q in enumerate(self.ids)}
        missing = [q for q in ids if q not in where]
        if missing:
            raise ContrastError(f"no collected states for question ids {missing[:5]}{' …' if len(missing) > 5 else ''}")
        return self.states[[where[q] for q in ids]]


@dataclass(frozen=True)
class BaselineSplit:
    """Chapter 04's fixed-seed split and per-question records, as chapter 05/06 need them."""

    contrast_ids: list[str]
    heldout_ids: list[str]
    prompts: dict[str, str]  # id → the exact prompt text that was generated from
    correct: dict[str, bool]  # id → baseline correctness (primary rule)
    records: dict[str, Record]  # id → the baseline record, re-scored on load

    def labels(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([self.correct[i] for i in ids], dtype=bool)

    def kinds(self, ids: Sequence[str]) -> list[str]:
        """Each question's type (:attr:`mechlib.records.Record.kind`), for tests within question types."""
        return [self.records[i].kind for i in ids]


def load_baseline_split(metrics_path: str | os.PathLike[str], records_path: str | os.PathLike[str]) -> BaselineSplit:
    """Read ``metrics/04_gsm8k_baseline.json`` (``contrast_ids``, ``heldout_ids``) and the baseline
    records JSONL, re-scored with the current parser (a parser fix never leaves stale labels)."""
    metrics_path, records_path = Path(metrics_path), Path(records_path)
    for f in (metrics_path, records_path):
        if not f.is_file():
            raise ContrastError(f"{f} not found: run chapter 04 (the baseline) first")
    m = read_json(metrics_path)
    missing = {"contrast_ids", "heldout_ids"} - set(m)
    if missing:
        raise ContrastError(f"{metrics_path}: lacks keys {sorted(missing)}")
    records = load_records(records_path)
    prompts = {str(r.id): r.prompt for r in records}
    correct = {str(r.id): bool(r.correct) for r in records}
    split = BaselineSplit(
        [str(i) for i in m["contrast_ids"]],
        [str(i) for i in m["heldout_ids"]],
        prompts,
        correct,
        {str(r.id): r for r in records},
    )
    absent = [i for i in split.contrast_ids + split.heldout_ids if i not in prompts]
    if absent:
        raise ContrastError(f"{records_path}: no record for question ids {absent[:5]} (rerun chapter 04)")
    return split


def match_questions(questions: Sequence[Question], split: BaselineSplit) -> BaselineSplit:
    """``split`` with each matched record's ``source`` taken from its question; raise if a question's
    text is not in chapter 04's recorded prompt for the same id.

    Why: chapters 05/06 re-load the questions (for their types, or to generate again) and pair
    them with chapter 04's records by id. If the task generator or the data changed since 04 ran,
    the same id names another question and every comparison would silently be wrong. Once matched,
    the question types come from one place, :meth:`BaselineSplit.kinds`, in every chapter; records
    written before they carried a ``source`` get it back here. Labels are kept as they are
    (placeholder labels included): only the source is copied.
    """
    bad = [q.id for q in questions if str(q.id) in split.prompts and q.question not in split.prompts[str(q.id)]]
    if bad:
        raise ContrastError(
            f"chapter 04's records were made from other questions than the task now gives "
            f"(ids {bad[:3]}{' …' if len(bad) > 3 else ''}); rerun chapter 04 for this run"
        )
    records = dict(split.records)
    for q in questions:
        r = records.get(str(q.id))
        if r is not None and r.source != q.source:
            records[str(q.id)] = dataclasses.replace(r, source=q.source)
    return dataclasses.replace(split, records=records)


def encode_for_states(tokenizer: Tokenizer, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Token ids exactly as generation builds them (:func:`mechlib.prompts.encode_prompts`, no
    second BOS), left-padded. The pad id is irrelevant: padded positions are masked out."""
    input_ids, mask = left_pad(encode_prompts(tokenizer, prompts), padding_id(tokenizer), torch.device("cpu"))
    return {"input_ids": input_ids, "attention_mask": mask}


class _SharedPrefixStates:
    """The prompts' common prefix, run through the model once for :func:`collect_layer_states`.

    Why: every prompt starts with the same chat template, system prompt and worked example (~100 of
    ~130 tokens for the default model); running that once instead of once per prompt is most of
    chapter 05's forward time. The prefix's cache is copied per batch (``[prefix | padding |
    suffix]``, positions ``cumsum(mask) − 1`` as before); its per-layer token-norm sum counts once
    per prompt, and for mean pooling its per-layer state sum joins each prompt's. Only float
    rounding differs from running each prompt whole (a batch-1 prefix).
    """

    def __init__(self, n_layers: int) -> None:
        self.length = 0
        self.count = 0  # the prefix's non-special tokens
        self.sums: list[Tensor | float] = [0.0] * n_layers  # per layer, [1, D] once recorded
        self.recording = False
        self._cache: DynamicCache | None = None

    def run(
        self,
        model: CausalLM,
        prefix: Sequence[int],
        special: Tensor,
        n_prompts: int,
        batch_state: dict[str, Tensor],
        device: torch.device,
    ) -> int:
        """Run the prefix (the hooks record into this object); returns its non-special tokens × prompts."""
        from transformers import DynamicCache  # heavy import, only when a prefix is shared

        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        keep = ~torch.isin(ids, special.to(device))
        batch_state.update(keep=keep, weight=torch.tensor(float(n_prompts)))
        self._cache, self.recording = DynamicCache(config=text_config(model)), True
        try:
            model(
                input_ids=ids,
                position_ids=torch.arange(ids.shape[1], device=device)[None],
                past_key_values=self._cache,
                use_cache=True,
            )
        except StopForward:
            pass
        finally:
            self.recording = False
        self.length, self.count = ids.shape[1], int(keep.sum())
        return self.count * n_prompts

    def cache_for(self, batch: int) -> DynamicCache | None:
        return None if self._cache is None else copy_for_batch(self._cache, batch)


@torch.no_grad()
def collect_layer_states(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    ids: Sequence[str],
    *,
    pooling: Pooling = "last",
    batch_size: int = 16,
    model_name: str = "",
    encode: Encoder | None = None,
    progress: bool = True,
) -> LayerStates:
    """Pooled output of every decoder layer for each prompt, in one (early-stopped) forward per batch.

    ``encode(tokenizer, prompts)`` must tokenize exactly as generation does (default: the ids of
    :func:`mechlib.prompts.encode_prompts`, left-padded as :func:`encode_for_states` does), returning
    ``input_ids`` and ``attention_mask``; left or right padding both work (the last real token is
    found from the mask). Position ids are ``cumsum(mask) − 1`` as in generation, so padding does not
    shift positions. With the default encoding the prompts' common prefix runs once
    (:class:`_SharedPrefixStates`) where that attends exactly as whole prompts do.
    """
    if pooling not in POOLINGS:
        raise ContrastError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if len(prompts) != len(ids) or not prompts:
        raise ContrastError(
            f"need one id per prompt and at least one prompt, got {len(prompts)} prompts, {len(ids)} ids"
        )
    layers = decoder_layers(model)
    n_layers = len(layers)
    device = model_device(model)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)

    pooled_batches: list[Tensor] = []
    norm_sum = torch.zeros(n_layers, dtype=torch.float64)
    n_tokens = 0
    batch_state: dict[str, Tensor] = {}  # "keep" [B, S] bool, "last" [B] long: set per batch, read by the hooks
    per_layer: list[Tensor | None] = [None] * n_layers
    shared = _SharedPrefixStates(n_layers)  # the prompts' common prefix, run once (empty: not shared)

    def make_hook(i: int) -> Callable[[nn.Module, tuple[object, ...], LayerOutput], None]:
        def hook(_module: nn.Module, _inputs: tuple[object, ...], out: LayerOutput) -> None:
            h = layer_output_tensor(out).float()
            keep = batch_state["keep"]  # [B, S] bool: real, non-special tokens
            norm_sum[i] += (h.norm(dim=-1) * keep).sum().double().cpu() * float(batch_state["weight"])
            if shared.recording:
                shared.sums[i] = (h * keep[..., None]).sum(1).cpu()  # [1, D]
            elif pooling == "last":
                per_layer[i] = h[torch.arange(h.shape[0], device=h.device), batch_state["last"]].cpu()
            else:
                per_layer[i] = ((h * keep[..., None]).sum(1).cpu() + shared.sums[i]) / (
                    keep.sum(1, keepdim=True).cpu() + shared.count
                )
            if i == n_layers - 1:
                raise StopForward  # everything needed has been recorded

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        lists = encode_prompts(tokenizer, list(prompts)) if encode is None else None
        n_prefix = usable_prefix_len(model, lists, max(map(len, lists))) if lists is not None else 0
        if lists is not None and n_prefix:
            n_tokens += shared.run(model, lists[0][:n_prefix], special, len(prompts), batch_state, device)
            lists = [row[n_prefix:] for row in lists]
        # similar lengths together (less padding); the original order is restored at the end
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="layer states", disable=not progress):
            batch = [prompts[i] for i in order[start : start + batch_size]]
            if lists is not None:
                rows = [lists[i] for i in order[start : start + batch_size]]
                input_ids, mask = left_pad(rows, padding_id(tokenizer), device)
            else:
                assert encode is not None  # lists is None only for an explicit encoder
                enc = encode(tokenizer, batch)
                input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            mask = mask.bool()
            keep = mask & ~torch.isin(input_ids, special.to(device))
            if ((keep.sum(1) + shared.count) == 0).any():
                raise ContrastError("a prompt has no non-special tokens to pool over")
            positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
            batch_state.update(
                keep=keep, last=torch.where(mask, positions, -1).max(dim=1).values, weight=torch.tensor(1.0)
            )
            n_tokens += int(keep.sum())
            full = torch.cat([mask.new_ones((mask.shape[0], shared.length)), mask], dim=1).long()
            position_ids = (full.cumsum(-1) - 1).clamp(min=0)[:, shared.length :]
            try:
                model(
                    input_ids=input_ids,
                    attention_mask=full,
                    position_ids=position_ids,
                    past_key_values=shared.cache_for(mask.shape[0]),
                    use_cache=shared.length > 0,
                )
            except StopForward:
                pass
            else:
                raise ContrastError("the forward pass finished without reaching the last decoder layer's hook")
            # every hook ran: the forward reached the last layer's hook
            pooled_batches.append(torch.stack(cast(list[Tensor], per_layer), dim=1))  # [B, L, D]
    finally:
        for handle in handles:
            handle.remove()
    pooled = torch.empty((len(prompts), n_layers, pooled_batches[0].shape[-1]), dtype=torch.float32)
    pooled[torch.tensor(order)] = torch.cat(pooled_batches)
    return LayerStates(
        list(map(str, ids)), pooled, (norm_sum / n_tokens).float(), pooling, model_name, sha_of_prompts(prompts)
    )


def sha_of_prompts(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode("utf-8")).hexdigest()


def collect_with_model(
    model_name: str,
    dtype: str,
    device: str,
    prompts: Sequence[str],
    ids: Sequence[str],
    *,
    pooling: Pooling = "last",
    batch_size: int = 16,
) -> LayerStates:
    """Load the model and collect (for :func:`cached_layer_states`: the model loads only on a cache miss)."""
    loaded = load_model(model_name, dtype, device)
    states = collect_layer_states(
        loaded.model, loaded.tokenizer, prompts, ids, pooling=pooling, batch_size=batch_size, model_name=model_name
    )
    return dataclasses.replace(states, settings=run_settings(dtype, device))


def run_settings(dtype: str, device: str) -> str:
    """The model settings a states cache is keyed by, as one string."""
    return f"dtype={dtype};device={device}"


def save_layer_states(states: LayerStates, path: str | os.PathLike[str]) -> Path:
    atomic_torch_save({**asdict(states)}, path)
    return Path(path)


def load_layer_states(path: str | os.PathLike[str]) -> LayerStates:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return LayerStates(**obj)
    except Exception as exc:
        raise ContrastError(f"{path}: not a saved LayerStates file ({type(exc).__name__}: {exc})") from None


def cached_layer_states(
    path: str | os.PathLike[str],
    *,
    model_name: str,
    pooling: Pooling,
    ids: Sequence[str],
    prompts: Sequence[str],
    collect: Callable[[], LayerStates],
    settings: str = "",
) -> LayerStates:
    """Load ``path`` if it holds states of the same model, settings, pooling, ids and prompts; else
    collect and save (and say in one line why a cache on disk was not used)."""
    path = Path(path)
    if path.is_file():
        cached = load_layer_states(path)
        key = (model_name, settings, pooling, list(map(str, ids)), sha_of_prompts(prompts))
        old = (cached.model, cached.settings, cached.pooling, cached.ids, cached.prompts_sha)
        if old == key:
            return cached
        what = [
            name
            for name, a, b in zip(("model", "model settings", "pooling", "questions", "prompts"), old, key)
            if a != b
        ]
        print(f"[mechbook] {', '.join(what)} changed since {path.name} was saved: collecting the states again")
    states = collect()
    save_layer_states(states, path)
    return states
