"""Triton kernels for the fast TopK SAE step (CUDA only; see mechlib.sae.fast).

Why these kernels: at the study's shape (d=2560, m=32768, k=128, batch 8192) the one
dense encoder GEMM is ~2 ms, and everything else must be memory traffic proportional to
batch·k·d, not batch·m·d. Each kernel has a pure-torch twin in ``mechlib.sae.fast`` with
the SAME semantics (outputs, order), which is what CPU tests run; the tests also run these
kernels under ``TRITON_INTERPRET=1`` against the twins when triton is importable.

(A radix-select top-k kernel lived here until 2026-11-30: on one H100 it made the step 12 %
slower than ``torch.topk`` — 24.3 vs 21.4 ms — and won nowhere measured, so it was removed.)

* ``decode_residual``: ``e = x - b_dec - sum_j v_j W_dec[idx_j]`` (token-major gather).
* ``pass_a``: latent-major over the entries sorted by latent: ``dW_dec[i] = sum v g[tok]``
  and, with the decoder row loaded once, the per-entry partial dots ``g[tok]·W_dec[i]``
  (the value gradients) per d-block — one gather of ``g`` serves both.
* ``pass_b``: latent-major: ``dW_enc[:, i] = sum dp x_c[tok]`` written as [BLOCK_D, BLOCK_M]
  tiles straight into the card's [d, m] layout, plus ``db_enc``.
* ``value_grads``: ``dv[n, j] = g[n] · W_dec[idx[n, j]]``, token-major like ``decode_residual``
  (the ``"dense_gather"`` backward's value gradients, instead of a dense ``g W_dec^T`` GEMM).
* ``seg_pass_a`` / ``seg_pass_b`` (tensor-core variants of the two passes): ``mechlib.sae.triton_seg``.

Grids put the d-block as the slow axis so the programs resident at one time gather from the
same column slice of the source (a few MB), which stays in L2. Launch configurations are
picked per shape by timing a few candidates on the first CUDA call (``_pick``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl

T = TypeVar("T")
Config = dict[str, int]  # BLOCK_* sizes (the kernel's constexprs) and num_warps / num_stages (launch options)

# Candidate launch configurations, first = default (all compile for sm_90 without register
# spills: checked with triton.compile + ptxas -v, no GPU needed). On CUDA the first call per (kernel, shape)
# times each candidate once and keeps the fastest (``MECHLIB_SAE_AUTOTUNE=0``: default only);
# ``CHOSEN`` records the picks (benchmarks/sae_step.py writes them into its results).
DECODE_CONFIGS = [
    dict(BLOCK_N=16, BLOCK_D=128, num_warps=4),
    dict(BLOCK_N=32, BLOCK_D=128, num_warps=4),
    dict(BLOCK_N=8, BLOCK_D=256, num_warps=4),
    dict(BLOCK_N=16, BLOCK_D=256, num_warps=8),
]
PASS_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_S=16, BLOCK_D=256, num_warps=4),
    dict(BLOCK_M=32, BLOCK_S=32, BLOCK_D=64, num_warps=4),
    dict(BLOCK_M=16, BLOCK_S=32, BLOCK_D=128, num_warps=4),
    dict(BLOCK_M=8, BLOCK_S=64, BLOCK_D=128, num_warps=8),
]
CHOSEN: dict[tuple, Config] = {}


def _pick(name: str, key: tuple, configs: list[Config], launch: Callable[[Config], object]) -> Config:
    """Best of ``configs`` for ``key`` (timed once on CUDA), then cached; ``launch(cfg)`` runs one."""
    full = (name, *key)
    if full in CHOSEN:
        return CHOSEN[full]
    best = configs[0]
    if (
        torch.cuda.is_available()
        and not os.environ.get("TRITON_INTERPRET")
        and os.environ.get("MECHLIB_SAE_AUTOTUNE", "1") != "0"
        and len(configs) > 1
    ):
        times = []
        for cfg in configs:
            try:
                launch(cfg)  # compile + warm
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(cfg)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            except Exception:  # a config that does not compile or fit (e.g. shared memory): skip it
                times.append(float("inf"))
        best = configs[min(range(len(configs)), key=times.__getitem__)]
    CHOSEN[full] = best
    return best


def _tuned(name: str, key: tuple, configs: list[Config], launch: Callable[[Config], T]) -> T:
    """``launch(cfg)`` with the best of ``configs`` for ``key`` (:func:`_pick`); what that launch returns."""
    return launch(_pick(name, key, configs, launch))


def _launch(kernel: Any, cfg: Config, *args: Any, rows: int, d: int, **consts: Any) -> None:
    """Run ``kernel(*args, n_blk, <cfg's BLOCK_*>, **consts)``, one program per (d-block, block of ``rows``).

    The d-block is the grid's slow axis (module docstring: the programs resident at one time gather from
    one column slice, which stays in L2); ``n_blk``, the count of row blocks (``BLOCK_N`` rows or
    ``BLOCK_M`` latents), is every kernel's last runtime argument (``N_TBLK`` / ``N_MBLK``): a program
    splits its id into (d-block, row block) with it.
    """
    n_blk = triton.cdiv(rows, cfg["BLOCK_N"] if "BLOCK_N" in cfg else cfg["BLOCK_M"])
    blocks = {name: v for name, v in cfg.items() if name.startswith("BLOCK_")}
    num_stages = cfg.get("num_stages", 3)  # triton's default for CUDA
    kernel[(_n_dblk(cfg, d) * n_blk,)](
        *args, n_blk, **blocks, **consts, num_warps=cfg["num_warps"], num_stages=num_stages
    )


def _n_dblk(cfg: Config, d: int) -> int:
    """How many ``BLOCK_D`` column blocks cover ``d`` (the rows of the per-d-block partials)."""
    return triton.cdiv(d, cfg["BLOCK_D"])


@triton.jit
def _decode_kernel(
    x_ptr, b_ptr, val_ptr, idx_ptr, w_ptr, e_ptr, N, D, K, N_TBLK, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid = tl.program_id(0)
    dblk = pid // N_TBLK
    rows = (pid % N_TBLK) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        lat = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0).to(tl.int64)
        v = tl.load(val_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += v[:, None] * w
    x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=m2, other=0.0)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    tl.store(e_ptr + rows64[:, None] * D + cols[None, :], x - b[None, :] - acc, mask=m2)


def decode_residual(
    x: torch.Tensor, b_dec: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor
) -> torch.Tensor:
    """e = x - b_dec - sum_j vals[:, j] * w_dec[idx[:, j]]  (fp32 out; w_dec may be bf16)."""
    n, d = x.shape
    k = idx.shape[1]
    e = torch.empty_like(x, dtype=torch.float32)
    if n:
        _tuned(
            "decode",
            (d, k, w_dec.dtype),
            DECODE_CONFIGS,
            lambda cfg: _launch(_decode_kernel, cfg, x, b_dec, vals, idx, w_dec, e, n, d, k, rows=n, d=d),
        )
    return e


@triton.jit
def _segment(off_ptr, lat, M):
    """(lat clamped to a valid row as int64, s0, s1): latent ``lat``'s entries are the sorted positions
    s0:s1, an empty range past the last latent (a block's tail), whose loads stay in bounds."""
    live = lat < M
    lat_c = tl.minimum(lat, M - 1).to(tl.int64)
    s0 = tl.load(off_ptr + lat_c)
    s1 = tl.where(live, tl.load(off_ptr + lat_c + 1), s0)
    return lat_c, s0, s1


@triton.jit
def _pass_a_kernel(
    off_ptr,
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
):
    pid = tl.program_id(0)
    dblk = pid // N_MBLK
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    for li in range(0, BLOCK_M):
        lat = (pid % N_MBLK) * BLOCK_M + li
        lat_c, s0, s1 = _segment(off_ptr, lat, M)
        w = tl.load(w_ptr + lat_c * D + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(s0, s1, BLOCK_S):
            ss = s + tl.arange(0, BLOCK_S)
            smask = ss < s1
            tok = tl.load(tok_ptr + ss, mask=smask, other=0).to(tl.int64)
            v = tl.load(val_ptr + ss, mask=smask, other=0.0)
            g = tl.load(g_ptr + tok[:, None] * D + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0).to(
                tl.float32
            )
            acc += tl.sum(g * v[:, None], 0)
            tl.store(dvp_ptr + dblk.to(tl.int64) * E + ss, tl.sum(g * w[None, :], 1), mask=smask)
        tl.store(dw_ptr + lat_c * D + cols, acc, mask=cmask & ((cols * 0 + lat) < M))


def pass_a(
    offsets: torch.Tensor, tok: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, w_dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_dec [m,d] fp32, dvals [E] fp32) over entries sorted by latent.

    dW_dec[i] = sum_{s in seg(i)} vals[s] g[tok[s]];  dvals[s] = g[tok[s]] · w_dec[i(s)].
    The dots are summed over d-blocks from per-block partials (deterministic, no atomics).
    """
    m, d = w_dec.shape
    e_count = tok.numel()
    dw = torch.empty(m, d, dtype=torch.float32, device=g.device)

    def launch(cfg: Config) -> torch.Tensor:
        dvp = torch.empty(_n_dblk(cfg, d), e_count, dtype=torch.float32, device=g.device)
        _launch(_pass_a_kernel, cfg, offsets, tok, vals, g, w_dec, dw, dvp, m, d, e_count, rows=m, d=d)
        return dvp

    dvp = _tuned("pass_a", (m, d, e_count // max(g.shape[0], 1)), PASS_CONFIGS, launch)
    return dw, dvp.sum(0)


@triton.jit
def _pass_b_kernel(
    off_ptr,
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
):
    pid = tl.program_id(0)
    dblk = pid // N_MBLK
    m0 = (pid % N_MBLK) * BLOCK_M
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lcols = tl.arange(0, BLOCK_M)
    tile = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for li in range(0, BLOCK_M):
        lat = m0 + li
        _, s0, s1 = _segment(off_ptr, lat, M)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s in range(s0, s1, BLOCK_S):
            ss = s + tl.arange(0, BLOCK_S)
            smask = ss < s1
            tok = tl.load(tok_ptr + ss, mask=smask, other=0).to(tl.int64)
            dp = tl.load(dp_ptr + ss, mask=smask, other=0.0)
            xr = tl.load(xc_ptr + tok[:, None] * D + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0).to(
                tl.float32
            )
            acc += tl.sum(xr * dp[:, None], 0)
            dsum += dp
        tile = tl.where(lcols[None, :] == li, acc[:, None], tile)
        db = tl.where(lcols == li, tl.sum(dsum, 0), db)
    lats = (m0 + lcols).to(tl.int64)
    lmask = lats < M
    tl.store(
        dw_ptr + cols[:, None].to(tl.int64) * stride_d + lats[None, :] * stride_m,
        tile,
        mask=cmask[:, None] & lmask[None, :],
    )
    tl.store(db_ptr + lats, db, mask=lmask & ((lats * 0 + dblk) == 0))


def pass_b(
    offsets: torch.Tensor,
    tok: torch.Tensor,
    dp: torch.Tensor,
    xc: torch.Tensor,
    m: int,
    dw_enc_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_enc [d,m] fp32, db_enc [m] fp32): dW_enc[:, i] = sum_{s in seg(i)} dp[s] xc[tok[s]]."""
    n, d = xc.shape
    dw = dw_enc_out if dw_enc_out is not None else torch.empty(d, m, dtype=torch.float32, device=xc.device)
    db = torch.empty(m, dtype=torch.float32, device=xc.device)
    args = (offsets, tok, dp, xc, dw, db, m, d, dw.stride(0), dw.stride(1))
    _tuned(
        "pass_b",
        (m, d, tok.numel() // max(n, 1)),
        PASS_CONFIGS,
        lambda cfg: _launch(_pass_b_kernel, cfg, *args, rows=m, d=d),
    )
    return dw, db


@triton.jit
def _value_grad_kernel(g_ptr, idx_ptr, w_ptr, dvp_ptr, N, D, K, N_TBLK, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    dblk = pid // N_TBLK
    rows = (pid % N_TBLK) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    g = tl.load(g_ptr + rows64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    out = dvp_ptr + dblk.to(tl.int64) * N * K + rows64 * K
    for j in range(0, K):
        lat = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + lat[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(out + j, tl.sum(g * w, 1), mask=rmask)


def value_grads(g: torch.Tensor, w_dec: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """dv [N, k] fp32: ``dv[n, j] = g[n] · w_dec[idx[n, j]]`` (token-major gather, decode's access pattern;
    per-d-block partials summed after, no atomics). Twin: ``mechlib.sae.fast.value_grads_torch``."""
    n, d = g.shape
    k = idx.shape[1]
    idx = idx.to(torch.int32).contiguous()
    if not n:
        return torch.zeros(0, k, dtype=torch.float32, device=g.device)

    def launch(cfg: Config) -> torch.Tensor:
        dvp = torch.empty(_n_dblk(cfg, d), n, k, dtype=torch.float32, device=g.device)
        _launch(_value_grad_kernel, cfg, g, idx, w_dec, dvp, n, d, k, rows=n, d=d)
        return dvp

    return _tuned("value_grads", (d, k, w_dec.dtype), DECODE_CONFIGS, launch).sum(0)
