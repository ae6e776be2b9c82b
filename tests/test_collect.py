"""Activation collection: exactness, packing, special tokens, manifest, resume, corruption, reader."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from mechlib.activations.collect import (
    ActivationStore,
    Packer,
    collect_activations,
    split_docs,
    stream_activations,
)
from mechlib.activations.corpus import CorpusError, iter_texts
from mechlib.activations.shards import ActivationError, ShardError
from mechlib.hooks import add_forward_hook
from mechlib.io import sha256_file
from mechlib.models import LayerError, decoder_layers

SMALL: dict[str, Any] = dict(n_tokens=700, seq_len=32, batch_size=4, shard_tokens=256, progress=False)


def _docs_file(tmp_path, n_docs: int = 60) -> str:
    words = "the cat sat on a mat while seven small dogs ran past the old red barn".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 13)) for i in range(n_docs)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


@pytest.mark.parametrize("layer_from_top", [2, 3])
def test_collection_equals_output_hidden_states(tiny_any, tmp_path, layer_from_top):
    model, tok, arch = tiny_any
    layer = len(decoder_layers(model)) - layer_from_top  # gemma4: layer 4 is a KV-shared layer
    run = collect_activations(model, tok, tmp_path / "a", layer=layer, **SMALL)
    store = ActivationStore(tmp_path / "a")
    assert store.n_tokens == 700 and run.computed_tokens == 700 and store.layer == layer
    acts = store.load_all()
    ref = []
    for i in range(len(store.entries)):
        sh = store.shard(i)
        with torch.no_grad():
            hs = model(input_ids=sh["context_ids"].long(), output_hidden_states=True).hidden_states[layer + 1]
        ref.append(hs[sh["keep_mask"]])
    torch.testing.assert_close(acts, torch.cat(ref), rtol=1e-5, atol=1e-5, msg=arch)


def test_packing_has_no_padding_and_marks_documents(tiny_llama, tmp_path):
    model, tok = tiny_llama
    corpus = _docs_file(tmp_path)
    collect_activations(model, tok, tmp_path / "a", layer=1, corpus=corpus, **SMALL)
    store = ActivationStore(tmp_path / "a")
    ctx = torch.cat([store.shard(i)["context_ids"] for i in range(len(store.entries))])
    assert ctx.shape[1] == 32 and (ctx[:, 0] == tok.bos_token_id).all()
    assert not (ctx == tok.pad_token_id).any()
    assert (ctx == tok.eos_token_id).sum() >= 5  # documents separated by EOS inside rows
    info = store.token_info()
    doc = info["doc_index"]
    assert (doc[1:] >= doc[:-1]).all() and doc.min() >= 0
    assert (info["row"] * 32 + info["position"]).diff().min() > 0  # tokens in packed order
    # Each kept token's id is the context id at its (row, position).
    assert torch.equal(info["token_ids"], ctx[info["row"], info["position"].long()])


def test_special_tokens_excluded_by_default(tiny_llama, tmp_path):
    model, tok = tiny_llama
    corpus = _docs_file(tmp_path)
    collect_activations(model, tok, tmp_path / "a", layer=1, corpus=corpus, **SMALL)
    collect_activations(model, tok, tmp_path / "b", layer=1, corpus=corpus, exclude_special_tokens=False, **SMALL)
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    special = torch.tensor(a.manifest["special_token_ids"])
    assert set(special.tolist()) >= {0, 1, 2}
    assert not torch.isin(a.token_info()["token_ids"], special).any()
    assert torch.isin(b.token_info()["token_ids"], special).any()
    sh = a.shard(0)
    assert not sh["keep_mask"][:, :2].any()  # BOS and the possible second attention sink after it
    want = ~torch.isin(sh["context_ids"], special.int())
    want[:, :2] = False
    assert torch.equal(sh["keep_mask"], want)
    assert a.n_tokens == b.n_tokens == 700  # the quota counts kept tokens
    assert b.shard(0)["keep_mask"][:, 2:].all() and not b.shard(0)["keep_mask"][:, :2].any()


def test_exclude_first_positions(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=1, exclude_first_positions=0, **SMALL)
    collect_activations(model, tok, tmp_path / "b", layer=1, exclude_first_positions=5, **SMALL)
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.token_info()["position"].min() == 1  # BOS (special) still excluded
    assert b.token_info()["position"].min() == 5 and b.manifest["exclude_first_positions"] == 5
    with pytest.raises(ValueError, match="exclude_first_positions"):
        collect_activations(model, tok, tmp_path / "c", layer=1, exclude_first_positions=32, **SMALL)


def test_manifest_records_what_and_checksums(tiny_gemma4, tmp_path):
    model, tok = tiny_gemma4
    collect_activations(model, tok, tmp_path / "a", layer=2, model_name="tiny-gemma4", **SMALL)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["complete"] and m["n_tokens"] == 700 and m["layer"] == 2 and m["d_model"] == 64
    assert (m["model"], m["dtype"], m["seq_len"], m["split"]) == ("tiny-gemma4", "float32", 32, "train")
    assert m["model_class"] == "Gemma4ForConditionalGeneration"
    assert sum(e["n_tokens"] for e in m["shards"]) == 700 and len(m["shards"]) >= 3
    for e in m["shards"]:
        assert sha256_file(tmp_path / "a" / e["file"]) == e["sha256"]
    summary = ActivationStore(tmp_path / "a").summary()
    assert (summary.model, summary.layer, summary.d_model, summary.n_tokens) == ("tiny-gemma4", 2, 64, 700)
    assert summary.n_shards == len(m["shards"]) and summary.special_token_ids == tuple(m["special_token_ids"])
    assert summary.separator_token_id == m["separator_token_id"] and "tokens=700" in summary.line("train")


def test_summary_of_a_manifest_without_a_key_names_the_file(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=1, model_name="tiny", **SMALL)
    path = tmp_path / "a" / "manifest.json"
    m = json.loads(path.read_text())
    del m["seq_len"]
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"manifest\.json: manifest lacks 'seq_len'"):
        ActivationStore(tmp_path / "a").summary()


def test_resume_after_kill_equals_one_shot(tiny_llama, tmp_path):
    model, tok = tiny_llama
    full = collect_activations(model, tok, tmp_path / "full", layer=2, **SMALL).manifest
    part_dir = tmp_path / "part"
    collect_activations(model, tok, part_dir, layer=2, **SMALL)
    # Simulate a kill after two shards: later shard files and manifest entries never got written.
    m = json.loads((part_dir / "manifest.json").read_text())
    for e in m["shards"][2:]:
        (part_dir / e["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:2], False
    (part_dir / "manifest.json").write_text(json.dumps(m))
    (part_dir / ".shard_00002.safetensors.abc.tmp").write_bytes(b"half")  # a killed atomic write
    with pytest.raises(ShardError, match="incomplete"):
        ActivationStore(part_dir)
    run = collect_activations(model, tok, part_dir, layer=2, **SMALL)
    skipped = sum(e["n_tokens"] for e in m["shards"])
    assert run.computed_tokens == 700 - skipped > 0
    assert [e["sha256"] for e in run.manifest["shards"]] == [e["sha256"] for e in full["shards"]]
    assert not list(part_dir.glob(".*.tmp"))
    # A rerun of a finished collection computes nothing.
    assert collect_activations(model, tok, part_dir, layer=2, **SMALL).computed_tokens == 0


def test_changed_parameters_recollect(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=2, **SMALL)
    run = collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    assert run.computed_tokens == 700 and ActivationStore(tmp_path / "a").layer == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_named(tiny_llama, tmp_path, damage):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    path = tmp_path / "a" / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard_00001.safetensors"):
        collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    store = ActivationStore(tmp_path / "a")
    with pytest.raises(ShardError, match=r"shard_00001.safetensors"):
        store.load_all()
    # Following the message's advice — delete the shard and rerun — recollects exactly that shard.
    path.unlink()
    run = collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    n1 = run.manifest["shards"][1]["n_tokens"]
    assert run.computed_tokens == n1 and ActivationStore(tmp_path / "a").load_all().shape[0] == 700


def test_nan_activations_name_the_shard(tiny_llama, tmp_path):
    model, tok = tiny_llama
    nan = add_forward_hook(decoder_layers(model)[1], lambda m, a, o: o * float("nan"))
    with nan, pytest.raises(ActivationError, match=r"shard_00000.safetensors.*NaN"):
        collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    assert not (tmp_path / "a" / "shard_00000.safetensors").exists()


def test_layer_out_of_range_and_empty_corpus(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(LayerError, match=r"0..3"):
        collect_activations(model, tok, tmp_path / "a", layer=4, **SMALL)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="holds no text"):
        collect_activations(model, tok, tmp_path / "b", layer=1, corpus=str(empty), **SMALL)
    with pytest.raises(CorpusError, match="ran out after"):
        collect_activations(model, tok, tmp_path / "c", layer=1, corpus=_docs_file(tmp_path, n_docs=3), **SMALL)


def test_heldout_split_uses_other_documents(tiny_llama, tmp_path):
    model, tok = tiny_llama
    corpus = _docs_file(tmp_path, n_docs=400)
    for split, n in (("train", 700), ("heldout", 300)):
        collect_activations(
            model, tok, tmp_path / split, layer=1, corpus=corpus, split=split, **{**SMALL, "n_tokens": n}
        )
    train = set(ActivationStore(tmp_path / "train").token_info()["doc_index"].tolist())
    held = set(ActivationStore(tmp_path / "heldout").token_info()["doc_index"].tolist())
    assert held and train and not train & held
    assert all(d % 10 == 9 for d in held)
    assert [i for i, _ in split_docs(iter_texts(corpus), "heldout")][:2] == [9, 19]


def test_iter_batches_is_deterministic_and_resumable(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=1, **SMALL)
    store = ActivationStore(tmp_path / "a")
    allx = store.load_all()
    one_pass = torch.cat(list(store.iter_batches(64, shuffle=False)))
    assert torch.equal(one_pass, allx)
    shuffled = torch.cat(list(store.iter_batches(64, shuffle=True, seed=1)))
    assert not torch.equal(shuffled, allx)
    assert torch.equal(shuffled.sum(0), allx.sum(0)) or torch.allclose(shuffled.sum(0), allx.sum(0), atol=1e-3)
    a = list(store.iter_batches(100, seed=5, n_batches=20))  # 2000 tokens: cycles ~3 epochs
    b = list(store.iter_batches(100, seed=5, start_batch=13, n_batches=20))
    assert len(a) == 20 and len(b) == 7 and all(x.shape == (100, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a[13:], b))
    c = list(store.iter_batches(100, seed=6, n_batches=20))
    assert not torch.equal(a[0], c[0])
    # each epoch is a permutation of the data
    assert torch.allclose(torch.cat(a)[:700].sort(0).values, allx.sort(0).values)


def test_stream_equals_disk(tiny_gemma4, tmp_path):
    model, tok = tiny_gemma4
    collect_activations(model, tok, tmp_path / "a", layer=3, **SMALL)
    disk = ActivationStore(tmp_path / "a")
    streamed = list(stream_activations(model, tok, layer=3, n_tokens=700, seq_len=32, batch_size=4))
    torch.testing.assert_close(torch.cat([s.acts for s in streamed]), disk.load_all(), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([s.token_ids for s in streamed]).int(), disk.token_info()["token_ids"])


def test_packer_without_bos_uses_eos():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id, all_special_ids = None, 7, None, [7]

        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 50 + 10 for c in text]}

    rows = list(Packer(Tok(), 8).rows(enumerate(["abcdefghij", "klmnop"])))
    assert all(len(r[0]) == 8 and r[0][0] == 7 for r in rows)


def test_bfloat16_shards(tiny_llama, tmp_path):
    model, tok = tiny_llama
    collect_activations(model, tok, tmp_path / "a", layer=1, dtype="bfloat16", **SMALL)
    collect_activations(model, tok, tmp_path / "b", layer=1, **SMALL)
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.shard(0)["activations"].dtype == torch.bfloat16
    torch.testing.assert_close(a.load_all(), b.load_all(), rtol=1e-2, atol=1e-2)


def test_real_smollm2_short_collection(smollm2, tmp_path):
    run = collect_activations(
        smollm2.model,
        smollm2.tokenizer,
        tmp_path / "s",
        layer=15,
        n_tokens=120,
        seq_len=64,
        batch_size=2,
        progress=False,
        model_name=smollm2.name,
    )
    store = ActivationStore(tmp_path / "s")
    assert store.n_tokens == 120 and store.d_model == 576 and run.manifest["model"] == smollm2.name
    sh = store.shard(0)
    with torch.no_grad():
        hs = smollm2.model(input_ids=sh["context_ids"].long(), output_hidden_states=True).hidden_states[16]
    torch.testing.assert_close(store.load_all(), hs[sh["keep_mask"]], rtol=1e-4, atol=1e-4)
    text = smollm2.tokenizer.decode(sh["context_ids"][0, 1:].tolist())
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # English prose from the Python docs


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/collect.py --device cpu --small: the CPU methods run, agree and are saved (the GPU path's logic).

    ``--seconds 0``: each timed loop still times one batch, so tokens/s > 0 does not hang on the scheduler (with
    0.1 s, a stall of the test process before the loop's first clock check left 0 batches and 0 tokens/s)."""
    import importlib.util

    from mechlib.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_collect", REPO_ROOT / "benchmarks" / "collect.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(
        ["--device", "cpu", "--small", "--seconds", "0", "--results", str(tmp_path), "--out-dir", str(tmp_path)]
    )
    assert rc == 0
    (saved,) = tmp_path.glob("collect_*.json")
    record = json.loads(saved.read_text())
    assert record["equivalent"] and record["all_ran"]
    assert set(record["results"]) == {"study", "stream_eager", "disk", "stream_eager_cudnn"}
    for name in ("stream_eager", "disk", "stream_eager_cudnn"):
        assert record["results"][name]["equivalence"]["max_abs_diff"] <= 1e-5
        assert record["results"][name]["tokens_per_s"] > 0
    assert record["results"]["disk"]["config_of"] == "stream_eager"
    assert all(c["kernel"] == "cpu" for c in record["attention"]) and record["attention"][0]["mask"] is not None
    assert bench.main(["--device", "cpu", "--small", "--methods", "study,warp"]) == 2  # unknown method named
    assert bench.main(["--device", "cpu"]) == 2  # the E4B-sized run refuses a CPU


def test_bfloat16_model_collection_matches_hidden_states(tiny_gemma4, tmp_path):
    """The study collects with a bf16 model; on CPU too the collector matches output_hidden_states."""
    model, tok = tiny_gemma4
    model = model.to(torch.bfloat16)
    collect_activations(model, tok, tmp_path / "a", layer=3, dtype="bfloat16", **SMALL)
    sh = ActivationStore(tmp_path / "a").shard(0)
    with torch.no_grad():
        hs = model(input_ids=sh["context_ids"].long(), output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(sh["activations"].float(), hs[sh["keep_mask"]].float(), rtol=2e-2, atol=2e-2)


def test_corpora(tmp_path, monkeypatch):
    from itertools import islice

    first = list(islice(iter_texts("python-stdlib-docs"), 3))
    assert first == list(islice(iter_texts("python-stdlib-docs"), 3))  # deterministic order
    assert all(len(t) > 100 and sum(c.isalpha() for c in t) > 0.5 * len(t) for t in first)
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"body": "first doc"}\n\n{"body": "second doc"}\n')
    assert list(iter_texts(str(jl), corpus_text_field="body")) == ["first doc", "second doc"]
    with pytest.raises(CorpusError, match="no text field 'text'"):
        list(iter_texts(str(jl)))
    jl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: not valid JSON"):
        list(iter_texts(str(jl)))
    with pytest.raises(CorpusError, match="not found"):
        list(iter_texts(str(tmp_path / "missing.txt")))
    with pytest.raises(CorpusError, match=r"must end in \.txt"):
        (tmp_path / "x.csv").write_text("a")
        list(iter_texts(str(tmp_path / "x.csv")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="hub may be unreachable"):
        next(iter_texts("hf:mechbook-test/not-a-dataset"))
