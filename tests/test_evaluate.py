"""Chapter 03's helpers: where the PCA baseline is fit, and the keyed cache of the model evals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from mechlib import evaluate, metrics
from mechlib.activations.provenance import tensor_digest
from mechlib.io import sha256_file


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


def test_a_damaged_cache_file_is_recomputed_not_a_crash(tmp_path):
    f = tmp_path / "evals.json"
    f.write_text('{"key": {"sae": "a"}, "val')  # cut short
    assert evaluate.load_cached(f, {"sae": "a"}) is None and evaluate.cache_changes(f, {"sae": "a"}) == ()


def test_model_evals_are_recomputed_when_the_heldout_activations_change(tmp_path, capsys, monkeypatch):
    """The cache key once held the SAE and the settings but not the activations: after chapter 01
    recollected with other settings, chapter 03 served ΔCE/KL of the old tokens."""
    from tiny_run import corpus_file, model_folder

    from mechlib import models
    from mechlib.activations.collect import ActivationStore, collect_activations
    from mechlib.params import BookParams
    from mechlib.sae import TopKSAE, save_card_checkpoint

    folder, corpus = model_folder(tmp_path), corpus_file(tmp_path)
    lm = models.load_model(str(folder), "float32", "cpu")
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or lm)
    P = BookParams(model=str(folder), device="cpu", layer=1, eval_ce_tokens=64, n_feature_examples=1)
    run_paths = SimpleNamespace(checkpoints=tmp_path / "ck")
    run_paths.checkpoints.mkdir()
    sae = TopKSAE(lm.d_model, 128, 4, seed=0)
    sae_path = str(save_card_checkpoint(sae, tmp_path / "sae_final.pt"))

    def evals(exclude_first_positions: int):
        collect_activations(
            lm.model,
            lm.tokenizer,
            tmp_path / "heldout",
            layer=1,
            n_tokens=256,
            seq_len=32,
            batch_size=4,
            shard_tokens=128,
            corpus=str(corpus),
            split="heldout",
            model_name=lm.name,
            exclude_first_positions=exclude_first_positions,
            progress=False,
        )
        heldout = ActivationStore(tmp_path / "heldout")
        x = heldout.load_all()
        _, counts = metrics.reconstruction_metrics(sae, x)
        return evaluate.model_evals(P, run_paths, heldout, sae, sae_path, x, counts, mean_act=torch.zeros(lm.d_model))

    first = evals(2)
    assert evals(2) == first and len(loads) == 1  # a rerun reuses the cache: no model load
    capsys.readouterr()
    evals(1)
    assert len(loads) == 2, "the cache of other held-out activations was reused"
    assert (
        "[mechbook] held-out activations changed since the cached model evals (03_model_evals.json): recomputing them"
    ) in capsys.readouterr().out
    key = json.loads((run_paths.checkpoints / evaluate.MODEL_EVALS_FILE).read_text())["key"]
    assert key["sae_file"] == sha256_file(sae_path) and key["mean_act"] == tensor_digest(torch.zeros(lm.d_model))
