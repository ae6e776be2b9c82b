"""One decode step of :mod:`mechlib.generate` — a forward with the KV cache and an argmax — plain or compiled.

Why a module of its own: the compiled step is where torch.compile's rules bite. Dynamo does not
guard on module hooks by default (``skip_nnmodule_hook_guards``): a steering hook added after the
first compile would silently be ignored. :func:`hook_guards` turns those guards on, so a changed
hook set recompiles instead. Compiled steps are kept in :data:`COMPILED_STEPS`, an object mechlib
owns, never on the model. The captured step of :mod:`mechlib.graph_decode` has the same question
without dynamo to answer it: :func:`hook_set_key` names the hook set a graph was captured under,
and :func:`hooks_not_graph_safe` the hooks a replay would not run (one walk gives both: :func:`hook_set`).
:func:`contiguous_lm_head` keeps the CPU bf16 forward's unembedding off a slow strided matmul.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from mechlib.models import CausalLM, model_device

if TYPE_CHECKING:
    from mechlib.kv_cache import Cache, Masks

StepFn = Callable[["CausalLM", torch.Tensor, torch.Tensor, "Masks", "Cache", dict[str, int]], torch.Tensor]
DEFAULT_COMPILE_KWARGS: Mapping[str, object] = {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False}


def supports_logits_to_keep(model: CausalLM) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def step(
    model: CausalLM,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: Masks,
    cache: Cache,
    extra: Mapping[str, int],
) -> torch.Tensor:
    """One forward with the cache; returns the greedy next token of every row."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        return_dict=True,
        **extra,
    )
    return out.logits[:, -1].argmax(dim=-1)


class CompiledSteps:
    """``torch.compile``'d decode steps, one per set of compile options, kept for reuse.

    Why one per option set and not per model: the model is an argument of the step, and dynamo
    guards on it (and, with :func:`hook_guards`, on its hooks), so one compiled function serves
    every model; compiling anew per call would throw away the captured graphs.
    """

    def __init__(self) -> None:
        self._steps: dict[tuple[tuple[str, str], ...], StepFn] = {}

    def get(self, compile_kwargs: Mapping[str, object]) -> StepFn:
        key = tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items()))
        if key not in self._steps:
            self._steps[key] = torch.compile(step, **compile_kwargs)  # type: ignore[call-overload]
        return self._steps[key]


COMPILED_STEPS = CompiledSteps()  # the one :func:`mechlib.generate.greedy_batch` uses


@contextlib.contextmanager
def hook_guards() -> Iterator[None]:
    """Make dynamo guard on module hooks (a steering hook added later must trigger a recompile)."""
    import torch._dynamo.config as dcfg  # only the compiled path needs dynamo (a slow import)

    with dcfg.patch(skip_nnmodule_hook_guards=False, recompile_limit=max(64, dcfg.recompile_limit)):
        yield


class HookSet(NamedTuple):
    """What :mod:`mechlib.graph_decode` asks of a model's hooks, from one walk over its modules."""

    key: tuple[object, ...]  # :func:`hook_set_key`
    unsafe: list[str]  # :func:`hooks_not_graph_safe`


def hook_set(model: torch.nn.Module) -> HookSet:
    """:func:`hook_set_key` and :func:`hooks_not_graph_safe` together, walking the modules once (per batch)."""
    from torch.nn.modules import module as nn_module

    key: list[tuple[object, ...]] = []
    unsafe: list[str] = []

    def visit(where: object, label: str, hooks: Mapping[int, Callable[..., object]]) -> None:
        for hid, fn in hooks.items():
            if hasattr(fn, "graph_key"):  # declared safe to capture; says which buffer a graph would read
                key.append((where, hid, id(fn), fn.graph_key()))
            else:
                key.append((where, hid, id(fn), None))
                unsafe.append(f"{label}: {getattr(fn, '__qualname__', type(fn).__qualname__)}")

    global_hooks = [
        ("global", "global forward hook", nn_module._global_forward_hooks),
        ("global-pre", "global forward pre-hook", nn_module._global_forward_pre_hooks),
    ]
    for where, label, hooks in global_hooks:
        visit(where, label, hooks)
    for i, (name, mod) in enumerate(model.named_modules()):
        visit(i, f"forward hook on {name or 'model'}", mod._forward_hooks)
        visit((i, "pre"), f"forward pre-hook on {name or 'model'}", mod._forward_pre_hooks)
        if "forward" in vars(mod):  # a forward patched on the instance (accelerate, peft) is part of the step too
            key.append((i, "forward", id(vars(mod)["forward"])))
    return HookSet(tuple(key), unsafe)


def hook_set_key(model: torch.nn.Module) -> tuple[object, ...]:
    """Identity of every forward and forward-pre hook on ``model``'s modules and of the global ones.

    Handle ids never repeat (a re-registered hook gets a new one), so the key changes whenever the
    hook set does. Hooks that expose ``graph_key()`` (:class:`mechlib.steering.RowSteering`) add
    it: which buffer the captured graph would read.
    """
    return hook_set(model).key


def hooks_not_graph_safe(model: torch.nn.Module) -> list[str]:
    """The hooks on ``model`` (and global ones) that do not declare themselves safe to capture.

    Why: a captured step runs a hook's Python body at warm-up and capture only; every replay repeats
    just the kernels it launched then. A hook that adds a fixed or in-place-updated device tensor (the
    steering hooks) is right under replay; one that records activations on the host, counts calls or
    reads a Python value that changes would silently stop working. So a hook is captured only when
    it says it is safe by exposing ``graph_key()`` (:class:`mechlib.steering.RowSteering`,
    :func:`mechlib.steering_vector.steering_hook`); with any other hook the batch takes the compiled
    (dynamo-traced) path, which runs hooks every step.
    """
    return hook_set(model).unsafe


@contextlib.contextmanager
def contiguous_lm_head(model: CausalLM) -> Iterator[None]:
    """On CPU in bf16/fp16, hand the unembedding a contiguous input (around a whole generation).

    ``logits_to_keep=1`` slices ``hidden[:, -1:, :]`` (a strided view); for a strided 3-D input in
    bf16 the CPU matmul expands the [vocab, d] weight per row (SmolLM2 at batch 32: a
    900 M-element copy, ~10 s per prefill on this machine's 2 cores, more than the whole forward).
    Values are unchanged; fp32 and GPUs are left alone, so the exact CPU path is untouched.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or model_device(model).type != "cpu" or model.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()
