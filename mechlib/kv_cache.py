"""The key/value caches of :mod:`mechlib.generate`: static caches for the compiled path, a shared
prompt prefix run once, and dropping rows that finished.

Why a module of its own: these decide *what the model attends to* (a wrong window, a wrong mask or a
row dropped too early changes tokens silently), so their rules sit together with their reasons; the
decode loop in :mod:`mechlib.generate` only calls them. Tests compare the tokens with HF
``generate`` on tiny Gemma 4, Qwen 3.5 and Llama models (tests/test_generate.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch

from mechlib.models import CausalLM, model_device, text_config

# transformers is imported in the functions that build caches or masks (a heavy import)
if TYPE_CHECKING:
    from transformers import DynamicCache, StaticCache

    Cache = DynamicCache | StaticCache
    Masks = torch.Tensor | dict[str, torch.Tensor | None] | None

__all__ = [
    "CACHE_BUCKET",
    "COMPACT_FRACTION",
    "MIN_SHARED_PREFIX",
    "STATIC_CACHES",
    "HeldStaticCache",
    "StaticCacheHolder",
    "free_generation_cache",
    "make_masks",
    "model_device",
    "prefix_cache",
    "prefix_sharing_exact",
    "reusable_static_cache",
    "rows_selectable",
    "rows_to_keep",
    "shared_prefix_len",
    "static_cache",
    "text_config",
    "usable_prefix_len",
]


CACHE_BUCKET = 256  # compiled path: cache lengths rounded up to this, so batches share one compiled graph


@dataclass(frozen=True)
class HeldStaticCache:
    """A static cache kept for reuse, with the shape it was made for."""

    batch: int
    max_len: int
    device: str
    cache: StaticCache
    compile_safe: bool


class StaticCacheHolder:
    """The compiled path's static caches: one per model, reset and reused while batch and length match.

    Why reuse: the same tensors keep CUDA-graph input addresses fixed (no re-capture per batch);
    only the latest shape is kept per model, so memory for older shapes is freed. Why here and
    not on the model: the cache is mechlib's state, not the model's; models are held weakly, so a
    model that is dropped frees its cache too.
    """

    def __init__(self) -> None:
        self._held: WeakKeyDictionary[torch.nn.Module, HeldStaticCache] = WeakKeyDictionary()

    def get(self, model: CausalLM, batch: int, max_len: int) -> tuple[StaticCache, bool]:
        """``(cache, compile_safe)`` for ``batch`` rows of ``max_len`` tokens, reset if reused."""
        device = str(model_device(model))
        held = self._held.get(model)
        if held is not None and (held.batch, held.max_len, held.device) == (batch, max_len, device):
            held.cache.reset()
            return held.cache, held.compile_safe
        self._held.pop(model, None)  # free the old shape before allocating the new one
        cache, safe = static_cache(model, max_len)
        self._held[model] = HeldStaticCache(batch, max_len, device, cache, safe)
        return cache, safe

    def held(self, model: CausalLM) -> HeldStaticCache | None:
        """What is kept for ``model``, if anything."""
        return self._held.get(model)

    def free(self, model: CausalLM) -> None:
        """Drop ``model``'s cache (GPU memory: batch × length × layers)."""
        self._held.pop(model, None)


STATIC_CACHES = StaticCacheHolder()  # the one :func:`mechlib.generate.greedy_batch` uses


def reusable_static_cache(model: CausalLM, batch: int, max_len: int) -> tuple[StaticCache, bool]:
    """The compiled path's cache for ``model`` (:data:`STATIC_CACHES`)."""
    return STATIC_CACHES.get(model, batch, max_len)


def free_generation_cache(model: CausalLM) -> None:
    """Drop the static cache the compiled path keeps for ``model``."""
    STATIC_CACHES.free(model)


def static_cache(model: CausalLM, max_len: int) -> tuple[StaticCache, bool]:
    """A ``StaticCache`` for ``max_len`` tokens; returns ``(cache, compile_safe)``.

    Sliding-window layers become plain static layers when ``max_len`` fits in their window: the
    sliding layer would then hold exactly the same ``max_len``-long tensors, but it tracks its
    length in a Python int that a compiled step would specialise on (one recompile per step).
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=text_config(model), max_cache_len=max_len)
    compile_safe = True
    for i, layer in enumerate(cache.layers):
        if type(layer) is StaticSlidingWindowLayer:
            if max_len <= layer.max_cache_len:
                cache.layers[i] = StaticLayer(max_cache_len=max_len)
            else:
                compile_safe = False
    return cache, compile_safe


def make_masks(
    model: CausalLM,
    cache: Cache,
    batch: int,
    q_len: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    first: bool,
) -> Masks:
    """The attention masks HF's ``prepare_inputs_for_generation`` builds for a compilable cache."""
    from transformers.masking_utils import create_masks_for_generate

    fn = getattr(model, "create_masks_for_generate", create_masks_for_generate)
    dev = position_ids.device
    masks = fn(
        config=model.config,
        inputs_embeds=torch.empty((batch, q_len, 0), dtype=model.dtype, device=dev),
        attention_mask=attention_mask,
        past_key_values=cache,
        position_ids=position_ids,
        is_first_iteration=first,
    )
    if isinstance(masks, dict):
        return {k: v.contiguous() if v is not None else None for k, v in masks.items()}
    return masks.contiguous() if masks is not None else None


def rows_selectable(kv: Cache) -> bool:
    """Whether finished rows can be dropped from this cache (not from linear-attention layers)."""
    return all(hasattr(layer, "batch_select_indices") for layer in getattr(kv, "layers", [None]))


COMPACT_FRACTION = 8  # drop finished rows once at least 1/8 of the batch (and one row) has finished


def rows_to_keep(live: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows to keep, or None while too few have finished to be worth a cache copy.

    Why: a batch runs until its longest answer ends; on a CPU, where a decode step costs about in
    proportion to its rows, rows that finished early would otherwise be computed (and thrown
    away) for every remaining step — about half the default run's decode work.
    """
    width = live.numel()
    n_done = width - int(live.sum())
    if n_done == 0 or n_done < width // COMPACT_FRACTION:
        return None
    return live.nonzero().flatten()


def prefix_cache(model: CausalLM, prefix: torch.Tensor, batch: int, extra: dict[str, int]) -> DynamicCache:
    """The ``DynamicCache`` of ``prefix`` (run once, batch 1), repeated over ``batch`` rows."""
    from transformers import DynamicCache

    kv = DynamicCache(config=text_config(model))
    ids = prefix.reshape(1, -1)
    model(
        input_ids=ids,
        position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
        past_key_values=kv,
        use_cache=True,
        return_dict=True,
        **extra,
    )
    if batch > 1:
        kv.batch_repeat_interleave(batch)
    return kv


def copy_for_batch(cache: DynamicCache, batch: int) -> DynamicCache:
    """A fresh copy of a batch-1 ``cache`` repeated over ``batch`` rows (the original stays as it was,
    so one prefix serves many batches)."""
    kv = copy.deepcopy(cache)
    if batch > 1:
        kv.batch_repeat_interleave(batch)
    return kv


MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth an extra forward


def prefix_sharing_exact(model: CausalLM, total_len: int) -> bool:
    """Whether the ``[prefix | padding | suffix]`` layout attends exactly as left padding does.

    Not for sliding-window layers once the padded sequence outgrows the window (the window counts
    cache slots, padding included), nor for linear-attention (recurrent) layers, whose state would
    run through the padding and whose caches cannot be repeated over a batch. Those fall back to
    plain left padding.
    """
    from transformers import DynamicCache

    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    if window and total_len > int(window):
        return False
    return all(hasattr(layer, "batch_repeat_interleave") for layer in DynamicCache(config=cfg).layers)


def usable_prefix_len(model: CausalLM, rows: Sequence[Sequence[int]], total_len: int) -> int:
    """:func:`shared_prefix_len` of ``rows`` where sharing it pays and is exact, else 0: at least
    :data:`MIN_SHARED_PREFIX` tokens, and :func:`prefix_sharing_exact` for sequences ``total_len`` long."""
    n = shared_prefix_len(rows)
    return n if n >= MIN_SHARED_PREFIX and prefix_sharing_exact(model, total_len) else 0


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the prefix all ``rows`` share, leaving every row at least one token of its own
    (the last prompt position must be prefilled with the row to give its first new token)."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return max(n, 0)
