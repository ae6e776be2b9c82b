"""SteeringVector: the card's on-disk format kept exactly, and ``apply`` adds exactly its delta, always removed."""

from __future__ import annotations

import json

import pytest
import torch

from mechlib.hooks import run_to_layer
from mechlib.io import atomic_torch_save, atomic_write_json
from mechlib.models import LayerError, decoder_layers
from mechlib.steering_vector import SteeringError, SteeringVector, meta_path


def _old_format(path, vector, *, layer, model, n_correct, n_wrong, mean_resid_norm, **extra):
    """What ``contrast.save_steering_vector`` wrote before the class existed (the card's format)."""
    atomic_torch_save(vector.detach().float().cpu().contiguous(), path)
    atomic_write_json(
        path.with_suffix(".json"),
        {
            "layer": int(layer),
            "model": model,
            "n_correct": int(n_correct),
            "n_wrong": int(n_wrong),
            "mean_resid_norm": float(mean_resid_norm),
            **extra,
        },
    )
    return path


def _unit(d=8, seed=0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_save_writes_the_old_format_and_load_reads_it(tmp_path):
    v = _unit()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = _old_format(
        tmp_path / "old" / "steering_vec_L3.pt",
        v,
        layer=3,
        model="m",
        n_correct=5,
        n_wrong=7,
        mean_resid_norm=12.5,
        raw_diff_norm=0.75,
        pooling="last",
    )
    new = SteeringVector(3, v, 12.5, model="m", n_correct=5, n_wrong=7, raw_diff_norm=0.75, pooling="last").save(
        tmp_path / "new" / "steering_vec_L3.pt"
    )
    assert meta_path(new).read_text() == meta_path(old).read_text()  # same keys, same values, same bytes
    a, b = torch.load(old, weights_only=True), torch.load(new, weights_only=True)
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)  # a bare tensor, as the card loads it

    vec = SteeringVector.load(old)
    assert torch.equal(vec.unit, v) and vec.layer == 3 and vec.mean_norm == 12.5 and vec.model == "m"
    assert (vec.n_correct, vec.n_wrong, vec.raw_diff_norm, vec.pooling) == (5, 7, 0.75, "last")
    # unknown sidecar keys survive a load → save round trip
    meta = json.loads(meta_path(old).read_text())
    meta["prompts_sha"] = "abc"
    meta_path(old).write_text(json.dumps(meta))
    again = SteeringVector.load(old).save(tmp_path / "again.pt")
    assert json.loads(meta_path(again).read_text()) == meta
    card = torch.load(again).to(torch.bfloat16)  # the card's own line
    assert card.shape == (8,) and abs(float(card.float().norm()) - 1) < 1e-2


def test_load_names_the_missing_file_or_key(tmp_path):
    with pytest.raises(SteeringError, match="not found"):
        SteeringVector.load(tmp_path / "missing.pt")
    p = SteeringVector(3, _unit(), 1.0).save(tmp_path / "steering_vec_L3.pt")
    meta_path(p).write_text(json.dumps({"layer": 3}))
    with pytest.raises(SteeringError, match="mean_resid_norm"):
        SteeringVector.load(p)
    meta_path(p).unlink()
    with pytest.raises(SteeringError, match=r"steering_vec_L3.json"):
        SteeringVector.load(p)
    torch.save(torch.ones(2, 2), p)
    SteeringVector(3, _unit(), 1.0).save(tmp_path / "other.pt")
    meta_path(tmp_path / "other.pt").rename(meta_path(p))
    with pytest.raises(SteeringError, match="1-D tensor"):
        SteeringVector.load(p)


def test_construction_refuses_a_bad_direction_or_norm():
    with pytest.raises(SteeringError):
        SteeringVector(1, torch.zeros(4), 1.0)
    with pytest.raises(SteeringError):
        SteeringVector(1, torch.ones(2, 2), 1.0)
    with pytest.raises(SteeringError, match="mean_norm"):
        SteeringVector(1, torch.ones(4), 0.0)


@pytest.mark.parametrize("scale", [0.3, -0.1])
def test_apply_adds_exactly_its_delta_at_its_layer(tiny_llama, scale):
    model, tok = tiny_llama
    enc = dict(tok(["Tom has 3 apples and buys 4 more."], return_tensors="pt"))
    d = model.config.hidden_size
    vec = SteeringVector(1, _unit(d, seed=1), 7.0)
    with torch.no_grad():
        clean_1, clean_0 = run_to_layer(model, 1, **enc), run_to_layer(model, 0, **enc)
        with vec.apply(model, scale) as delta:
            steered_1, steered_0 = run_to_layer(model, 1, **enc), run_to_layer(model, 0, **enc)
    expected = scale * 7.0 * vec.unit / vec.unit.norm()
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=0)
    assert torch.equal(steered_1, clean_1 + delta), "the layer's output plus the delta, at every position"
    assert torch.equal(steered_0, clean_0), "layers before the vector's own are untouched"
    assert _hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(run_to_layer(model, 1, **enc), clean_1), "no steering after the with block"


def test_apply_removes_its_hook_on_error_and_checks_the_layer(tiny_llama):
    model, _ = tiny_llama
    d = model.config.hidden_size
    with pytest.raises(RuntimeError, match="boom"), SteeringVector(1, _unit(d), 1.0).apply(model, 0.5):
        assert _hook_count(model) == 1
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    with pytest.raises(LayerError), SteeringVector(len(decoder_layers(model)), _unit(d), 1.0).apply(model, 0.5):
        pass
    assert _hook_count(model) == 0


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
