"""Loading an SAE from any format the book reads: the card's ``sae_final.pt``, the book's ``sae.safetensors``
(+ ``cfg.json``), SAELens and sparsify folders, and any of these on the Hugging Face Hub.

Why apart from :mod:`mechlib.sae.model`: reading the other libraries' folders needs
:mod:`mechlib.sae.interop`, which builds on the model's :class:`TopKSAE`; here both import at the
top, with no cycle. The model keeps the math and what the book writes (:func:`save_card_checkpoint`,
:func:`save_sae`) and :func:`sae_from_state`, which checks a card-format dict whatever file it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mechlib.io import checksum_path, verify_sha256
from mechlib.paths import resolve
from mechlib.sae import interop
from mechlib.sae.model import SAEError, TopKSAE, sae_from_state


def load_sae(spec: str | os.PathLike[str], device: str | torch.device = "cpu") -> TopKSAE:
    """Load an SAE from a card-format ``.pt``, a ``sae.safetensors`` (+ ``cfg.json``), a SAELens or sparsify
    folder (:mod:`mechlib.sae.interop`; e.g. the one chapter 02 exports), or any of these on the Hugging Face
    Hub as ``hf:<owner>/<repo>[@<revision>][/<path-in-repo>]`` (:mod:`mechlib.hub`).

    A ``cfg.json`` next to the file (if any) fills ``sae.meta`` (model, layer, training knobs); from the
    Hub, ``meta`` also records the repo and commit, and the layer read from the repo's names when no
    config says it (so :func:`check_compatible` still checks the layer of the card's ``sae_final.pt``).
    """
    spec_s = str(spec)
    if spec_s.startswith("hf:"):  # download what the format needs, then load it like a local path
        from mechlib.hub import download  # at call time: hub imports this package (a cycle); huggingface_hub is heavy

        got = download(spec_s)
        sae = _load_local(got.path, spec_s)
        for key, value in got.meta().items():  # the commit, and the layer when the files alone lack it
            sae.meta.setdefault(key, value)
        return sae.to(device)
    return _load_local(resolve(spec_s), spec_s).to(device)


def locate_local(path: Path) -> Path:
    """What :func:`load_sae` reads for the local ``path``: a SAELens / sparsify folder, or one checkpoint file.

    Why apart: the book's runner calls it before any chapter runs, so a wrong ``sae_pretrained`` is
    reported at once, not after chapter 01 collected. Reads no weights; :class:`SAEError` when nothing
    loadable is there.
    """
    if (
        path.is_file()
        and path.name in (interop.SAELENS_WEIGHTS, interop.SPARSIFY_WEIGHTS)
        and interop.detect(path.parent)
    ):
        path = path.parent  # a SAELens / sparsify weights file: read its folder (cfg.json beside it)
    if path.is_dir() and not (path / "sae_final.pt").is_file() and interop.detect(path):
        return path
    if path.is_dir():
        path = next((path / n for n in ("sae_final.pt", "sae.safetensors") if (path / n).is_file()), path)
    if not path.is_file():
        raise SAEError(
            f"SAE checkpoint not found: {path} (expected the card's sae_final.pt, the book's "
            f"sae.safetensors + cfg.json, a SAELens folder (cfg.json + sae_weights.safetensors) or a "
            f"sparsify folder (cfg.json + sae.safetensors, or its layers.N/ subfolder))"
        )
    return path


def _load_local(path: Path, spec_s: str) -> TopKSAE:
    """:func:`load_sae` for a local file or folder (``spec_s``: what the user wrote, kept in the meta)."""
    path = locate_local(path)
    if path.is_dir():
        folder_state, folder_meta = interop.read_folder(path) or ({}, {})
        folder_meta["source"] = spec_s
        return sae_from_state(folder_state, str(path), folder_meta)
    check_checksum(path)
    cfg_path = path.parent / "cfg.json"
    meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if "layer" not in meta and interop.layer_of_cfg(meta) is not None:  # e.g. a .pt beside a SAELens cfg.json
        meta["layer"] = interop.layer_of_cfg(meta)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: dict[str, Any] = dict(load_file(str(path)))
            if "k" not in meta:
                raise SAEError(f"{path}: safetensors SAE needs a cfg.json with 'k' beside it ({cfg_path})")
            state["k"] = int(meta["k"])
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # checked to be a dict below
    except SAEError:
        raise
    except Exception as exc:
        raise SAEError(f"{path}: could not read SAE checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise SAEError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    meta.setdefault("source", spec_s)
    return sae_from_state(state, str(path), meta)


def check_checksum(path: Path) -> None:
    """Raise :class:`SAEError` if ``path`` differs from its ``.sha256`` sidecar (no sidecar: nothing to check).

    Why: one flipped exponent bit in a checkpoint once gave a variance explained of -1.6e70, exit code 0.
    """
    if verify_sha256(path) is False:
        raise SAEError(
            f"{path}: the file does not match its checksum {checksum_path(path).name} (corrupt, "
            f"truncated or replaced). If chapter 02 wrote it: delete it and rerun chapter 02 to retrain (it "
            f"rewrites the file from train_state.pt when that is intact). If you replaced it on purpose, "
            f"delete {checksum_path(path)}"
        )
