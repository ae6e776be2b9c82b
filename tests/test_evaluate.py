"""Chapter 03's helpers: where the PCA baseline is fit, and the keyed cache of the model evals."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mechlib import evaluate, metrics


def test_stream_runs_fit_pca_on_the_first_half_of_the_heldout_tokens():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    got = evaluate.pca_baseline(SimpleNamespace(collect_mode="stream"), None, x, k=3)
    want = metrics.fit_pca([x[:100]], k=3)
    assert "first half of the held-out tokens (100" in got.source
    assert torch.allclose(got.pca.mean, want.mean) and torch.allclose(got.pca.components, want.components)


def test_cache_returns_the_value_only_under_the_same_key(tmp_path):
    f = tmp_path / "evals.json"
    assert evaluate.load_cached(f, {"sae": "a"}) is None
    evaluate.save_cached(f, {"sae": "a", "tokens": 4096}, {"kl": 0.5})
    assert evaluate.load_cached(f, {"sae": "a", "tokens": 4096}) == {"kl": 0.5}
    assert evaluate.load_cached(f, {"sae": "b", "tokens": 4096}) is None
