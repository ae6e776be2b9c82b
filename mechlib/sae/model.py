"""The TopK sparse autoencoder, its exact (reference) training step, and its file formats.

Why this module is the contract: the CPU reference here and the CUDA fast path
(``mechlib.sae.fast.fast_step``) must compute the *same* loss, so the math lives in one place
and the fast path is tested against it.

Math (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", and the study's card)::

    pre    = (x - b_dec) @ W_enc + b_enc                      # [N, m]
    code   = ReLU(topk(pre, k))                               # values [N, k], indices [N, k]
    recon  = sum_j values_j * W_dec[indices_j] + b_dec        # sparse decode, O(N*k*d)
    e      = x - recon
    fvu    = sum(e^2) / sum((x - mean_over_batch(x))^2)       # per-dimension variance, batch mean
    mse    = mean(e^2)                                        # per element
    AuxK   (only if k_aux > 0 and some latent is dead):
           pre masked to -inf outside dead latents, top-min(k_aux, n_dead), ReLU,
           e_hat = sparse decode of that code WITHOUT b_dec,
           aux   = sum((e_hat - e.detach())^2) / sum((e.detach() - mean(e.detach()))^2)
    loss   = fvu + aux_coef * aux

AuxK only moves dead latents' encoder columns, encoder biases and decoder rows (and ``b_dec``,
which sits inside ``pre``); the residual is detached so it never pulls on the live code.

Layout is the card's: ``W_enc`` [d, m], ``W_dec`` [m, d] (a decoder *row* per latent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechlib.io import (
    atomic_save_safetensors_checksummed,
    atomic_torch_save_checksummed,
    atomic_write_json,
)
from mechlib.sae.sparse_grad import SparseDecode, TopKValues

CARD_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "k")
FORMULAS = {
    "fvu": "sum(e^2) / sum((x - x.mean(0))^2) over the batch (per-dimension variance)",
    "aux": "sum((e_hat - e.detach())^2) / sum((e.detach() - e.detach().mean(0))^2); e_hat without b_dec; "
    "ReLU on the top-min(k_aux, n_dead) dead pre-activations",
    "loss": "fvu + aux_coef * aux",
    "renorm": "decoder rows (W_dec[i, :]) rescaled to unit L2 norm every renorm_every steps; encoder untouched",
    "dead": "a latent is dead after dead_tokens training tokens without a positive top-k activation",
}


class SAEError(ValueError):
    """An SAE file or SAE/model pairing the book cannot use. The message names the file and values."""


class TopKCode(NamedTuple):
    values: Tensor  # [N, k], >= 0 (ReLU applied after top-k)
    indices: Tensor  # [N, k], int64 latent ids


class SAEOutput(NamedTuple):
    recon: Tensor  # [N, d]
    code: TopKCode
    pre: Tensor  # [N, m], pre-activations before top-k


class TopKSAE(nn.Module):
    """A TopK SAE with fp32 parameters in the card's layout.

    Init (Gao et al.): decoder rows random unit vectors, encoder = decoder transposed, biases 0.
    ``b_dec`` may then be set from data with :func:`init_b_dec_` (geometric median of a sample).
    ``meta`` carries provenance (model, layer) so a checkpoint can be checked against a model.
    """

    def __init__(self, d_model: int, d_sae: int, k: int, *, seed: int = 0, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0 < k <= d_sae:
            raise SAEError(f"need 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_model, generator=gen, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w_dec.t().contiguous().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.k = int(k)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> TopKCode:
        return topk_code(self.pre_acts(x), self.k)

    def decode(self, code: TopKCode) -> Tensor:
        return sparse_decode(code, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        code = topk_code(pre, self.k)
        return SAEOutput(self.decode(code), code, pre)


def topk_code(pre: Tensor, k: int) -> TopKCode:
    values, indices = pre.topk(k, dim=-1)
    return TopKCode(values.relu(), indices)


def sparse_decode(code: TopKCode, W_dec: Tensor) -> Tensor:
    """``sum_j values_j * W_dec[indices_j]`` without a dense [N, m] matrix (no bias)."""
    return F.embedding_bag(code.indices, W_dec, per_sample_weights=code.values.to(W_dec.dtype), mode="sum")


def dense_code(code: TopKCode, d_sae: int) -> Tensor:
    """The [N, m] activation matrix of a code (for metrics on small batches)."""
    out = torch.zeros(code.values.shape[0], d_sae, dtype=code.values.dtype, device=code.values.device)
    return out.scatter_(-1, code.indices, code.values)


# --------------------------------------------------------------------------------------- step


@dataclass
class StepStats:
    loss: Tensor  # scalar, detached
    fvu: Tensor
    mse: Tensor
    aux_loss: Tensor  # 0 when there is no dead latent (or k_aux == 0)
    fired: Tensor  # bool [m]: latent had a positive top-k value in some row of this batch


def reference_step(sae: TopKSAE, x: Tensor, dead_mask: Tensor, k_aux: int, aux_coef: float) -> StepStats:
    """One loss evaluation + ``backward()``, exact fp32 (the optimizer step is separate).

    The contract every fast path must reproduce; see the module docstring for the formulas.
    Pre-activations are computed once without autograd; the main and AuxK codes both take their
    values from them through :class:`~mechlib.sae.sparse_grad.TopKValues`, whose backward touches only
    the selected entries (work ∝ N·k·d). :func:`autograd_step` is the same loss in plain dense
    autograd, kept as the oracle the tests compare gradients against.
    """
    with torch.no_grad():
        pre = sae.pre_acts(x)
    selected, indices = pre.topk(sae.k, dim=-1)
    values = TopKValues.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, indices, selected)
    e = x - (SparseDecode.apply(values, indices, sae.W_dec) + sae.b_dec)
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    n_dead = int(dead_mask.sum())
    if k_aux > 0 and n_dead > 0:
        # top-k among the dead columns only: same selection as masking the live ones to -inf,
        # but the top-k runs over n_dead columns instead of all m
        dead_idx = dead_mask.nonzero().squeeze(1)
        a_sel, j = pre.index_select(1, dead_idx).topk(min(k_aux, n_dead), dim=-1)
        a_idx = dead_idx[j]
        a_vals = TopKValues.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, a_idx, a_sel)
        aux = aux_loss(SparseDecode.apply(a_vals, a_idx, sae.W_dec), e.detach())
    return _finish(e, x, aux, aux_coef, TopKCode(values.detach(), indices), sae.d_sae)


def autograd_step(sae: TopKSAE, x: Tensor, dead_mask: Tensor, k_aux: int, aux_coef: float) -> StepStats:
    """:func:`reference_step` written the straightforward way: dense autograd through ``forward``."""
    out = sae(x)
    e = x - out.recon
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    aux_code = aux_topk(out.pre, dead_mask, k_aux)
    if aux_code is not None:
        aux = aux_loss(sparse_decode(aux_code, sae.W_dec), e.detach())
    return _finish(e, x, aux, aux_coef, out.code, sae.d_sae)


def aux_topk(pre: Tensor, dead_mask: Tensor, k_aux: int) -> TopKCode | None:
    """AuxK's code: ReLU of the top-min(k_aux, n_dead) *dead* pre-activations (``None``: no AuxK this step)."""
    n_dead = int(dead_mask.sum())
    if k_aux <= 0 or n_dead == 0:
        return None
    return topk_code(pre.masked_fill(~dead_mask, float("-inf")), min(k_aux, n_dead))


def aux_loss(e_hat: Tensor, e: Tensor, denom: Tensor | None = None) -> Tensor:
    """AuxK term ``sum((e_hat - e)^2) / denom``; ``denom`` is this batch's ``sum((e - mean(e))^2)``
    unless given (a data-parallel step passes the global batch's)."""
    if denom is None:
        denom = (e - e.mean(0)).pow(2).sum()
    return (e_hat - e).pow(2).sum() / denom


def fvu_terms(e: Tensor, denom: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(e^2), sum(e^2) / denom)``: the squared error and the FVU for the centred-input sum ``denom``."""
    sq = e.pow(2).sum()
    return sq, sq / denom


def _finish(e: Tensor, x: Tensor, aux: Tensor, aux_coef: float, code: TopKCode, d_sae: int) -> StepStats:
    sq, fvu = fvu_terms(e, (x - x.mean(0)).pow(2).sum())
    loss = fvu + aux_coef * aux
    loss.backward()
    return StepStats(loss.detach(), fvu.detach(), sq.detach() / e.numel(), aux.detach(), fired_mask(code, d_sae))


def fired_mask(code: TopKCode, d_sae: int) -> Tensor:
    fired = torch.zeros(d_sae, dtype=torch.bool, device=code.indices.device)
    fired[code.indices[code.values > 0]] = True
    return fired


@torch.no_grad()
def renorm_decoder_(sae: TopKSAE) -> None:
    """Rescale each decoder row to unit L2 norm, in place; the encoder is left as is.

    Why only the decoder: rescaling encoder columns to compensate would change which latents
    win the top-k, so no rescaling keeps a TopK SAE's function; the card (and Gao et al.)
    renormalise the decoder alone.
    """
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def init_b_dec_(sae: TopKSAE, sample: Tensor, iters: int = 20) -> None:
    """Set ``b_dec`` to the geometric median of ``sample`` (Weiszfeld iterations), as Gao et al.

    Why: the encoder then sees centred inputs from step 0, so early top-k choices are not all
    spent on the mean direction.
    """
    x = sample.to(sae.b_dec.dtype)
    med = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - med).norm(dim=1).clamp_min(1e-8)
        med = (w[:, None] * x).sum(0) / w.sum()
    sae.b_dec.copy_(med)


# ----------------------------------------------------------------------------------- saving


def card_state(sae: TopKSAE) -> dict[str, Any]:
    """The card's ``sae_final.pt`` dict: exactly ``W_enc, W_dec, b_enc, b_dec, k`` (fp32, CPU)."""
    return {
        "W_enc": sae.W_enc.detach().float().cpu().clone(),
        "W_dec": sae.W_dec.detach().float().cpu().clone(),
        "b_enc": sae.b_enc.detach().float().cpu().clone(),
        "b_dec": sae.b_dec.detach().float().cpu().clone(),
        "k": int(sae.k),
    }


def save_card_checkpoint(sae: TopKSAE, path: str | os.PathLike[str], renorm: bool = True) -> Path:
    """Write ``sae_final.pt`` in the card's format with decoder rows at unit norm.

    Renormalises ``sae`` itself first (in place) so the file and the in-memory SAE compute the
    same function. Training renormalises only every ``renorm_every`` steps, so a trained SAE's decoder
    rows can move slightly here when its last step falls between two renorms.
    ``renorm=False`` for weights renormalised already (a finished state rewriting a damaged file:
    a second renorm would move decoder rows by an ulp, and the rewrite must be bit-identical).
    """
    if renorm:
        renorm_decoder_(sae)
    state = card_state(sae)
    atomic_torch_save_checksummed(state, path)  # + sae_final.pt.sha256
    return Path(path)


def save_sae(sae: TopKSAE, folder: str | os.PathLike[str], cfg: dict[str, Any]) -> Path:
    """SAELens-style ``sae.safetensors`` + ``cfg.json`` (shapes, k, provenance, training knobs, formulas)."""
    folder = Path(folder)
    tensors = {k: v for k, v in card_state(sae).items() if k != "k"}
    full = {
        **cfg,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "formulas": FORMULAS,
        **{k: v for k, v in sae.meta.items() if k not in cfg},
    }
    atomic_save_safetensors_checksummed(
        tensors,
        folder / "sae.safetensors",  # + sae.safetensors.sha256
        metadata={"format": "mechbook-topk-sae"},
    )
    atomic_write_json(folder / "cfg.json", full)
    return folder


def sae_from_state(state: dict[str, Any], source: str, meta: dict[str, Any] | None = None) -> TopKSAE:
    """Build a :class:`TopKSAE` from a card-format dict, checking keys and shapes."""
    missing = [k for k in CARD_KEYS if k not in state]
    if missing:
        raise SAEError(f"{source}: not a card-format SAE checkpoint, missing keys {missing} (has {sorted(state)})")
    W_enc, W_dec = state["W_enc"], state["W_dec"]
    if W_enc.dim() != 2 or W_dec.shape != W_enc.t().shape:
        raise SAEError(f"{source}: W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} are not [d, m] / [m, d]")
    d, m = W_enc.shape
    if tuple(state["b_enc"].shape) != (m,) or tuple(state["b_dec"].shape) != (d,):
        raise SAEError(
            f"{source}: b_enc {tuple(state['b_enc'].shape)} / b_dec {tuple(state['b_dec'].shape)} "
            f"do not match d_model={d}, d_sae={m}"
        )
    sae = TopKSAE(d, m, int(state["k"]), meta=meta)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(state[name].float())
    return sae


def _resolve_hf(spec: str) -> Path:
    """``hf:<owner>/<repo>[@<revision>][/<path>]`` → the local file or folder holding what that SAE needs
    (:func:`mechlib.hub.download`: configs and weights, one pinned commit; offline → one clear error)."""
    from mechlib.hub import download  # cycle (hub reads SAEError, interop) and huggingface_hub is heavy

    return download(spec).path


def check_compatible(sae: TopKSAE, d_model: int, layer: int | None = None, source: str = "SAE") -> None:
    """Raise :class:`SAEError` naming both values if the SAE was made for another width or layer."""
    if sae.d_model != d_model:
        raise SAEError(f"{source}: checkpoint d_model={sae.d_model} but the activations/model have d_model={d_model}")
    ck_layer = sae.meta.get("layer")
    if layer is not None and ck_layer is not None and int(ck_layer) != int(layer):
        raise SAEError(f"{source}: checkpoint was trained on layer {ck_layer} but the run uses layer {layer}")
