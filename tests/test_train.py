"""SAE training loop: schedule, dead counters, resume == uninterrupted, files, the pretrained switch."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

import pytest
import torch

from mechlib.params import BookParams
from mechlib.sae import SAEError, TopKSAE, load_sae, reference_step, save_card_checkpoint
from mechlib.sae.history import read_history
from mechlib.sae.train import (
    ParallelHooks,
    TensorStore,
    TrainConfig,
    load_train_state,
    lr_at,
    run_sae,
    run_sae_for_eval,
    train_sae,
)

D = 16


def sparse_data(n=3000, d=D, n_atoms=48, seed=0) -> torch.Tensor:
    """Activations that *are* sparse combinations of unit atoms (a TopK SAE can recover them)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    codes = (torch.rand(n, n_atoms, generator=g) < 0.06).float() * (torch.rand(n, n_atoms, generator=g) * 3 + 0.5)
    return codes @ atoms + 0.01 * torch.randn(n, d, generator=g) + 1.0


def small_cfg(**kw) -> TrainConfig:
    base: dict[str, Any] = dict(
        d_sae=64,
        k=4,
        k_aux=16,
        aux_coef=0.125,
        lr=1e-2,
        lr_floor=1e-3,
        warmup_steps=3,
        train_batch_size=128,
        train_tokens=128 * 24,
        renorm_every=5,
        dead_tokens=512,
        checkpoint_every=4,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_cosine_floor():
    kw = dict(lr=1e-3, lr_floor=1e-4, warmup_steps=10, total_steps=110)
    lrs = [lr_at(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))  # warmup rises
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))  # cosine falls
    assert lrs[109] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 50 / 99)))


def test_train_config_from_params_takes_every_knob():
    P = BookParams(d_sae=128, k=8, lr=2e-4, lr_floor=6e-5, renorm_every=10, k_aux=512)
    cfg = TrainConfig.from_params(P)
    assert (cfg.d_sae, cfg.k, cfg.lr, cfg.lr_floor, cfg.k_aux) == (128, 8, 2e-4, 6e-5, 512)
    defaults = BookParams()
    for f in dataclasses.fields(TrainConfig):
        if hasattr(defaults, f.name):
            assert getattr(TrainConfig(), f.name) == getattr(defaults, f.name), f.name


def test_tensor_store_batches_resume_and_cycle_epochs():
    store = TensorStore(torch.arange(10.0)[:, None])
    full = [b.flatten().tolist() for b in store.iter_batches(4, seed=1, n_batches=6)]
    assert all(len(b) == 4 for b in full)
    assert sorted([*full[0], *full[1], *full[2][:2]]) == list(range(10))  # epoch 0 covers every token once
    assert [b.flatten().tolist() for b in store.iter_batches(4, seed=1, start_batch=3, n_batches=6)] == full[3:]


def test_training_learns_and_writes_card_files(tmp_path):
    x = sparse_data()
    res = train_sae(TensorStore(x, model="synthetic", layer=3), small_cfg(), tmp_path, device="cpu", progress=False)
    assert res.step_path == "reference" and res.steps == 24 and res.tokens == 24 * 128
    assert res.history[-1].fvu < 0.5 * res.history[0].fvu
    for name in ("sae_final.pt", "sae.safetensors", "cfg.json", "train_history.json", "train_state.pt"):
        assert (tmp_path / name).is_file(), name
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["layer"] == 3 and cfg["model"] == "synthetic" and cfg["step_path"] == "reference"
    assert cfg["k_aux"] == 16 and cfg["renorm_every"] == 5 and cfg["adam_betas"] == [0.9, 0.999]
    ck = torch.load(tmp_path / "sae_final.pt")
    torch.testing.assert_close(ck["W_dec"].norm(dim=1), torch.ones(64))
    assert torch.equal(ck["W_enc"], res.sae.W_enc.detach()) and torch.equal(ck["W_dec"], res.sae.W_dec.detach())
    assert json.loads((tmp_path / "train_history.json").read_text()) == [h.to_json() for h in res.history]
    assert read_history(tmp_path / "train_history.json") == res.history


def test_resumed_training_equals_uninterrupted(tmp_path):
    x = sparse_data()
    cfg = small_cfg(dead_tokens=256)  # dead latents appear, so AuxK and the counters are part of the state
    full = train_sae(TensorStore(x), cfg, tmp_path / "a", device="cpu", progress=False)
    assert any(h.n_dead > 0 for h in full.history), "test needs dead latents to cover AuxK state"
    part = train_sae(TensorStore(x), cfg, tmp_path / "b", device="cpu", progress=False, stop_after=10)
    assert part.steps == 10 and not (tmp_path / "b" / "sae_final.pt").exists()
    assert load_train_state(tmp_path / "b")["step"] == 10
    # "c" stops on a periodic-checkpoint boundary (checkpoint_every=4), "b" between two
    part2 = train_sae(TensorStore(x), cfg, tmp_path / "c", device="cpu", progress=False, stop_after=8)
    assert part2.steps == 8
    for d in ("b", "c"):
        resumed = train_sae(TensorStore(x), cfg, tmp_path / d, device="cpu", progress=False)
        assert resumed.resumed_from in (8, 10)
        assert resumed.history == full.history
        assert torch.equal(resumed.tokens_since_fired, full.tokens_since_fired)
        a = torch.load(tmp_path / "a" / "sae_final.pt")
        b = torch.load(tmp_path / d / "sae_final.pt")
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(a[key], b[key]), (d, key)
    # a finished run is not retrained: no step is taken (checked by a step that fails, not by a wall-clock bound)

    def no_step(*args: Any) -> Any:
        raise AssertionError("a finished run took a training step")

    again = train_sae(TensorStore(x), cfg, tmp_path / "a", device="cpu", progress=False, step_fn=no_step)
    assert again.resumed_from == again.steps == cfg.total_steps and again.history == full.history


def test_changed_settings_train_afresh(tmp_path, capsys):
    x = sparse_data()
    train_sae(TensorStore(x), small_cfg(), tmp_path, device="cpu", progress=False, stop_after=4)
    res = train_sae(TensorStore(x), small_cfg(k=5), tmp_path, device="cpu", progress=False, stop_after=2)
    assert (
        res.resumed_from == 0
        and "training settings changed since the saved SAE (k 4 → 5): training from scratch" in capsys.readouterr().out
    )
    # a finished run's files are removed when a different run starts in the same folder
    train_sae(TensorStore(x), small_cfg(train_tokens=128 * 4), tmp_path, device="cpu", progress=False)
    assert (tmp_path / "sae_final.pt").is_file()
    train_sae(TensorStore(x), small_cfg(k=3), tmp_path, device="cpu", progress=False, stop_after=1)
    assert not (tmp_path / "sae_final.pt").exists() and not (tmp_path / "cfg.json").exists()


def test_dead_counters_follow_definition_and_hooks_are_called(tmp_path):
    """The dead mask handed to the step = latents with no positive activation for >= dead_tokens tokens."""
    x = sparse_data()
    cfg = small_cfg(dead_tokens=256)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    calls = {"grads": 0, "fired": 0, "batch": 0}

    def spy(sae, xb, dead, k_aux, aux_coef):
        stats = reference_step(sae, xb, dead, k_aux, aux_coef)
        seen.append((dead.clone(), stats.fired.clone()))
        return stats

    def count(key, ret=None):
        def f(arg):
            calls[key] += 1
            return arg if ret is None else ret

        return f

    hooks = ParallelHooks(
        local_batch=count("batch"), reduce_grads=count("grads", ret=True), reduce_fired=count("fired")
    )
    train_sae(TensorStore(x), cfg, tmp_path, device="cpu", progress=False, step_fn=spy, hooks=hooks)
    since = torch.zeros(cfg.d_sae, dtype=torch.long)
    for dead, fired in seen:
        assert torch.equal(dead, since >= cfg.dead_tokens)
        since += cfg.train_batch_size
        since[fired] = 0
    assert any(d.any() for d, _ in seen)
    assert calls == {"grads": 24, "fired": 24, "batch": 24}


def test_pretrained_switch_loads_local_card_file(tmp_path):
    x = sparse_data()
    store = TensorStore(x, model="synthetic", layer=3)
    sae = TopKSAE(D, 32, 4, seed=5)
    path = save_card_checkpoint(sae, tmp_path / "given" / "sae_final.pt")
    P = BookParams(sae_source="pretrained", sae_pretrained=str(path))
    res = run_sae(P, store, tmp_path / "ck", device="cpu")
    assert res.sae_source == "pretrained" and res.sae.d_sae == 32 and res.step_path == "none"
    assert res.summary()["sae_source"] == "pretrained" and res.summary()["d_sae"] == 32
    assert torch.equal(res.sae.W_enc, sae.W_enc)
    evaluated, _ = run_sae_for_eval(P, tmp_path / "ck", device="cpu")
    assert torch.equal(evaluated.W_dec, sae.W_dec)
    wide = save_card_checkpoint(TopKSAE(D + 1, 32, 4), tmp_path / "wide.pt")
    with pytest.raises(SAEError, match=f"d_model={D + 1}.*d_model={D}"):
        run_sae(BookParams(sae_source="pretrained", sae_pretrained=str(wide)), store, tmp_path / "ck2", device="cpu")
    with pytest.raises(SAEError, match="run chapter 02"):
        run_sae_for_eval(BookParams(), tmp_path / "nothing", device="cpu")
    assert load_sae(path).k == 4


# ------------------------------------------------------------------------ stream mode (collect_mode: stream)


def _piecewise_stream(x: torch.Tensor, calls: list[int]):
    """An epoch stream over ``x`` in irregular pieces that honours ``skip`` (records each skip)."""

    def epoch_stream(skip: int):
        calls.append(skip)
        pos = skip
        sizes = [37, 5, 64, 91, 13]
        i = 0
        while pos < x.shape[0]:
            n = sizes[i % len(sizes)]
            yield x[pos : pos + n]
            pos += n
            i += 1

    return epoch_stream


def test_stream_store_resumes_on_the_same_batches_without_replaying_the_stream():
    from mechlib.activations.stores import StreamStore

    x = torch.arange(1000.0)[:, None]
    calls: list[int] = []
    store = StreamStore(_piecewise_stream(x, calls), n_tokens=1000, d_model=1, manifest={"layer": 1}, shuffle_batches=4)
    full = [b.flatten() for b in store.iter_batches(50, seed=3, n_batches=45)]  # 2.25 epochs
    assert all(b.numel() == 50 for b in full)
    assert sorted(torch.cat(full[:4]).tolist()) == list(range(200))  # a chunk = 4 batches, shuffled inside
    assert torch.cat(full[:20]).sort().values.tolist() == list(range(1000))  # epoch 0: every token once
    assert not torch.equal(torch.cat(full[:4]), torch.arange(200.0))
    calls.clear()
    resumed = [b.flatten() for b in store.iter_batches(50, seed=3, start_batch=27, n_batches=45)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[27:])) and len(resumed) == 18
    assert calls[0] == (24 * 50) % 1000  # skipped straight to the chunk holding batch 27, in epoch 1


def test_training_on_a_stream_resumes_exactly(tmp_path):
    from mechlib.activations.stores import StreamStore

    x = sparse_data(n=1500)
    make = lambda: StreamStore(_piecewise_stream(x, []), 1500, D, {"layer": 3}, shuffle_batches=3)  # noqa: E731
    cfg = small_cfg(train_tokens=128 * 14)
    full = train_sae(make(), cfg, tmp_path / "a", device="cpu", progress=False)
    train_sae(make(), cfg, tmp_path / "b", device="cpu", progress=False, stop_after=7)
    resumed = train_sae(make(), cfg, tmp_path / "b", device="cpu", progress=False)
    assert resumed.resumed_from == 7 and resumed.history == full.history
    assert torch.equal(resumed.sae.W_dec, full.sae.W_dec)


def test_stream_store_for_book_matches_chapter_01_shards(tiny_llama, tiny_tok, tmp_path):
    """Unshuffled, the stream yields exactly the activations collection writes, in the same order."""
    from mechlib.activations.collect import ActivationStore, collect_activations
    from mechlib.activations.collect_config import stream_store_for_book
    from mechlib.models import LoadedModel

    model, _ = tiny_llama
    words = "the cat sat on a mat while seven small dogs ran past the old red barn".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 13)) for i in range(80)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n")
    P = BookParams(corpus=str(tmp_path / "docs.txt"), layer=2, seq_len=32, collect_tokens=600, collect_batch_size=4)
    collect_activations(
        model,
        tiny_tok,
        tmp_path / "train",
        layer=2,
        n_tokens=600,
        seq_len=32,
        batch_size=4,
        shard_tokens=256,
        corpus=P.corpus,
        progress=False,
    )
    on_disk = ActivationStore(tmp_path / "train").load_all()
    loaded = LoadedModel(model=model, tokenizer=tiny_tok, name="tiny-llama", n_layers=4, d_model=64)
    store = stream_store_for_book(loaded, P, shuffle_batches=2)
    streamed = torch.cat(list(store.iter_batches(100, shuffle=False, n_batches=6)))
    torch.testing.assert_close(streamed, on_disk, rtol=1e-5, atol=1e-5)
    tail = torch.cat(list(store.iter_batches(100, shuffle=False, start_batch=3, n_batches=6)))
    torch.testing.assert_close(tail, on_disk[300:], rtol=1e-5, atol=1e-5)
    # a mid-row skip (batch 1 starts inside a row) drops exactly the tokens before it
    torch.testing.assert_close(torch.cat(list(store.epoch_stream(150))), on_disk[150:], rtol=1e-5, atol=1e-5)


def test_a_malformed_training_history_is_one_error_naming_the_file(tmp_path):
    from mechlib.sae.history import HistoryError

    path = tmp_path / "train_history.json"
    path.write_text(json.dumps([{"step": 0, "lr": 1e-3, "loss": 1.0, "fvu": "x", "mse": 0.1, "aux_loss": 0.0}]))
    with pytest.raises(HistoryError, match=r"train_history\.json: .*'fvu' must be a number, got 'x'"):
        read_history(path)
    path.write_text(json.dumps({"step": 0}))
    with pytest.raises(HistoryError, match="expected a list of step rows"):
        read_history(path)
