"""The fast TopK SAE training step: same loss and gradients as ``mechlib.sae.reference_step``.

Why a hand-written backward: at the study's shape (d=2560, m=32768, k=128, k_aux=512, batch
8192) autograd of the dense method spends its time on [N, m] matrices that TopK does not need.
Here the only work ∝ N·m·d is the one encoder GEMM (bf16 on CUDA, fp32 master weights cast
once per step); everything else is ∝ N·k·d (the main code) or a GEMM restricted to the dead
latents (AuxK). Steps, with the kernel that runs each on CUDA (``mechlib.sae.triton_kernels``) and
the pure-torch twin with the same semantics that runs elsewhere and in tests:

1. ``pre = (x - b_dec) @ W_enc + b_enc``: the one [N, m] buffer (bf16 on CUDA).
2. ``select``: top-k per row and, from the same ``pre``, the AuxK top-min(k_aux, n_dead) among
   the dead latents only (the torch twin: ties → lowest latent index, indices ascending; CUDA:
   ``torch.topk``, ties arbitrary as in the reference; ``Backend.topk_chunk`` /
   ``MECHLIB_SAE_TOPK_CHUNK`` > 0: the exact two-stage ``topk_chunked``, off until measured to win).
   ``dead_mask.nonzero()`` is the step's one host sync, queued after the encoder GEMM so the GPU
   stays busy while the host waits. (A radix-select Triton top-k was removed on 2026-11-30: it made
   the H100 step 12 % slower than ``torch.topk``, 24.3 vs 21.4 ms, and won nowhere measured.)
3. ``decode_residual``: ``e = x - b_dec - sum_j relu(v_j) W_dec[i_j]``; fvu, mse.
4. ``g = dL/drecon = -2 e / V``, then the main code's backward, by ``Backend.bwd``:

   * ``"sparse"`` (default): entries sorted by latent (``latent_order``), then ``pass_a``: dW_dec
     rows and the value gradients ``g[n]·W_dec[i]`` in one gather of ``g``; ``pass_b``: dW_enc
     columns and db_enc from ``d_pre`` at the selected entries only (one latent at a time).
   * ``"seg"``: the same two passes as tensor-core kernels over blocks of latents
     (``seg_pass_a``/``seg_pass_b``; the torch backend runs the ``"sparse"`` twins, same math).
   * ``"dense"``: three bf16 tensor-core GEMMs over one [N, m] buffer (``pre``'s, reused):
     ``dW_dec = S^T g`` with S the scattered code, value grads = ``(g W_dec^T)`` gathered at the
     selected entries, ``dW_enc = x_c^T D`` with D the scattered ``d_pre`` (``dense_backward``).
     Why it may win: three dense GEMMs at the study's shape are ~5.5 ms on an H100/H200, against
     ~10 ms for ``pass_a`` + ``pass_b``; it does m/k = 256× the multiply-adds of the sparse form,
     so better sparse kernels (``"seg"``) may beat it. Memory: the buffer is ``pre`` itself
     (N·m·2 B = 512 MiB at batch 8192), so the peak grows only by the bf16 GEMM outputs.
   * ``"dense_gather"``: ``"dense"`` with the value gradients gathered per selected entry
     (``value_grads``: N·k·d work with decode's access pattern, ~0.7 ms) instead of the middle
     GEMM (~1.8 ms).

   ``MECHLIB_SAE_BWD=sparse|seg|dense|dense_gather`` picks it on CUDA (``benchmarks/sae_step.py``
   measures all four side by side; the default stays ``"sparse"`` until a GPU run picks).
5. AuxK (``aux_dense``): restricted to the dead columns, as four dense GEMMs of N·n_dead·d.
   Why not sparse like the main code: a sparse op at k_aux=512 moves 4× the main code's bytes
   through memory, while a tensor-core GEMM over the n_dead ≤ m columns is ~100× cheaper per
   multiply-add, so the dense-restricted form wins for every n_dead ≤ m.
6. ``db_dec = sum_n g[n] - W_enc @ db_enc`` (b_dec sits inside ``pre`` and inside ``recon``).

Precision: the CUDA backends use bf16 operands with fp32 accumulation everywhere; ``"dense"``
and ``"dense_gather"`` also round their GEMM outputs (dW_dec, dW_enc; ``"dense"`` the value
gradients too) to bf16 (~2^-9 relative per element), ``"seg"`` rounds ``d_pre`` to bf16 inside
its dot. The benchmark's 100-step FVU
equivalence against the fp32 reference is the check that this is harmless.

Gradients are *added* to ``.grad`` (``backward()`` semantics); the optimizer step stays the
caller's (``torch.optim.Adam(fused=True)`` on CUDA is one pass over the weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mechlib.sae.model import StepStats, TopKSAE

_PAD = 64  # dead-column count padded to a multiple of this for aligned GEMMs


class Selection(NamedTuple):
    idx: Tensor  # [N, k] latent ids: ascending per row on the torch backend, in any order on Triton
    raw: Tensor  # [N, k] selected pre-activations (before ReLU)
    aux_idx: Tensor  # [N, ka] dead latent ids, ordered as idx (ka = 0: empty)
    aux_raw: Tensor  # [N, ka]


class LatentOrder(NamedTuple):
    """The N·k (row, latent) entries sorted by latent (stable: rows ascend within a latent)."""

    perm: Tensor  # [E] flat entry (n*k + j) at each sorted position
    lat: Tensor  # [E] latent id of each sorted entry
    tok: Tensor  # [E] row (token) of each sorted entry
    offsets: Tensor  # [m + 1] segment starts: latent i owns sorted positions offsets[i]:offsets[i+1]


# ------------------------------------------------------------------ torch twins (exact, any device)


def select_topk(pre: Tensor, k: int, dead_mask: Tensor | None = None, ka: int = 0) -> Selection:
    """Top-k per row with ties going to the lowest index, indices ascending (the kernel's rule)."""
    dead_idx = None if ka <= 0 or dead_mask is None else dead_mask.nonzero().flatten()
    return select_topk_among(pre, k, dead_idx, ka)


def select_topk_among(pre: Tensor, k: int, dead_idx: Tensor | None, ka: int) -> Selection:
    """:func:`select_topk` with the dead latents given as their ascending int64 ids (``nonzero()`` of
    the mask), which :func:`fast_step` already holds: no mask to rebuild and search again."""

    def top(p: Tensor, kk: int) -> Tensor:
        return torch.sort(p, dim=1, descending=True, stable=True).indices[:, :kk].sort(dim=1).values

    idx = top(pre, k)
    if ka <= 0 or dead_idx is None:
        return Selection(idx, pre.gather(1, idx), idx.new_empty(pre.shape[0], 0), pre.new_empty(pre.shape[0], 0))
    aux_idx = dead_idx[top(pre.index_select(1, dead_idx), ka)]
    return Selection(idx, pre.gather(1, idx), aux_idx, pre.gather(1, aux_idx))


def latent_order(idx: Tensor, m: int) -> LatentOrder:
    k = idx.shape[1]
    flat = idx.reshape(-1).long()
    lat, perm = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(lat, torch.arange(m + 1, device=idx.device))  # no host sync (bincount syncs)
    return LatentOrder(perm, lat, perm // k, offsets)


def decode_residual_torch(x: Tensor, b_dec: Tensor, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """``e = x - b_dec - sum_j vals[:, j] W_dec[idx[:, j]]``."""
    dec = F.embedding_bag(idx.long(), W_dec.to(vals.dtype), per_sample_weights=vals, mode="sum")
    return x - b_dec - dec.to(x.dtype)


def _by_latent(order: LatentOrder, coef: Tensor, src: Tensor, m: int) -> Tensor:
    """``out[i] = sum_{s in seg(i)} coef[s] src[tok[s]]`` → [m, d], via a sparse [m, N] matrix."""
    sp = torch.sparse_coo_tensor(torch.stack([order.lat, order.tok]), coef, (m, src.shape[0]), check_invariants=False)
    return torch.sparse.mm(sp, src.to(coef.dtype))


def pass_a_torch(order: LatentOrder, vals_sorted: Tensor, g: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(dW_dec [m, d], dvals [E]): dW_dec[i] = sum v g[tok]; dvals[s] = g[tok[s]] · W_dec[lat[s]].

    Sums run in ``vals_sorted``'s dtype over the (possibly bf16-rounded) ``g`` and ``W_dec``, as the
    kernel does in fp32 over its bf16 loads.
    """
    dw = _by_latent(order, vals_sorted, g, W_dec.shape[0])
    dt, chunk = vals_sorted.dtype, max(1, (1 << 22) // g.shape[1])  # gathered [chunk, d] blocks of ~4 M values
    dv = (
        torch.cat(
            [
                (g[order.tok[s : s + chunk]].to(dt) * W_dec[order.lat[s : s + chunk]].to(dt)).sum(1)
                for s in range(0, order.tok.numel(), chunk)
            ]
        )
        if order.tok.numel()
        else g.new_zeros(0, dtype=dt)
    )
    return dw, dv


def pass_b_torch(order: LatentOrder, dp_sorted: Tensor, xc: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(dW_enc [d, m], db_enc [m]): dW_enc[:, i] = sum dp xc[tok]; db_enc[i] = sum dp."""
    dw = _by_latent(order, dp_sorted, xc, m).t().contiguous()
    db = torch.zeros(m, dtype=dp_sorted.dtype, device=dp_sorted.device).index_add_(0, order.lat, dp_sorted)
    return dw, db


# ----------------------------------------------------------------------------------- backends


Bwd = Literal["sparse", "seg", "dense", "dense_gather"]
BWDS: tuple[Bwd, ...] = ("sparse", "seg", "dense", "dense_gather")


@dataclass(frozen=True)
class Backend:
    """Which implementation runs each step. ``compute`` is the dtype of pre and the weight copies;
    ``bwd`` the main code's backward (module docstring, step 4)."""

    name: Literal["torch", "triton"]
    compute: torch.dtype | None  # None: the parameters' own dtype (exact)
    bwd: Bwd = "sparse"
    topk_chunk: int = 0  # triton backend: > 0 selects in two torch.topk stages (``topk_chunked``)


TORCH = Backend("torch", None)
TRITON = Backend("triton", torch.bfloat16)


def default_backend(device: torch.device) -> Backend:
    """Triton + bf16 on CUDA when triton imports (``MECHLIB_SAE_BACKEND=torch`` forces the twins).

    ``MECHLIB_SAE_BWD=seg|dense|dense_gather`` picks the main code's backward (default ``sparse``)
    and ``MECHLIB_SAE_TOPK_CHUNK=1024`` (say) the two-stage top-k (default 0: one ``torch.topk``);
    measure on your card with ``benchmarks/sae_step.py``.
    """
    bwd = os.environ.get("MECHLIB_SAE_BWD", "") or "sparse"
    if bwd not in BWDS:
        raise ValueError(f"MECHLIB_SAE_BWD={bwd!r}: expected one of {', '.join(BWDS)}")
    chunk = os.environ.get("MECHLIB_SAE_TOPK_CHUNK", "") or "0"
    if not chunk.isdigit():
        raise ValueError(f"MECHLIB_SAE_TOPK_CHUNK={chunk!r}: expected a whole number of columns (0: off)")
    if device.type != "cuda" or os.environ.get("MECHLIB_SAE_BACKEND", "") == "torch":
        return TORCH
    try:
        import mechlib.sae.triton_kernels  # noqa: F401
    except ImportError:
        return Backend("torch", torch.bfloat16, bwd)
    return Backend("triton", torch.bfloat16, bwd, int(chunk))


def select(be: Backend, pre: Tensor, k: int, dead_idx: Tensor | None, ka: int) -> Selection:
    """Top-k of ``pre`` and the AuxK top-``ka`` among the columns ``dead_idx`` (ascending ids)."""
    if be.name == "triton":  # torch.topk (ties arbitrary), AuxK over the dead columns only
        raw, idx = topk_chunked(pre, k, be.topk_chunk)
        if not ka or dead_idx is None:
            return Selection(idx, raw, idx[:, :0], raw[:, :0])
        araw, aloc = pre.index_select(1, dead_idx).topk(ka, dim=1, sorted=False)
        return Selection(idx, raw, dead_idx[aloc], araw)
    return select_topk_among(pre, k, dead_idx, ka)


def topk_chunked(pre: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest per row, unsorted, in two ``torch.topk`` stages: the top-k
    inside each ``chunk``-wide slice of a row, then the top-k of those m/chunk·k candidates.

    Exact: each of a row's k largest is among its own slice's k largest (ties: arbitrary, as with
    one ``torch.topk``). Why: ``torch.topk`` over 32768 bf16 columns with k=128 took ~2 ms per
    8192 rows on an H200, ~10x the time to read them; short slices take a different kernel path
    in PyTorch, which may be faster — the benchmark times both. ``chunk`` 0, not dividing m, below
    k, or >= m: one plain ``torch.topk``.
    """
    n, m = pre.shape
    if chunk <= 0 or chunk >= m or m % chunk or chunk < k:
        return pre.topk(k, dim=1, sorted=False)
    v1, i1 = pre.view(n, m // chunk, chunk).topk(k, dim=2, sorted=False)  # [n, m/chunk, k]
    i1 = i1 + torch.arange(0, m, chunk, device=pre.device).view(1, -1, 1)
    v2, j = v1.reshape(n, -1).topk(k, dim=1, sorted=False)
    return v2, i1.reshape(n, -1).gather(1, j)


def value_grads_torch(g: Tensor, W_dec: Tensor, idx: Tensor) -> Tensor:
    """``dv[n, j] = g[n] · W_dec[idx[n, j]]`` [N, k], summed in fp32 over ``g``/``W_dec`` as given
    (the twin of ``triton_kernels.value_grads``)."""
    dt = torch.promote_types(g.dtype, torch.float32)
    chunk = max(1, (1 << 22) // max(1, idx.shape[1] * g.shape[1]))  # gathered blocks of ~4 M values
    parts = [
        (W_dec[idx[s : s + chunk]].to(dt) * g[s : s + chunk, None].to(dt)).sum(-1)
        for s in range(0, idx.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else g.new_zeros(0, idx.shape[1], dtype=dt)


def dense_backward(
    sel: Selection,
    vals: Tensor,
    g_c: Tensor,
    xc_c: Tensor,
    W_dec_c: Tensor,
    buf: Tensor,
    value_grads: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dW_dec [m, d], dW_enc [d, m], db_enc [m]) of the main code as dense GEMMs.

    ``buf`` [N, m] (``pre``'s storage, no longer needed) holds in turn the code S, ``g W_dec^T``
    and ``d_pre``; the GEMM outputs come in ``buf``'s dtype, db_enc in ``vals``' dtype.
    ``value_grads(g, W_dec, idx)``, when given, computes the value gradients instead of the
    middle GEMM (``"dense_gather"``).
    """
    if buf.shape != (g_c.shape[0], W_dec_c.shape[0]) or not buf.is_contiguous():
        raise ValueError(f"dense_backward needs a contiguous [N, m] buffer, got {tuple(buf.shape)}")
    idx, cdt = sel.idx.long(), buf.dtype
    S = buf.zero_().scatter_(1, idx, vals.to(cdt))
    dW_dec = S.t() @ g_c  # [m, d]
    if value_grads is None:
        G = torch.mm(g_c, W_dec_c.t(), out=buf)  # S is dead after the GEMM above (same stream)
        dv = G.gather(1, idx)
    else:
        dv = value_grads(g_c, W_dec_c, sel.idx)
    dp = dv.to(vals.dtype) * (sel.raw > 0)
    D = buf.zero_().scatter_(1, idx, dp.to(cdt))
    dW_enc = xc_c.t() @ D  # [d, m]
    db_enc = torch.zeros(buf.shape[1], dtype=vals.dtype, device=buf.device).index_add_(
        0, idx.reshape(-1), dp.reshape(-1)
    )
    return dW_dec, dW_enc, db_enc


def aux_dense(
    sel: Selection,
    e: Tensor,
    xc_c: Tensor,
    W_dec_c: Tensor,
    dead_idx: Tensor,
    aux_coef: float,
    grads: dict[str, Tensor],
) -> Tensor:
    """AuxK loss; adds its gradients into ``grads`` (dW_enc [d,m], db_enc [m], dW_dec [m,d]).

    Works in the dead columns only: A [N, n_dead] holds the aux code, ê = A @ W_dec[dead].
    """
    n, m, pdt, cdt = e.shape[0], W_dec_c.shape[0], e.dtype, W_dec_c.dtype
    n_dead = dead_idx.numel()
    n_pad = -(-n_dead // _PAD) * _PAD
    pos = torch.full((m,), -1, dtype=torch.int64, device=e.device)
    pos[dead_idx] = torch.arange(n_dead, device=e.device)
    aloc = pos[sel.aux_idx.long()]
    av = sel.aux_raw.to(pdt).clamp_min(0)
    A = torch.zeros(n, n_pad, dtype=cdt, device=e.device).scatter_(1, aloc, av.to(cdt))
    Wd = torch.zeros(n_pad, W_dec_c.shape[1], dtype=cdt, device=e.device)
    Wd[:n_dead] = W_dec_c[dead_idx]
    r = (A @ Wd).to(pdt) - e
    v_e = (e - e.mean(0)).pow(2).sum()
    aux = r.pow(2).sum() / v_e
    de = (r * (2.0 * aux_coef / v_e)).to(cdt)
    dav = (de @ Wd.t()).gather(1, aloc).to(pdt) * (sel.aux_raw > 0)
    grads["W_dec"].index_add_(0, dead_idx, (A.t() @ de)[:n_dead].to(pdt))
    D = A.zero_().scatter_(1, aloc, dav.to(cdt))
    grads["W_enc"].index_add_(1, dead_idx, (xc_c.t() @ D)[:, :n_dead].to(pdt))
    grads["b_enc"].index_add_(0, sel.aux_idx.reshape(-1).long(), dav.reshape(-1))
    return aux


def _accumulate(p: torch.nn.Parameter, grad: Tensor) -> None:
    if p.grad is None:
        p.grad = grad
    else:
        p.grad.add_(grad)


# --------------------------------------------------------------------------------------- step


@torch.no_grad()
def fast_step(
    sae: TopKSAE, x: Tensor, dead_mask: Tensor, k_aux: int, aux_coef: float, *, backend: Backend | None = None
) -> StepStats:
    """``reference_step``'s loss and gradients (added to ``.grad``) without dense [N, m] autograd.

    On CUDA the default backend is Triton with a bf16 encoder GEMM and bf16 weight copies (fp32
    master weights, fp32 gradients); elsewhere the exact torch twins in the parameters' dtype.
    """
    be = backend or default_backend(x.device)
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    pdt, m, k = W_enc.dtype, W_enc.shape[1], sae.k
    x = x.to(pdt)
    cdt = be.compute or pdt
    xc = x - b_dec
    xc_c, W_dec_c = xc.to(cdt), W_dec.to(cdt)
    pre = torch.addmm(b_enc.to(cdt), xc_c, W_enc.to(cdt))
    dead_idx = dead_mask.nonzero().flatten() if k_aux > 0 else None  # the one host sync, after the GEMM
    ka = min(k_aux, dead_idx.numel()) if dead_idx is not None else 0
    sel = select(be, pre, k, dead_idx, ka)

    vals = sel.raw.to(pdt).clamp_min(0)
    triton = be.name == "triton"
    if triton:
        from mechlib.sae import triton_kernels as tk  # needs triton (CUDA installs only)
        from mechlib.sae import triton_seg

        e = tk.decode_residual(x, b_dec, vals, sel.idx.int(), W_dec_c)
    else:
        e = decode_residual_torch(x, b_dec, vals, sel.idx, W_dec_c)
    var = (x - x.mean(0)).pow(2).sum()
    sse = e.pow(2).sum()
    fvu, mse = sse / var, sse / e.numel()
    g = e * (-2.0 / var)
    g_c = g.to(cdt)

    if be.bwd in ("dense", "dense_gather"):
        vg = None if be.bwd == "dense" else (tk.value_grads if triton else value_grads_torch)
        dW_dec, dW_enc, db_enc = dense_backward(sel, vals, g_c, xc_c, W_dec_c, pre, vg)
    else:
        order = latent_order(sel.idx, m)
        vals_s = vals.reshape(-1)[order.perm]
        pos_s = sel.raw.reshape(-1)[order.perm] > 0
        if triton and be.bwd == "seg":
            offs, lat, tok = order.offsets.int(), order.lat.int(), order.tok.int()
            dW_dec, dv_s = triton_seg.seg_pass_a(offs, lat, tok, vals_s.float(), g_c, W_dec_c)
            dW_enc, db_enc = triton_seg.seg_pass_b(offs, lat, tok, dv_s * pos_s, xc_c, m)
        elif triton:
            offs, tok = order.offsets.int(), order.tok.int()
            dW_dec, dv_s = tk.pass_a(offs, tok, vals_s.float(), g_c, W_dec_c)
            dW_enc, db_enc = tk.pass_b(offs, tok, dv_s * pos_s, xc_c, m)
        else:
            dW_dec, dv_s = pass_a_torch(order, vals_s, g_c, W_dec_c)
            dW_enc, db_enc = pass_b_torch(order, dv_s * pos_s, xc_c, m)
    del pre
    grads = {"W_enc": dW_enc.to(pdt), "b_enc": db_enc.to(pdt), "W_dec": dW_dec.to(pdt)}

    if ka > 0 and dead_idx is not None:
        aux = aux_dense(sel, e, xc_c, W_dec_c, dead_idx, aux_coef, grads)
    else:
        aux = torch.zeros((), dtype=pdt, device=x.device)
    grads["b_dec"] = g.sum(0) - W_enc @ grads["b_enc"]
    for name, grad in grads.items():
        _accumulate(getattr(sae, name), grad)

    positive = (sel.raw > 0).reshape(-1).to(pdt)
    fired = torch.zeros(m, dtype=pdt, device=x.device).index_add_(0, sel.idx.reshape(-1).long(), positive) > 0
    return StepStats((fvu + aux_coef * aux).detach(), fvu, mse, aux, fired)
