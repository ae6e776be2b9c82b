"""Greedy decoding by replaying one captured CUDA graph per step (``compile="graph"`` of :mod:`mechlib.generate`).

Why (issue 11): the ``reduce-overhead`` compiled step spent ~18 ms of a 24 ms step *inside the
call* on an H200, where reading weights and cache is estimated at 3-5 ms. Suspects, per call:
dynamo's guard evaluation (module-hook guards on, over every module of the model) and cudagraph-tree
bookkeeping. The route fast decoders take (gpt-fast) avoids all of them: put every input of a decode
step in a **static buffer**, capture the whole step once in a ``torch.cuda.CUDAGraph``, and replay
it. A replay is one launch: no Python model code, no dynamo guard evaluation, no allocation.

What one captured step does, all on the device, is :func:`mechlib.graph_buffers.buffer_step` (the
static buffers it reads and writes, and how a batch loads them, are that module's). The host only
replays, and reads the unfinished flags every ``sync_every`` steps (EOS / stop rule), like the plain loop.

Exactness: the buffers hold what :func:`mechlib.generate.greedy_batch` feeds the model (left
padding, ``cumsum(mask) − 1`` positions, the masks of :func:`mechlib.kv_cache.make_masks`: the
in-step column update is checked against ``make_masks`` at every step in the tests). On a CPU, or
wherever capture is unavailable, the same buffer step runs eagerly, so the CPU tests (tokens equal
HF ``generate`` on tiny Gemma 4, Qwen 3.5, Llama, with and without steering hooks) test the very
buffer logic a replay runs.

Capture: the first decode steps of a new graph run for real on a side stream (warm-up: cuBLAS
handles, inductor compilation and autotuning), then one step is captured (capture does not
execute) and replayed. ``"graph"`` captures the eager kernels (the default: a first call of
seconds); ``"graph-inductor"`` captures an inductor-compiled step (``torch.compile`` in its default
mode, i.e. without cudagraph trees — we capture by hand) and ``"graph-autotune"`` one compiled with
``max-autotune-no-cudagraphs`` (GEMM autotuning: fewer ms per step, minutes of first call). For
both, dynamo's guards (hook guards on) are evaluated at warm-up and capture only, never at replay.

When a graph is re-captured: graphs are kept in :data:`GRAPHS` (mechlib's, never on the model; the
model held weakly), keyed by batch, cache length, dtype, device, EOS/pad settings, compile option
and the **hook-set key** (:func:`hook_set_key`: every forward/pre-hook of every module, and the
global ones, by handle id and function, computed once per batch, not per step). A hook added or
removed later changes the key and forces a new capture — it is never silently ignored. A hook must
read anything that changes between calls from device tensors updated *in place*: a
:class:`mechlib.steering.RowSteering` scale change (``set_rows``, same shape) is a copy into the
buffer the graph reads, so it does not re-capture; :meth:`RowSteering.graph_key` names its buffer,
so a delta of another shape (another buffer) does. A hook that records tensors on the host (an
activation probe) would run only at warm-up and capture, so only hooks that declare themselves safe
(a ``graph_key()`` method) are captured; with any other hook on the model the batch takes the
compiled path, which runs hooks every step (:func:`hooks_not_graph_safe`).

Fallback (returns ``None``; :mod:`mechlib.generate` then takes its pre-issue-11 path: the
reduce-overhead compiled step on CUDA where the cache is compile-safe, else the uncompiled loop): caches
that are not graph-safe — sliding-window layers narrower than the cache (their length is a Python
int), or any cache layer type other than static, linear-attention (in-place conv/recurrent
states) and KV-shared dummy layers. A capture that raises is recorded in
:attr:`GraphHolder.errors`; that batch finishes eagerly from the same buffers (its cache is mid-answer), and
later batches with the same key take the compiled path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from weakref import WeakKeyDictionary

import torch

from mechlib.decode_step import hook_guards, hook_set, hook_set_key, hooks_not_graph_safe, step, supports_logits_to_keep
from mechlib.graph_buffers import GraphDecodeError, StepBuffers, buffer_step, load_buffers, record
from mechlib.kv_cache import CACHE_BUCKET, make_masks, static_cache
from mechlib.models import CausalLM, text_config
from mechlib.step_timer import STEP_TIMER
from mechlib.stopping import mark_stopped

if TYPE_CHECKING:
    from mechlib.kv_cache import Cache
    from mechlib.stopping import StopWhen

__all__ = [  # the step buffers' names (mechlib.graph_buffers) and the hook checks (mechlib.decode_step) re-exported
    "GRAPHS",
    "GRAPH_COMPILE_KWARGS",
    "GRAPH_MODES",
    "MAX_GRAPHS_PER_MODEL",
    "WARMUP_STEPS",
    "GraphDecodeError",
    "GraphHolder",
    "GraphKey",
    "GraphMode",
    "GraphRequest",
    "HeldGraph",
    "StepBuffers",
    "buffer_step",
    "graph_cache_len",
    "graph_greedy",
    "graph_safe",
    "hook_set_key",
    "hooks_not_graph_safe",
]

GraphMode = Literal["graph", "graph-inductor", "graph-autotune"]
GRAPH_MODES: tuple[GraphMode, ...] = ("graph", "graph-inductor", "graph-autotune")
# torch.compile kwargs of the step each mode captures (None: the eager step). Tests swap in {"backend": "eager"}.
GRAPH_COMPILE_KWARGS: dict[str, Mapping[str, object] | None] = {
    "graph": None,
    "graph-inductor": {"dynamic": False, "fullgraph": False},  # inductor's default mode, no cudagraph trees
    "graph-autotune": {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": False},
}
WARMUP_STEPS = 3  # real steps on a side stream before capture (PyTorch's recommendation)
MAX_GRAPHS_PER_MODEL = 2  # a sweep's full and last batch; each holds a static cache
_GRAPH_SAFE_LAYERS = {"StaticLayer", "LinearAttentionLayer", "LinearAttentionAndStaticFullAttentionLayer", "DummyLayer"}


@dataclass(frozen=True)
class GraphKey:
    """Everything a captured step bakes in."""

    batch: int
    cache_len: int
    dtype: str
    device: str
    mode: str
    pad_id: int
    eos_ids: tuple[int, ...]
    ignore_eos: bool
    hooks: tuple[object, ...]


@dataclass
class HeldGraph:
    """One captured (or capturable) step with the cache and buffers it reads."""

    key: GraphKey
    cache: Cache
    bufs: StepBuffers | None = None
    graph: torch.cuda.CUDAGraph | None = None
    warm: int = 0  # warm-up steps run so far
    capture_failed: bool = False


@dataclass
class GraphHolder:
    """Captured decode steps per model (weakly held), at most :data:`MAX_GRAPHS_PER_MODEL` each, newest last.

    ``builds`` counts new entries (cache + buffers), ``captures`` CUDA-graph captures; tests read them
    to prove that a hook change re-captures and a steering scale change does not.
    """

    builds: int = 0
    captures: int = 0
    errors: list[str] = field(default_factory=list)
    _held: WeakKeyDictionary[torch.nn.Module, list[HeldGraph]] = field(default_factory=WeakKeyDictionary)

    def get(self, model: torch.nn.Module, key: GraphKey) -> HeldGraph | None:
        entries = self._held.get(model, [])
        for h in entries:
            if h.key == key:
                entries.remove(h)
                entries.append(h)  # most recently used last
                return h
        return None

    def put(self, model: torch.nn.Module, held: HeldGraph) -> None:
        entries = self._held.setdefault(model, [])
        # a graph captured under another hook set can never be replayed again (handle ids never repeat)
        entries[:] = [h for h in entries if h.key.hooks == held.key.hooks][-(MAX_GRAPHS_PER_MODEL - 1) :]
        entries.append(held)
        self.builds += 1

    def held(self, model: torch.nn.Module) -> list[HeldGraph]:
        return list(self._held.get(model, []))

    def free(self, model: torch.nn.Module) -> None:
        """Drop ``model``'s graphs and caches (GPU memory)."""
        self._held.pop(model, None)


GRAPHS = GraphHolder()  # the one :func:`mechlib.generate.greedy_batch` uses


def graph_cache_len(model: CausalLM, prompt_len: int, max_new_tokens: int) -> int:
    """Cache length: ``prompt + new`` rounded up to :data:`CACHE_BUCKET` (one graph serves many batches),
    unless that outgrows a sliding window the exact length fits (then the exact length)."""
    exact = prompt_len + max_new_tokens
    bucketed = -(-exact // CACHE_BUCKET) * CACHE_BUCKET
    window = getattr(text_config(model), "sliding_window", None)
    return bucketed if not window or bucketed <= int(window) else exact


def graph_safe(cache: Cache, compile_safe: bool) -> bool:
    """Whether a replayed step would run exactly as the eager one on this cache (see the module docstring)."""
    return compile_safe and all(type(layer).__name__ in _GRAPH_SAFE_LAYERS for layer in cache.layers)


_COMPILED: dict[str, Callable[..., None]] = {}


def _step_fn(mode: str) -> Callable[..., None]:
    kwargs = GRAPH_COMPILE_KWARGS[mode]
    if kwargs is None:
        return buffer_step
    tag = mode + repr(sorted(kwargs.items()))
    if tag not in _COMPILED:
        _COMPILED[tag] = torch.compile(buffer_step, **kwargs)  # type: ignore[call-overload]
    return _COMPILED[tag]


class _Runner:
    """Advances one held graph by one step: warm-up on a side stream, capture, then replay (CUDA); eager elsewhere."""

    def __init__(
        self, held: HeldGraph, fn: Callable[[], None], device: torch.device, holder: GraphHolder, capture: bool
    ) -> None:
        self.held, self.fn, self.holder, self.capture = held, fn, holder, capture
        capturing = capture and device.type == "cuda" and not held.capture_failed
        self.stream = torch.cuda.Stream(device) if capturing else None

    def advance(self) -> None:
        held = self.held
        if held.graph is not None and self.capture:
            held.graph.replay()
            return
        if self.stream is None:
            self.fn()
            return
        if held.warm < WARMUP_STEPS:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.fn()
            torch.cuda.current_stream().wait_stream(self.stream)
            held.warm += 1
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except Exception as exc:  # not capturable (a host sync in some model code): run eagerly, say why
            held.capture_failed, self.stream = True, None
            self.holder.errors.append(f"capture failed: {type(exc).__name__}: {exc}"[:500])
            self.fn()
            return
        held.graph = graph
        self.holder.captures += 1
        graph.replay()


@dataclass(frozen=True)
class GraphRequest:
    """The decode settings this path needs (a subset of :class:`mechlib.generate.DecodeSettings`)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    mode: str = "graph"
    ignore_eos: bool = False
    sync_every: int = 1
    stop_when: StopWhen | None = None
    capture: bool = True  # False: run the buffer step eagerly on CUDA too (tests compare replay with it)


@torch.inference_mode()
def graph_greedy(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    req: GraphRequest,
    holder: GraphHolder = GRAPHS,
) -> torch.Tensor | None:
    """Greedy continuation ids ``[batch, steps]`` of one left-padded batch, as
    :func:`mechlib.generate.greedy_batch` gives them; ``None`` when the model's cache is not graph-safe, or
    when a hook that is not declared graph-safe would be captured (:func:`hooks_not_graph_safe`)."""
    if req.mode not in GRAPH_MODES:
        raise GraphDecodeError(f"mode must be one of {GRAPH_MODES}, got {req.mode!r}")
    batch, prompt_len = input_ids.shape
    cache_len = graph_cache_len(model, prompt_len, req.max_new_tokens)
    hooks = hook_set(model)  # one walk over the modules for the key and the unsafe hooks
    key = GraphKey(
        batch,
        cache_len,
        str(model.dtype),
        str(input_ids.device),
        req.mode,
        req.pad_id,
        req.eos_ids,
        req.ignore_eos,
        hooks.key,
    )
    if req.capture and input_ids.device.type == "cuda" and hooks.unsafe:
        note = f"not captured, hooks without graph_key(): {', '.join(hooks.unsafe)}"[:500]
        if note not in holder.errors:
            holder.errors.append(note)
        return None
    held = holder.get(model, key)
    if held is not None and held.capture_failed and req.capture:
        return None  # it failed once for this key: later batches take the compiled path, not the eager buffer step
    if held is None:
        cache, safe = static_cache(model, cache_len)
        if not graph_safe(cache, safe):
            return None
        held = HeldGraph(key, cache)
        holder.put(model, held)
    else:
        held.cache.reset()
    kv = held.cache
    extra: dict[str, int] = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask2d = None if bool((attention_mask == 1).all()) else attention_mask
    nxt = step(
        model, input_ids, position_ids, make_masks(model, kv, batch, prompt_len, mask2d, position_ids, True), kv, extra
    )
    pos = position_ids[:, -1:] + 1
    grown = None if mask2d is None else torch.cat([mask2d, mask2d.new_ones((batch, 1))], dim=-1)
    first = make_masks(model, kv, batch, 1, grown, pos, False)
    b = load_buffers(held.bufs, first, pos, prompt_len, req.eos_ids, req.pad_id, cache_len)
    if b is not held.bufs:
        held.bufs, held.graph, held.warm = b, None, 0  # new addresses: any graph of the old ones is stale
    use_eos = not req.ignore_eos and len(req.eos_ids) > 0
    record(b, nxt, req.pad_id, use_eos)
    fn = functools.partial(_step_fn(req.mode), model, kv, b, extra, req.pad_id, use_eos)
    runner = _Runner(held, fn, input_ids.device, holder, req.capture)
    guard = hook_guards() if GRAPH_COMPILE_KWARGS[req.mode] is not None else contextlib.nullcontext()
    steps = req.max_new_tokens
    t0 = STEP_TIMER.loop_start()
    with guard:
        for t in range(req.max_new_tokens):
            if t > 0:
                ev = STEP_TIMER.begin(input_ids.device)
                runner.advance()
                STEP_TIMER.end(ev)
            if not req.ignore_eos and (t + 1) % req.sync_every == 0:
                if req.stop_when is not None:
                    mark_stopped(b.out, b.unfinished, t + 1, req.stop_when)
                if not bool(b.unfinished.any()):
                    steps = t + 1
                    break
    result = b.out[:, :steps].clone()  # the buffer is the next batch's
    STEP_TIMER.loop_end(t0, steps - 1, input_ids.device)
    return result
