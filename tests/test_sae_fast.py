"""CPU checks of the fast TopK SAE step's math (mechlib.sae.fast), in its exact torch form.

What is proved here: every backward candidate (``Backend.bwd``) equals autograd of the dense
method (float64, with and without AuxK, with exact ties), ``fast_step`` equals ``reference_step``,
selections (one top-k or two-stage) have exactly k distinct latents, and training with it keeps
unit decoder rows. The Triton kernels themselves (interpreter, sm_90 compile) are checked in
tests/test_sae_triton_cpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mechlib.sae import TopKSAE, reference_step, renorm_decoder_
from mechlib.sae.fast import (
    BWDS,
    TORCH,
    Backend,
    default_backend,
    fast_step,
    latent_order,
    select_topk,
)
from mechlib.sae.fast import select as fast_select

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


def test_torch_select_from_dead_ids_equals_the_mask_path():
    """``select``'s torch branch takes the dead ids as they are; it must pick exactly what the mask path
    picks (same ids, values and dtypes, bit for bit) and what masking the live latents to -inf picks."""
    pre = torch.randn(64, 300, dtype=torch.float64)
    pre[:, ::7] = 0.5  # plenty of ties, among dead and live latents
    for n_dead, ka in ((0, 0), (50, 30), (50, 50), (3, 3), (50, 0)):
        mask = dead_mask(300, n_dead)
        got = fast_select(TORCH, pre, 17, mask.nonzero().flatten(), ka)
        want = select_topk(pre, 17, mask, ka)
        for name, a, b in zip(got._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} n_dead={n_dead} ka={ka}"
        oracle = lowest_index_topk(pre.masked_fill(~mask, float("-inf")), ka).sort(dim=1).values
        assert got.aux_idx.shape == (64, ka) and torch.equal(got.aux_idx, oracle), f"n_dead={n_dead} ka={ka}"
    assert fast_select(TORCH, pre, 17, None, 5).aux_idx.shape == (64, 0)


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
