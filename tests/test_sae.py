"""TopK SAE invariants, the step contract, and the file formats (synthetic tensors, fast)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mechlib.sae import (
    CARD_KEYS,
    SAEError,
    TopKSAE,
    autograd_step,
    card_state,
    check_compatible,
    dense_code,
    fired_mask,
    init_b_dec_,
    load_sae,
    reference_step,
    renorm_decoder_,
    sae_from_state,
    save_card_checkpoint,
    save_sae,
)

D, M, K = 24, 96, 5


def make_sae(dtype=torch.float64, seed=3) -> TopKSAE:
    sae = TopKSAE(D, M, K, seed=seed).to(dtype)
    with torch.no_grad():  # non-trivial biases so every term of the gradient is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_dec.copy_(torch.randn(D, generator=g, dtype=dtype))
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=g, dtype=dtype))
    return sae


def data(n=64, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 0.5


def grads_of(step, sae, x, dead, k_aux=64, aux_coef=0.5):
    sae.zero_grad(set_to_none=True)
    stats = step(sae, x, dead, k_aux, aux_coef)
    return stats, {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_exactly_k_active_per_row():
    sae = make_sae(torch.float32)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive → ReLU keeps all k
    code = sae.encode(data(dtype=torch.float32))
    dense = dense_code(code, M)
    assert code.values.shape == code.indices.shape == (64, K)
    assert torch.equal((dense > 0).sum(1), torch.full((64,), K))
    # the k indices are the k largest pre-activations of each row
    pre = sae.pre_acts(data(dtype=torch.float32))
    kth = pre.topk(K, -1).values[:, -1:]
    assert torch.all(pre.gather(1, code.indices) >= kth)


def test_relu_after_topk_allows_fewer_than_k():
    sae = make_sae(torch.float32)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    code = sae.encode(data(dtype=torch.float32))
    assert torch.all(code.values == 0) and code.indices.shape[1] == K
    assert not fired_mask(code, M).any()


def test_renorm_gives_unit_decoder_rows():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(M, 1, dtype=torch.float64) * 5 + 0.1)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))
    w_enc = sae.W_enc.detach().clone()
    renorm_decoder_(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))
    assert torch.equal(sae.W_enc, w_enc)  # encoder untouched (documented choice)


def test_init_is_tied_unit_norm():
    sae = TopKSAE(D, M, K, seed=7)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert torch.equal(TopKSAE(D, M, K, seed=7).W_dec, sae.W_dec)
    assert not torch.equal(TopKSAE(D, M, K, seed=8).W_dec, sae.W_dec)


@pytest.mark.parametrize("n_dead", [0, 7, M])
def test_reference_step_matches_dense_autograd(n_dead):
    sae = make_sae()
    x = data()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    s1, g1 = grads_of(reference_step, sae, x, dead)
    s2, g2 = grads_of(autograd_step, sae, x, dead)
    for field in ("loss", "fvu", "mse", "aux_loss"):
        torch.testing.assert_close(getattr(s1, field), getattr(s2, field), rtol=1e-12, atol=1e-12)
    assert torch.equal(s1.fired, s2.fired)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-10, atol=1e-12, msg=name)
    assert (s1.aux_loss > 0) == (n_dead > 0)


def test_step_formulas():
    sae = make_sae()
    x = data()
    dead = torch.zeros(M, dtype=torch.bool)
    stats = reference_step(sae, x, dead, 64, 0.5)
    e = x - sae(x).recon.detach()
    torch.testing.assert_close(stats.fvu, e.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    torch.testing.assert_close(stats.mse, e.pow(2).mean())
    torch.testing.assert_close(stats.loss, stats.fvu)
    code = sae.encode(x)
    expect = torch.zeros(M, dtype=torch.bool)
    expect[code.indices[code.values > 0]] = True
    assert torch.equal(stats.fired, expect)


@pytest.mark.parametrize("step", [reference_step, autograd_step])
def test_auxk_only_touches_dead_latents(step):
    sae = make_sae()
    x = data()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    _, without = grads_of(step, sae, x, dead, aux_coef=0.0)
    _, with_aux = grads_of(step, sae, x, dead, aux_coef=1.0)
    diff = {n: (with_aux[n] - without[n]).abs() for n in without}
    live = ~dead
    assert diff["W_enc"][:, live].max() == 0 and diff["W_enc"][:, dead].max() > 0
    assert diff["b_enc"][live].max() == 0 and diff["b_enc"][dead].max() > 0
    assert diff["W_dec"][live].max() == 0 and diff["W_dec"][dead].max() > 0
    # b_dec sits inside pre = (x - b_dec) @ W_enc + b_enc, so AuxK moves it through dead columns only
    torch.testing.assert_close(diff["b_dec"], (sae.W_enc[:, dead] @ (with_aux["b_enc"] - without["b_enc"])[dead]).abs())


def test_card_snippet_reproduces_mechlib(tmp_path):
    sae = make_sae(torch.float32)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # not unit: saving must renormalise (and the SAE with it)
    path = save_card_checkpoint(sae, tmp_path / "sae_final.pt")
    x = data(dtype=torch.float32)
    # --- the card's usage snippet, verbatim but for the path and x ---
    ck = torch.load(path)
    pre = (x - ck["b_dec"]) @ ck["W_enc"] + ck["b_enc"]
    v, i = pre.topk(ck["k"], -1)
    f = torch.zeros_like(pre).scatter(-1, i, v).relu()
    recon = f @ ck["W_dec"] + ck["b_dec"]
    # --------------------------------------------------------------------
    assert sorted(ck) == sorted(CARD_KEYS) and isinstance(ck["k"], int)
    torch.testing.assert_close(ck["W_dec"].norm(dim=1), torch.ones(M))
    out = sae(x)
    torch.testing.assert_close(f, dense_code(out.code, M).detach())
    torch.testing.assert_close(recon, out.recon.detach(), rtol=1e-5, atol=1e-5)
    loaded = load_sae(path)
    torch.testing.assert_close(loaded(x).recon.detach(), recon, rtol=1e-5, atol=1e-5)


def test_safetensors_cfg_round_trip(tmp_path):
    sae = make_sae(torch.float32)
    sae.meta = {"model": "tiny", "layer": 2}
    save_sae(sae, tmp_path, {"k_aux": 64, "aux_coef": 0.125, "lr": 1e-3})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_model"] == D and cfg["d_sae"] == M and cfg["k"] == K and cfg["layer"] == 2
    assert cfg["k_aux"] == 64 and "fvu" in cfg["formulas"]
    loaded = load_sae(tmp_path / "sae.safetensors")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.k == K and loaded.meta["layer"] == 2 and loaded.meta["model"] == "tiny"
    assert load_sae(tmp_path).d_sae == M  # a folder works too


def test_mismatched_checkpoint_errors_name_both_values(tmp_path):
    sae = make_sae(torch.float32)
    sae.meta = {"layer": 2}
    with pytest.raises(SAEError, match=r"d_model=24.*d_model=64"):
        check_compatible(sae, 64, 2)
    with pytest.raises(SAEError, match=r"layer 2 .*layer 5"):
        check_compatible(sae, D, 5)
    check_compatible(sae, D, 2)
    state = card_state(sae)
    del state["b_enc"]
    with pytest.raises(SAEError, match=r"missing keys.*b_enc"):
        sae_from_state(state, "x.pt")
    state = card_state(sae)
    state["W_dec"] = state["W_dec"][:, :-1]
    with pytest.raises(SAEError, match=r"not \[d, m\]"):
        sae_from_state(state, "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SAEError, match=r"junk.pt"):
        load_sae(tmp_path / "junk.pt")
    with pytest.raises(SAEError, match="not found"):
        load_sae(tmp_path / "missing.pt")


def test_hub_spec_offline_gives_one_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(SAEError, match=r"hub repo 'someone/some-sae'.*local path"):
        load_sae("hf:someone/some-sae/sae_final.pt")
    with pytest.raises(SAEError, match="expected hf:<owner>/<repo>"):
        load_sae("hf:only-a-repo")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_geometric_median_init_resists_outliers():
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(0)) * 0.1
    x[:5] += 1000.0
    sae = TopKSAE(D, M, K)
    init_b_dec_(sae, x)
    assert sae.b_dec.abs().max() < 1.0 < x.mean(0).abs().max()
