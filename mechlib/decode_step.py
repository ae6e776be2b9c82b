"""One decode step of :mod:`mechlib.generate` — a forward with the KV cache and an argmax — plain or compiled.

Why a module of its own: the compiled step is where torch.compile's rules bite. Dynamo does not
guard on module hooks by default (``skip_nnmodule_hook_guards``): a steering hook added after the
first compile would silently be ignored. :func:`hook_guards` turns those guards on, so a changed
hook set recompiles instead. Compiled steps are kept in :data:`COMPILED_STEPS`, an object mechlib
owns, never on the model. The captured step of :mod:`mechlib.graph_decode` has the same question
without dynamo to answer it: :func:`hook_set_key` names the hook set a graph was captured under,
and :func:`hooks_not_graph_safe` the hooks a replay would not run.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from mechlib.models import CausalLM

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


def hook_set_key(model: torch.nn.Module) -> tuple[object, ...]:
    """Identity of every forward and forward-pre hook on ``model``'s modules and of the global ones.

    Handle ids never repeat (a re-registered hook gets a new one), so the key changes whenever the
    hook set does. Hooks that expose ``graph_key()`` (:class:`mechlib.steering.RowSteering`) add
    it: which buffer the captured graph would read.
    """
    from torch.nn.modules import module as nn_module

    def entries(where: object, hooks: Mapping[int, Callable[..., object]]) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for hid, fn in hooks.items():
            extra = fn.graph_key() if hasattr(fn, "graph_key") else None
            out.append((where, hid, id(fn), extra))
        return out

    key: list[tuple[object, ...]] = []
    key += entries("global", nn_module._global_forward_hooks)
    key += entries("global-pre", nn_module._global_forward_pre_hooks)
    for i, mod in enumerate(model.modules()):
        key += entries(i, mod._forward_hooks)
        key += entries((i, "pre"), mod._forward_pre_hooks)
        if "forward" in vars(mod):  # a forward patched on the instance (accelerate, peft) is part of the step too
            key.append((i, "forward", id(vars(mod)["forward"])))
    return tuple(key)


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
    from torch.nn.modules import module as nn_module

    groups: list[tuple[str, Mapping[int, Callable[..., object]]]] = [
        ("global forward hook", nn_module._global_forward_hooks),
        ("global forward pre-hook", nn_module._global_forward_pre_hooks),
    ]
    for name, mod in model.named_modules():
        groups += [(f"forward hook on {name or 'model'}", mod._forward_hooks)]
        groups += [(f"forward pre-hook on {name or 'model'}", mod._forward_pre_hooks)]
    return [
        f"{where}: {getattr(fn, '__qualname__', type(fn).__qualname__)}"
        for where, hooks in groups
        for fn in hooks.values()
        if not hasattr(fn, "graph_key")
    ]
