"""One function of the params builds every collection: chapter 01, chapter 02's stream and ``mechlib.scale``.

``python -m mechlib.scale collect`` once ignored ``exclude_first_positions`` (always 2) and so wrote
other tokens than chapter 01; the stream store of ``collect_mode: stream`` did too. Here both paths
run on a tiny saved model with non-default settings and must write identical manifests.
"""

from __future__ import annotations

import json

import jupytext
import papermill
import pytest
import torch
from tiny_run import one_thread, write_params

from mechlib.activations.collect_config import (
    PARAM_KEYS,
    CollectConfig,
    collect_config_from_params,
    collect_for_book,
    collect_split,
)
from mechlib.book import chapters
from mechlib.params import BookParams, load_params

ODD = dict(exclude_first_positions=1, seq_len=48, shard_tokens=192, collect_tokens=700, heldout_tokens=200)


def test_config_reads_every_collection_param_once():
    P = BookParams(
        exclude_first_positions=1, seq_len=48, collect_batch_size=3, activation_dtype="bfloat16", collect_mode="stream"
    )
    cfg = collect_config_from_params(P)
    assert isinstance(cfg, CollectConfig)
    assert (cfg.exclude_first_positions, cfg.seq_len, cfg.batch_size, cfg.dtype) == (1, 48, 3, "bfloat16")
    assert cfg.splits == (("heldout", P.heldout_tokens),)  # stream: no train shards on disk
    assert set(PARAM_KEYS) == {f for f in CollectConfig.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"split must be one of \['heldout'\] in collect_mode 'stream'"):
        collect_split(None, cfg, "unused", "train")


@pytest.mark.parametrize("name", ["01_collect", "02_train_sae"])
def test_chapters_that_build_a_collect_config_declare_every_key_it_reads(name):
    """A chapter gets only the parameters it declares; an undeclared key would silently take the default."""
    chapter = next(c for c in chapters() if c.name == name)
    declared = set(papermill.inspect_notebook(jupytext.read(chapter.source)))
    assert set(PARAM_KEYS.values()) <= declared, sorted(set(PARAM_KEYS.values()) - declared)


def test_scale_collect_writes_the_chapter_01_manifests(tmp_path, monkeypatch):
    from mechlib import paths, scale
    from mechlib.models import load_model

    params = write_params(tmp_path, "odd", **ODD)
    P = load_params(params)
    with one_thread():
        monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "chapter")
        collect_for_book(load_model(P.model, P.model_dtype, "cpu"), P, paths.RunPaths(P.run).make(), progress=False)
        monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "scale")
        scale.collect(params, progress=False)
    for split in ("train", "heldout"):
        chapter = json.loads((tmp_path / "chapter/odd/activations" / split / "manifest.json").read_text())
        scaled = json.loads((tmp_path / "scale/odd/activations" / split / "manifest.json").read_text())
        assert chapter["exclude_first_positions"] == 1 and chapter["seq_len"] == 48 and chapter["complete"]
        assert scaled == chapter, split


def test_stream_store_packs_with_the_chapter_01_settings(tmp_path):
    from mechlib.activations.collect import ActivationStore
    from mechlib.activations.collect_config import stream_store_for_book
    from mechlib.models import load_model

    params = write_params(tmp_path, "odd", **ODD)
    P = load_params(params)
    lm = load_model(P.model, P.model_dtype, "cpu")
    with one_thread():
        out = tmp_path / "train"
        collect_split(lm, collect_config_from_params(P), out, "train", progress=False)
        on_disk = ActivationStore(out).load_all()
        store = stream_store_for_book(lm, P, shuffle_batches=2)
        streamed = torch.cat(list(store.iter_batches(100, shuffle=False, n_batches=7)))
    torch.testing.assert_close(streamed, on_disk, rtol=1e-5, atol=1e-5)
    assert store.manifest["exclude_first_positions"] == 1
    assert store.manifest["params_hash"] == ActivationStore(out).manifest["params_hash"]
