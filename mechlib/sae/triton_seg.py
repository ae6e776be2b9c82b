"""Tensor-core variants of ``pass_a`` / ``pass_b`` (``mechlib.sae.triton_kernels``) for the fast
TopK SAE step's ``"seg"`` backward (``mechlib.sae.fast``); CUDA only, twins ``pass_a_torch`` /
``pass_b_torch``.

Why: ``pass_a`` and ``pass_b`` walk one latent at a time (~32 entries each at the study's shape), so each program
is a chain of small dependent gathers and CUDA-core reductions (~5 ms each on an H100). Here a
program owns BLOCK_M consecutive latents, whose entries are one contiguous range of the
latent-sorted order, and walks that range in BLOCK_S chunks; a one-hot matrix
``P[i, s] = v_s [lat_s == m0 + i]`` turns each chunk into ``tl.dot``s:
``dW_dec[block] += P @ g[tok]``, value-grad partials = row-select of ``g[tok] @ W_dec[block]^T``,
``dW_enc[:, block] += x_c[tok]^T @ (dp one-hot)``. The dots' operands are bf16 (``v`` comes
from bf16 pre-activations, so it is exact in bf16; ``dp`` is rounded to bf16, ~2^-9 relative)
with fp32 accumulation. The interpreter's bf16 ``tl.dot`` is wrong (triton 3.9), so under
``TRITON_INTERPRET`` operands are widened to fp32 first (``DOT_F32``) — same values, only the
summation order differs from the GPU. (fp32 operands on a GPU would run TF32 dots: the fast
step only calls these with its bf16 compute dtype.)

Launch configurations are timed on the first CUDA call per shape, like the other kernels (``_pick``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mechlib.sae.triton_kernels import Config, _launch, _n_dblk, _tuned


@triton.jit
def _seg_block(off_ptr, M, D, N_MBLK, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block: (d-block, first latent m0, columns [D] and their mask, latents [M] int64 and
    their mask, and s0:s1, the range of the latent-sorted entries those BLOCK_M latents own)."""
    pid = tl.program_id(0)
    dblk = pid // N_MBLK
    m0 = (pid % N_MBLK) * BLOCK_M
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lats = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    lmask = lats < M
    s0 = tl.load(off_ptr + m0)
    s1 = tl.load(off_ptr + tl.minimum(m0 + BLOCK_M, M))
    return dblk, m0, cols, cmask, lats, lmask, s0, s1


@triton.jit
def _seg_onehot(lat_ptr, m0, s, s1, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """(entry offsets [S], entry mask [S], one-hot [M, S]: entry s belongs to latent m0 + i)."""
    ss = s + tl.arange(0, BLOCK_S)
    smask = ss < s1
    lat = tl.load(lat_ptr + ss, mask=smask, other=-1)
    hot = ((lat[None, :] - m0) == tl.arange(0, BLOCK_M)[:, None]) & smask[None, :]
    return ss, smask, hot


@triton.jit
def _seg_pass_a_kernel(
    off_ptr,
    lat_ptr,
    tok_ptr,
    val_ptr,
    g_ptr,
    w_ptr,
    dw_ptr,
    dvp_ptr,
    M,
    D,
    E,
    N_MBLK,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    dblk, m0, cols, cmask, lats, lmask, s0, s1 = _seg_block(off_ptr, M, D, N_MBLK, BLOCK_M, BLOCK_D)
    w = tl.load(w_ptr + lats[:, None] * D + cols[None, :], mask=lmask[:, None] & cmask[None, :], other=0.0)
    if DOT_F32:
        w = w.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(s0, s1, BLOCK_S):
        ss, smask, hot = _seg_onehot(lat_ptr, m0, s, s1, BLOCK_M, BLOCK_S)
        tok = tl.load(tok_ptr + ss, mask=smask, other=0).to(tl.int64)
        v = tl.load(val_ptr + ss, mask=smask, other=0.0)
        g = tl.load(g_ptr + tok[:, None] * D + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
        p = tl.where(hot, v[None, :], 0.0).to(g.dtype)
        if DOT_F32:
            g = g.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(p, g, acc)
        q = tl.dot(g, tl.trans(w))  # [S, M]: g[tok_s] · W_dec[m0 + i] over this d-block
        part = tl.sum(tl.where(tl.trans(hot), q, 0.0), 1)
        tl.store(dvp_ptr + dblk.to(tl.int64) * E + ss, part, mask=smask)
    tl.store(dw_ptr + lats[:, None] * D + cols[None, :], acc, mask=lmask[:, None] & cmask[None, :])


@triton.jit
def _seg_pass_b_kernel(
    off_ptr,
    lat_ptr,
    tok_ptr,
    dp_ptr,
    xc_ptr,
    dw_ptr,
    db_ptr,
    M,
    D,
    stride_d,
    stride_m,
    N_MBLK,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    dblk, m0, cols, cmask, lats, lmask, s0, s1 = _seg_block(off_ptr, M, D, N_MBLK, BLOCK_M, BLOCK_D)
    tile = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(s0, s1, BLOCK_S):
        ss, smask, hot = _seg_onehot(lat_ptr, m0, s, s1, BLOCK_M, BLOCK_S)
        tok = tl.load(tok_ptr + ss, mask=smask, other=0).to(tl.int64)
        dp = tl.load(dp_ptr + ss, mask=smask, other=0.0)
        xr = tl.load(xc_ptr + tok[:, None] * D + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
        pt = tl.where(tl.trans(hot), dp[:, None], 0.0)  # [S, M] fp32
        db += tl.sum(pt, 0)
        pt = pt.to(xr.dtype)
        if DOT_F32:
            xr = xr.to(tl.float32)
            pt = pt.to(tl.float32)
        tile = tl.dot(tl.trans(xr), pt, tile)
    tl.store(
        dw_ptr + cols[:, None].to(tl.int64) * stride_d + lats[None, :] * stride_m,
        tile,
        mask=cmask[:, None] & lmask[None, :],
    )
    tl.store(db_ptr + lats, db, mask=lmask & ((lats * 0 + dblk) == 0))


# Launch configurations, first = default; every one compiles for sm_90 without register spills
# (tests/test_sae_triton_cpu.py) and matches the twins under the interpreter. num_stages: 3 unless given.
SEG_CONFIGS = [
    dict(BLOCK_M=32, BLOCK_S=64, BLOCK_D=128, num_warps=4),
    dict(BLOCK_M=64, BLOCK_S=64, BLOCK_D=128, num_warps=8),
    dict(BLOCK_M=32, BLOCK_S=32, BLOCK_D=128, num_warps=4),
    dict(BLOCK_M=16, BLOCK_S=64, BLOCK_D=256, num_warps=8),
    dict(BLOCK_M=32, BLOCK_S=64, BLOCK_D=64, num_warps=4),
    dict(BLOCK_M=32, BLOCK_S=64, BLOCK_D=128, num_warps=4, num_stages=4),  # deeper pipelining of the gathers
    dict(BLOCK_M=64, BLOCK_S=32, BLOCK_D=128, num_warps=8, num_stages=4),
]


def _dot_f32() -> bool:
    return bool(os.environ.get("TRITON_INTERPRET"))


def seg_pass_a(
    offsets: torch.Tensor,
    lat: torch.Tensor,
    tok: torch.Tensor,
    vals: torch.Tensor,
    g: torch.Tensor,
    w_dec: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pass_a``'s (dW_dec [m,d] fp32, dvals [E] fp32) on tensor cores; ``lat`` [E] int32 is the
    sorted entries' latent ids (``LatentOrder.lat``)."""
    m, d = w_dec.shape
    e_count = tok.numel()
    dw = torch.empty(m, d, dtype=torch.float32, device=g.device)

    def launch(cfg: Config) -> torch.Tensor:
        dvp = torch.empty(_n_dblk(cfg, d), e_count, dtype=torch.float32, device=g.device)
        args = (offsets, lat, tok, vals, g, w_dec, dw, dvp, m, d, e_count)
        _launch(_seg_pass_a_kernel, cfg, *args, rows=m, d=d, DOT_F32=_dot_f32())
        return dvp

    dvp = _tuned("seg_pass_a", (m, d, e_count // max(g.shape[0], 1), g.dtype), SEG_CONFIGS, launch)
    return dw, dvp.sum(0)


def seg_pass_b(
    offsets: torch.Tensor, lat: torch.Tensor, tok: torch.Tensor, dp: torch.Tensor, xc: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pass_b``'s (dW_enc [d,m] fp32, db_enc [m] fp32) on tensor cores (``dp`` rounded to xc's dtype
    inside the dot; ``db_enc`` sums it in fp32)."""
    n, d = xc.shape
    dw = torch.empty(d, m, dtype=torch.float32, device=xc.device)
    db = torch.empty(m, dtype=torch.float32, device=xc.device)
    args = (offsets, lat, tok, dp, xc, dw, db, m, d, dw.stride(0), dw.stride(1))
    _tuned(
        "seg_pass_b",
        (m, d, tok.numel() // max(n, 1), xc.dtype),
        SEG_CONFIGS,
        lambda cfg: _launch(_seg_pass_b_kernel, cfg, *args, rows=m, d=d, DOT_F32=_dot_f32()),
    )
    return dw, db
