"""The SAE's code at a completion's answer positions: the forward pass behind :mod:`mechlib.feature_reward`.

Why a module of its own: the forward decides *which states the SAE reads* (a wrong position, a
mask that lets a pad in, a prefix cache that attends differently changes the reward silently), so
its rules sit together with their reasons; :mod:`mechlib.feature_reward` re-exports
:class:`CompletionCode` and :func:`completion_codes` and only scores codes.

Shared prefix: the book's prompts all start with the same chat template, system prompt and worked
example (~102 of ~125 prompt tokens, completions ~21), and in GRPO the trainer scores 4-8
completions of the SAME prompt. That prefix runs once at batch 1 into a ``DynamicCache`` (as
:func:`mechlib.contrast.collect_layer_states` and :mod:`mechlib.generate` do); each batch then runs
only its suffixes (``[prefix | suffix | right padding]``). Where that cannot attend exactly as the
whole sequence does (:func:`mechlib.kv_cache.prefix_sharing_exact`), sequences run whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from mechlib.hooks import run_to_layer
from mechlib.kv_cache import copy_for_batch, usable_prefix_len
from mechlib.models import CausalLM, Tokenizer, check_layer, d_model, model_device, text_config
from mechlib.prompts import encode_prompts, padding_id
from mechlib.sae.model import check_compatible

if TYPE_CHECKING:
    from transformers import DynamicCache

    from mechlib.sae.model import TopKSAE


class FeatureRewardError(ValueError):
    """Input the feature reward cannot use; the message names the value or file."""


class CompletionCode(NamedTuple):
    """The SAE's sparse top-k code at each answer position of one completion (CPU tensors)."""

    indices: Tensor  # [n_positions, k] int64 feature ids
    values: Tensor  # [n_positions, k] float32 activations (>= 0)

    @property
    def n_positions(self) -> int:
        return int(self.indices.shape[0])


class SharedPrefix(NamedTuple):
    """The tokens every sequence starts with, run once; ``cache`` is None when nothing is shared."""

    length: int
    cache: DynamicCache | None


NO_PREFIX = SharedPrefix(0, None)


def shareable_prefix_len(model: CausalLM, heads: Sequence[Sequence[int]], seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``seqs`` can share (0: run them whole).

    Computed on the prompts (``heads``), so at most len(shortest prompt) − 1 tokens: the first
    answer position is the LAST prompt token, whose state must come out of the suffix forward.
    Nothing is shared below :data:`~mechlib.kv_cache.MIN_SHARED_PREFIX` (not worth the extra
    forward), nor where the architecture cannot share exactly (sliding windows shorter than the
    longest sequence, linear-attention caches).
    """
    return usable_prefix_len(model, heads, max(map(len, seqs)))


def run_shared_prefix(model: CausalLM, layer: int, prefix: Sequence[int]) -> SharedPrefix:
    """Run ``prefix`` once at batch 1 into a ``DynamicCache``, through decoder layer ``layer`` only.

    Layers above ``layer`` never write their cache entries (the forward stops there), and need not:
    the suffix forward stops at ``layer`` too, so it never reads them, ``batch_repeat_interleave``
    skips empty layers, and the masks HF sizes from the first layer of each attention kind are
    right for every kind a layer up to ``layer`` uses (that first layer is at or below ``layer``).
    """
    from transformers import DynamicCache  # heavy import, only when a prefix is shared

    if not prefix:
        return NO_PREFIX
    device = model_device(model)
    kv = DynamicCache(config=text_config(model))
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    cache_kw: dict[str, Any] = {"past_key_values": kv}  # run_to_layer's inputs are typed as tensors
    run_to_layer(
        model,
        layer,
        input_ids=ids,
        position_ids=torch.arange(len(prefix), device=device)[None],
        use_cache=True,
        **cache_kw,
    )
    return SharedPrefix(len(prefix), kv)


def forward_suffixes(
    model: CausalLM, layer: int, rows: Sequence[Sequence[int]], pad_id: int, prefix: SharedPrefix = NO_PREFIX
) -> Tensor:
    """Layer ``layer``'s output ``[B, width, d]`` for right-padded ``rows`` that follow ``prefix``.

    Right padding: every real token precedes every pad, so under causal attention (and Qwen 3.5's
    recurrent layers) no real state sees a pad and positions need no shifting. With a prefix the
    mask covers prefix + suffix and positions continue from the prefix (pads' positions are never
    read); without one the call is the plain whole-sequence forward.
    """
    device = model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    if prefix.cache is None:
        return run_to_layer(model, layer, input_ids=ids.to(device), attention_mask=mask.to(device))
    full = torch.cat([mask.new_ones((len(rows), prefix.length)), mask], dim=1)
    positions = (prefix.length + torch.arange(width)).expand(len(rows), -1)
    cache_kw: dict[str, Any] = {"past_key_values": copy_for_batch(prefix.cache, len(rows))}
    return run_to_layer(
        model,
        layer,
        input_ids=ids.to(device),
        attention_mask=full.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **cache_kw,
    )


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}


def _strip_trailing(ids: list[int], special: set[int]) -> list[int]:
    """``ids`` without its trailing special tokens (EOS, padding)."""
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return ids[:end]


def completion_codes(
    model: CausalLM,
    tokenizer: Tokenizer,
    sae: TopKSAE,
    layer: int,
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> list[CompletionCode]:
    """The SAE's top-k code at each answer position of each prompt + completion (see :mod:`mechlib.feature_reward`).

    Prompts are tokenised as generation does (:func:`mechlib.prompts.encode_prompts`); a completion
    by its ``completion_ids`` if given (TRL passes the sampled ids: no re-tokenisation drift), else
    ``tokenizer(completion, add_special_tokens=False)``. Trailing special tokens of given ids (the EOS
    and padding TRL keeps) are dropped first, so the answer positions are the states that generate
    the answer's *text* whether the completion comes as ids (GRPO) or as text (Stage Gate 1, from
    chapter 04's records): the same reward either way. The sequences' common prefix runs once
    (:func:`shareable_prefix_len`; ``share_prefix=False`` runs them whole) and each batch its
    right-padded suffixes (:func:`forward_suffixes`): a completion's code does not depend on its
    batch, and sharing changes only float rounding. The forward stops at ``layer`` under
    ``inference_mode``. Codes stay sparse (k per position): a dense code would be ~65k wide.
    """
    if len(prompts) != len(completions) or (completion_ids is not None and len(completion_ids) != len(prompts)):
        n_ids = "no" if completion_ids is None else len(completion_ids)
        raise FeatureRewardError(f"got {len(prompts)} prompts, {len(completions)} completions, {n_ids} completion_ids")
    if batch_size < 1:
        raise FeatureRewardError(f"batch_size must be >= 1, got {batch_size}")
    check_layer(model, layer)
    check_compatible(sae, d_model(model), layer, source="feature reward SAE")
    heads = encode_prompts(tokenizer, list(prompts))
    if any(not h for h in heads):
        raise FeatureRewardError("every prompt must have at least one token")
    tails = (
        [_strip_trailing(list(t), _special_ids(tokenizer)) for t in completion_ids]
        if completion_ids is not None
        else [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    )
    # the last completion token generates nothing of the answer: its state is never read
    seqs = [h + t[:-1] for h, t in zip(heads, tails)]
    codes = [CompletionCode(torch.zeros(0, sae.k, dtype=torch.long), torch.zeros(0, sae.k)) for _ in seqs]
    todo = sorted((i for i, t in enumerate(tails) if t), key=lambda i: len(seqs[i]))  # less padding
    if not todo:
        return codes
    sae_device, sae_dtype = model_device(sae), sae.W_enc.dtype
    with torch.inference_mode():
        n = shareable_prefix_len(model, [heads[i] for i in todo], [seqs[i] for i in todo]) if share_prefix else 0
        prefix = run_shared_prefix(model, layer, seqs[todo[0]][:n])
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            h = forward_suffixes(model, layer, [seqs[i][n:] for i in batch], padding_id(tokenizer), prefix)
            for row, i in enumerate(batch):
                states = h[row, len(heads[i]) - 1 - n : len(seqs[i]) - n]  # [n completion tokens, d]
                code = sae.encode(states.to(sae_device, sae_dtype))
                codes[i] = CompletionCode(code.indices.cpu(), code.values.float().cpu())
    return codes
