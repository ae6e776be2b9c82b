"""Batched greedy generation: a lean decode loop that gives exactly HF ``generate``'s greedy tokens.

Why: chapter 04 generates every question once and chapter 06 again per steering scale. HF
``generate`` spends most of its time in per-step Python (logits processors, stopping criteria,
growing ``torch.cat``s, a float copy of the full logits row), which bounds it on a GPU. This loop
does one model forward per step and nothing else: argmax, EOS bookkeeping in place, a host sync
only every few steps on CUDA.

Exactness: the loop feeds the model exactly what HF's greedy path feeds it — left padding,
``position_ids = cumsum(mask) − 1``, the 2-D mask dropped when there is no padding,
``logits_to_keep=1`` (so Gemma 4's KV-shared layers see only the last prompt position at prefill,
as in ``generate``), a ``DynamicCache`` built from the text config, finished rows fed the pad
token. Tests compare the tokens with ``model.generate(do_sample=False)`` on tiny Gemma 4, Qwen 3.5
and Llama models, with and without a steering hook. It is *plain* greedy: the model's
``generation_config`` sampling/penalty settings are ignored on purpose.

Hooks: steering is a forward hook registered by the caller around the call. The model's modules
run at prefill and at every decode step, so hooks fire. With ``torch.compile``, dynamo by default
does *not* guard on module hooks (``skip_nnmodule_hook_guards``): a hook added after the first
compile would silently be ignored (this also affects HF's own static-cache auto-compile). The
compiled path here (:mod:`mechlib.decode_step`) turns those guards on, so a changed hook set recompiles instead.

Shared prompt prefix (``share_prefix=True``, dynamic cache): the book's prompts all begin with the
same chat template, system prompt and worked example (~110 of ~160 prompt tokens for SmolLM2), and
on a CPU the prefill of those tokens, once per row, is most of the generation time. The prefix is
then run once at batch 1, its cache repeated over the batch, and only the rows' own suffixes are
prefilled, laid out as ``[prefix | padding | suffix]`` with the same ``cumsum(mask) − 1`` positions,
so every token attends to exactly the tokens it did before. Only the float rounding of the
batch-1 prefix matmuls differs (a greedy near-tie can flip; tests check the tokens against
``generate`` on tiny models). The caller promises that its hooks treat every row alike (a per-row
steering hook cannot see the batch-1 prefix pass): it is off by default.

Static cache (``cache="static"``, default on CUDA): transformers' ``StaticCache`` sized to the
batch's prompt + ``max_new_tokens``; attention masks are built outside the compiled step (as HF
does); the decode step (forward + argmax) is compiled with ``mode="reduce-overhead"`` (CUDA
graphs) when ``compile`` is True or torch.compile kwargs. ``compile="graph"`` (the CUDA default,
:func:`default_compile`) instead captures the whole step over static buffers in one
``torch.cuda.CUDAGraph`` and replays it (:mod:`mechlib.graph_decode`: no dynamo guards per step,
issue 11); models whose cache is not graph-safe fall back to the reduce-overhead step on CUDA
(uncompiled where the cache is not compile-safe either, and on CPU). When the
whole sequence fits in the sliding window, sliding-window cache layers are replaced by plain static
layers holding the same tensors — identical attention, but no Python-int bookkeeping inside the
compiled step (that would force recompiles).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mechlib.decode_settings import (
    CacheKind,
    CompileOption,
    DecodeSettings,
    GenerationError,
    ResolvedCache,
    default_compile,
    eos_ids_of,
    left_pad,
    pad_id_of,
    resolve_cache,
)
from mechlib.decode_step import (
    COMPILED_STEPS,
    DEFAULT_COMPILE_KWARGS,
    StepFn,
    contiguous_lm_head,
    hook_guards,
    step,
    supports_logits_to_keep,
)
from mechlib.graph_decode import GRAPHS, GraphRequest, graph_cache_len, graph_greedy
from mechlib.kv_cache import (
    MIN_SHARED_PREFIX,
    STATIC_CACHES,
    make_masks,
    prefix_cache,
    prefix_sharing_exact,
    reusable_static_cache,
    rows_selectable,
    rows_to_keep,
    shared_prefix_len,
    static_cache,
    usable_prefix_len,
)
from mechlib.models import CausalLM, Tokenizer, model_device, text_config
from mechlib.prompts import decode_text, encode_prompts
from mechlib.step_timer import STEP_TIMER
from mechlib.stopping import StopWhen, shortest_stopping_prefix

if TYPE_CHECKING:
    from mechlib.kv_cache import Cache, Masks

__all__ = [  # the settings' names (mechlib.decode_settings) and a few of kv_cache/stopping: callers find them here
    "MIN_SHARED_PREFIX",
    "CacheKind",
    "CompileOption",
    "DecodeSettings",
    "GenerationError",
    "ResolvedCache",
    "default_compile",
    "eos_ids_of",
    "free_generation_cache",
    "generate_greedy",
    "generate_ids",
    "greedy_batch",
    "left_pad",
    "pad_id_of",
    "prefix_sharing_exact",
    "resolve_cache",
    "shared_prefix_len",
    "shortest_stopping_prefix",
]

# --------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------


@dataclass
class _Prefill:
    """What the first forward of a batch needs, and what decoding continues from."""

    kv: Cache
    masks: Masks
    mask2d: torch.Tensor | None  # the 2-D padding mask (None: no padding), grown by one per step
    position_ids: torch.Tensor
    step_fn: StepFn


def _prepare(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    s: DecodeSettings,
    prefix: torch.Tensor | None,
    extra: dict[str, int],
) -> _Prefill:
    """The batch's cache (shared prefix, reusable static, static or dynamic), masks, positions and step."""
    batch, prompt_len = input_ids.shape
    shared_kv = None
    if prefix is not None and prefix.numel():
        if s.cache != "dynamic":
            raise GenerationError("a shared prompt prefix needs cache='dynamic'")
        shared_kv = prefix_cache(model, prefix.to(input_ids.device), batch, extra)
        attention_mask = torch.cat([attention_mask.new_ones((batch, prefix.numel())), attention_mask], dim=-1)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -prompt_len:]
    mask2d: torch.Tensor | None = None if bool((attention_mask == 1).all()) else attention_mask

    kv: Cache
    masks: Masks
    if shared_kv is not None:
        kv, compile_safe, masks = shared_kv, False, mask2d
    elif s.cache == "static" and s.compile:
        # bucketed like the graph path's cache, so batches of nearby lengths share one compiled graph
        kv, compile_safe = reusable_static_cache(model, batch, graph_cache_len(model, prompt_len, s.max_new_tokens))
        masks = make_masks(model, kv, batch, prompt_len, mask2d, position_ids, first=True)
    elif s.cache == "static":
        kv, compile_safe = static_cache(model, prompt_len + s.max_new_tokens)
        masks = make_masks(model, kv, batch, prompt_len, mask2d, position_ids, first=True)
    else:
        from transformers import DynamicCache  # heavy import, on use

        kv, compile_safe, masks = DynamicCache(config=text_config(model)), False, mask2d
    step_fn: StepFn = step
    if s.compiled and compile_safe:
        options = DEFAULT_COMPILE_KWARGS if s.compile is True else s.compile
        step_fn = COMPILED_STEPS.get(options)  # type: ignore[arg-type]  # s.compile is a Mapping here
    return _Prefill(kv, masks, mask2d, position_ids, step_fn)


def greedy_batch(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    ignore_eos: bool = False,
    cache: ResolvedCache = "dynamic",
    compile: CompileOption = False,
    sync_every: int = 1,
    stop_when: StopWhen | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy continuation ids ``[batch, steps]`` of one left-padded batch (rows that finished are
    filled with ``pad_id``, like ``generate``). ``steps <= max_new_tokens``: the loop stops when
    every row has emitted an EOS or met ``stop_when`` (checked every ``sync_every`` steps), unless
    ``ignore_eos``. A row stopped by ``stop_when`` may carry up to ``sync_every - 1`` tokens past
    its stopping point: cut it with :func:`shortest_stopping_prefix`.

    ``prefix``: 1-D ids every row's prompt starts with, *not* repeated in ``input_ids`` (which then
    holds the left-padded suffixes); run once at batch 1 and shared (dynamic cache only; see the
    module docstring)."""
    settings = DecodeSettings(
        max_new_tokens, tuple(int(e) for e in eos_ids), pad_id, ignore_eos, cache, compile, sync_every, stop_when
    )
    return _decode(model, input_ids, attention_mask, settings, prefix)


@torch.inference_mode()
def _decode(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    s: DecodeSettings,
    prefix: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`greedy_batch` with its settings bundled: prefill, then one step per new token."""
    s.check()
    if s.graph and (prefix is None or not prefix.numel()):
        req = GraphRequest(
            s.max_new_tokens, s.eos_ids, s.pad_id, str(s.compile), s.ignore_eos, s.sync_every, s.stop_when
        )
        toks = graph_greedy(model, input_ids, attention_mask, req)
        if toks is not None:
            return toks
        # cache not graph-safe (mechlib.graph_decode): the path compile=None took before issue 11 (the
        # reduce-overhead step on CUDA where the cache is compile-safe, else the uncompiled static loop)
        s = replace(s, compile=input_ids.device.type == "cuda")
    device = input_ids.device
    batch = input_ids.shape[0]
    extra: dict[str, int] = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    pre = _prepare(model, input_ids, attention_mask, s, prefix, extra)
    kv, masks, mask2d, step_fn = pre.kv, pre.masks, pre.mask2d, pre.step_fn

    eos = torch.tensor(list(s.eos_ids), dtype=torch.long, device=device)
    out = torch.full((batch, s.max_new_tokens), s.pad_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    # rows still in the batch (indices into ``out``); the dynamic cache drops finished ones
    alive = torch.arange(batch, device=device)
    compact = s.cache == "dynamic" and not s.ignore_eos and rows_selectable(kv)
    # prefill: plain call (a compiled prefill would recompile per prompt length)
    nxt = step(model, input_ids, pre.position_ids, masks, kv, extra)
    pos = pre.position_ids[:, -1:]
    steps = s.max_new_tokens
    guard = hook_guards() if step_fn is not step else contextlib.nullcontext()
    t0 = STEP_TIMER.loop_start()
    with guard:
        for t in range(s.max_new_tokens):
            live = unfinished[alive]
            nxt = torch.where(live, nxt, s.pad_id)
            out[alive, t] = nxt
            if not s.ignore_eos and eos.numel():
                unfinished[alive] = live & ~torch.isin(nxt, eos)
            if not s.ignore_eos and (t + 1) % s.sync_every == 0:
                s.mark_stopped(out, unfinished, t + 1)
                if not bool(unfinished.any()):
                    steps = t + 1
                    break
                if compact:
                    keep = rows_to_keep(unfinished[alive])
                    if keep is not None:
                        kv.batch_select_indices(keep)
                        alive, nxt, pos = alive[keep], nxt[keep], pos[keep]
                        mask2d = None if mask2d is None else mask2d[keep]
            if t + 1 == s.max_new_tokens:
                break
            pos = pos + 1
            if mask2d is not None:
                mask2d = torch.cat([mask2d, mask2d.new_ones((mask2d.shape[0], 1))], dim=-1)
            masks = make_masks(model, kv, batch, 1, mask2d, pos, first=False) if s.cache == "static" else mask2d
            ev = STEP_TIMER.begin(device)
            nxt = step_fn(model, nxt[:, None].contiguous(), pos, masks, kv, extra).clone()
            STEP_TIMER.end(ev)
    STEP_TIMER.loop_end(t0, steps - 1, device)
    return out[:, :steps]


# --------------------------------------------------------------------------------------------
# Many prompts
# --------------------------------------------------------------------------------------------


def free_generation_cache(model: CausalLM) -> None:
    """Drop the static caches and captured graphs the compiled and graph paths keep for ``model``."""
    STATIC_CACHES.free(model)
    GRAPHS.free(model)


def generate_ids(
    model: CausalLM,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    ignore_eos: bool = False,
    cache: CacheKind = "auto",
    compile: CompileOption | None = None,
    sort_by_length: bool = True,
    progress: bool = True,
    desc: str = "",
    stop_when: StopWhen | None = None,
    share_prefix: bool = False,
) -> list[list[int]]:
    """Greedy continuation ids per prompt, cut before the first EOS (all ``max_new_tokens`` with
    ``ignore_eos``) or after the shortest prefix that meets ``stop_when``. Prompts are batched by
    length (less padding); results keep the input order.

    ``compile=None`` means :func:`default_compile`: a replayed CUDA graph on CUDA with the static
    cache, off elsewhere (the CPU path stays the exact, uncompiled loop). ``share_prefix``: run a
    batch's common prompt prefix once (dynamic cache only; the caller's hooks must treat every row
    alike — see the module docstring).
    """
    if batch_size <= 0:
        raise GenerationError(f"batch_size must be positive, got {batch_size}")
    device = model_device(model)
    kind = resolve_cache(cache, device)
    settings = DecodeSettings(
        max_new_tokens,
        tuple(int(e) for e in eos_ids),
        pad_id,
        ignore_eos,
        kind,
        compile=default_compile(device, kind) if compile is None else compile,
        sync_every=8 if device.type == "cuda" else 1,
        stop_when=stop_when,
        share_prefix=share_prefix and kind == "dynamic",
    )
    order = (
        sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        if sort_by_length
        else list(range(len(prompt_ids)))
    )
    results: list[list[int]] = [[] for _ in prompt_ids]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    n_errors = len(GRAPHS.errors)
    with contiguous_lm_head(model):
        for idx in tqdm(batches, desc=desc or "generate", disable=not progress, unit="batch"):
            rows = _generate_batch(model, [prompt_ids[i] for i in idx], batch_size, settings, device)
            for i, row in zip(idx, rows):
                results[i] = row
    for note in dict.fromkeys(GRAPHS.errors[n_errors:]):  # the answers are right either way; the speed is not
        warnings.warn(f"mechlib.graph_decode: {note} (same tokens, without the replay's speed)", stacklevel=2)
    return results


def _generate_batch(
    model: CausalLM, rows: Sequence[Sequence[int]], batch_size: int, s: DecodeSettings, device: torch.device
) -> list[list[int]]:
    """Generate ``rows`` (prompt ids) as one batch; each row's new ids, cut by :meth:`DecodeSettings.cut`."""
    n = len(rows)
    if s.compiled and n < batch_size:
        # a smaller last batch would compile a second graph: fill it with copies, dropped below
        rows = [*rows, *[rows[-1]] * (batch_size - n)]
    # rows still hold the shared prefix here: the padded sequence is the longest row plus the new tokens
    n_shared = usable_prefix_len(model, rows, max(map(len, rows)) + s.max_new_tokens) if s.share_prefix else 0
    prefix = None
    if n_shared:
        prefix = torch.tensor(list(rows[0][:n_shared]), dtype=torch.long, device=device)
        rows = [r[n_shared:] for r in rows]
    ids, mask = left_pad(rows, s.pad_id, device)
    toks = _decode(model, ids, mask, s, prefix).tolist()
    return [s.cut(row) for row in toks[:n]]


def generate_greedy(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    progress: bool = True,
    desc: str = "",
    cache: CacheKind = "auto",
    compile: CompileOption | None = None,
) -> list[str]:
    """Greedy continuations (decoded text only, special tokens skipped) of ``prompts``.

    Stops each row at the model's EOS. Steering hooks registered on decoder layers around this
    call fire at prefill and every decode step. ``cache``: ``"dynamic"`` (exact, default off
    CUDA), ``"static"`` (default on CUDA), ``"auto"``; ``compile``: None = :func:`default_compile`
    (the captured graph on CUDA+static), False = never, True or a dict of ``torch.compile`` kwargs,
    or a graph mode of :mod:`mechlib.graph_decode`.
    """
    eos = eos_ids_of(model, tokenizer)
    pad = pad_id_of(model, tokenizer, eos)
    ids = generate_ids(
        model,
        encode_prompts(tokenizer, prompts),
        max_new_tokens,
        batch_size,
        eos_ids=eos,
        pad_id=pad,
        cache=cache,
        compile=compile,
        progress=progress,
        desc=desc,
    )
    return [decode_text(tokenizer, row, skip_special_tokens=True) for row in ids]
