"""Atomic writes: a failure mid-write leaves the old file intact and no temporary behind."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from mechlib.io import atomic_path, atomic_torch_save, atomic_write_json, iter_jsonl, read_json, sha256_file


def test_atomic_json_round_trip(tmp_path):
    f = tmp_path / "sub" / "m.json"
    atomic_write_json(f, {"b": 1, "a": [1.5, None]})
    assert read_json(f) == {"a": [1.5, None], "b": 1}
    assert list(f.parent.iterdir()) == [f]


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "m.json"
    atomic_write_json(f, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
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


# ------------------------------------------------------------------------- text files: decoding errors


class _DataError(ValueError):
    pass


def test_iter_jsonl_names_file_and_line_of_bad_utf8(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = b'{"a": 1}\n' * 3000  # past the 8 KiB text-mode buffer, so the line number must be exact
    path.write_bytes(good + b'{"a": "caf\xe9"}\n' + b'{"a": 2}\n')
    rows = []
    with pytest.raises(_DataError, match=rf"{path}:3001: not UTF-8 text \(byte 11 of the line"):
        for row in iter_jsonl(path, _DataError):
            rows.append(row)
    assert len(rows) == 3000


def test_iter_jsonl_reads_crlf_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n{"b": "\xc3\xa9"}\r\n')
    assert list(iter_jsonl(path, _DataError)) == [(1, {"a": 1}), (3, {"b": "é"})]


def test_gsm8k_and_corpus_readers_name_the_file_and_line(tmp_path):
    from mechlib.activations.corpus import CorpusError, iter_texts
    from mechlib.gsm8k import GSM8KError, load_gsm8k

    gsm = tmp_path / "test.jsonl"
    gsm.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "\xff", "answer": "#### 3"}\n')
    with pytest.raises(GSM8KError, match=rf"{gsm}:2: not UTF-8"):
        load_gsm8k(str(gsm))
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"Some prose.\r\n\r\nMore prose.\n\nLatin-1 \xe9t\xe9\n")
    with pytest.raises(CorpusError, match=rf"{txt}:5: not UTF-8"):
        list(iter_texts(str(txt)))
    txt.write_bytes(b"Some prose.\r\nsecond line\r\n\r\nMore prose.\n")
    assert list(iter_texts(str(txt))) == ["Some prose.\nsecond line", "More prose."]


def test_run_paths_print_relative_to_the_repository():
    from mechlib.paths import RunPaths

    paths = RunPaths("r1")
    assert paths.rel(paths.metrics / "01_collect.json") == "outputs/r1/metrics/01_collect.json"
    assert paths.rel("/elsewhere/x.pt") == "/elsewhere/x.pt"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    from mechlib.io import atomic_save_safetensors_checksummed, checksum_path

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        atomic_torch_save({"x": 1}, tmp_path / "t.pt")
        atomic_save_safetensors_checksummed({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for f in ("m.json", "t.pt", "w.safetensors", checksum_path(tmp_path / "w.safetensors").name):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == mode, f
