"""The forward pass to decoder layer L, three ways: hooked stop, per-layer compile, one compiled stack.

Why three: collection only needs the residual stream after layer L, and at seq 1024 every batch
has the same shape, so the whole truncated stack (embedding, Gemma 4's per-layer inputs, layers
0…L) can be one static graph. The ways, all giving the same activations (eager: bit-equal in fp32
on CPU; compiled: within 1e-5 relative, fusion reorders sums):

- ``None`` (eager): :func:`mechlib.hooks.run_to_layer` — the model's own forward, stopped by an
  exception from a hook on layer L. Works on any model; hooks (steering) fire as usual.
- ``"layers"`` (what ``compile=True`` means): each of layers 0…L runs a ``torch.compile``'d
  forward (on mechlib-owned shallow copies of the layers, in a view as below; hooks stay eager
  around each). Fuses the elementwise work inside each layer, but the graph ends at every layer
  boundary.
- ``"stack"``: a mechlib-owned *view* of the text model — a shallow copy whose layer list is
  ``layers[:L + 1]`` and whose final norm is ``Identity`` — run whole and compiled with static
  shapes: no exception, no per-layer graph breaks, the lm head never runs. The user's model is
  not modified: the view shares the parameters and the layer modules (so ``model.to`` and weight
  edits are seen) but owns its module dict; views and compiled functions are cached in a
  ``WeakKeyDictionary`` keyed by the model and rebuilt when the layer modules change.

Defaults: ``compile=True`` keeps meaning ``"layers"`` and eager stays the default until a GPU run
shows ``"stack"`` ahead at the study's shape (``benchmarks/collect.py`` measures every mode in one
run, issue 12); none has been measured on a GPU yet.

Why a view and not a temporarily truncated layer list: a context manager that swaps
``model.layers`` would change the model for every other thread (a notebook's background writer,
a second collector) while it runs and, under ``torch.compile``, would leave guards keyed on a list
that is put back afterwards. The view is never visible from the model.

Gemma 4: layers from ``num_hidden_layers - num_kv_shared_layers`` on (24 in E4B) reuse K/V of
earlier layers; the view keeps layers 0…L in order, so every producer precedes its consumer, and
the text model's own loop (which keys the KV-sharing split on the layer index) runs unchanged.
The per-layer inputs are still computed for all layers (the text model reshapes them by
``num_hidden_layers``): ~1.4 % of E4B's FLOPs to layer 21, kept for exactness.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mechlib.hooks import run_to_layer
from mechlib.models import LayerError, _layers_owner, check_layer, decoder_layers, final_norm

__all__ = [
    "COMPILE_MODES",
    "CompileMode",
    "SDPACall",
    "forward_to_layer",
    "layer_forward",
    "pick_kernel",
    "record_sdpa",
    "resolve_compile",
    "truncated_stack",
]

CompileMode = Literal["layers", "stack"]
COMPILE_MODES: tuple[str, ...] = ("layers", "stack")
LayerForward = Callable[[torch.Tensor], torch.Tensor]  # input ids [B, T] -> residual after layer L [B, T, d]


def resolve_compile(compile: bool | str | None) -> CompileMode | None:
    """``False``/``None`` → eager; ``True`` → ``"layers"`` (the historical meaning); a mode name → itself."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "layers"
    if compile in COMPILE_MODES:
        return compile  # type: ignore[return-value]  # narrowed by the membership test
    raise ValueError(f"compile must be a bool or one of {', '.join(COMPILE_MODES)}, got {compile!r}")


@dataclass
class _StackEntry:
    layers: tuple[int, ...]  # id() of the layer modules the view was built from
    view: nn.Module
    compiled: Callable[..., object] | None = None  # "stack": the view under torch.compile
    layers_view: nn.Module | None = None  # "layers": a view over copies of the layers with compiled forwards


# model -> layer -> its truncated view; weak keys: a dropped model takes its views (and graphs) with it
_STACKS: weakref.WeakKeyDictionary[nn.Module, dict[int, _StackEntry]] = weakref.WeakKeyDictionary()


def _child_name(owner: nn.Module, child: nn.Module, what: str) -> str:
    for name, module in owner.named_children():
        if module is child:
            return name
    raise LayerError(f"the {what} of {type(owner).__name__} is not one of its direct children")


def _entry(model: nn.Module, layer: int) -> _StackEntry:
    check_layer(model, layer)
    layers = list(decoder_layers(model)[: layer + 1])
    key = tuple(id(m) for m in layers)
    per_model = _STACKS.setdefault(model, {})
    entry = per_model.get(layer)
    if entry is None or entry.layers != key:
        owner = _layers_owner(model)
        view = copy.copy(owner)  # a new object sharing parameters, buffers and config
        modules = dict(owner._modules)  # its own module dict: the owner's is never touched
        modules[_child_name(owner, decoder_layers(model), "layer list")] = nn.ModuleList(layers)
        modules[_child_name(owner, final_norm(model), "final norm")] = nn.Identity()
        view.__dict__["_modules"] = modules
        for name, value in list(vars(view).items()):  # the owner's hooks watch the owner's output, not this one's
            if "hooks" in name and isinstance(value, dict):
                view.__dict__[name] = type(value)()
        entry = per_model[layer] = _StackEntry(key, view)
    return entry


def truncated_stack(model: nn.Module, layer: int) -> nn.Module:
    """The text model with layers ``0..layer`` and no final norm (a cached view; the model is unchanged)."""
    return _entry(model, layer).view


def _last_hidden(view: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = view(input_ids=input_ids, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise LayerError(f"{type(view).__name__} returned no last_hidden_state")
    return hidden


def forward_to_layer(model: nn.Module, layer: int, input_ids: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` via the truncated view (== ``run_to_layer``).

    ``compile=True``: the view runs under ``torch.compile(dynamic=False)``, compiled once per
    (model, layer) and recompiled by Dynamo only when the input shape changes.
    """
    entry = _entry(model, layer)
    if not compile:
        return _last_hidden(entry.view, input_ids)
    if entry.compiled is None:
        # A code object of its own per (model, layer): Dynamo keeps its compiled graphs (and its
        # recompile limit, 8) per code object, so collecting many layers or models in one process
        # never pushes a view back to eager. The stack traces as one graph (no breaks on Gemma 4,
        # Qwen 3.5's attention layers or Llama), so no inner frame shares a cache either.
        name = f"_stack_to_layer_{layer}_{id(entry.view):x}"
        code = _last_hidden.__code__.replace(co_name=name, co_qualname=name)
        entry.compiled = torch.compile(types.FunctionType(code, _last_hidden.__globals__), dynamic=False)
    result = entry.compiled(entry.view, input_ids)
    assert isinstance(result, torch.Tensor)
    return result


def _layers_view(model: nn.Module, layer: int) -> nn.Module:
    """The truncated view over mechlib-owned shallow copies of layers 0…L, each with a compiled ``forward``.

    Compiled is each layer's forward, not its module call: forward hooks stay eager around the
    compiled code instead of being traced into it, and since a shallow copy shares the layer's
    parameters, submodules and hook dicts, a steering hook registered on the user's layer (even
    later) fires here too. The user's layers are not modified (``compile=True`` once replaced
    their ``forward``).
    """
    entry = _entry(model, layer)
    if entry.layers_view is None:
        copies = []
        for block in decoder_layers(model)[: layer + 1]:
            twin = copy.copy(block)
            # the class's forward code, shared by every layer: Dynamo reuses one graph across
            # layers of the same structure (parameters are graph inputs), so 22 layers compile a few graphs
            twin.__dict__["forward"] = torch.compile(twin.forward)
            copies.append(twin)
        view = copy.copy(entry.view)
        view.__dict__["_modules"] = {**entry.view._modules}
        view._modules[_child_name(entry.view, decoder_layers(entry.view), "layer list")] = nn.ModuleList(copies)
        entry.layers_view = view
    return entry.layers_view


class _FixedRows:
    """The compiled stack at one batch size: a shorter batch (a collection's last) is padded with
    copies of its last row and the padding dropped from the output. Why: the graph is static, and
    a new row count would mean a fresh compile (a minute at E4B's size) for one batch. Rows never
    see each other (attention is within a row), so the padding changes nothing in the real rows."""

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer = model, layer
        self.rows = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        self.rows = max(self.rows, n)
        if n < self.rows:
            ids = torch.cat([ids, ids[-1:].expand(self.rows - n, -1)])
        return forward_to_layer(self.model, self.layer, ids, compile=True)[:n]


def layer_forward(model: nn.Module, layer: int, compile: bool | str | None = False) -> LayerForward:
    """A function ``input_ids -> residual after layer`` for the chosen way (see the module docstring)."""
    check_layer(model, layer)
    mode = resolve_compile(compile)
    if mode == "stack":
        return _FixedRows(model, layer)
    if mode == "layers":
        view = _layers_view(model, layer)
        return lambda ids: _last_hidden(view, ids)
    return lambda ids: run_to_layer(model, layer, input_ids=ids)


# ------------------------------------------------------------------------------ attention kernel


@dataclass(frozen=True)
class SDPACall:
    """One ``scaled_dot_product_attention`` call: what decides the kernel, and (CUDA) which ones accept it."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    dtype: str
    mask: str | None  # "bool [B, 1, T, T]" or None (then ``is_causal`` carries causality)
    is_causal: bool
    enable_gqa: bool
    flash: bool | None  # torch.backends.cuda.can_use_* (False when that backend is disabled); None off CUDA
    efficient: bool | None
    cudnn: bool | None
    kernel: str  # the first accepting backend in torch's priority order at the call; "cpu" off CUDA


# torch's SDPBackend values (torch._C._get_sdp_priority_order() lists them in the order tried)
_BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}


def pick_kernel(flash: bool | None, efficient: bool | None, cudnn: bool | None, math: bool = True) -> str:
    """The backend SDPA runs: the first in torch's current priority order that accepts the call."""
    if flash is None:
        return "cpu"
    ok = {"flash": flash, "efficient": efficient, "cudnn": cudnn, "math": math}
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [1, 2, 0, 3])()
    for value in order:
        name = _BACKEND_NAMES.get(int(value))
        if name is not None and ok[name]:
            return name
    return "none"


def _can_use(q, k, v, mask, is_causal: bool, gqa: bool) -> tuple[bool | None, bool | None, bool | None]:
    if q.device.type != "cuda":
        return None, None, None
    b = torch.backends.cuda
    try:
        params = b.SDPAParams(q, k, v, mask, 0.0, is_causal, gqa)  # 7 args since torch 2.5
    except TypeError:
        params = b.SDPAParams(q, k, v, mask, 0.0, is_causal)  # type: ignore[call-arg]
    cudnn = getattr(b, "can_use_cudnn_attention", None)
    return (
        b.flash_sdp_enabled() and b.can_use_flash_attention(params, False),
        b.mem_efficient_sdp_enabled() and b.can_use_efficient_attention(params, False),
        (b.cudnn_sdp_enabled() and cudnn(params, False)) if cudnn is not None else None,
    )


class _RecordSDPA(TorchFunctionMode):
    def __init__(self, calls: list[SDPACall]):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            gqa = bool(kwargs.get("enable_gqa", False))
            flash, eff, cudnn = _can_use(q, k, v, mask, causal, gqa)
            shown = None if mask is None else f"{str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}"
            math = flash is None or torch.backends.cuda.math_sdp_enabled()
            kernel = pick_kernel(flash, eff, cudnn, math)
            call = SDPACall(tuple(q.shape), tuple(k.shape), str(q.dtype), shown, causal, gqa, flash, eff, cudnn, kernel)
            self.calls.append(call)
        return func(*args, **kwargs)


@contextmanager
def record_sdpa() -> Iterator[list[SDPACall]]:
    """Record every SDPA call made (eagerly) inside the block: shapes, mask, and the kernels that accept it."""
    calls: list[SDPACall] = []
    with _RecordSDPA(calls):
        yield calls
