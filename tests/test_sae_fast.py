"""CPU checks of the fast TopK SAE step's sparse math (mechlib.sae.fast).

What is proved here: the hand-written sparse backward equals autograd of the dense method
(float64, with and without AuxK, with exact ties), ``fast_step`` equals ``reference_step``,
selections have exactly k distinct latents, training with it keeps unit decoder rows, and —
when triton is importable — the Triton kernels run under ``TRITON_INTERPRET=1`` give what
their torch twins give, and every kernel configuration compiles for sm_90 (H100/H200) with the
default ones free of register spills (subprocesses, so the interpreter flag cannot leak).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechlib.sae import TopKSAE, reference_step, renorm_decoder_
from mechlib.sae.fast import BWDS, TORCH, Backend, default_backend, fast_step, latent_order, select_topk

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make_sae(d=24, m=96, k=6, seed=1, dtype=torch.float64) -> TopKSAE:
    sae = TopKSAE(d, m, k, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial biases so every gradient path carries signal
        sae.b_enc.copy_(torch.randn(m, generator=gen, dtype=dtype) * 0.5)
        sae.b_dec.copy_(torch.randn(d, generator=gen, dtype=dtype))
    return sae


def make_x(n, d, seed=0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=dtype) * 3 + 1).to(dtype)


def dead_mask(m, n_dead, seed=0) -> torch.Tensor:
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return mask


def dense_oracle(sae: TopKSAE, x, dead, k_aux, aux_coef, select=None) -> torch.Tensor:
    """The study's dense method in autograd: dense latents via scatter, dense decode.

    ``select`` (default ``torch.topk``) picks indices; values are gathered from ``pre`` so
    gradients flow exactly through the selected entries, as ``topk``'s backward does.
    """
    select = select or (lambda p, kk: p.topk(kk, dim=1).indices)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    idx = select(pre, sae.k)
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    e = x - (acts @ sae.W_dec + sae.b_dec)
    loss = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    n_dead = int(dead.sum())
    if k_aux > 0 and n_dead > 0:
        masked = pre.masked_fill(~dead, float("-inf"))
        aidx = select(masked, min(k_aux, n_dead))
        aux_acts = torch.zeros_like(pre).scatter(1, aidx, pre.gather(1, aidx).relu())
        ed = e.detach()
        loss = loss + aux_coef * ((aux_acts @ sae.W_dec) - ed).pow(2).sum() / (ed - ed.mean(0)).pow(2).sum()
    loss.backward()
    return loss.detach()


def grads(sae):
    return {n: getattr(sae, n).grad.clone() for n in PARAMS}


def assert_grads_close(ga, gb, rtol):
    for name in PARAMS:
        scale = ga[name].abs().max().clamp_min(1e-30)
        err = (ga[name] - gb[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative max error {float(err):.2e}"


@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("n_dead,k_aux", [(0, 8), (5, 8), (40, 8), (40, 0), (96, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_grads_equal_dense_autograd_float64(n_dead, k_aux, seed, bwd):
    """Every backward candidate (``Backend.bwd``) in its exact torch form vs dense autograd."""
    sae = make_sae(seed=seed)
    x, dead = make_x(50, 24, seed), dead_mask(96, n_dead, seed)
    a, b = copy.deepcopy(sae), copy.deepcopy(sae)
    loss_ref = dense_oracle(a, x, dead, k_aux, 0.125)
    stats = fast_step(b, x, dead, k_aux, 0.125, backend=Backend("torch", None, bwd))
    assert torch.allclose(stats.loss, loss_ref, rtol=1e-12)
    assert (stats.aux_loss > 0) == (n_dead > 0 and k_aux > 0)
    assert_grads_close(grads(a), grads(b), 1e-10)


def test_aux_gradients_touch_only_dead_latents():
    sae = make_sae()
    x, dead = make_x(50, 24), dead_mask(96, 20)
    with_aux, without = copy.deepcopy(sae), copy.deepcopy(sae)
    fast_step(with_aux, x, dead, 8, 0.5, backend=TORCH)
    fast_step(without, x, dead, 0, 0.5, backend=TORCH)
    d_enc = (with_aux.W_enc.grad - without.W_enc.grad).abs().sum(0)
    d_dec = (with_aux.W_dec.grad - without.W_dec.grad).abs().sum(1)
    assert (d_enc[~dead] == 0).all() and (d_dec[~dead] == 0).all()
    assert (d_enc[dead] > 0).any() and (d_dec[dead] > 0).any()


def lowest_index_topk(p, kk):
    return torch.sort(p, dim=1, descending=True, stable=True).indices[:, :kk]


def test_ties_go_to_lowest_index_and_grads_match():
    """Integer-valued weights make many exactly equal pre-activations at the top-k boundary."""
    d, m, k = 8, 40, 5
    sae = make_sae(d, m, k)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-1, 2, (d, m), generator=gen).double())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randint(0, 2, (30, d), generator=gen).double()
    pre = x @ sae.W_enc
    sel = select_topk(pre, k)
    kth = pre.topk(k, dim=1).values[:, -1:]
    assert ((pre >= kth).sum(1) > k).any(), "the fixture must contain ties at the top-k boundary"
    want = lowest_index_topk(pre, k).sort(dim=1).values
    assert torch.equal(sel.idx, want)
    dead = dead_mask(m, 12)
    a, b, c = copy.deepcopy(sae), copy.deepcopy(sae), copy.deepcopy(sae)
    dense_oracle(a, x, dead, 6, 0.125, select=lowest_index_topk)
    fast_step(b, x, dead, 6, 0.125, backend=TORCH)
    fast_step(c, x, dead, 6, 0.125, backend=TORCH)
    assert_grads_close(grads(a), grads(b), 1e-10)
    for name in PARAMS:  # deterministic: a second run is bitwise identical
        assert torch.equal(getattr(b, name).grad, getattr(c, name).grad)


@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("n_dead", [0, 7, 96])
def test_fast_step_equals_reference_step_fp32(n_dead, bwd):
    sae = make_sae(32, 128, 8, dtype=torch.float32)
    x, dead = make_x(64, 32, dtype=torch.float32), dead_mask(128, n_dead)
    a, b = copy.deepcopy(sae), copy.deepcopy(sae)
    sa = reference_step(a, x, dead, 16, 0.125)
    sb = fast_step(b, x, dead, 16, 0.125, backend=Backend("torch", None, bwd))
    for field in ("loss", "fvu", "mse", "aux_loss"):
        assert torch.allclose(getattr(sa, field), getattr(sb, field), rtol=1e-5, atol=1e-7), field
    assert torch.equal(sa.fired, sb.fired)
    assert_grads_close(grads(a), grads(b), 1e-5)


def test_gradients_accumulate_like_backward():
    sae = make_sae()
    x, dead = make_x(20, 24), dead_mask(96, 10)
    once, twice = copy.deepcopy(sae), copy.deepcopy(sae)
    fast_step(once, x, dead, 8, 0.125)
    fast_step(twice, x, dead, 8, 0.125)
    fast_step(twice, x, dead, 8, 0.125)
    for name in PARAMS:
        assert torch.allclose(2 * getattr(once, name).grad, getattr(twice, name).grad, rtol=1e-12)


def test_selection_has_exactly_k_distinct_ascending_latents():
    pre = torch.randn(200, 300, dtype=torch.float64)
    pre[:, ::7] = 0.5  # plenty of ties
    dead = dead_mask(300, 50)
    sel = select_topk(pre, 17, dead, 30)
    assert sel.idx.shape == (200, 17) and sel.aux_idx.shape == (200, 30)
    assert (sel.idx.diff(dim=1) > 0).all() and (sel.aux_idx.diff(dim=1) > 0).all()
    assert dead[sel.aux_idx].all()
    # the selected values are the k largest: nothing outside beats the smallest inside
    outside = pre.scatter(1, sel.idx, float("-inf"))
    assert (outside.max(1).values <= sel.raw.min(1).values).all()


def test_latent_order_segments():
    idx = select_topk(torch.randn(30, 50), 4).idx
    order = latent_order(idx, 50)
    assert order.offsets[-1] == 120 and torch.equal(order.lat, idx.reshape(-1)[order.perm])
    for i in range(50):
        seg = slice(int(order.offsets[i]), int(order.offsets[i + 1]))
        assert (order.lat[seg] == i).all() and (order.tok[seg].diff() > 0).all()
        assert torch.equal(order.tok[seg], (idx == i).any(1).nonzero().flatten())


def test_training_with_fast_step_tracks_reference_and_keeps_unit_decoder():
    """30 Adam steps with renorm every 10: the fast step's run follows the reference run."""
    runs = {}
    for name, fn in (("ref", reference_step), ("fast", fast_step)):
        sae = make_sae(32, 128, 8, dtype=torch.float32)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = dead_mask(128, 30)  # AuxK active throughout
        fvus = []
        for step in range(30):
            opt.zero_grad(set_to_none=True)
            fvus.append(float(fn(sae, make_x(64, 32, seed=step, dtype=torch.float32), dead, 16, 0.125).fvu))
            opt.step()
            if (step + 1) % 10 == 0:
                renorm_decoder_(sae)
        runs[name] = (fvus, sae)
    (f_ref, s_ref), (f_fast, s_fast) = runs["ref"], runs["fast"]
    assert f_ref[-1] < f_ref[0]  # it learned something
    assert max(abs(a - b) for a, b in zip(f_ref, f_fast)) < 1e-3
    assert torch.allclose(s_fast.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    assert torch.allclose(s_ref.W_enc, s_fast.W_enc, atol=1e-3)


@pytest.mark.parametrize("bwd", BWDS)
def test_bf16_compute_stays_close_to_fp32_reference(bwd):
    """The CUDA recipe (bf16 pre and weight copies, fp32 grads; ``"dense"`` also bf16 GEMM outputs)
    emulated on CPU with the twins."""
    sae = make_sae(64, 256, 8, dtype=torch.float32)
    x, dead = make_x(128, 64, dtype=torch.float32), dead_mask(256, 40)
    a, b = copy.deepcopy(sae), copy.deepcopy(sae)
    sa = reference_step(a, x, dead, 16, 0.125)
    sb = fast_step(b, x, dead, 16, 0.125, backend=Backend("torch", torch.bfloat16, bwd))
    assert abs(float(sa.fvu - sb.fvu)) < 0.01 * float(sa.fvu)
    for name in PARAMS:
        ga, gb = getattr(a, name).grad, getattr(b, name).grad
        cos = torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0)
        assert cos > 0.97, f"{name}: cosine {float(cos):.4f}"


def test_dense_backward_reuses_one_buffer_and_rejects_a_wrong_one():
    """``"dense"`` writes S, g W_dec^T and d_pre into the [N, m] buffer it is given (pre's)."""
    from mechlib.sae.fast import dense_backward

    pre = torch.randn(10, 40, dtype=torch.float64)
    sel = select_topk(pre, 4)
    vals, g, W = sel.raw.clamp_min(0), torch.randn(10, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    xc = torch.randn(10, 6)
    buf = pre.clone()
    dW_dec, dW_enc, db_enc = dense_backward(sel, vals, g, xc.double(), W, buf)
    S = torch.zeros_like(pre).scatter(1, sel.idx, vals)
    assert torch.allclose(dW_dec, S.t() @ g)
    dp = (g @ W.t()).gather(1, sel.idx) * (sel.raw > 0)
    D = torch.zeros_like(pre).scatter(1, sel.idx, dp)
    assert torch.equal(buf, D)  # the buffer ends holding d_pre
    assert torch.allclose(dW_enc, xc.double().t() @ D) and torch.allclose(db_enc, D.sum(0))
    with pytest.raises(ValueError, match="contiguous"):
        dense_backward(sel, vals, g, xc.double(), W, buf.t())


@pytest.mark.parametrize("chunk", [0, 16, 64, 100, 256])
def test_topk_chunked_selects_the_k_largest(chunk):
    """Two-stage top-k: the same values as one ``torch.topk`` (bf16, so with ties), k distinct
    indices whose entries hold those values; chunk 0, 100 (does not divide m) and m fall back."""
    from mechlib.sae.fast import topk_chunked

    pre = (torch.randn(50, 256) * 3).bfloat16()
    pre[0] = 1.0  # a row of ties
    vals, idx = topk_chunked(pre, 16, chunk)
    want = pre.topk(16, dim=1).values
    assert torch.equal(vals.sort(dim=1, descending=True).values, want)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()


def test_backward_env_var(monkeypatch):
    monkeypatch.setenv("MECHLIB_SAE_BWD", "dense")
    assert default_backend(torch.device("cpu")) == TORCH  # CPU: always the exact twins
    monkeypatch.setenv("MECHLIB_SAE_BWD", "fastest")
    with pytest.raises(ValueError, match="MECHLIB_SAE_BWD"):
        default_backend(torch.device("cpu"))
    monkeypatch.setenv("MECHLIB_SAE_BWD", "seg")
    monkeypatch.setenv("MECHLIB_SAE_TOPK_CHUNK", "1k")
    with pytest.raises(ValueError, match="MECHLIB_SAE_TOPK_CHUNK"):
        default_backend(torch.device("cpu"))


# ------------------------------------------------------------- Triton kernels under the interpreter


def _interpreter_checks() -> None:
    """Run each kernel under TRITON_INTERPRET=1 against its torch twin, then whole steps."""
    from mechlib.sae import triton_kernels as tk
    from mechlib.sae import triton_seg
    from mechlib.sae.fast import decode_residual_torch, pass_a_torch, pass_b_torch, value_grads_torch

    torch.manual_seed(0)
    n, m, d, k = 37, 300, 70, 9
    pre = torch.randn(n, m) * 2
    pre[:, 7] = 5.0  # one latent in every row: a long segment spanning several BLOCK_S chunks
    s = select_topk(pre, k)
    raw = s.raw.bfloat16()
    for wdt in (torch.float32, torch.bfloat16):
        x, b, W = torch.randn(n, d), torch.randn(d), torch.randn(m, d).to(wdt)
        vals = raw.float().clamp_min(0)
        e1 = tk.decode_residual(x, b, vals, s.idx.int(), W)
        assert torch.allclose(e1, decode_residual_torch(x, b, vals, s.idx, W), atol=1e-4), "decode"
        gv = torch.randn(n, d).to(wdt)
        dv_want = value_grads_torch(gv, W, s.idx)
        assert dv_want.abs().sum() > 0 and dv_want.shape == (n, k)
        assert torch.allclose(tk.value_grads(gv, W, s.idx), dv_want, atol=1e-4), "value_grads"
        o = latent_order(s.idx, m)
        g, xc, vs = torch.randn(n, d).to(wdt), torch.randn(n, d).to(wdt), vals.reshape(-1)[o.perm]
        dp = torch.randn(o.tok.numel()).to(wdt).float()  # bf16-exact, as the seg kernel's dot sees it
        offs, lat, tok = o.offsets.int(), o.lat.int(), o.tok.int()
        dw2, dv2 = pass_a_torch(o, vs, g, W)
        de2, db2 = pass_b_torch(o, dp, xc, m)
        assert dw2.abs().sum() > 0 and de2.abs().sum() > 0 and dv2.abs().sum() > 0
        for name, (dw1, dv1), (de1, db1) in (
            ("pass", tk.pass_a(offs, tok, vs, g, W), tk.pass_b(offs, tok, dp, xc, m)),
            ("seg", triton_seg.seg_pass_a(offs, lat, tok, vs, g, W), triton_seg.seg_pass_b(offs, lat, tok, dp, xc, m)),
        ):
            assert torch.allclose(dw1, dw2, atol=1e-4) and torch.allclose(dv1, dv2, atol=1e-4), f"{name}_a {wdt}"
            assert torch.allclose(de1, de2, atol=1e-4) and torch.allclose(db1, db2, atol=1e-4), f"{name}_b {wdt}"
    # every launch configuration of the seg kernels (the GPU times them and keeps one), bf16 operands
    o = latent_order(s.idx, m)
    offs, lat, tok, vs = o.offsets.int(), o.lat.int(), o.tok.int(), raw.float().clamp_min(0).reshape(-1)[o.perm]
    g, xc, W = torch.randn(n, d).bfloat16(), torch.randn(n, d).bfloat16(), torch.randn(m, d).bfloat16()
    dp = torch.randn(o.tok.numel()).bfloat16().float()
    (dw2, dv2), (de2, db2) = pass_a_torch(o, vs, g, W), pass_b_torch(o, dp, xc, m)
    tk.CHOSEN.clear()
    for cfg in triton_seg.SEG_CONFIGS:
        tk.CHOSEN[("seg_pass_a", m, d, k, g.dtype)] = tk.CHOSEN[("seg_pass_b", m, d, k, xc.dtype)] = cfg
        dw1, dv1 = triton_seg.seg_pass_a(offs, lat, tok, vs, g, W)
        de1, db1 = triton_seg.seg_pass_b(offs, lat, tok, dp, xc, m)
        assert torch.allclose(dw1, dw2, atol=1e-4) and torch.allclose(dv1, dv2, atol=1e-4), f"seg_a {cfg}"
        assert torch.allclose(de1, de2, atol=1e-4) and torch.allclose(db1, db2, atol=1e-4), f"seg_b {cfg}"
        assert len(tk.CHOSEN) == 2, "the kernels must run the configuration set above"
    tk.CHOSEN.clear()
    # whole steps, every backward, AuxK live and not: fp32 compute vs the fp32 reference (exact up to
    # summation order), bf16 compute (the CUDA recipe) within 1 % FVU and 0.97 gradient cosine
    for bwd in BWDS:
        for n_dead in (0, 30):
            sae = make_sae(40, 160, 8, dtype=torch.float32)
            xs, dmask = make_x(48, 40, dtype=torch.float32), dead_mask(160, n_dead)
            a, bb, c = copy.deepcopy(sae), copy.deepcopy(sae), copy.deepcopy(sae)
            sr = reference_step(c, xs, dmask, 16, 0.125)
            st = fast_step(a, xs, dmask, 16, 0.125, backend=Backend("triton", torch.float32, bwd))
            assert torch.allclose(st.loss, sr.loss, rtol=1e-5), f"{bwd} fp32 loss"
            assert (st.aux_loss > 0) == (n_dead > 0), f"{bwd} aux"
            assert_grads_close(grads(c), grads(a), 1e-4)
            sb = fast_step(bb, xs, dmask, 16, 0.125, backend=Backend("triton", torch.bfloat16, bwd))
            assert abs(float(sb.fvu - sr.fvu)) < 0.01 * float(sr.fvu), f"{bwd} bf16 fvu"
            for name in PARAMS:
                cos = torch.nn.functional.cosine_similarity(
                    getattr(bb, name).grad.flatten(), getattr(c, name).grad.flatten(), dim=0
                )
                assert cos > 0.97, f"{bwd} bf16 {name}: cosine {float(cos):.4f}"
    sae = make_sae(40, 160, 8, dtype=torch.float32)  # two-stage top-k: same step as one topk
    xs, dmask = make_x(48, 40, dtype=torch.float32), dead_mask(160, 30)
    a, c = copy.deepcopy(sae), copy.deepcopy(sae)
    st = fast_step(a, xs, dmask, 16, 0.125, backend=Backend("triton", torch.float32, "seg", topk_chunk=32))
    sr = reference_step(c, xs, dmask, 16, 0.125)
    assert torch.allclose(st.loss, sr.loss, rtol=1e-5), "topk_chunk loss"
    assert_grads_close(grads(c), grads(a), 1e-4)
    print("TRITON_INTERPRET checks passed")


def _compile_checks() -> None:
    """Compile every kernel and launch configuration for sm_90 (H100/H200) — no GPU needed — and,
    where triton ships ptxas, check the default configurations do not spill registers."""
    import glob
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mechlib.sae import triton_kernels as tk
    from mechlib.sae import triton_seg

    ptr = {"f32": "*fp32", "bf16": "*bf16", "i32": "*i32", "u8": "*u8"}
    decode = dict(
        x_ptr=ptr["f32"],
        b_ptr=ptr["f32"],
        val_ptr=ptr["f32"],
        idx_ptr=ptr["i32"],
        w_ptr=ptr["bf16"],
        e_ptr=ptr["f32"],
        N="i32",
        D="i32",
        K="i32",
        N_TBLK="i32",
    )
    pass_a = dict(
        off_ptr=ptr["i32"],
        tok_ptr=ptr["i32"],
        val_ptr=ptr["f32"],
        g_ptr=ptr["bf16"],
        w_ptr=ptr["bf16"],
        dw_ptr=ptr["f32"],
        dvp_ptr=ptr["f32"],
        M="i32",
        D="i32",
        E="i32",
        N_MBLK="i32",
    )
    pass_b = dict(
        off_ptr=ptr["i32"],
        tok_ptr=ptr["i32"],
        dp_ptr=ptr["f32"],
        xc_ptr=ptr["bf16"],
        dw_ptr=ptr["f32"],
        db_ptr=ptr["f32"],
        M="i32",
        D="i32",
        stride_d="i32",
        stride_m="i32",
        N_MBLK="i32",
    )
    seg_a = dict(pass_a, lat_ptr=ptr["i32"])
    seg_b = dict(pass_b, lat_ptr=ptr["i32"])
    seg_a = {n: seg_a[n] for n in ("off_ptr", "lat_ptr", "tok_ptr", "val_ptr", "g_ptr", "w_ptr", "dw_ptr", "dvp_ptr")}
    seg_a |= dict(M="i32", D="i32", E="i32", N_MBLK="i32")
    seg_b = {n: seg_b[n] for n in ("off_ptr", "lat_ptr", "tok_ptr", "dp_ptr", "xc_ptr", "dw_ptr", "db_ptr")}
    seg_b |= dict(M="i32", D="i32", stride_d="i32", stride_m="i32", N_MBLK="i32")
    jobs = [
        (fn, sig, {**{n: c[n] for n in ("BLOCK_M", "BLOCK_S", "BLOCK_D")}, "DOT_F32": False}, c["num_warps"], True)
        for fn, sig in ((triton_seg._seg_pass_a_kernel, seg_a), (triton_seg._seg_pass_b_kernel, seg_b))
        for c in triton_seg.SEG_CONFIGS
    ]
    value_grad = dict(
        g_ptr=ptr["bf16"], idx_ptr=ptr["i32"], w_ptr=ptr["bf16"], dvp_ptr=ptr["f32"], N="i32", D="i32", K="i32"
    )
    value_grad |= dict(N_TBLK="i32")
    jobs += [
        (tk._value_grad_kernel, value_grad, {n: c[n] for n in ("BLOCK_N", "BLOCK_D")}, c["num_warps"], i == 0)
        for i, c in enumerate(tk.DECODE_CONFIGS)
    ]
    jobs += [
        (tk._decode_kernel, decode, {n: c[n] for n in ("BLOCK_N", "BLOCK_D")}, c["num_warps"], i == 0)
        for i, c in enumerate(tk.DECODE_CONFIGS)
    ]
    jobs += [
        (fn, sig, {n: c[n] for n in ("BLOCK_M", "BLOCK_S", "BLOCK_D")}, c["num_warps"], i == 0)
        for fn, sig in ((tk._pass_a_kernel, pass_a), (tk._pass_b_kernel, pass_b))
        for i, c in enumerate(tk.PASS_CONFIGS)
    ]
    ptxas = sorted(glob.glob(str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas*")), reverse=True)
    for fn, sig, consts, warps, is_default in jobs:
        sig = {**sig, **{name: "constexpr" for name in consts}}
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps},
        )
        assert kernel.asm.get("cubin"), f"{fn.__name__} {consts}: no cubin"
        if is_default and ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
                fh.write(kernel.asm["ptx"])
            info = subprocess.run(
                [ptxas[0], "-v", "--gpu-name", "sm_90a", fh.name, "-o", os.devnull], capture_output=True, text=True
            ).stderr
            spills = re.findall(r"(\d+) bytes spill stores", info)
            assert spills and all(v == "0" for v in spills), f"{fn.__name__} {consts}: {info}"
    print(f"compiled {len(jobs)} kernel configurations for sm_90")


def _run_self(flag: str, env_extra: dict[str, str]) -> str:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        env_extra,
        TRITON_DEFAULT_FP_FUSION="1",
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    out = subprocess.run(
        [sys.executable, str(Path(__file__)), flag], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _triton_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2] if p.isdigit())


needs_triton = pytest.mark.skipif(
    not _triton_version(), reason="triton not installed (pip install triton==3.9.0 runs these on CPU)"
)


@pytest.mark.skipif(
    _triton_version() < (3, 9),
    reason="needs triton >= 3.9 (older interpreters trip on NumPy 2 "
    "scalars; the compiled kernels are checked by test_triton_kernels_compile_for_sm90)",
)
def test_triton_kernels_match_twins_under_interpreter():
    assert "TRITON_INTERPRET checks passed" in _run_self("--triton-interpret", {"TRITON_INTERPRET": "1"})


@needs_triton
def test_triton_kernels_compile_for_sm90():
    assert "kernel configurations for sm_90" in _run_self("--triton-compile", {})


if __name__ == "__main__" and sys.argv[1:] == ["--triton-interpret"]:
    _interpreter_checks()
if __name__ == "__main__" and sys.argv[1:] == ["--triton-compile"]:
    _compile_checks()
