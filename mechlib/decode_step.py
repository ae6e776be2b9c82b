"""One decode step of :mod:`mechlib.generate` — a forward with the KV cache and an argmax — plain or compiled.

Why a module of its own: the compiled step is where torch.compile's rules bite. Dynamo does not
guard on module hooks by default (``skip_nnmodule_hook_guards``): a steering hook added after the
first compile would silently be ignored. :func:`hook_guards` turns those guards on, so a changed
hook set recompiles instead. Compiled steps are kept in :data:`COMPILED_STEPS`, an object mechlib
owns, never on the model.
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
    extra: dict[str, int],
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
