"""What the runner checks before any chapter runs, and the ``-p KEY=VALUE`` overrides it validates.

Why before: a device the machine lacks, a ``layer`` past the model's last, or a local input path with a
typo would otherwise surface minutes (chapter 01 after loading the model; a wrong ``gsm8k_path`` after
collection and training) or an hour (chapter 06's ``steering_layer``) into a run. These read only the
params, the model's config and whether files exist, never weights or data. :mod:`mechlib.book` re-exports
them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

import yaml

from mechlib.params import BookParams, ParamsError, ParamsLoader, validate

__all__ = ["check_device", "check_inputs", "check_layers", "one_line", "parse_overrides", "source_of", "with_overrides"]


def one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines included) as single spaces: one terminal line."""
    return " ".join(str(text).split())


def check_device(device: str, source: str) -> None:
    """Refuse a device this machine lacks now, not when a chapter first moves a tensor there."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParamsError(
                f"{source}: 'device' is {device!r} but torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device: auto or cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ParamsError(
                f"{source}: 'device' is {device!r} but this machine has {torch.cuda.device_count()} "
                f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(
            f"{source}: 'device' is 'mps' but torch.backends.mps.is_available() is False here; use device: auto or cpu"
        )


def check_layers(params: BookParams, source: str) -> None:
    """``layer`` and ``steering_layer`` against the model's decoder layers, from its config alone.

    Why here: chapter 01 would find a bad ``layer`` after loading the model, and chapter 06 a bad
    ``steering_layer`` after the whole book before it had run. A hub id whose config is not cached
    is skipped with a note (chapter 01 checks it once the model is loaded).
    """
    from mechlib.models import ModelLoadError, ModelShapeUnknown, model_shape

    try:
        n_layers, _ = model_shape(params.model)
    except ModelShapeUnknown as exc:
        print(f"[mechbook] note: layer check skipped until the model loads: {one_line(exc)}", file=sys.stderr)
        return
    except ModelLoadError as exc:
        raise ParamsError(f"{source}: 'model': {one_line(exc)}") from None
    for key in ("layer", "steering_layer"):
        value = getattr(params, key)
        if value is not None and value >= n_layers:
            raise ParamsError(
                f"{source}: '{key}' is {value} but {params.model} has {n_layers} decoder layers: "
                f"valid layers are 0..{n_layers - 1}"
            )


def check_inputs(params: BookParams, source: str, declared: Collection[str]) -> None:
    """The local files the chosen chapters will read exist: a corpus file, a GSM8K copy, a published SAE.

    ``declared``: the parameters those chapters declare, so ``--only 01`` is not refused for a
    ``gsm8k_path`` that only chapter 04 reads. Hub inputs (``hf:…``, an empty ``gsm8k_path``) are left to
    the chapter that downloads them.
    """
    from mechlib.activations.corpus import CorpusError, check_local_file, is_local
    from mechlib.gsm8k import GSM8KError, local_file
    from mechlib.paths import resolve
    from mechlib.sae.loading import locate_local
    from mechlib.sae.model import SAEError

    checks: list[tuple[str, Callable[[], object]]] = []
    if "corpus" in declared and is_local(params.corpus):
        checks.append(("corpus", lambda: check_local_file(resolve(params.corpus))))
    if "gsm8k_path" in declared and params.task == "gsm8k" and params.gsm8k_path:
        checks.append(("gsm8k_path", lambda: local_file(params.gsm8k_path, params.gsm8k_split)))
    if (
        "sae_pretrained" in declared
        and params.sae_source == "pretrained"
        and not params.sae_pretrained.startswith("hf:")
    ):
        checks.append(("sae_pretrained", lambda: locate_local(resolve(params.sae_pretrained))))
    for key, check in checks:
        try:
            check()
        except (CorpusError, GSM8KError, SAEError) as exc:
            raise ParamsError(f"{source}: '{key}': {one_line(exc)}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["k=64", "lr=5e-4"]`` → ``{"k": 64, "lr": 0.0005}``: each value read as a YAML scalar, exactly as
    the same line in a params file would be (YAML 1.2 floats, ``null``, ``true``), so ``-p`` and the file
    go through one schema."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParamsError(f"-p {item!r}: expected KEY=VALUE, e.g. -p k=64")
        if key in out:
            raise ParamsError(f"-p {key}: given twice; each parameter may be overridden once")
        try:
            value = yaml.load(raw, Loader=ParamsLoader) if raw.strip() else ""  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ParamsError(f"-p {item!r}: the value is not a YAML scalar ({one_line(exc)})") from None
        if isinstance(value, (dict, list)):
            raise ParamsError(f"-p {item!r}: the value must be a single value, not a YAML {type(value).__name__}")
        out[key] = value
    return out


def source_of(params_file: str, overrides: dict[str, Any]) -> str:
    """How an error names where a value came from: the params file, and the ``-p`` overrides if any."""
    return f"{params_file} with -p {' '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else params_file


def with_overrides(params: BookParams, overrides: dict[str, Any], source: str) -> BookParams:
    """``params`` with ``overrides`` applied, validated by the same schema (unknown key: the same error)."""
    if not overrides:
        return params
    return validate({**params.as_dict(), **overrides}, source=source_of(source, overrides))
