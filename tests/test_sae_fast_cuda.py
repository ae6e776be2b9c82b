"""GPU checks of the fast TopK SAE step: Triton kernels vs their torch twins, fast_step vs
reference_step, a short training run, and the study shape's memory bound. Skips without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from mechlib.sae import TopKSAE, reference_step, renorm_decoder_  # noqa: E402
from mechlib.sae.fast import BWDS, Backend, fast_step, latent_order, select_topk  # noqa: E402

DEV = torch.device("cuda")
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make_sae(d, m, k, seed=0) -> TopKSAE:
    sae = TopKSAE(d, m, k, seed=seed).to(DEV)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(m, generator=gen, device=DEV))
        sae.b_dec.copy_(torch.randn(d, generator=gen, device=DEV))
    return sae


def make_x(n, d, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    return torch.randn(n, d, generator=gen, device=DEV) * 2 + 0.5


def dead_mask(m, n_dead, seed=0):
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return mask.to(DEV)


def test_kernels_match_torch_twins():
    from mechlib.sae import triton_kernels as tk
    from mechlib.sae import triton_seg
    from mechlib.sae.fast import decode_residual_torch, pass_a_torch, pass_b_torch, value_grads_torch

    n, m, d, k = 512, 4096, 320, 32
    gen = torch.Generator(device=DEV).manual_seed(0)
    pre = (torch.randn(n, m, generator=gen, device=DEV) * 2).bfloat16()
    pre[:, 7] = 9.0  # a latent in every row: one segment spans many chunks
    s = select_topk(pre, k)
    x, b = torch.randn(n, d, device=DEV), torch.randn(d, device=DEV)
    W = torch.randn(m, d, device=DEV).bfloat16()
    vals = s.raw.float().clamp_min(0)
    idx = s.idx.int()
    assert torch.allclose(
        tk.decode_residual(x, b, vals, idx, W), decode_residual_torch(x, b, vals, s.idx, W), atol=1e-3
    )
    o = latent_order(s.idx, m)
    g, xc = torch.randn(n, d, device=DEV).bfloat16(), torch.randn(n, d, device=DEV).bfloat16()
    assert torch.allclose(tk.value_grads(g, W, s.idx), value_grads_torch(g, W, s.idx), atol=1e-3, rtol=1e-4)
    vs = vals.reshape(-1)[o.perm]
    dp = torch.randn(o.tok.numel(), device=DEV).bfloat16().float()  # bf16-exact: the seg dot's rounding is moot
    offs, lat, tok = o.offsets.int(), o.lat.int(), o.tok.int()
    dw2, dv2 = pass_a_torch(o, vs, g, W)
    de2, db2 = pass_b_torch(o, dp, xc, m)
    for name, (dw1, dv1), (de1, db1) in (
        ("pass", tk.pass_a(offs, tok, vs, g, W), tk.pass_b(offs, tok, dp, xc, m)),
        ("seg", triton_seg.seg_pass_a(offs, lat, tok, vs, g, W), triton_seg.seg_pass_b(offs, lat, tok, dp, xc, m)),
    ):
        assert torch.allclose(dw1, dw2, atol=1e-3, rtol=1e-4), f"{name}_a dW_dec"
        assert torch.allclose(dv1, dv2, atol=1e-3, rtol=1e-4), f"{name}_a dvals"
        assert torch.allclose(de1, de2, atol=1e-3, rtol=1e-4), f"{name}_b dW_enc"
        assert torch.allclose(db1, db2, atol=1e-3, rtol=1e-4), f"{name}_b db_enc"


@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("n_dead", [0, 300])
def test_fast_step_matches_reference_on_gpu(n_dead, bwd):
    sae = make_sae(256, 2048, 32)
    x, dead = make_x(1024, 256), dead_mask(2048, n_dead)
    ref, fast, twin = copy.deepcopy(sae), copy.deepcopy(sae), copy.deepcopy(sae)
    sr = reference_step(ref, x, dead, 64, 0.125)
    sf = fast_step(fast, x, dead, 64, 0.125, backend=Backend("triton", torch.bfloat16, bwd))
    st = fast_step(twin, x, dead, 64, 0.125, backend=Backend("torch", None, bwd))
    assert abs(float(sf.fvu - sr.fvu)) < 0.01 * float(sr.fvu)
    assert abs(float(sf.aux_loss - sr.aux_loss)) <= 0.02 * float(sr.aux_loss) + 1e-6
    assert torch.allclose(st.loss, sr.loss, rtol=1e-4)  # fp32 twins on GPU: exact up to summation order
    assert (sf.fired == sr.fired).float().mean() > 0.98
    for name in PARAMS:
        a, b = getattr(ref, name).grad.flatten(), getattr(fast, name).grad.flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name
        c = getattr(twin, name).grad.flatten()
        assert torch.nn.functional.cosine_similarity(a, c, dim=0) > 0.9999, name


def test_short_training_run_tracks_reference():
    runs = {}
    dead = dead_mask(2048, 300)
    for name, fn in (("ref", reference_step), ("fast", fast_step)):
        sae = make_sae(256, 2048, 32)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for step in range(50):
            opt.zero_grad(set_to_none=True)
            fn(sae, make_x(1024, 256, seed=step), dead, 64, 0.125)
            opt.step()
            if (step + 1) % 10 == 0:
                renorm_decoder_(sae)
        with torch.no_grad():
            x = make_x(2048, 256, seed=999)
            out = sae(x)
            runs[name] = float((x - out.recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(2048, device=DEV), atol=1e-5)
    assert abs(runs["fast"] - runs["ref"]) < 0.005, runs


@pytest.mark.parametrize("bwd", BWDS)
def test_study_shape_step_fits_memory_and_selects_exactly_k(bwd):
    d, m, k, n = 2560, 32768, 128, 8192
    sae = make_sae(d, m, k)
    x, dead = make_x(n, d), dead_mask(m, 3277)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stats = fast_step(sae, x, dead, 512, 0.125, backend=Backend("triton", torch.bfloat16, bwd))
    torch.cuda.synchronize()
    param_gib = sum(getattr(sae, p).numel() * 4 for p in PARAMS) / 2**30
    step_peak = (torch.cuda.max_memory_allocated() - base) / 2**30  # grads + step buffers
    trainer_peak = param_gib * 3 + step_peak  # + weights + Adam's two moments
    assert trainer_peak <= 6.0, f"params + Adam + step peak = {trainer_peak:.2f} GiB"
    assert torch.isfinite(stats.loss) and stats.aux_loss > 0
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc.bfloat16(), (x - sae.b_dec).bfloat16(), sae.W_enc.bfloat16())
        idx = pre.topk(k, dim=1, sorted=False).indices
    assert (torch.sort(idx, dim=1).values.diff(dim=1) > 0).all()
