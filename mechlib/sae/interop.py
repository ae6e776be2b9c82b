"""The SAE in the ecosystem's formats: one folder that SAELens and sparsify both load, and back.

Why: an SAE trained here is only useful to others if their tools open it without glue code. The two
common loaders want different files, and they do not collide, so one export folder holds both::

    <folder>/cfg.json                    SAELens  (SAE.load_from_disk(folder)), architecture "topk"
    <folder>/sae_weights.safetensors     SAELens  W_enc [d, m], W_dec [m, d], b_enc [m], b_dec [d]
    <folder>/layers.<L>/cfg.json         sparsify (SparseCoder.load_from_disk(folder / "layers.<L>"),
    <folder>/layers.<L>/sae.safetensors            or SparseCoder.load_many(folder, local=True))
                                                   encoder.weight [m, d], encoder.bias [m], W_dec [m, d], b_dec [d]

Formats as the libraries' own loaders read them (checked against sae-lens 6.54.12 and eai-sparsify 1.3.3,
whose loaders the tests run when installed): SAELens's TopK SAE computes
``topk(ReLU)((x - b_dec) @ W_enc + b_enc)`` with ``apply_b_dec_to_input`` and no input normalisation;
sparsify's computes ``topk(ReLU(encoder(x - b_dec)))``. Both equal :class:`mechlib.sae.TopKSAE` as dense
activations (ReLU before or after the top-k only differs in which zero entries are listed).

:func:`read_saelens` and :func:`read_sparsify` turn such folders back into card-format dicts, so
``sae_source: pretrained`` loads them (see :func:`mechlib.sae.load_sae`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechlib.io import atomic_save_safetensors, atomic_write_json
from mechlib.params import BookParams
from mechlib.sae.model import SAEError, TopKSAE, card_state, dense_code

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens release whose loader this format was written against
# the embedded model is a GGUF quantisation of this Hugging Face model; tools look models up by hub name
HF_MODEL_NAMES = {"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class HookInfo:
    """Where the SAE reads the model, recorded in the export so others hook the same activations."""

    model: str  # the book's model spec (e.g. "embedded:smollm2-135m-instruct" or a hub name)
    layer: int  # residual stream after decoder layer `layer`
    context_size: int  # seq_len the activations were collected with
    exclude_first_positions: int  # leading positions of each sequence left out of training
    exclude_special_tokens: bool  # special tokens (BOS, chat markers, ...) left out of training

    @classmethod
    def from_params(cls, P: BookParams) -> HookInfo:
        return cls(
            str(P.model), int(P.layer), int(P.seq_len), int(P.exclude_first_positions), bool(P.exclude_special_tokens)
        )

    @property
    def hook_name(self) -> str:  # TransformerLens name of a decoder layer's output
        return f"blocks.{self.layer}.hook_resid_post"

    @property
    def hf_hook_name(self) -> str:  # the module whose output it is, in a Hugging Face causal LM
        return f"model.layers.{self.layer}"

    @property
    def hookpoint(self) -> str:  # sparsify's name (module path in the base model): its subfolder
        return f"layers.{self.layer}"


@dataclass(frozen=True)
class Exported:
    folder: Path  # SAELens folder
    sparsify_folder: Path  # sparsify hookpoint folder inside it


def saelens_cfg(sae: TopKSAE, hook: HookInfo) -> dict[str, Any]:
    return {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": HF_MODEL_NAMES.get(hook.model, hook.model),
            "mechbook_model": hook.model,
            "hook_name": hook.hook_name,
            "hf_hook_name": hook.hf_hook_name,
            "hook_head_index": None,
            "context_size": hook.context_size,
            "prepend_bos": True,
            "exclude_first_positions": hook.exclude_first_positions,
            "exclude_special_tokens": hook.exclude_special_tokens,
            "trained_with": "mechbook (TopK SAE, Gao et al. 2024)",
        },
    }


def sparsify_cfg(sae: TopKSAE) -> dict[str, Any]:
    return {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_model),
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_model,
    }


def export_sae(sae: TopKSAE, folder: str | os.PathLike[str], hook: HookInfo) -> Exported:
    """Write ``sae`` into ``folder`` for SAELens (top level) and sparsify (``layers.<L>/``), atomically."""
    folder = Path(folder)
    state = card_state(sae)
    sl = {name: state[name].contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    atomic_save_safetensors(sl, folder / SAELENS_WEIGHTS)
    atomic_write_json(folder / SAELENS_CFG, saelens_cfg(sae, hook))
    sub = folder / hook.hookpoint
    sp = {
        "encoder.weight": state["W_enc"].t().contiguous(),
        "encoder.bias": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    atomic_save_safetensors(sp, sub / SPARSIFY_WEIGHTS)
    atomic_write_json(sub / SAELENS_CFG, sparsify_cfg(sae))
    return Exported(folder, sub)


# ------------------------------------------------------------------------------------ import


def detect(folder: Path) -> str | None:
    """``"saelens"``, ``"sparsify"`` or ``None`` for a folder (a sparsify root with one hookpoint counts)."""
    if (folder / SAELENS_WEIGHTS).is_file() and (folder / SAELENS_CFG).is_file():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file() and _is_sparsify_cfg(folder / SAELENS_CFG):
        return "sparsify"
    if _sparsify_hookpoints(folder):
        return "sparsify"
    return None


def _is_sparsify_cfg(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "d_in" in cfg and "num_latents" in cfg


def _sparsify_hookpoints(folder: Path) -> list[Path]:
    return (
        sorted(
            p
            for p in folder.iterdir()
            if p.is_dir() and (p / SPARSIFY_WEIGHTS).is_file() and _is_sparsify_cfg(p / SAELENS_CFG)
        )
        if folder.is_dir()
        else []
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SAEError(f"{path}: could not read the SAE config ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{path}: expected a JSON object")
    return cfg


def _load_tensors(path: Path, needed: tuple[str, ...]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise SAEError(f"{path}: could not read safetensors ({type(exc).__name__}: {exc})") from None
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise SAEError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    return {n: tensors[n].float() for n in needed}


def _layer_from(*names: object) -> int | None:
    for name in names:
        m = re.search(r"(?:blocks|layers)\.(\d+)(?:\.|$)", str(name or ""))
        if m:
            return int(m.group(1))
    return None


def layer_of_cfg(cfg: dict[str, Any]) -> int | None:
    """The layer a ``cfg.json`` says its SAE reads: the book's ``layer`` or SAELens's hook names."""
    if isinstance(cfg.get("layer"), int):
        return int(cfg["layer"])
    md = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg
    return _layer_from(md.get("hook_name"), md.get("hf_hook_name"))


def read_saelens(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A SAELens TopK folder → (card-format state, meta). Refuses what the book's SAE cannot compute."""
    cfg = _read_json(folder / SAELENS_CFG)
    where = folder / SAELENS_CFG
    arch = cfg.get("architecture")
    if arch != "topk":
        raise SAEError(f"{where}: architecture is {arch!r}; the book loads only SAELens 'topk' SAEs")
    for key, ok in (
        ("normalize_activations", "none"),
        ("rescale_acts_by_decoder_norm", False),
        ("reshape_activations", "none"),
    ):
        if cfg.get(key, ok) != ok:
            raise SAEError(f"{where}: {key} is {cfg[key]!r}; the book's TopK SAE supports only {ok!r}")
    t = _load_tensors(folder / SAELENS_WEIGHTS, ("W_enc", "W_dec", "b_enc", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x @ W_enc + b_enc: fold b_dec into b_enc
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if "k" not in cfg:
        raise SAEError(f"{where}: a topk SAE config needs 'k'")
    md = cfg.get("metadata") or {}
    meta = {
        "format": "saelens",
        "model": md.get("mechbook_model") or md.get("model_name"),
        "layer": layer_of_cfg(cfg),
        "hook_name": md.get("hook_name"),
    }
    return {**t, "k": int(cfg["k"])}, {k: v for k, v in meta.items() if v is not None}


def read_sparsify(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sparsify hookpoint folder (or a root holding exactly one) → (card-format state, meta)."""
    if not (folder / SPARSIFY_WEIGHTS).is_file():
        subs = _sparsify_hookpoints(folder)
        if len(subs) != 1:
            raise SAEError(
                f"{folder}: a sparsify folder with {len(subs)} hookpoints "
                f"({[p.name for p in subs]}); set sae_pretrained to one of them, e.g. {folder}/layers.N"
            )
        folder = subs[0]
    where = folder / SAELENS_CFG
    cfg = _read_json(where)
    for key, ok in (("activation", "topk"), ("skip_connection", False), ("transcode", False)):
        if cfg.get(key, ok) != ok:
            raise SAEError(f"{where}: {key} is {cfg[key]!r}; the book's TopK SAE supports only {ok!r}")
    if "k" not in cfg:
        raise SAEError(f"{where}: sparsify config needs 'k'")
    t = _load_tensors(folder / SPARSIFY_WEIGHTS, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    state = {
        "W_enc": t["encoder.weight"].t().contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
        "k": int(cfg["k"]),
    }
    meta = {"format": "sparsify", "hookpoint": folder.name, "layer": _layer_from(folder.name)}
    return state, {k: v for k, v in meta.items() if v is not None}


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Card-format state and meta from a SAELens or sparsify folder; ``None`` if it is neither."""
    kind = detect(folder)
    if kind == "saelens":
        return read_saelens(folder)
    if kind == "sparsify":
        return read_sparsify(folder)
    return None


def encode_dense(sae: TopKSAE, x: Tensor) -> Tensor:
    """Dense [N, m] activations (what the libraries' encoders return, up to the order of the top-k list)."""
    with torch.no_grad():
        return dense_code(sae.encode(x), sae.d_sae)
