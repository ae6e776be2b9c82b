"""The fast collection paths: the truncated-stack view, compile modes, the two-thread shard writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechlib.activations import forward as fwd
from mechlib.activations import shard_writer as writer_mod
from mechlib.activations import shards as shards_mod
from mechlib.activations.collect import ActivationStore, collect_activations, stream_activations
from mechlib.activations.forward import forward_to_layer, pick_kernel, record_sdpa, resolve_compile, truncated_stack
from mechlib.hooks import add_forward_hook, replace_layer_output, run_to_layer
from mechlib.io import sha256_file
from mechlib.models import decoder_layers, final_norm

SMALL = dict(n_tokens=700, seq_len=32, batch_size=4, shard_tokens=256, progress=False)


def _ids(n_rows: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, 500, (n_rows, seq), generator=torch.Generator().manual_seed(1))


def test_truncated_stack_equals_run_to_layer_at_every_layer(tiny_any):
    """Same modules, same order, no final norm: bit-equal to the hooked stop (Gemma 4's KV-shared layers too)."""
    model, _, _ = tiny_any
    ids = _ids()
    for layer in range(len(decoder_layers(model))):
        with torch.no_grad():
            want = run_to_layer(model, layer, input_ids=ids)
            got = forward_to_layer(model, layer, ids)
        assert torch.equal(got, want), layer


def test_view_leaves_the_model_alone(tiny_gemma4):
    model, _ = tiny_gemma4
    layers, norm = decoder_layers(model), final_norm(model)
    before = dict(vars(model))
    ids = _ids()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        forward_to_layer(model, 2, ids)
        again = model(input_ids=ids).logits
    assert decoder_layers(model) is layers and len(layers) == 6 and final_norm(model) is norm
    assert vars(model).keys() == before.keys()
    assert torch.equal(full, again)
    view = truncated_stack(model, 2)
    assert len(decoder_layers(view)) == 3 and isinstance(final_norm(view), torch.nn.Identity)
    assert view.embed_tokens.weight is model.model.language_model.embed_tokens.weight  # shared, not copied


def test_view_runs_layer_hooks_but_not_the_owners(tiny_llama):
    """A steering hook on a layer acts inside the view; one on the text model (not the view's output) does not."""
    model, _ = tiny_llama
    ids = _ids()
    seen: list[str] = []
    owner = model.model

    def steer(module, args, output):
        return replace_layer_output(output, output + 1.0 if isinstance(output, torch.Tensor) else output[0] + 1.0)

    with torch.no_grad(), add_forward_hook(decoder_layers(model)[1], steer):
        with add_forward_hook(owner, lambda m, a, o: seen.append("owner")):
            got = forward_to_layer(model, 2, ids)
        want = run_to_layer(model, 2, input_ids=ids)
        plain = forward_to_layer(model, 2, ids)  # hook still on: the view is built once and sees it
    assert torch.equal(got, want) and torch.equal(plain, want) and seen == []
    with torch.no_grad():
        unsteered = forward_to_layer(model, 2, ids)
    assert not torch.equal(unsteered, want)


def test_view_rebuilt_when_a_layer_is_replaced(tiny_llama):
    model, _ = tiny_llama
    ids = _ids()
    with torch.no_grad():
        before = forward_to_layer(model, 1, ids)
        layers = decoder_layers(model)
        new = type(layers[1])(model.config, 1)
        new.load_state_dict(layers[0].state_dict())
        layers[1] = new.eval()
        after = forward_to_layer(model, 1, ids)
        assert torch.equal(after, run_to_layer(model, 1, input_ids=ids))
    assert not torch.equal(before, after)


def test_resolve_compile():
    assert resolve_compile(False) is None and resolve_compile(None) is None
    assert resolve_compile(True) == "layers" and resolve_compile("stack") == "stack"
    with pytest.raises(ValueError, match="compile must be a bool or one of layers, stack"):
        resolve_compile("graph")


def test_sdpa_record_shows_gemma4_masks(tiny_gemma4):
    """Sliding layers carry a boolean mask (window < seq); full layers pass none and use is_causal.

    On CUDA at E4B's shape this means: sliding layers (head_dim 256) go to the efficient kernel with
    a mask, full layers (head_dim 512 > flash's 256) to efficient/cuDNN — the GPU benchmark records
    which, from torch's own ``can_use_*`` checks.
    """
    model, _ = tiny_gemma4
    with torch.no_grad(), record_sdpa() as calls:
        forward_to_layer(model, 3, _ids(seq=32))
    assert len(calls) == 4
    kinds = model.config.text_config.layer_types[:4]
    for call, kind in zip(calls, kinds):
        if kind == "sliding_attention":
            assert call.mask == "bool [2, 1, 32, 32]" and not call.is_causal
        else:
            assert call.mask is None and call.is_causal and call.q_shape[-1] == 32
        assert call.kernel == "cpu"


def test_kernel_pick_follows_torchs_priority_order():
    """Default order flash, efficient, math, cuDNN; ``sdpa_kernel(..., set_priority=True)`` reorders it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    assert pick_kernel(None, None, None) == "cpu"
    assert pick_kernel(True, True, True) == "flash"
    assert pick_kernel(False, True, True) == "efficient"
    assert pick_kernel(False, False, True) == "math"  # torch tries math before cuDNN by default
    assert pick_kernel(False, False, True, math=False) == "cudnn"
    assert pick_kernel(False, False, False, math=False) == "none"
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        assert pick_kernel(True, True, True) == "cudnn"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stack", "layers"])
def test_compiled_modes_match_eager(tiny_gemma4, tmp_path, mode):
    """Both compile modes collect what the eager path collects (fp32: fusion reorders sums, so 1e-5 relative)."""
    model, tok = tiny_gemma4
    collect_activations(model, tok, tmp_path / "eager", layer=4, **SMALL)
    collect_activations(model, tok, tmp_path / mode, layer=4, compile=mode, **SMALL)
    a, b = ActivationStore(tmp_path / "eager").load_all(), ActivationStore(tmp_path / mode).load_all()
    assert float((a - b).norm() / a.norm()) <= 1e-5
    streamed = torch.cat(
        [s.acts for s in stream_activations(model, tok, layer=4, n_tokens=700, seq_len=32, compile=mode)]
    )
    assert float((streamed - a).norm() / a.norm()) <= 1e-5
    assert all("forward" not in vars(blk) for blk in decoder_layers(model))  # the user's layers untouched
    assert not hasattr(model, "_mechlib_compiled")


def test_layers_mode_compiles_copies_not_the_users_layers(tiny_llama, monkeypatch):
    """``compile=True``: each layer's forward compiled, on copies of the layers; hooks on the layers still fire."""
    model, _ = tiny_llama
    compiled: list = []

    def fake_compile(fn, **kw):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(fwd.torch, "compile", fake_compile)
    forward = fwd.layer_forward(model, 2, True)
    assert len(compiled) == 3
    assert all("forward" not in vars(blk) for blk in decoder_layers(model))  # the user's layers untouched
    assert not hasattr(model, "_mechlib_compiled")
    ids = _ids()
    with torch.no_grad(), add_forward_hook(decoder_layers(model)[1], lambda m, a, o: o + 1.0):
        steered = forward(ids)
        want = run_to_layer(model, 2, input_ids=ids)
    assert torch.equal(steered, want)
    with torch.no_grad():
        assert torch.equal(forward(ids), run_to_layer(model, 2, input_ids=ids))
    assert fwd.layer_forward(model, 2, "layers") is not None and len(compiled) == 3  # cached per (model, layer)


def test_stack_mode_pads_a_short_batch_to_the_compiled_size(tiny_gemma4, monkeypatch):
    """A collection's last, shorter batch runs at the compiled row count (no recompile) and returns only its rows."""
    model, _ = tiny_gemma4
    shapes: list[tuple[int, ...]] = []

    def fake_compile(fn, **kw):
        def run(view, ids):
            shapes.append(tuple(ids.shape))
            return fn(view, ids)

        return run

    monkeypatch.setattr(fwd.torch, "compile", fake_compile)
    forward = fwd.layer_forward(model, 2, "stack")
    ids = _ids(n_rows=4)
    with torch.no_grad():
        full = forward(ids)
        short = forward(ids[:3])
        want = run_to_layer(model, 2, input_ids=ids[:3])
    assert shapes == [(4, 24), (4, 24)] and short.shape[0] == 3
    # same row count as the full batch: a row's arithmetic does not depend on the other rows, so bit-equal
    assert torch.equal(short, full[:3])
    # 4 rows against the plain path's 3: BLAS may block the rows differently (e.g. oneDNN on an AMX Xeon),
    # reordering fp32 sums. Values reach ~12 here and fp32 rounding of the stack is ~2e-5 (against fp64);
    # a leaked padding row or a wrong row is an O(1) difference, far outside this tolerance.
    torch.testing.assert_close(short, want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ shard writer


def test_pipelined_writer_writes_save_file_bytes(tiny_gemma4, tmp_path):
    """Shards are byte-for-byte what ``safetensors.save_file`` writes; manifest sizes and hashes match the files."""
    model, tok = tiny_gemma4
    run = collect_activations(model, tok, tmp_path / "a", layer=3, **SMALL)
    entries = run.manifest["shards"]
    assert len(entries) >= 3 and [e["index"] for e in entries] == list(range(len(entries)))
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["shards"] == entries and on_disk["complete"]
    for e in entries:
        path = tmp_path / "a" / e["file"]
        assert e["sha256"] == sha256_file(path) and e["bytes"] == path.stat().st_size
        meta = {"mechbook": json.dumps({"shard": e["index"], "first_row": e["first_row"]})}
        save_file(load_file(str(path)), str(tmp_path / "ref.safetensors"), metadata=meta)
        assert (tmp_path / "ref.safetensors").read_bytes() == path.read_bytes()
    again = collect_activations(model, tok, tmp_path / "b", layer=3, **SMALL)
    assert [e["sha256"] for e in again.manifest["shards"]] == [e["sha256"] for e in entries]  # deterministic


@pytest.mark.parametrize("stage", ["atomic_save_safetensors", "sha256_file"])
def test_writer_stage_error_reaches_the_caller(tiny_llama, tmp_path, monkeypatch, stage):
    """A failure in the write or the record thread is raised by collect_activations; a rerun finishes."""
    model, tok = tiny_llama

    def broken(*args, **kwargs):
        raise OSError(f"{stage}: disk full")

    monkeypatch.setattr(writer_mod, stage, broken)
    with pytest.raises(OSError, match=f"{stage}: disk full"):
        collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    monkeypatch.undo()
    run = collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    assert run.manifest["complete"] and run.computed_tokens == SMALL["n_tokens"]


@pytest.mark.parametrize("with_flags", [True, False])
def test_writer_finds_non_finite_kept_tokens_only(tmp_path, with_flags):
    """NaN at a dropped position is ignored; at a kept one it names the shard (flags from the device or not)."""
    manifest: dict = {"shards": []}
    hidden = torch.ones(2, 4, 3)
    hidden[0, 0] = float("nan")  # position 0: not kept
    keep = torch.tensor([[False, True, True, True], [False, True, True, True]])
    ids = torch.arange(8).reshape(2, 4)

    def run(h: torch.Tensor, out) -> None:
        out.mkdir()
        w = writer_mod.ShardWriter(out, dict(manifest), "float32")
        flags = torch.isfinite(h).all(-1) if with_flags else None
        w.add_batch(h, keep, ids, ids, 0, finite=flags)
        w.end_shard(0, 0, 2)
        w.close()

    run(hidden, tmp_path / "ok")
    assert (tmp_path / "ok" / "shard_00000.safetensors").exists()
    hidden[1, 2, 1] = float("inf")
    with pytest.raises(shards_mod.ActivationError, match=r"shard_00000.safetensors: 1 of 6 activation vectors"):
        run(hidden, tmp_path / "bad")
    assert not (tmp_path / "bad" / "shard_00000.safetensors").exists()


def test_stream_study_smoke_runs_on_cpu(tmp_path):
    """benchmarks/stream_study.py --device cpu --small: the model → StreamStore → train_sae loop runs and is timed."""
    import importlib.util

    from mechlib.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_stream_study", REPO_ROOT / "benchmarks" / "stream_study.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--small", "--seconds", "0.5", "--results", str(tmp_path)]) == 0
    (saved,) = tmp_path.glob("stream_study_*.json")
    record = json.loads(saved.read_text())
    assert "error" not in record and record["steps"] % 4 == 0 and record["sae_tokens"] == record["steps"] * 256
    split = record["time_split"]
    assert split["model_s"] > 0 and split["sae_step_s"] > 0
    assert split["model_s"] + split["sae_step_s"] <= record["seconds"] * 1.01
    assert record["model_processed_tokens"] >= record["sae_tokens"]  # the model also ran the dropped positions
    assert bench.main(["--device", "cpu"]) == 2  # the E4B-sized run refuses a CPU


def _e4b_pattern(**overrides):
    """E4B's text config at toy width (42 layers, 5 sliding : 1 full, last 18 share K/V)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from mechlib.tiny import gemma4_e4b_config

    real = gemma4_e4b_config().text_config
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    small |= dict(global_head_dim=32, hidden_size_per_layer_input=8, vocab_size=512, vocab_size_per_layer_input=512)
    text = type(real)(**{**real.to_dict(), **small, "sliding_window": 8, "pad_token_id": 0, **overrides})
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=None, audio_config=None))
    return model.float().eval()


def test_e4b_attention_branch_at_seq_1024_head_dims():
    """What HF hands SDPA at E4B's head dims (256 sliding, 512 full) and seq 1024 with window 512:
    sliding layers a boolean mask with K/V repeated (no GQA flag); full layers no mask, ``is_causal``,
    and also K/V repeated, since HF passes ``enable_gqa`` only for head dims ≤ 256. So no call needs
    flash (which takes neither a mask nor head dim 512): on CUDA they are efficient-attention calls,
    and ``benchmarks/collect.py`` records torch's own verdict per call."""
    model = _e4b_pattern(head_dim=256, global_head_dim=512, sliding_window=512, num_attention_heads=8)
    with torch.no_grad(), record_sdpa() as calls:
        forward_to_layer(model, 21, _ids(n_rows=1, seq=1024))
    kinds = model.config.text_config.layer_types[:22]
    assert len(calls) == 22 and kinds.count("full_attention") == 3
    for call, kind in zip(calls, kinds):
        assert not call.enable_gqa and call.k_shape[1] == call.q_shape[1] == 8  # K/V heads repeated to 8
        if kind == "sliding_attention":
            assert call.mask == "bool [1, 1, 1024, 1024]" and not call.is_causal and call.q_shape[-1] == 256
        else:
            assert call.mask is None and call.is_causal and call.q_shape[-1] == 512


def test_view_on_the_e4b_layer_pattern():
    """E4B's 42-layer pattern (5 sliding : 1 full, last 18 layers reuse K/V) at toy width: the view equals
    the hooked stop at layer 21 (the study's) and past the first KV-shared layer (24)."""
    model = _e4b_pattern()
    cfg = model.config.text_config
    assert cfg.num_hidden_layers == 42 and cfg.num_hidden_layers - cfg.num_kv_shared_layers == 24
    ids = _ids(seq=20)
    for layer in (21, 24, 30):
        with torch.no_grad():
            assert torch.equal(forward_to_layer(model, layer, ids), run_to_layer(model, layer, input_ids=ids)), layer
