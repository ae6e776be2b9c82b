"""Forward hooks that never leak, and a forward pass that stops after decoder layer L.

Why: a hook left attached after an exception silently changes every later forward pass (a
steering vector that keeps steering, a stop hook that keeps stopping). ``add_forward_hook``
removes its hook in a ``finally``. ``run_to_layer`` is the dictionary_learning trick: raise
from the hook on layer L so the remaining layers (and the 262k-wide unembedding of Gemma 4)
never run — about half the work of the study's full-depth ``output_hidden_states`` pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mechlib.models import check_layer, decoder_layers

LayerOutput = torch.Tensor | tuple[torch.Tensor, ...]  # what a decoder layer returns (transformers 5: a Tensor)
HookFn = Callable[[nn.Module, tuple[object, ...], LayerOutput], LayerOutput | None]
InputValue = torch.Tensor | bool | None  # model(**inputs): ids, masks, position ids, use_cache


class StopForward(Exception):
    """Raised from a hook to end a forward pass early; carries the captured activation."""

    def __init__(self, output: torch.Tensor | None = None):
        super().__init__("forward stopped by a mechlib hook")
        self.output = output


def layer_output_tensor(output: object) -> torch.Tensor:
    """The residual stream from a decoder layer's output: a plain Tensor in transformers 5
    (Gemma 4, Qwen 3.5, Llama), the first element of a tuple in older versions / other models."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder-layer output type {type(output).__name__}")


def replace_layer_output(output: object, new: torch.Tensor) -> LayerOutput:
    """Rebuild a decoder layer's output with ``new`` as the residual stream (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        return cast(LayerOutput, type(output)((new, *output[1:])))  # the container type the layer returned
    raise TypeError(f"unexpected decoder-layer output type {type(output).__name__}")


@contextlib.contextmanager
def add_forward_hook(module: nn.Module, fn: HookFn) -> Iterator[RemovableHandle]:
    """Register ``fn`` as a forward hook on ``module`` for the ``with`` block; always removed."""
    handle = module.register_forward_hook(fn)
    try:
        yield handle
    finally:
        handle.remove()


def _stop_hook(module: nn.Module, args: tuple[object, ...], output: LayerOutput) -> None:
    raise StopForward(layer_output_tensor(output))


def run_to_layer(model: nn.Module, layer: int, **inputs: InputValue) -> torch.Tensor:
    """Run ``model(**inputs)`` only as far as decoder layer ``layer``; return that layer's output.

    The result equals ``model(**inputs, output_hidden_states=True).hidden_states[layer + 1]`` for
    every layer below the last (the last entry of ``hidden_states`` is final-normed on Gemma 4 and
    in transformers 5 generally; this returns the raw layer output instead). ``use_cache`` is
    off unless given: no KV cache is needed for a single forward.
    """
    check_layer(model, layer)
    inputs.setdefault("use_cache", False)
    with add_forward_hook(decoder_layers(model)[layer], _stop_hook):
        try:
            model(**inputs)
        except StopForward as stop:
            assert stop.output is not None
            return stop.output
    raise RuntimeError(f"decoder layer {layer} never ran during the forward pass of {type(model).__name__}")
