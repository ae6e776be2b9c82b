"""Provenance keys: stable digests, named input changes, and activation fingerprints from manifests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mechlib.activations.collect import collect_activations
from mechlib.activations.provenance import (
    ActivationsFingerprint,
    Provenance,
    ProvenanceError,
    canonical_json,
    digest,
    fingerprint_of_manifest,
    fingerprint_of_store,
    read_activations_fingerprint,
    stale_line,
    tensor_digest,
)
from mechlib.activations.shards import ShardError
from mechlib.activations.stores import TensorStore


@dataclass(frozen=True)
class _Knobs:
    lr: float
    betas: tuple[float, float]


def test_digest_is_sha256_of_canonical_json_and_ignores_key_order_and_tuple_vs_list():
    value = {"b": (1, 2.5, None), "a": "x"}
    assert canonical_json(value) == '{"a":"x","b":[1,2.5,null]}'
    assert digest(value) == hashlib.sha256(b'[{"a":"x","b":[1,2.5,null]}]').hexdigest()  # any machine, any run
    assert digest({"a": "x", "b": [1, 2.5, None]}) == digest(value)
    assert digest(value) != digest({"a": "x", "b": [1, 2.5]})
    assert digest("a", "b") != digest("ab") and digest(1) != digest("1")
    assert digest(_Knobs(1e-3, (0.9, 0.999))) == digest({"lr": 1e-3, "betas": [0.9, 0.999]})
    assert digest(Path("a/b")) == digest("a/b")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object(), {1: "x"}])
def test_digest_refuses_values_without_one_meaning(bad):
    with pytest.raises(ProvenanceError, match="cannot digest"):
        digest(bad)


def test_provenance_names_the_inputs_that_changed_and_round_trips():
    fp = ActivationsFingerprint("p1", "s1", 100, 8)
    a = Provenance.of(activations=fp, train_config={"k": 4})
    assert Provenance.from_dict(a.as_dict()) == a and a.changed(Provenance.from_dict(a.as_dict())) == ()
    b = Provenance.of(activations=ActivationsFingerprint("p1", "s2", 100, 8), train_config={"k": 4})
    assert b.changed(a) == ("activations",) and b.digest != a.digest
    assert Provenance.of(activations=fp, train_config={"k": 5}).changed(a) == ("train_config",)
    assert a.changed(None) == ("activations", "train_config")
    assert Provenance.from_dict(None) is None
    with pytest.raises(ProvenanceError, match="not a provenance record"):
        Provenance.from_dict({"activations": 3})
    assert stale_line("activations", "saved SAE", "training from scratch", "seq_len 32 → 48") == (
        "[mechbook] activations changed since the saved SAE (seq_len 32 → 48): training from scratch"
    )


def test_tensor_digest_sees_every_bit_and_the_dtype():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y.view(torch.int32)[2, 1] ^= 1  # one mantissa bit
    assert tensor_digest(x) == tensor_digest(x.clone()) != tensor_digest(y)
    assert tensor_digest(x) != tensor_digest(x.double()) and tensor_digest(x) != tensor_digest(x.reshape(3, 4))
    assert fingerprint_of_store(TensorStore(x)).digest != fingerprint_of_store(TensorStore(y)).digest


def test_fingerprint_of_a_collection_follows_its_settings_and_shards(tiny_llama, tmp_path):
    model, tok = tiny_llama
    small = dict(layer=1, n_tokens=300, seq_len=32, batch_size=4, shard_tokens=128, progress=False)
    with pytest.raises(ShardError, match="no activation manifest here; run chapter 01"):
        read_activations_fingerprint(tmp_path / "a")
    run = collect_activations(model, tok, tmp_path / "a", **small)
    fp = read_activations_fingerprint(tmp_path / "a")
    assert fp == fingerprint_of_manifest(run.manifest) and fp.n_tokens == 300 and fp.layer == 1
    assert dict(fp.settings)["exclude_first_positions"] == 2
    assert ActivationsFingerprint.from_dict(fp.as_dict()) == fp
    collect_activations(model, tok, tmp_path / "a", exclude_first_positions=1, **small)  # recollects in place
    other = read_activations_fingerprint(tmp_path / "a")
    assert other.digest != fp.digest and other.params_hash != fp.params_hash
    assert other.describe_change(fp) == "exclude_first_positions 2 → 1"
    # the same settings and tokens with one shard's bytes changed: the shard checksums tell them apart
    manifest = dict(run.manifest)
    manifest["shards"] = [dict(e) for e in manifest["shards"]]
    manifest["shards"][1]["sha256"] = "0" * 64
    changed = fingerprint_of_manifest(manifest)
    assert changed.digest != fp.digest and changed.describe_change(fp) == "shard contents (checksums) differ"
