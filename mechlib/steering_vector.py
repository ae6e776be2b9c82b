"""The CAA steering vector as one object: its layer, direction, unit of scale and provenance.

Why: chapter 05 finds the direction, chapter 06 sweeps it, the card's snippet loads it without
mechlib. Before, each read a ``{"vector": …, **sidecar}`` dict by string keys. A
:class:`SteeringVector` carries the same facts typed (in the spirit of steering-vectors'
``SteeringVector``) and keeps the on-disk format the card announces: ``steering_vec_L{layer}.pt`` holds
the *bare* unit tensor (``torch.load(path).to("cuda").to(torch.bfloat16)`` works), and
``steering_vec_L{layer}.json`` beside it holds the layer, the mean residual norm and the provenance.

The hook (:func:`steering_hook`) is a context manager whose handle is removed in ``finally``: a
failed generation never leaves the model steered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mechlib.hooks import LayerOutput, add_forward_hook, layer_output_tensor, replace_layer_output
from mechlib.io import atomic_torch_save, atomic_write_json, read_json
from mechlib.models import check_layer, decoder_layers

JSONScalar = str | int | float | bool | None


class SteeringError(ValueError):
    """A steering setting the book cannot use; the message names the value."""


def steering_delta(vector: Tensor, scale: float, mean_norm: float) -> Tensor:
    """``scale × mean_norm × vector / ‖vector‖`` — the exact vector the hook adds."""
    v = torch.as_tensor(vector).detach().float()
    if v.ndim != 1 or not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise SteeringError(f"the steering vector must be a finite, non-zero 1-D tensor, got shape {tuple(v.shape)}")
    if not (mean_norm > 0 and torch.isfinite(torch.tensor(mean_norm))):
        raise SteeringError(f"mean_norm must be a positive number, got {mean_norm!r}")
    return (float(scale) * float(mean_norm)) * (v / v.norm())


@contextlib.contextmanager
def steering_hook(layer_module: nn.Module, vector: Tensor, scale: float, mean_norm: float) -> Iterator[Tensor]:
    """Add ``scale × mean_norm × unit(vector)`` to ``layer_module``'s output at every position.

    Works for layers returning a Tensor (transformers 5, Gemma 4 included) or a tuple whose first
    item is the hidden state. During ``generate`` the hook fires at prefill and every decode step,
    so every position is steered once. Yields the added vector (float32); the hook is removed on
    exit, also when the body raises.
    """
    hook = AddVector(steering_delta(vector, scale, mean_norm))
    with add_forward_hook(layer_module, hook):
        yield hook.delta


class AddVector:
    """:func:`steering_hook`'s forward hook: ``out + delta`` at every position, ``delta`` fixed.

    A class rather than a closure so that it can say it is safe inside a captured CUDA graph
    (:meth:`graph_key`, read by :mod:`mechlib.graph_decode`): its only device input is ``delta``, cast
    once per dtype/device and never changed while the hook is registered.
    """

    def __init__(self, delta: Tensor) -> None:
        self.delta = delta  # float32, as steering_delta returns it
        self._cast: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def graph_key(self) -> tuple[str, int]:
        return ("AddVector", id(self.delta))

    def __call__(self, _module: nn.Module, _inputs: tuple[object, ...], out: LayerOutput) -> LayerOutput:
        h = layer_output_tensor(out)
        if h.shape[-1] != self.delta.shape[0]:
            raise SteeringError(f"steering vector has {self.delta.shape[0]} dims but the layer outputs {h.shape[-1]}")
        key = (h.dtype, h.device)
        if key not in self._cast:
            self._cast[key] = self.delta.to(device=h.device, dtype=h.dtype)
        return replace_layer_output(out, h + self._cast[key])


def meta_path(path: str | os.PathLike[str]) -> Path:
    """``steering_vec_L{layer}.json`` beside ``steering_vec_L{layer}.pt``: the vector's metadata."""
    return Path(path).with_suffix(".json")


@dataclass(frozen=True, eq=False)  # eq=False: a dataclass __eq__ would compare tensors with ==
class SteeringVector:
    """A direction to push the residual stream after decoder layer ``layer`` along.

    ``unit`` is the direction as saved (unit norm up to float32 rounding; the added vector is
    normalised again, so any non-zero direction steers like its unit). ``mean_norm`` is the layer's
    mean residual norm ``‖h‖₂`` over the non-special tokens of every prompt chapter 05 read (contrast and
    held-out; no label enters it): scales are fractions
    of it. The rest is provenance, written to and read from the JSON sidecar; ``extra`` keeps
    sidecar keys this class does not name, so a load → save round trip loses nothing.
    """

    layer: int
    unit: Tensor
    mean_norm: float
    model: str = ""
    n_correct: int | None = None
    n_wrong: int | None = None
    raw_diff_norm: float | None = None  # ‖mean(h|correct) − mean(h|wrong)‖ before normalising
    pooling: str | None = None  # how the contrast states were pooled ("last" | "mean")
    extra: Mapping[str, JSONScalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steering_delta(self.unit, 1.0, self.mean_norm)  # validates the direction and the norm

    @property
    def d_model(self) -> int:
        return int(self.unit.shape[0])

    def delta(self, scale: float) -> Tensor:
        """``scale × mean_norm × unit`` (float32): what :meth:`apply` adds at every position."""
        return steering_delta(self.unit, scale, self.mean_norm)

    def with_unit(self, unit: Tensor) -> SteeringVector:
        """Another direction at the same layer and unit of scale (a random-direction control)."""
        return SteeringVector(self.layer, unit, self.mean_norm, model=self.model)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, scale: float) -> Iterator[Tensor]:
        """Steer ``model`` by ``scale × mean_norm × unit`` after decoder layer ``layer`` inside the ``with``
        block; yields the added vector. The hook is removed on exit and when the body raises."""
        with steering_hook(
            decoder_layers(model)[check_layer(model, self.layer)], self.unit, scale, self.mean_norm
        ) as delta:
            yield delta

    # ------------------------------------------------------------------ the card's on-disk format

    def sidecar(self) -> dict[str, JSONScalar]:
        """The JSON sidecar's content, keys in the order chapter 05 has always written them."""
        out: dict[str, JSONScalar] = {"layer": int(self.layer), "model": self.model}
        if self.n_correct is not None:
            out["n_correct"] = int(self.n_correct)
        if self.n_wrong is not None:
            out["n_wrong"] = int(self.n_wrong)
        out["mean_resid_norm"] = float(self.mean_norm)
        if self.raw_diff_norm is not None:
            out["raw_diff_norm"] = float(self.raw_diff_norm)
        if self.pooling is not None:
            out["pooling"] = self.pooling
        return {**out, **self.extra}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """The card's ``steering_vec_L{layer}.pt`` (the bare float32 tensor) and its JSON sidecar, atomically."""
        atomic_torch_save(self.unit.detach().float().cpu().contiguous(), path)
        atomic_write_json(meta_path(path), self.sidecar())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        path = Path(path)
        meta = meta_path(path)
        for f in (path, meta):
            if not f.is_file():
                raise SteeringError(f"steering vector file not found: {f} (run chapter 05 first)")
        unit = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(unit, Tensor) or unit.ndim != 1:
            raise SteeringError(f"{path}: expected a 1-D tensor (the unit steering vector); rerun chapter 05")
        obj = dict(read_json(meta))
        missing = {"layer", "mean_resid_norm"} - set(obj)
        if missing:
            raise SteeringError(f"{meta}: steering vector metadata lacks keys {sorted(missing)}; rerun chapter 05")
        return cls(
            layer=int(obj.pop("layer")),
            unit=unit,
            mean_norm=float(obj.pop("mean_resid_norm")),
            model=str(obj.pop("model", "")),
            n_correct=_opt_int(obj.pop("n_correct", None)),
            n_wrong=_opt_int(obj.pop("n_wrong", None)),
            raw_diff_norm=_opt_float(obj.pop("raw_diff_norm", None)),
            pooling=_opt_str(obj.pop("pooling", None)),
            extra=obj,
        )


def _opt_int(x: object) -> int | None:
    return None if x is None else int(x)  # type: ignore[call-overload]  # a JSON number


def _opt_float(x: object) -> float | None:
    return None if x is None else float(x)  # type: ignore[arg-type]  # a JSON number


def _opt_str(x: object) -> str | None:
    return None if x is None else str(x)
