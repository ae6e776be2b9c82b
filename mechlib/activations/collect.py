"""Collect the residual stream after decoder layer L: packed sequences, stop-after-L, shards or a stream.

Why each choice:
- **Packing.** Documents are concatenated (separated by EOS) and cut into rows of exactly
  ``seq_len`` tokens, each row starting with BOS: no padding, so every computed token is kept
  (the study pads/truncates per document). The BOS at position 0 also absorbs the attention-sink
  behaviour of the first position, which we then exclude.
- **Special tokens excluded** (BOS/EOS/pad and any other special id) by default: their residual
  norms are many times larger than ordinary tokens' and dominate SAE training (FIELD.md traps).
  The first ``exclude_first_positions`` (default 2) positions of every row are excluded too: the BOS
  at position 0, and position 1, which SmolLM2 sometimes turns into a second attention sink with
  10–150× the median norm (33 of 160 000 default tokens held ~1/3 of the total squared norm).
  The mask is stored per row (``keep_mask``) so nothing is hidden.
- **Stop after L** (``mechlib.hooks.run_to_layer``): the layers above L and the unembedding never
  run. On a GPU the model runs in bf16 with SDPA attention, device→host copies go into pinned
  buffers with ``non_blocking=True`` (activations converted to the shard dtype and checked for
  NaN/inf on the device first) and background threads mask, write and hash shards
  (``mechlib.activations.shard_writer.ShardWriter``); ``compile=True`` (or ``"layers"``) compiles the
  layers up to L, ``compile="stack"`` the whole truncated stack as one graph
  (:mod:`mechlib.activations.forward`).
- **Held-out split**: every 10th corpus document goes to ``heldout``, the rest to ``train``, so the
  two splits never share a document yet come from the same distribution.
- **Resumable**: shards are a deterministic function of the parameters; a rerun verifies and
  skips finished shards (a corrupt one raises, naming the file) and computes only the rest
  (the bookkeeping: :mod:`mechlib.activations.resume`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from mechlib.activations.corpus import CorpusSpec
from mechlib.activations.forward import LayerForward, layer_forward
from mechlib.activations.packing import (
    HELDOUT_EVERY,
    SPLITS,
    PackedBatch,
    Packer,
    Row,
    batch_rows,
    packed_rows,
    rows_with_quota,
    split_docs,
)
from mechlib.activations.resume import (
    collection_identity,
    drop_if_changed,
    finish_manifest,
    finished_shards,
    params_hash,
)
from mechlib.activations.shard_writer import ShardWriter
from mechlib.activations.shards import (
    MANIFEST,
    ActivationStore,
    Manifest,
    ShardEntry,
    rank_manifest_name,
    verify_shard,
)
from mechlib.models import check_layer

if TYPE_CHECKING:  # transformers is heavy; annotations only
    from transformers import PreTrainedTokenizerBase as Tokenizer

__all__ = [  # the packing names are re-exported: callers have always found them here
    "HELDOUT_EVERY",
    "SPLITS",
    "ActivationStore",
    "PackedBatch",
    "Packer",
    "Row",
    "batch_rows",
    "collect_activations",
    "collection_identity",
    "packed_rows",
    "params_hash",
    "rows_with_quota",
    "split_docs",
    "stream_activations",
    "stream_batches",
]


def _prepare(model: nn.Module, layer: int, compile: bool | str) -> tuple[torch.device, LayerForward]:
    """The model's device and its forward to ``layer`` (see :mod:`mechlib.activations.forward` for the modes)."""
    check_layer(model, layer)
    return next(model.parameters()).device, layer_forward(model, layer, compile)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host→device without a host sync on CUDA (pinned source, non_blocking); a no-op on CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class StreamBatch:
    acts: torch.Tensor  # [n_kept, d] on the model's device, model dtype
    token_ids: torch.Tensor  # [n_kept] CPU


def stream_activations(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    layer: int,
    n_tokens: int,
    seq_len: int = 128,
    batch_size: int = 16,
    corpus: CorpusSpec | str = CorpusSpec(),
    split: str = "train",
    exclude_special_tokens: bool = True,
    exclude_first_positions: int = 2,
    compile: bool | str = False,
) -> Iterator[StreamBatch]:
    """Yield kept-token activations batch by batch, never touching disk (for 1 B-token runs).

    ``compile``: ``False`` (eager), ``True``/``"layers"`` or ``"stack"`` (:mod:`mechlib.activations.forward`).
    """
    device, forward = _prepare(model, layer, compile)
    _, rows = packed_rows(
        tokenizer, n_tokens, seq_len, CorpusSpec.of(corpus), split, exclude_special_tokens, exclude_first_positions
    )
    yield from stream_batches(forward, batch_rows(rows, batch_size), device)


def stream_batches(
    forward: LayerForward, batches: Iterable[PackedBatch], device: torch.device
) -> Iterator[StreamBatch]:
    """Run ``forward`` on each batch and keep its kept tokens, on the device, without a host sync.

    The keep mask's indices are found on the CPU and sent pinned/non_blocking, so nothing here
    waits for the GPU: the next batch is packed while this one computes (a boolean mask index on
    the GPU would sync on every batch to learn its output size).
    """
    for pb in batches:
        with torch.no_grad():
            h = forward(_to_device(pb.ids, device))
        idx = pb.keep.reshape(-1).nonzero().squeeze(1)
        acts = h.reshape(-1, h.shape[-1]).index_select(0, _to_device(idx, device))
        yield StreamBatch(acts, pb.ids.reshape(-1)[idx])


class _HostBuffers:
    """Pinned host buffers for overlapped device→host copies on CUDA; a pass-through on CPU."""

    def __init__(self, device: torch.device, n_buffers: int = 3):
        self.device = device
        self.n_buffers = n_buffers
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._lock = threading.Condition()
        # Copies run on a side stream so the next batch's compute is not queued behind them.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, h: torch.Tensor, flags: torch.Tensor, check: Callable[[], None] = lambda: None):
        """Start copying ``h`` (and its small ``flags``) to pinned memory: ``(host, host_flags, event, release)``.

        ``check`` re-raises a writer-thread error while waiting for a free buffer.
        """
        if self.device.type != "cuda":
            return h, flags, None, None
        with self._lock:
            while True:
                fits = [
                    b
                    for b in self._free
                    if b.shape[1:] == h.shape[1:] and b.shape[0] >= h.shape[0] and b.dtype == h.dtype
                ]
                if fits:
                    buf = fits[0]
                    self._free.remove(buf)
                    break
                if self._made < self.n_buffers:
                    buf = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
                    self._made += 1
                    break
                self._lock.wait(timeout=0.5)  # the writer thread still reads every buffer: backpressure
                check()  # a dead writer never releases its buffers
        host = buf[: h.shape[0]]
        host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)  # small: the caching host allocator
        assert self.stream is not None  # made on CUDA, the only device that gets here
        self.stream.wait_stream(torch.cuda.current_stream(h.device))  # h is complete before copying
        with torch.cuda.stream(self.stream):
            host.copy_(h, non_blocking=True)
            host_flags.copy_(flags, non_blocking=True)
            h.record_stream(self.stream)  # the allocator must not reuse h's memory until the copy is done
            flags.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)

        def release(buf=buf):
            with self._lock:
                self._free.append(buf)
                self._lock.notify()

        return host, host_flags, event, release


@dataclass
class CollectRun:
    manifest: Manifest
    computed_tokens: int  # tokens run through the model in this call (0 when everything was on disk)
    seconds: float


def collect_activations(
    model: nn.Module,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    layer: int,
    n_tokens: int,
    seq_len: int = 128,
    batch_size: int = 16,
    shard_tokens: int = 65_536,
    corpus: CorpusSpec | str = CorpusSpec(),
    split: str = "train",
    exclude_special_tokens: bool = True,
    exclude_first_positions: int = 2,
    dtype: str = "float32",
    model_name: str = "",
    compile: bool | str = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    sync: Callable[[], None] | None = None,
) -> CollectRun:
    """Collect ``n_tokens`` kept-token activations of ``split`` into shards + ``manifest.json``.

    A rerun with the same parameters verifies and skips finished shards (resume); changed
    parameters (other than ``n_tokens``) start over. Returns a :class:`CollectRun`: the final manifest,
    the tokens computed in this call and the seconds it took.
    Data parallel (``world_size > 1``, see :mod:`mechlib.scale`): this process computes only the
    shards with ``index % world_size == rank`` and lists them in ``manifest.rank<rank>.json``;
    rank 0 merges those into ``manifest.json`` (the same file one process writes). Only rank 0
    deletes stale files, then ``sync`` (a barrier) lets the other ranks start computing.

    ``compile``: ``False`` (eager), ``True``/``"layers"`` or ``"stack"`` (:mod:`mechlib.activations.forward`).
    Steps: identity and hash → drop what other settings wrote → gather finished shards →
    compute the missing ones (:func:`_write_shards`) → trim and write the manifest.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in out_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink()
    device, forward = _prepare(model, layer, compile)
    spec = CorpusSpec.of(corpus)
    rows_per_shard = max(1, shard_tokens // seq_len)
    identity = collection_identity(
        model,
        model_name=model_name,
        layer=layer,
        dtype=dtype,
        seq_len=seq_len,
        rows_per_shard=rows_per_shard,
        corpus=spec,
        split=split,
        exclude_special_tokens=exclude_special_tokens,
        exclude_first_positions=exclude_first_positions,
    )
    phash = params_hash(identity)
    old = drop_if_changed(out_dir, phash, rank == 0)
    if sync is not None:
        sync()
    done = finished_shards(out_dir, old, phash)
    packer, rows = packed_rows(
        tokenizer, n_tokens, seq_len, spec, split, exclude_special_tokens, exclude_first_positions
    )
    manifest = {
        **identity,
        "params_hash": phash,
        "n_tokens_requested": n_tokens,
        "complete": False,
        "special_token_ids": packer.special_ids,
        "start_token_id": packer.start_id,
        "separator_token_id": packer.sep_id,
        "n_tokens": 0,
        "shards": sorted(done.values(), key=lambda e: e["index"]),
    }
    manifest_name = MANIFEST if world_size == 1 else rank_manifest_name(rank)
    writer = ShardWriter(out_dir, manifest, dtype, manifest_name=manifest_name)
    bar = tqdm(total=n_tokens, unit="tok", desc=f"collect {split} L{layer}", disable=not progress)
    plan = _ShardPlan(out_dir, done, rows_per_shard, batch_size, rank, world_size)
    try:
        n_shards, n_rows, computed = _write_shards(forward, device, rows, plan, writer, bar)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.close()
    finish_manifest(out_dir, manifest, manifest_name, n_shards, n_rows, n_tokens, world_size)
    return CollectRun(manifest, computed, time.perf_counter() - t0)


@dataclass(frozen=True)
class _ShardPlan:
    """Which shards this process writes and which it only verifies (finished) or leaves to another rank."""

    out_dir: Path
    done: dict[int, ShardEntry]
    rows_per_shard: int
    batch_size: int
    rank: int
    world_size: int


def _write_shards(
    forward: LayerForward,
    device: torch.device,
    rows: Iterator[Row],
    plan: _ShardPlan,
    writer: ShardWriter,
    bar: tqdm,
) -> tuple[int, int, int]:
    """The write loop: ``(shards seen, rows seen, tokens computed)``; finished shards are verified, not recomputed."""
    buffers = _HostBuffers(device)
    index = first_row = computed = 0
    while shard_rows := list(itertools.islice(rows, plan.rows_per_shard)):
        kept = sum(int(r[1].sum()) for r in shard_rows)
        e = plan.done.get(index)
        if e and not (plan.out_dir / e["file"]).exists():
            e = None  # deleted by the user (e.g. after a checksum error): recollect it
        mine = index % plan.world_size == plan.rank
        if e and (e["first_row"], e["n_rows"], e["n_tokens"]) == (first_row, len(shard_rows), kept):
            if mine:
                verify_shard(plan.out_dir, e)  # finished earlier: trust it only if its checksum matches
        elif not mine:
            pass  # another rank computes this shard
        else:
            for pb in batch_rows(shard_rows, plan.batch_size, first_row):
                with torch.no_grad():
                    # converted and checked where it was computed: on a GPU the NaN/inf check costs
                    # microseconds there and is the slowest step of a shard on the host
                    h = forward(_to_device(pb.ids, device)).to(writer.dtype)
                    finite = torch.isfinite(h).all(dim=-1)
                host, flags, event, release = buffers.to_host(h, finite, check=writer._check)
                writer.add_batch(host, pb.keep, pb.ids, pb.doc, pb.first_row, event, release, finite=flags)
                computed += int(pb.keep.sum())
                bar.update(int(pb.keep.sum()))
            writer.end_shard(index, first_row, len(shard_rows))
            kept = 0
        bar.update(kept)
        first_row += len(shard_rows)
        index += 1
    return index, first_row, computed
