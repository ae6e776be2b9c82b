"""The background shard writer: gather → write → record, pipelined on three threads.

Split from :mod:`mechlib.activations.shards` (the format, the manifest, the checks on read), which
it writes; :func:`mechlib.activations.collect.collect_activations` feeds it.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mechlib.activations.shards import (
    ACT_DTYPES,
    MANIFEST,
    ActivationError,
    Manifest,
    non_finite_message,
    shard_name,
)
from mechlib.io import atomic_save_safetensors, atomic_write_json, sha256_file

__all__ = ["ShardWriter"]


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
