"""Atomic writes: a failure mid-write leaves the old file intact and no temporary behind."""

from __future__ import annotations

import json

import pytest
import torch

from mechlib.io import atomic_path, atomic_torch_save, atomic_write_json, read_json, sha256_file


def test_atomic_json_round_trip(tmp_path):
    f = tmp_path / "sub" / "m.json"
    atomic_write_json(f, {"b": 1, "a": [1.5, None]})
    assert read_json(f) == {"a": [1.5, None], "b": 1}
    assert list(f.parent.iterdir()) == [f]


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "m.json"
    atomic_write_json(f, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed")
    assert json.loads(f.read_text()) == {"v": 1}
    assert list(tmp_path.iterdir()) == [f]


def test_nan_is_refused_in_metrics(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_torch_save_and_checksum(tmp_path):
    f = tmp_path / "t.pt"
    atomic_torch_save({"w": torch.arange(3)}, f)
    assert torch.equal(torch.load(f)["w"], torch.arange(3))
    h = sha256_file(f)
    assert len(h) == 64 and h == sha256_file(f)
