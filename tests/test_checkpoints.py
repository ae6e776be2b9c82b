"""Nothing stale, nothing mixed, nothing silent: provenance-keyed resume and checksummed checkpoints.

- An SAE state computed from other activations (recollected with other settings, other shard
  bytes) or other knobs is never resumed, also when the earlier run was killed halfway; the line
  printed says what changed. Chapter 03 refuses an SAE trained on activations no longer on disk.
- ``train_state.pt``, ``sae_final.pt`` and ``sae.safetensors`` carry ``.sha256`` sidecars: a
  flipped bit or a truncation is named with the file and what to do; a damaged training state
  falls back to the checkpoint before it, or to a fresh start, saying so.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_run import one_thread

from mechlib.activations.collect import ActivationStore, collect_activations
from mechlib.activations.provenance import read_activations_fingerprint
from mechlib.io import checksum_path, sha256_file
from mechlib.params import BookParams
from mechlib.sae import SAEError, TopKSAE, load_sae, save_card_checkpoint, save_sae
from mechlib.sae.train import TensorStore, TrainConfig, load_train_state, run_sae_for_eval, train_sae

CFG = TrainConfig(
    d_sae=32,
    k=4,
    k_aux=8,
    lr=3e-3,
    lr_floor=3e-4,
    warmup_steps=2,
    train_batch_size=32,
    train_tokens=32 * 12,
    renorm_every=3,
    dead_tokens=128,
    checkpoint_every=4,
    seed=0,
)
COLLECT = dict(layer=1, n_tokens=400, seq_len=32, batch_size=4, shard_tokens=128, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _data(seed: int) -> torch.Tensor:
    return torch.randn(32 * 8, 16, generator=torch.Generator().manual_seed(seed)) + 0.5


def _train(store, folder, **kw):
    return train_sae(store, CFG, folder, device="cpu", progress=False, **kw)


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "sae_final.pt")


def _flip_bit(path, byte_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 - byte_from_end] ^= 0x40  # inside the tensor payload
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------ finding 1: stale or mixed SAEs


def test_other_activations_of_the_same_shape_are_never_resumed(tmp_path, capsys):
    """The old fingerprint was (n_tokens, d_model, model, layer): equal here, so this resumed."""
    _train(TensorStore(_data(0)), tmp_path, stop_after=5)
    capsys.readouterr()
    res = _train(TensorStore(_data(1)), tmp_path)
    assert res.resumed_from == 0 and res.start == "trained from scratch"
    out = capsys.readouterr().out
    assert (
        "[mechbook] activations changed since the saved SAE (shard contents (checksums) differ): training "
        "from scratch" in out
    ), out
    fresh = _train(TensorStore(_data(1)), tmp_path / "fresh")
    assert all(torch.equal(_weights(tmp_path)[k], _weights(tmp_path / "fresh")[k]) for k in ("W_enc", "W_dec"))
    assert fresh.history == res.history


@pytest.mark.parametrize("killed_at", [5, None], ids=["killed-halfway", "finished"])
def test_recollected_with_other_settings_trains_from_scratch(tiny_llama, tmp_path, capsys, killed_at):
    """Chapter 01 reruns with exclude_first_positions 2 → 1 after chapter 02 trained (or was killed at
    step 5): chapter 02 must not resume — no SAE of 5 steps on old tokens and the rest on new ones."""
    model, tok = tiny_llama
    acts, ck = tmp_path / "train", tmp_path / "ck"
    collect_activations(model, tok, acts, **COLLECT)
    _train(ActivationStore(acts), ck, stop_after=killed_at)
    collect_activations(model, tok, acts, exclude_first_positions=1, **COLLECT)
    capsys.readouterr()
    res = _train(ActivationStore(acts), ck)
    out = capsys.readouterr().out
    assert res.resumed_from == 0 and res.steps == CFG.total_steps
    assert (
        "[mechbook] activations changed since the saved SAE (exclude_first_positions 2 → 1): training from scratch"
    ) in out, out
    _train(ActivationStore(acts), tmp_path / "fresh")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(_weights(ck)[key], _weights(tmp_path / "fresh")[key]), key
    cfg = json.loads((ck / "cfg.json").read_text())
    fp = read_activations_fingerprint(acts)
    assert cfg["activations"]["params_hash"] == fp.params_hash and set(cfg["provenance"]) == {
        "activations",
        "train_config",
    }


def test_chapter_03_refuses_an_sae_trained_on_activations_no_longer_on_disk(tiny_llama, tmp_path):
    model, tok = tiny_llama
    acts, ck = tmp_path / "train", tmp_path / "ck"
    collect_activations(model, tok, acts, **COLLECT)
    _train(ActivationStore(acts), ck)
    sae, _ = run_sae_for_eval(BookParams(), ck, device="cpu", activations=read_activations_fingerprint(acts))
    assert sae.d_sae == CFG.d_sae
    collect_activations(model, tok, acts, **{**COLLECT, "seq_len": 48})
    with pytest.raises(
        SAEError,
        match=r"sae_final\.pt: trained on other activations than chapter 01's current "
        r"ones \(.*seq_len 32 → 48.*\); rerun chapter 02",
    ):
        run_sae_for_eval(BookParams(), ck, device="cpu", activations=read_activations_fingerprint(acts))


# ------------------------------------------------------------------------ finding 4: checksums


def test_every_checkpoint_has_a_matching_sidecar(tmp_path):
    _train(TensorStore(_data(0)), tmp_path)
    for name in ("train_state.pt", "train_state.prev.pt", "sae_final.pt", "sae.safetensors"):
        side = checksum_path(tmp_path / name).read_text()
        assert side == f"{sha256_file(tmp_path / name)}  {name}\n", name  # `sha256sum -c` reads it


@pytest.mark.parametrize("name", ["sae_final.pt", "sae.safetensors"])
def test_a_flipped_bit_in_the_sae_is_named_with_what_to_do(tmp_path, name, capsys):
    _train(TensorStore(_data(0)), tmp_path)
    _flip_bit(tmp_path / name)
    with pytest.raises(
        SAEError,
        match=rf"{name}: the file does not match its checksum {name}\.sha256 .*delete it "
        r"and rerun chapter 02",
    ):
        load_sae(tmp_path / name)
    with pytest.raises(SAEError, match=name):
        run_sae_for_eval(BookParams(), tmp_path, device="cpu") if name == "sae_final.pt" else load_sae(tmp_path / name)
    # following the advice: chapter 02 rewrites the file from the intact training state, no retraining
    (tmp_path / name).unlink()
    again = _train(TensorStore(_data(0)), tmp_path)
    assert again.resumed_from == CFG.total_steps and load_sae(tmp_path / name).d_sae == CFG.d_sae
    assert again.start == f"already trained ({CFG.total_steps} steps): nothing left to run"


def test_a_finished_run_rewrites_a_damaged_export_and_says_so(tmp_path, capsys):
    _train(TensorStore(_data(0)), tmp_path)
    want = _weights(tmp_path)
    _flip_bit(tmp_path / "sae_final.pt")
    capsys.readouterr()
    _train(TensorStore(_data(0)), tmp_path)
    assert (
        f"sae_final.pt in {tmp_path}: missing or not matching the checksum; rewriting from the intact "
        "train_state.pt" in capsys.readouterr().out
    )
    assert all(torch.equal(_weights(tmp_path)[k], want[k]) for k in ("W_enc", "W_dec"))
    load_sae(tmp_path / "sae_final.pt")


def test_a_pretrained_file_without_sidecar_loads_and_a_mismatching_sidecar_is_an_error(tmp_path):
    sae = TopKSAE(16, 32, 4, seed=0)
    save_card_checkpoint(sae, tmp_path / "mine.pt")
    checksum_path(tmp_path / "mine.pt").unlink()  # a file from elsewhere: nothing to verify
    assert torch.equal(load_sae(tmp_path / "mine.pt").W_enc, sae.W_enc)
    save_sae(sae, tmp_path, {"layer": 1})
    checksum_path(tmp_path / "mine.pt").write_text(f"{'0' * 64}  mine.pt\n")
    with pytest.raises(SAEError, match=r"mine\.pt: the file does not match .*delete .*mine\.pt\.sha256"):
        load_sae(tmp_path / "mine.pt")
    assert load_sae(tmp_path / "sae.safetensors").k == 4


def test_a_truncated_train_state_falls_back_to_the_one_before_and_ends_identical(tmp_path, capsys):
    full = _train(TensorStore(_data(0)), tmp_path / "full")
    ck = tmp_path / "ck"
    _train(TensorStore(_data(0)), ck, stop_after=10)  # checkpoints at 4 and 8, then the end-of-call state at 10
    state = ck / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # a copy cut short
    capsys.readouterr()
    res = _train(TensorStore(_data(0)), ck)
    out = capsys.readouterr().out
    assert (
        f"{state} does not match its checksum train_state.pt.sha256 (corrupt or truncated): resuming from the "
        "checkpoint before it, train_state.prev.pt (step 8)" in out
    ), out
    assert res.resumed_from == 8 and res.history == full.history
    assert res.start == f"resumed from step 8 of {CFG.total_steps}"
    assert all(torch.equal(_weights(ck)[k], _weights(tmp_path / "full")[k]) for k in ("W_enc", "W_dec", "b_dec"))


def test_damaged_states_with_nothing_to_fall_back_on_start_over_saying_so(tmp_path, capsys):
    _train(TensorStore(_data(0)), tmp_path, stop_after=6)
    for name in ("train_state.pt", "train_state.prev.pt"):
        _flip_bit(tmp_path / name)
    assert load_train_state(tmp_path, announce=False) is None
    capsys.readouterr()
    res = _train(TensorStore(_data(0)), tmp_path)
    out = capsys.readouterr().out
    assert res.resumed_from == 0 and "train_state.prev.pt does not match its checksum" in out
    assert "no intact training state left, training from scratch" in out
    # a state whose sidecar is missing is not trusted either (every state this code writes has one)
    checksum_path(tmp_path / "train_state.pt").unlink()
    (tmp_path / "train_state.prev.pt").unlink()
    assert load_train_state(tmp_path, announce=False) is None
