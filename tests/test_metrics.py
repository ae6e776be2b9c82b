"""SAE evaluation metrics on known data, and the spliced next-token loss on tiny models."""

from __future__ import annotations

import pytest
import torch

from mechlib.metrics import (
    feature_examples,
    fit_pca,
    heldout_rows,
    pca_var_explained,
    pick_features,
    reconstruction_metrics,
    spliced_loss,
    top_activations,
    variance_explained,
)
from mechlib.models import decoder_layers
from mechlib.prompts import token_label
from mechlib.sae import TopKSAE


def anisotropic(n=2000, d=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d) + torch.arange(d) * 10.0


def identity_sae(d: int) -> TopKSAE:
    """An exact identity map as a TopK SAE: latents +e_i and -e_i, k = 2d, ReLU(x) − ReLU(−x) = x."""
    sae = TopKSAE(d, 2 * d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_variance_explained_known_cases():
    x = anisotropic()
    assert variance_explained(x, x) == (1.0, 1.0)
    per_dim, glob = variance_explained(x, x.mean(0).expand_as(x))
    assert per_dim == pytest.approx(0.0, abs=1e-9)
    # one global variance also counts the spread between dimension means (0, 10, ..., 70) as variance
    assert glob > 0.9
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    per_dim, glob = variance_explained(x, x + e)
    sse = (e.double() ** 2).sum()
    assert per_dim == pytest.approx(float(1 - sse / ((x.double() - x.double().mean(0)) ** 2).sum()))
    assert glob == pytest.approx(float(1 - (sse / e.numel()) / x.double().var()))
    assert glob > per_dim


def test_reconstruction_metrics_identity_and_counts():
    x = anisotropic(n=300)
    sae = identity_sae(8)
    m, counts = reconstruction_metrics(sae, x, batch_size=64)
    assert m.var_explained == pytest.approx(1.0) and m.mse == pytest.approx(0.0, abs=1e-10)
    assert m.n_tokens == 300
    # every dimension's mean is >= 0 with most values positive: latent +e_i fires when x_i > 0
    torch.testing.assert_close(counts[:8], (x > 0).sum(0))
    torch.testing.assert_close(counts[8:], (x < 0).sum(0))
    assert m.l0 == pytest.approx(float((x != 0).sum(1).double().mean()))
    assert m.coverage == pytest.approx(float((counts > 0).double().mean()))
    assert m.never_fired_fraction == pytest.approx(1 - m.coverage)


def test_reconstruction_metrics_match_direct_formulas():
    x = anisotropic(n=500)
    sae = TopKSAE(8, 32, 3, seed=2)
    m, counts = reconstruction_metrics(sae, x, batch_size=128)
    recon = sae(x).recon.detach()
    per_dim, glob = variance_explained(x, recon)
    assert m.var_explained == pytest.approx(per_dim, rel=1e-6)
    assert m.var_explained_global == pytest.approx(glob, rel=1e-6)
    assert m.mse == pytest.approx(float((x - recon).double().pow(2).mean()), rel=1e-6)
    assert m.l0 <= 3 and counts.sum() == round(m.l0 * 500)


def test_pca_baseline_recovers_a_low_rank_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=g))[0].t()  # 3 orthonormal directions in R^10
    scales = torch.tensor([5.0, 2.0, 1.0])
    train = (torch.randn(4000, 3, generator=g) * scales) @ basis + 7.0
    held = (torch.randn(500, 3, generator=g) * scales) @ basis + 7.0
    pca = fit_pca(train.split(1000), k=3)
    assert pca_var_explained(pca, held) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(pca.components[0].abs(), basis[0].abs().double(), atol=0.02, rtol=0)
    one = fit_pca([train], k=1)
    expected = 25.0 / (25.0 + 4.0 + 1.0)
    assert pca_var_explained(one, held) == pytest.approx(expected, abs=0.03)


def test_top_activations_and_feature_picks():
    x = anisotropic(n=200)
    sae = identity_sae(8)
    top = top_activations(sae, x, [0, 3, 9], n_examples=4, batch_size=50)
    vals, idx = x[:, 3].topk(4)
    assert [i for _, i in top[3]] == idx.tolist()
    assert [v for v, _ in top[3]] == pytest.approx(vals.tolist())
    assert all(v > 0 for v, _ in top[9])  # feature 9 = -e_1: fires where x_1 < 0 (rare here)
    counts = torch.tensor([0, 10, 3, 50, 7, 0])
    picks = pick_features(counts, 2, seed=0)
    assert len(picks) == 2 and set(picks) <= {1, 3, 4} and picks == pick_features(counts, 2, seed=0)


class _FakeStore:
    """What feature_examples needs from an ActivationStore: token_info and context."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # [rows, T]

    def token_info(self):
        rows, T = self.ids.shape
        return {"row": torch.arange(rows).repeat_interleave(T), "position": torch.arange(T).repeat(rows)}

    def context(self, row, position, window=24):
        return self.ids[row, max(0, position - window) : position + 1].tolist()


def test_feature_examples_show_the_max_token_in_context(tiny_tok):
    ids = torch.tensor([[72, 101, 108, 108, 111], [87, 111, 114, 108, 100]])
    x = torch.zeros(10, 8)
    x[8, 2] = 5.0  # token index 8 = row 1, position 3 ("l" of World)
    x[1, 2] = 1.0  # row 0, position 1 ("e")
    sae = identity_sae(8)
    counts = torch.zeros(16, dtype=torch.long)
    counts[2] = 10
    out = feature_examples(sae, x, _FakeStore(ids), tiny_tok, counts, n_features=1, seed=0, window=3)
    assert out[0]["feature"] == 2 and out[0]["frequency"] == pytest.approx(1.0)
    first = out[0]["examples"][0]
    assert first["activation"] == pytest.approx(5.0)
    assert first["token"] == token_label(tiny_tok, 108) and first["context"] == tiny_tok.decode([87, 111, 114])
    assert len(out[0]["examples"]) == 2


@pytest.mark.parametrize("arch", ["llama", "gemma4", "qwen35"])
def test_spliced_identity_sae_changes_nothing(arch, request):
    model, _ = request.getfixturevalue(f"tiny_{arch}")
    d = model.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (3, 10), generator=g)
    ids[:, 0] = 2  # BOS
    keep = ids != 2
    layer = 1
    res = spliced_loss(model, layer, identity_sae(d), ids, keep, mean_act=torch.zeros(d), batch_size=2)
    assert res.n_tokens == int(keep[:, :-1].sum())
    assert res.delta_ce_loss == pytest.approx(0.0, abs=1e-6) and res.kl == pytest.approx(0.0, abs=1e-6)
    if res.ce_mean_ablation > res.ce_clean:  # random weights: ablation need not hurt
        assert res.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    else:
        assert res.ce_loss_recovered is None
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1][keep[:, :-1]]
    ce = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep[:, :-1]])
    assert res.ce_clean == pytest.approx(float(ce), rel=1e-5)
    # a random SAE does change the next-token distribution; no hook is left behind
    noisy = spliced_loss(model, layer, TopKSAE(d, 4 * d, 2, seed=1), ids, keep, mean_act=torch.zeros(d))
    assert noisy.kl > 1e-4 and noisy.ce_spliced != noisy.ce_clean
    assert not decoder_layers(model)[layer]._forward_hooks
    # positions outside keep are never replaced: with nothing kept there is nothing to score
    with pytest.raises(ValueError, match="no non-special positions"):
        spliced_loss(model, layer, TopKSAE(d, 4 * d, 2), ids, torch.zeros_like(keep), mean_act=torch.zeros(d))


def test_spliced_replaces_only_kept_positions(tiny_llama):
    """Only position 6 kept: the spliced CE and KL equal an independent forward hook that replaces the residual
    at position 6 alone, and differ from replacing every position (which changes position 6 through attention)."""
    model, _ = tiny_llama
    d = model.config.hidden_size
    ids = torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(3))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 6] = True
    sae = TopKSAE(d, 4 * d, 2, seed=1)
    res = spliced_loss(model, 2, sae, ids, keep, mean_act=torch.zeros(d))
    assert res.n_tokens == 2

    def logp_at_6(positions: slice | None) -> torch.Tensor:
        def hook(_module, _args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            where = slice(6, 7) if positions is None else positions
            h[:, where] = sae(h[:, where].reshape(-1, d)).recon.view_as(h[:, where])
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = None if positions == slice(0, 0) else decoder_layers(model)[2].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, 6].float(), -1)
        finally:
            if handle is not None:
                handle.remove()

    clean, only_6, every = logp_at_6(slice(0, 0)), logp_at_6(None), logp_at_6(slice(None))
    kl = lambda lp: float(torch.nn.functional.kl_div(lp, clean, log_target=True, reduction="sum")) / 2  # noqa: E731
    assert res.kl == pytest.approx(kl(only_6), rel=1e-4) and res.kl > 0
    assert res.ce_spliced == pytest.approx(float(torch.nn.functional.nll_loss(only_6, ids[:, 7])), rel=1e-5)
    assert abs(kl(every) - res.kl) > 1e-3 * res.kl


class _ShardStore:
    def __init__(self, shards):
        self.entries = shards
        self.directory = "fake"

    def shard(self, i):
        return self.entries[i]


def test_heldout_rows_collects_whole_rows_until_enough_tokens():
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[:, 0] = False
    shards = [{"context_ids": torch.arange(15).view(3, 5), "keep_mask": keep}] * 2
    ids, k = heldout_rows(_ShardStore(shards), n_tokens=7)  # 3 scorable positions per row → 3 rows
    assert ids.shape == (3, 5) and k.shape == (3, 5)
    ids, _ = heldout_rows(_ShardStore(shards), n_tokens=100)
    assert ids.shape == (6, 5)


def test_outlier_tokens_are_reported_and_excluded_in_the_robust_variant():
    x = anisotropic(n=400)
    x[:3] *= 200.0  # three "massive activation" tokens
    sae = TopKSAE(8, 32, 3, seed=2)
    m, _ = reconstruction_metrics(sae, x, batch_size=128)
    assert m.n_outlier_tokens == 3
    recon = sae(x[3:]).recon.detach()
    assert m.var_explained_excl_outliers == pytest.approx(variance_explained(x[3:], recon)[0], rel=1e-6)
    clean, _ = reconstruction_metrics(sae, anisotropic(n=400), batch_size=128)
    assert clean.n_outlier_tokens == 0 and clean.var_explained_excl_outliers == pytest.approx(clean.var_explained)
