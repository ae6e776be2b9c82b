"""Activation shards on disk: the manifest and checks on read (the writer: :mod:`mechlib.activations.shard_writer`).

Why: a collection run is long and may be killed; each shard is written atomically with its
sha256 and token count recorded in ``manifest.json`` (itself rewritten atomically after every
shard), so a rerun knows exactly which shards are finished and trustworthy. Writing happens
on background threads so that, on a GPU, the model keeps computing while the previous
shard's device→host copies land and the file is written.

Shard layout (safetensors): ``activations`` [n, d] (float32 or bfloat16), per kept token
``token_ids`` [n] int32, ``row`` [n] int64 (global packed-row index), ``position`` [n] int32
(position in the row), ``doc_index`` [n] int64 (document of the corpus), and for the shard's rows
``context_ids`` [rows, seq_len] int32 and ``keep_mask`` [rows, seq_len] bool — enough to show a
token's preceding context (chapter 03's top-activating examples).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mechlib.io import read_json, sha256_file

MANIFEST = "manifest.json"
# A manifest and one of its shard entries as JSON documents: values of mixed types by key (the
# keys are written in one place, :func:`mechlib.activations.collect.collect_activations`).
Manifest = dict[str, Any]
ShardEntry = dict[str, Any]
FORMAT = "mechbook-activations/1"
ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StoreSummary(NamedTuple):
    """What a finished collection holds, read once from its manifest (chapter 01 prints it).

    Why typed: the manifest is a JSON document; readers that index it by string keys break silently
    when a key is renamed, while a field missing here fails in one place with the file's name.
    """

    model: str
    layer: int
    d_model: int
    dtype: str
    seq_len: int
    n_rows: int
    n_tokens: int
    n_shards: int
    special_token_ids: tuple[int, ...]
    separator_token_id: int | None

    def line(self, name: str) -> str:
        """One printable line: the split ``name`` and its shapes."""
        return (
            f"{name:8s} model={self.model} layer={self.layer} d_model={self.d_model} dtype={self.dtype} "
            f"seq_len={self.seq_len} rows={self.n_rows} tokens={self.n_tokens} shards={self.n_shards}"
        )


class ShardError(ValueError):
    """A shard or manifest that is missing, truncated or corrupt; the message names the file."""


class ActivationError(ValueError):
    """Activations that are not finite (NaN/inf); the message names the shard."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def read_manifest(directory: Path, name: str = MANIFEST) -> Manifest | None:
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise ShardError(f"{path}: manifest is not valid JSON ({exc}); delete the folder to recollect") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a mechbook activation manifest (format {FORMAT!r} expected)")
    return manifest


def verify_shard(directory: Path, entry: ShardEntry) -> None:
    """Raise :class:`ShardError` naming the file if it is missing or its sha256 differs."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    if path.stat().st_size != entry.get("bytes", path.stat().st_size):
        raise ShardError(
            f"{path}: shard is truncated or changed (size {path.stat().st_size} bytes, "
            f"manifest says {entry['bytes']}); delete it and rerun to recollect it"
        )
    if sha256_file(path) != entry["sha256"]:
        raise ShardError(
            f"{path}: shard is corrupt (sha256 differs from the manifest); delete it and rerun to recollect it"
        )


def load_shard(directory: Path, entry: ShardEntry, verify: bool = True) -> dict[str, torch.Tensor]:
    """Load one shard (verifying its checksum first); non-finite activations raise."""
    from safetensors.torch import load_file

    path = Path(directory) / entry["file"]
    if verify:
        verify_shard(directory, entry)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated headers
        raise ShardError(f"{path}: cannot read shard ({exc})") from None
    acts = tensors.get("activations")
    if acts is None or acts.shape[0] != entry["n_tokens"]:
        raise ShardError(
            f"{path}: expected {entry['n_tokens']} activation rows, found {None if acts is None else acts.shape[0]}"
        )
    check_finite(acts, path)
    return tensors


def check_finite(acts: torch.Tensor, where: Path | str) -> None:
    if not bool(torch.isfinite(acts).all()):
        bad = int((~torch.isfinite(acts)).any(dim=-1).sum())
        raise ActivationError(non_finite_message(where, bad, acts.shape[0]))


def non_finite_message(where: Path | str, bad: int, total: int) -> str:
    return (
        f"{where}: {bad} of {total} activation vectors contain NaN or inf "
        f"(model in float16? try model_dtype: bfloat16 or float32)"
    )


def rank_manifest_name(rank: int | str) -> str:
    """The manifest one torchrun rank writes for the shards it computed (merged by rank 0); ``"*"`` globs."""
    return f"manifest.rank{rank}.json"


class ActivationStore:
    """Read a finished collection: ``ActivationStore(RunPaths(run).activations / "train")``.

    ``iter_batches`` gives a deterministic order for a seed and can start at any batch offset
    without reading what comes before it, so an interrupted SAE training run resumes on exactly
    the batches it would have seen. Shuffling permutes the shard order per epoch, then the tokens
    inside groups of ``shards_per_group`` consecutive shards (all shards at the book's sizes: a
    full shuffle); memory stays bounded by one group for billion-token collections.
    """

    def __init__(self, directory: str | Path, verify: bool = True, cache_bytes: int = 2 << 30):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ShardError(
                f"{self.directory / MANIFEST}: no activation manifest here; run chapter 01 (collection) first"
            )
        if not manifest.get("complete"):
            raise ShardError(
                f"{self.directory / MANIFEST}: collection is incomplete "
                f"({manifest.get('n_tokens', 0)} tokens so far); rerun chapter 01 to finish it"
            )
        self.manifest = manifest
        self.entries: list[ShardEntry] = manifest["shards"]
        self.verify = verify
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._verified: set[int] = set()
        self._cache_ok = self.n_tokens * self.d_model * 4 <= cache_bytes

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    def __len__(self) -> int:
        return self.n_tokens

    def summary(self) -> StoreSummary:
        """The manifest's identity and totals as a :class:`StoreSummary`."""
        m = self.manifest
        try:
            sep = m["separator_token_id"]
            return StoreSummary(
                model=str(m["model"]),
                layer=int(m["layer"]),
                d_model=int(m["d_model"]),
                dtype=str(m["dtype"]),
                seq_len=int(m["seq_len"]),
                n_rows=int(m["n_rows"]),
                n_tokens=int(m["n_tokens"]),
                n_shards=len(self.entries),
                special_token_ids=tuple(int(t) for t in m["special_token_ids"]),
                separator_token_id=None if sep is None else int(sep),
            )
        except KeyError as exc:
            raise ShardError(
                f"{self.directory / MANIFEST}: manifest lacks {exc}; delete the folder to recollect"
            ) from None

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """All tensors of shard ``i`` (checksum verified once per store)."""
        if i in self._cache:
            return self._cache[i]
        tensors = load_shard(self.directory, self.entries[i], verify=self.verify and i not in self._verified)
        self._verified.add(i)
        if self._cache_ok:
            self._cache[i] = tensors
        return tensors

    def _cat(self, key: str, max_tokens: int | None = None) -> torch.Tensor:
        out, n = [], 0
        for i in range(len(self.entries)):
            if max_tokens is not None and n >= max_tokens:
                break
            t = self.shard(i)[key]
            out.append(t)
            n += t.shape[0]
        x = torch.cat(out)
        return x if max_tokens is None else x[:max_tokens]

    def load_all(self, max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All activations [n_tokens, d_model] in shard order (index i ↔ ``token_info()`` index i)."""
        return self._cat("activations", max_tokens).to(dtype)

    def token_info(self, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Per kept token: ``token_ids``, ``row``, ``position``, ``doc_index`` (same order as ``load_all``)."""
        return {k: self._cat(k, max_tokens) for k in ("token_ids", "row", "position", "doc_index")}

    def context(self, row: int, position: int, window: int = 24) -> list[int]:
        """Token ids of packed row ``row`` up to and including ``position`` (at most ``window + 1``)."""
        for i, e in enumerate(self.entries):
            if e["first_row"] <= row < e["first_row"] + e["n_rows"]:
                ids = self.shard(i)["context_ids"][row - e["first_row"]]
                return ids[max(0, position - window) : position + 1].tolist()
        raise IndexError(f"row {row} is not in this collection ({self.directory})")

    # -- batches
    def _groups(self, epoch: int, seed: int, shuffle: bool, shards_per_group: int) -> list[list[int]]:
        n = len(self.entries)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        else:
            order = list(range(n))
        return [order[i : i + shards_per_group] for i in range(0, n, shards_per_group)]

    def _epoch_stream(self, epoch: int, seed: int, shuffle: bool, skip: int, shards_per_group: int, dtype):
        for gi, group in enumerate(self._groups(epoch, seed, shuffle, shards_per_group)):
            size = sum(self.entries[s]["n_tokens"] for s in group)
            if skip >= size:
                skip -= size
                continue
            x = torch.cat([self.shard(s)["activations"] for s in group])
            if shuffle:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + gi + 1)
                x = x[torch.randperm(size, generator=g)]
            yield x[skip:].to(dtype)
            skip = 0

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        start_batch: int = 0,
        n_batches: int | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        shards_per_group: int = 8,
    ) -> Iterator[torch.Tensor]:
        """Yield activation batches [batch_size, d_model].

        ``n_batches=None``: one pass (epoch 0), last batch possibly smaller. Otherwise exactly
        ``n_batches`` full batches counted from batch 0, cycling epochs (each epoch its own
        shuffle); ``start_batch`` skips the first batches without reading them, so batch ``b``
        is the same whether or not the run was interrupted before it.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        total = self.n_tokens
        end = total if n_batches is None else n_batches * batch_size
        pos = start_batch * batch_size
        if n_batches is None and pos >= total:
            return
        buf: list[torch.Tensor] = []
        have = 0
        epoch, skip = divmod(pos, total)
        while pos < end:
            for chunk in self._epoch_stream(epoch, seed, shuffle, skip, shards_per_group, dtype):
                buf.append(chunk)
                have += chunk.shape[0]
                if have < batch_size:
                    continue
                x, off = (torch.cat(buf) if len(buf) > 1 else buf[0]), 0  # one copy per chunk, not per batch
                while have - off >= batch_size and pos < end:
                    yield x[off : off + batch_size]
                    off, pos = off + batch_size, pos + batch_size
                buf, have = [x[off:]], have - off
                if pos >= end:
                    return
            epoch, skip = epoch + 1, 0
            if n_batches is None:
                break
        if n_batches is None and have > 0:
            yield torch.cat(buf)
