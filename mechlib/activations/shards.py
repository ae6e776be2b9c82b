"""Activation shards on disk: the manifest, a background shard writer, and checks on read.

Why: a collection run is long and may be killed; each shard is written atomically with its
sha256 and token count recorded in ``manifest.json`` (itself rewritten atomically after every
shard), so a rerun knows exactly which shards are finished and trustworthy. Writing happens
on a background thread so that, on a GPU, the model keeps computing while the previous
shard's device→host copies land and the file is written.

Shard layout (safetensors): ``activations`` [n, d] (float32 or bfloat16), per kept token
``token_ids`` [n] int32, ``row`` [n] int64 (global packed-row index), ``position`` [n] int32
(position in the row), ``doc_index`` [n] int64 (document of the corpus), and for the shard's rows
``context_ids`` [rows, seq_len] int32 and ``keep_mask`` [rows, seq_len] bool — enough to show a
token's preceding context (chapter 03's top-activating examples).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mechlib.io import atomic_save_safetensors, atomic_write_json, read_json, sha256_file

MANIFEST = "manifest.json"
# A manifest and one of its shard entries as JSON documents: values of mixed types by key (the
# keys are written in one place, :func:`mechlib.activations.collect.collect_activations`).
Manifest = dict[str, Any]
ShardEntry = dict[str, Any]
FORMAT = "mechbook-activations/1"
ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


class ShardWriter:
    """Accumulates per-batch activations and writes shards + manifest on three background threads.

    ``add_batch`` takes host (or pinned, still-copying) tensors plus a CUDA event to wait on, and
    optionally per-position finite flags computed where the activations were (the GPU: a check
    there costs microseconds, on the host it is the slowest step of a shard); ``end_shard``
    finishes a shard. A pipeline, in shard order: *gather* waits for each copy, masks and converts
    to the on-disk dtype, and at a shard's end concatenates and checks for NaN/inf; *write* writes
    the shard atomically (``safetensors.save_file``, straight from the tensors); *record* hashes the
    file and appends its manifest entry. Why three: at 130 k tokens/s a 64 k-token bf16 shard
    (335 MB) is due every ~0.5 s, and mask + concatenate + write + hash on one thread takes about
    that long; pipelined, each stage has the whole interval. The files and the manifest are the
    same as one thread's (a test checks the bytes), so old collections resume.
    Errors from any thread are re-raised in the caller at the next call or at ``close``.
    """

    def __init__(
        self, directory: Path, manifest: Manifest, dtype: str, max_pending: int = 4, manifest_name: str = MANIFEST
    ):
        self.directory = Path(directory)
        self.manifest = manifest
        self.manifest_name = manifest_name  # a rank's own manifest under torchrun (mechlib.scale merges)
        self.dtype = ACT_DTYPES[dtype]
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._parts: list[dict[str, torch.Tensor]] = []
        self._bad = 0  # kept positions with a non-finite value in the shard being gathered
        self._to_write: queue.Queue = queue.Queue(maxsize=1)  # one finished shard waits while one is written
        self._to_record: queue.Queue = queue.Queue(maxsize=1)
        self._recorder = threading.Thread(
            target=self._stage, args=(self._to_record, self._record, None, None), name="mechlib-shard-record"
        )
        self._writer = threading.Thread(
            target=self._stage,
            args=(self._to_write, self._write_file, self._to_record, self._recorder),
            name="mechlib-shard-write",
        )
        self._thread = threading.Thread(target=self._run, name="mechlib-shard-gather")
        self._threads = (self._thread, self._writer, self._recorder)
        for t in self._threads:
            t.daemon = True
            t.start()

    # -- caller side
    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: tuple) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def add_batch(
        self,
        hidden: torch.Tensor,
        keep: torch.Tensor,
        ids: torch.Tensor,
        doc: torch.Tensor,
        first_row: int,
        event: torch.cuda.Event | None = None,
        on_done: Callable[[], None] | None = None,
        finite: torch.Tensor | None = None,
    ) -> None:
        """Queue one model batch: ``hidden`` [B, T, d], ``keep``/``ids``/``doc`` [B, T] on the CPU.

        ``finite`` [B, T] (optional, landed with ``event``): whether each position's vector is finite
        in the on-disk dtype; without it the gather thread checks the kept activations itself.
        """
        self._put(("batch", hidden, keep, ids, doc, first_row, event, on_done, finite))

    def end_shard(self, index: int, first_row: int, n_rows: int) -> None:
        self._put(("end", index, first_row, n_rows))

    def close(self) -> None:
        self._put(("stop",))
        for t in self._threads:
            t.join()
        self._check()

    def abort(self) -> None:
        """Stop the threads after what is queued, without raising their error (the caller is raising)."""
        while self._thread.is_alive():  # alive even when a later stage failed: it waits for work
            try:
                self._queue.put(("stop",), timeout=0.5)
                break
            except queue.Full:
                continue
        for t in self._threads:
            t.join(timeout=60)

    # -- threads
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:  # the first error is the cause; later ones are its consequences
            self._error = exc

    def _pass(self, box: queue.Queue, item: tuple | None, consumer: threading.Thread) -> None:
        while consumer.is_alive():  # a dead stage (its error is set) takes nothing more
            try:
                box.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item[0] == "stop":
                    return
                if item[0] == "batch":
                    self._take_batch(*item[1:])
                else:
                    self._pass(self._to_write, (*item[1:], self._finish_parts(item[1])), self._writer)
        except BaseException as exc:  # surfaced to the caller by _check
            self._fail(exc)
        finally:
            self._pass(self._to_write, None, self._writer)

    def _stage(
        self,
        inbox: queue.Queue,
        work: Callable[..., tuple | None],
        outbox: queue.Queue | None,
        consumer: threading.Thread | None,
    ) -> None:
        try:
            while (item := inbox.get()) is not None:
                out = work(*item)
                if outbox is not None and consumer is not None:
                    self._pass(outbox, out, consumer)
        except BaseException as exc:
            self._fail(exc)
        finally:
            if outbox is not None and consumer is not None:
                self._pass(outbox, None, consumer)

    def _take_batch(self, hidden, keep, ids, doc, first_row, event, on_done, finite) -> None:
        if event is not None:
            event.synchronize()  # the non_blocking device→host copies have landed
        b, t, d = hidden.shape
        flat = keep.reshape(-1)
        acts = hidden.reshape(b * t, d)[flat].to(self.dtype)
        if on_done is not None:
            on_done()  # the pinned buffer may be reused now
        if finite is None:
            finite_kept = torch.isfinite(acts).all(dim=-1)
        else:
            finite_kept = finite.reshape(-1)[flat]
        self._bad += int((~finite_kept).sum())
        rows = torch.arange(first_row, first_row + b).repeat_interleave(t)[flat]
        pos = torch.arange(t, dtype=torch.int32).repeat(b)[flat]
        self._parts.append(
            {
                "activations": acts,
                "token_ids": ids.reshape(-1)[flat].to(torch.int32),
                "row": rows,
                "position": pos,
                "doc_index": doc.reshape(-1)[flat].to(torch.int64),
                "context_ids": ids.to(torch.int32),
                "keep_mask": keep.clone(),
            }
        )

    def _finish_parts(self, index: int) -> dict[str, torch.Tensor]:
        parts, self._parts = self._parts, []
        bad, self._bad = self._bad, 0
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if bad:
            raise ActivationError(
                non_finite_message(self.directory / shard_name(index), bad, len(tensors["activations"]))
            )
        return tensors

    def _write_file(self, index: int, first_row: int, n_rows: int, tensors: dict[str, torch.Tensor]) -> tuple:
        path = self.directory / shard_name(index)
        atomic_save_safetensors(
            tensors,
            path,
            # one key: safetensors writes a multi-key metadata map in random
            # order, and shards must be byte-identical across reruns
            metadata={"mechbook": json.dumps({"shard": index, "first_row": first_row})},
        )
        return index, first_row, n_rows, int(tensors["activations"].shape[0]), path

    def _record(self, index: int, first_row: int, n_rows: int, n_tokens: int, path: Path) -> None:
        entry = {
            "file": path.name,
            "index": index,
            "first_row": first_row,
            "n_rows": n_rows,
            "n_tokens": n_tokens,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        self.manifest["n_tokens"] = sum(e["n_tokens"] for e in self.manifest["shards"])
        atomic_write_json(self.directory / self.manifest_name, self.manifest)


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
