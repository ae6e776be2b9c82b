"""The book's collection settings, from its params, in one place: chapters and ``mechlib.scale`` alike.

Why: ``python -m mechlib.scale collect`` once built its own argument list and forgot
``exclude_first_positions`` (always 2), so the torchrun path wrote other tokens than chapter 01.
Now :func:`collect_config_from_params` is the only reader of the collection params; chapter 01,
chapter 02 (what it trains on, also in ``collect_mode: stream``) and ``mechlib.scale`` all pass
its :class:`CollectConfig` to :func:`collect_split` / :func:`open_train_store`, so they cannot
diverge. A test compares the manifests both paths write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from mechlib.activations.collect import (
    SPLITS,
    CollectRun,
    Row,
    batch_rows,
    collect_activations,
    collection_identity,
    packed_rows,
    params_hash,
    stream_batches,
)
from mechlib.activations.corpus import CorpusSpec
from mechlib.activations.forward import layer_forward
from mechlib.activations.shards import ActivationStore, Manifest
from mechlib.activations.stores import ActivationSource, StreamStore
from mechlib.models import LoadedModel, load_model
from mechlib.params import BookParams
from mechlib.paths import RunPaths

# CollectConfig field → the BookParams key it is read from (a chapter that builds a config declares them all).
PARAM_KEYS: dict[str, str] = {
    "layer": "layer",
    "seq_len": "seq_len",
    "batch_size": "collect_batch_size",
    "shard_tokens": "shard_tokens",
    "corpus": "corpus",
    "corpus_config": "corpus_config",
    "corpus_split": "corpus_split",
    "corpus_text_field": "corpus_text_field",
    "exclude_special_tokens": "exclude_special_tokens",
    "exclude_first_positions": "exclude_first_positions",
    "dtype": "activation_dtype",
    "train_tokens": "collect_tokens",
    "heldout_tokens": "heldout_tokens",
    "mode": "collect_mode",
}


@dataclass(frozen=True)
class CollectConfig:
    """Which activations the book collects: the layer, the corpus and its packing, exclusions, sizes."""

    layer: int
    seq_len: int
    batch_size: int
    shard_tokens: int
    corpus: str
    corpus_config: str | None
    corpus_split: str
    corpus_text_field: str
    exclude_special_tokens: bool
    exclude_first_positions: int
    dtype: Literal["float32", "bfloat16"]  # on-disk activation dtype
    train_tokens: int
    heldout_tokens: int
    mode: Literal["disk", "stream"]

    @property
    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(self.corpus, self.corpus_config, self.corpus_split, self.corpus_text_field)

    @property
    def splits(self) -> tuple[tuple[str, int], ...]:
        """``(split, tokens)`` to collect on disk: ``train`` only in ``disk`` mode, then ``heldout``."""
        return ((("train", self.train_tokens),) if self.mode == "disk" else ()) + (("heldout", self.heldout_tokens),)

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)

    def identity(self, loaded: LoadedModel, split: str) -> Manifest:
        """The manifest identity a collection of ``split`` with ``loaded`` has."""
        return collection_identity(
            loaded.model,
            model_name=loaded.name,
            layer=self.layer,
            dtype=self.dtype,
            seq_len=self.seq_len,
            rows_per_shard=self.rows_per_shard,
            corpus=self.corpus_spec,
            split=split,
            exclude_special_tokens=self.exclude_special_tokens,
            exclude_first_positions=self.exclude_first_positions,
        )

    def stream_manifest(self, loaded: LoadedModel) -> Manifest:
        """What a ``collect_mode: stream`` store reports: the train split's identity and its hash."""
        identity = self.identity(loaded, "train")
        return {**identity, "params_hash": params_hash(identity)}


def collect_config_from_params(P: BookParams) -> CollectConfig:
    """The one place the collection params are read."""
    return CollectConfig(**{field: getattr(P, key) for field, key in PARAM_KEYS.items()})


def collect_split(
    loaded: LoadedModel,
    cfg: CollectConfig,
    out_dir: str | Path,
    split: str,
    *,
    progress: bool = True,
    compile: bool = False,
    rank: int = 0,
    world_size: int = 1,
    sync: Callable[[], None] | None = None,
) -> CollectRun:
    """Collect ``split`` as ``cfg`` says into ``out_dir`` (chapter 01 and ``mechlib.scale collect``)."""
    tokens = dict(cfg.splits).get(split)
    if tokens is None:
        raise ValueError(
            f"split must be one of {[s for s, _ in cfg.splits]} in collect_mode {cfg.mode!r}, got {split!r}"
        )
    return collect_activations(
        loaded.model,
        loaded.tokenizer,
        out_dir,
        layer=cfg.layer,
        n_tokens=tokens,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        shard_tokens=cfg.shard_tokens,
        corpus=cfg.corpus_spec,
        split=split,
        exclude_special_tokens=cfg.exclude_special_tokens,
        exclude_first_positions=cfg.exclude_first_positions,
        dtype=cfg.dtype,
        model_name=loaded.name,
        compile=compile,
        progress=progress,
        rank=rank,
        world_size=world_size,
        sync=sync,
    )


@dataclass
class CollectResult:
    train: ActivationStore | None  # None in collect_mode "stream" (chapter 02 streams instead)
    heldout: ActivationStore
    runs: dict[str, CollectRun]

    @property
    def computed_tokens(self) -> int:
        return sum(r.computed_tokens for r in self.runs.values())

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs.values())


def collect_for_book(
    loaded: LoadedModel, params: BookParams, run_paths: RunPaths, progress: bool = True, compile: bool = False
) -> CollectResult:
    """Chapter 01: collect the ``train`` and ``heldout`` splits for the book's parameters.

    Activations land in ``run_paths.activations / "train"`` and ``/ "heldout"``.
    """
    cfg = collect_config_from_params(params)
    runs = {
        split: collect_split(loaded, cfg, run_paths.activations / split, split, progress=progress, compile=compile)
        for split, _ in cfg.splits
    }
    train = ActivationStore(run_paths.activations / "train") if "train" in runs else None
    return CollectResult(train, ActivationStore(run_paths.activations / "heldout"), runs)


def open_store(params: BookParams, run_paths: RunPaths, split: str = "train") -> ActivationStore:
    """The finished ``split`` collection of a run (``run_paths.activations / split``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return ActivationStore(run_paths.activations / split)


def open_train_store(P: BookParams, run_paths: RunPaths, device: str) -> ActivationSource:
    """What chapter 02 (and ``mechlib.scale train``) trains on: chapter 01's ``train`` shards, or
    (``collect_mode: stream``) the model run inside the loop. Streaming under torchrun runs the model
    for the whole global batch on every rank (only the SAE step is split), so prefer ``disk`` there."""
    if P.collect_mode == "stream":
        return stream_store_for_book(load_model(P.model, P.model_dtype, device), P)
    return open_store(P, run_paths, "train")


def stream_store_for_book(loaded: LoadedModel, P: BookParams, shuffle_batches: int = 16) -> StreamStore:
    """The ``train`` split of the book's corpus as a :class:`StreamStore` (``collect_mode: stream``).

    Rows are packed exactly as chapter 01 packs them — the same :class:`CollectConfig`
    (``exclude_first_positions`` included); skipped rows are only tokenised, never run through the
    model. The manifest carries the collection's identity and hash, so a change of settings changes
    the SAE's provenance (:mod:`mechlib.activations.provenance`).
    """
    cfg = collect_config_from_params(P)
    model = loaded.model
    device = next(model.parameters()).device

    def rows_after(skip: int) -> Iterator[Row]:
        _, rows = packed_rows(
            loaded.tokenizer,
            cfg.train_tokens,
            cfg.seq_len,
            cfg.corpus_spec,
            "train",
            cfg.exclude_special_tokens,
            cfg.exclude_first_positions,
        )
        got = 0
        for ids, keep, doc in rows:
            n = int(keep.sum())
            if got + n <= skip:
                got += n
                continue
            if got < skip:  # the row straddling the skip point: drop its first (skip - got) kept tokens
                keep = keep & (keep.cumsum(0) > skip - got)
            got += n
            yield ids, keep, doc

    forward = layer_forward(model, cfg.layer)  # eager, the hooked stop: as chapter 01 collects

    def epoch_stream(skip: int) -> Iterator[Tensor]:
        # stream_batches keeps the kept tokens without a host sync per batch (a boolean mask index would)
        for b in stream_batches(forward, batch_rows(rows_after(skip), cfg.batch_size), device):
            yield b.acts.float()

    return StreamStore(
        epoch_stream, cfg.train_tokens, loaded.d_model, cfg.stream_manifest(loaded), shuffle_batches=shuffle_batches
    )
