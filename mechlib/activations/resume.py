"""What a rerun of a collection may keep: its settings identity, the shards still valid, the final manifest.

Why a module of its own: resuming is bookkeeping on the files in ``out_dir`` and never touches the
model's forward; :mod:`mechlib.activations.collect` calls these steps around its write loop, and
:mod:`mechlib.activations.collect_config` keys a collection by the same identity and hash. Shards are a
deterministic function of the identity, so a shard written under the same ``params_hash`` (by
``manifest.json`` or by a killed torchrun's ``manifest.rank<r>.json``) is kept if its checksum still
matches; anything written under other settings is deleted (by rank 0 only) before computing starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from mechlib.activations.corpus import CorpusSpec
from mechlib.activations.packing import HELDOUT_EVERY
from mechlib.activations.shards import FORMAT, MANIFEST, Manifest, ShardEntry, rank_manifest_name, read_manifest
from mechlib.io import atomic_write_json
from mechlib.models import d_model

__all__ = ["collection_identity", "drop_if_changed", "finish_manifest", "finished_shards", "params_hash"]


def params_hash(identity: Manifest) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def collection_identity(
    model: nn.Module,
    *,
    model_name: str,
    layer: int,
    dtype: str,
    seq_len: int,
    rows_per_shard: int,
    corpus: CorpusSpec,
    split: str,
    exclude_special_tokens: bool,
    exclude_first_positions: int,
) -> Manifest:
    """Everything that decides which tokens (and bytes) a collection holds; its hash keys the manifest."""
    return {
        "format": FORMAT,
        "model": model_name or str(getattr(model.config, "_name_or_path", "")),
        "model_class": type(model).__name__,
        "layer": layer,
        "d_model": d_model(model),
        "dtype": dtype,
        "seq_len": seq_len,
        "rows_per_shard": rows_per_shard,
        **corpus.identity(),
        "split": split,
        "heldout_every": HELDOUT_EVERY,
        "exclude_special_tokens": exclude_special_tokens,
        "exclude_first_positions": exclude_first_positions,
    }


def drop_if_changed(out_dir: Path, phash: str, main: bool) -> Manifest | None:
    """The manifest on disk if it was written with these settings; else (rank 0) delete its shards."""
    old = read_manifest(out_dir)
    if old is not None and old.get("params_hash") != phash:
        if main:
            print(f"{out_dir}: collection parameters changed since the last run; recollecting")
            for e in old.get("shards", []):
                (out_dir / e["file"]).unlink(missing_ok=True)
            (out_dir / MANIFEST).unlink(missing_ok=True)
        old = None
    return old


def finished_shards(out_dir: Path, old: Manifest | None, phash: str) -> dict[int, ShardEntry]:
    """Shard entries already written with these settings: ``manifest.json``'s and a killed torchrun's per rank."""
    done = {e["index"]: e for e in (old or {}).get("shards", [])}
    for part in sorted(out_dir.glob(rank_manifest_name("*"))):
        m = read_manifest(out_dir, part.name)
        if m is not None and m.get("params_hash") == phash:
            done.update({e["index"]: e for e in m.get("shards", [])})
    return done


def finish_manifest(
    out_dir: Path, manifest: Manifest, manifest_name: str, n_shards: int, n_rows: int, n_tokens: int, world_size: int
) -> None:
    """Drop shards past the end (an earlier run with more tokens), total up, write the manifest."""
    for e in manifest["shards"]:
        if e["index"] >= n_shards:
            (out_dir / e["file"]).unlink(missing_ok=True)
    manifest["shards"] = [e for e in manifest["shards"] if e["index"] < n_shards]
    manifest["n_tokens"] = sum(e["n_tokens"] for e in manifest["shards"])
    manifest["n_rows"] = n_rows
    manifest["complete"] = manifest["n_tokens"] == n_tokens
    atomic_write_json(out_dir / manifest_name, manifest)
    if world_size == 1:  # everything is in manifest.json now
        for part in out_dir.glob(rank_manifest_name("*")):
            part.unlink(missing_ok=True)
