"""The static buffers of :mod:`mechlib.graph_decode`'s captured decode step, and the step itself.

What one captured step does, all on the device: set the attention-mask column of the cache slot
being written (``index_fill_`` from the slot buffer, so no host-built mask per step), run the model
on the token buffer at the position buffer (transformers 5 models take no ``cache_position``: the
static cache writes at, and advances, its own device-side length, so no host value enters the step),
take ``logits[:, -1].argmax(-1)``, feed finished rows the pad id, write the token into the output
buffer at the column buffer, update the unfinished flags (EOS), and advance token, position, slot
and column buffers.

Why a module of its own: this is everything a captured graph bakes in and replays — the buffers'
layout, the one step over them, and how a new batch is loaded into them without new addresses — apart
from *when* a graph is built, captured, kept or declined (:mod:`mechlib.graph_decode`). The step reads
no host value, so the same function runs eagerly on CPU (the tests) and under capture on CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mechlib.decode_step import step
from mechlib.models import CausalLM

if TYPE_CHECKING:
    from mechlib.kv_cache import Cache, Masks


class GraphDecodeError(ValueError):
    """Settings the graph decode path cannot take; the message says which."""


@dataclass
class StepBuffers:
    """The static inputs and outputs of one decode step (fixed addresses for the captured graph)."""

    tok: torch.Tensor  # [B, 1] token fed this step
    pos: torch.Tensor  # [B, 1] its position id
    slot: torch.Tensor  # [1] cache slot written this step (same for every row: left padding)
    col: torch.Tensor  # [1] output column of the token this step produces
    out: torch.Tensor  # [B, cache_len] produced tokens (columns 0..max_new-1 used)
    unfinished: torch.Tensor  # [B] bool
    eos: torch.Tensor  # [E]
    masks: Masks  # what the model gets as attention_mask (tensors updated in place)
    fills: tuple[tuple[torch.Tensor, bool | float], ...]  # distinct mask tensors, value of an attended slot


def record(b: StepBuffers, nxt: torch.Tensor, pad_id: int, use_eos: bool) -> None:
    """Write this step's tokens: finished rows get ``pad_id``; EOS marks rows finished; buffers advance."""
    nxt = torch.where(b.unfinished, nxt, pad_id)
    b.out.index_copy_(1, b.col, nxt[:, None])
    if use_eos:  # not torch.isin: on CUDA it may sort with torch.unique, whose output size is a host sync
        b.unfinished.logical_and_(~(nxt[:, None] == b.eos[None, :]).any(dim=-1))
    b.tok.copy_(nxt[:, None])
    b.col.add_(1)


def buffer_step(
    model: CausalLM, cache: Cache, b: StepBuffers, extra: Mapping[str, int], pad_id: int, use_eos: bool
) -> None:
    """One decode step entirely from and into ``b`` (what a graph captures): no host reads."""
    for mask, value in b.fills:
        mask.index_fill_(-1, b.slot, value)
    record(b, step(model, b.tok, b.pos, b.masks, cache, extra), pad_id, use_eos)
    b.pos.add_(1)
    b.slot.add_(1)


def _mask_fills(masks: Masks, slot: int) -> tuple[tuple[torch.Tensor, bool | float], ...]:
    tensors: dict[int, torch.Tensor] = {}
    for m in masks.values() if isinstance(masks, dict) else [masks]:
        if m is not None:
            if m.ndim != 4:
                raise GraphDecodeError(f"expected 4-D attention masks from make_masks, got shape {tuple(m.shape)}")
            tensors[id(m)] = m
    return tuple((m, m[0, 0, -1, slot].item()) for m in tensors.values())


def _mask_list(masks: Masks) -> list[tuple[str, torch.Tensor | None]]:
    if isinstance(masks, dict):
        return sorted(masks.items())
    return [("", masks)]


def _copy_masks(dst: Masks, src: Masks) -> bool:
    """Copy ``src`` into ``dst`` in place; False when their layout differs (then buffers are rebuilt)."""
    pairs = list(zip(_mask_list(dst), _mask_list(src)))
    if isinstance(dst, dict) != isinstance(src, dict) or len(_mask_list(dst)) != len(_mask_list(src)):
        return False
    for (kd, d), (ks, s) in pairs:
        if kd != ks or (d is None) != (s is None) or (d is not None and s is not None and d.shape != s.shape):
            return False
    for (_, d), (_, s) in pairs:
        if d is not None and s is not None:
            d.copy_(s)
    return True


def load_buffers(
    bufs: StepBuffers | None,
    masks: Masks,
    pos: torch.Tensor,
    slot: int,
    eos_ids: Sequence[int],
    pad_id: int,
    out_len: int,
) -> StepBuffers:
    """Fill ``bufs`` for a new batch: masks of the first decode step, its position and slot. New buffers (new
    addresses: a graph captured over ``bufs`` is stale) when there are none yet or the masks' layout differs."""
    b = bufs
    if b is None or not _copy_masks(b.masks, masks):
        batch, dev = pos.shape[0], pos.device
        b = StepBuffers(
            tok=torch.zeros((batch, 1), dtype=torch.long, device=dev),
            pos=torch.zeros((batch, 1), dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            col=torch.zeros(1, dtype=torch.long, device=dev),
            out=torch.zeros((batch, out_len), dtype=torch.long, device=dev),
            unfinished=torch.ones(batch, dtype=torch.bool, device=dev),
            eos=torch.tensor(list(eos_ids), dtype=torch.long, device=dev),
            masks=masks,
            fills=_mask_fills(masks, slot),
        )
    b.pos.copy_(pos)
    b.slot.fill_(slot)
    b.col.zero_()
    b.out.fill_(pad_id)
    b.unfinished.fill_(True)
    return b
