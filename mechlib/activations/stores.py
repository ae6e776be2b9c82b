"""What SAE training reads: the :class:`ActivationSource` contract and two sources besides the disk.

:class:`ActivationSource` is the contract (a ``Protocol``): ``d_model``, ``n_tokens``, ``manifest``
and ``iter_batches(batch_size, shuffle, seed, start_batch, n_batches)``, where batch ``b`` is a pure
function of ``(seed, b)``. The on-disk :class:`mechlib.activations.shards.ActivationStore` and the
two classes here implement it, so :func:`mechlib.sae.train.train_sae` cannot tell them apart and
resumes on exactly the batch it stopped at.

- :class:`TensorStore`: activations already in memory (notebook experiments, tests).
- :class:`StreamStore`: ``collect_mode: stream`` — the model runs inside the training loop and no
  activation touches the disk (the study's 1 B tokens would be ~5 TB in bf16). Order: the packed
  corpus stream, shuffled inside chunks of ``shuffle_batches`` batches; epochs repeat the stream.
  Resuming skips whole rows *without running the model* (only tokenising), then recomputes at most
  one chunk, so a killed billion-token run does not pay its forward passes twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from mechlib.activations.shards import Manifest


class ActivationSource(Protocol):
    """Activation vectors of one layer, read in seeded batches (what SAE training and evaluation read).

    - ``d_model``, ``n_tokens``: the width of a vector and the number of vectors in one epoch.
    - ``manifest``: at least ``model``, ``layer``, ``params_hash`` and ``shards`` (each with
      ``sha256``): :func:`mechlib.activations.provenance.fingerprint_of_store` digests it.
    - ``iter_batches``: ``n_batches=None`` is one pass (the last batch may be smaller); otherwise
      batches ``start_batch .. n_batches - 1`` of the endless epoch cycle, each epoch with its own
      shuffle; batch ``b`` is the same whether or not a run was interrupted before it.
    """

    manifest: Manifest

    @property
    def d_model(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        start_batch: int = 0,
        n_batches: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Tensor]: ...


class TensorStore:
    """An in-memory stand-in for ``ActivationStore`` (same batch semantics).

    Epoch ``e`` is a permutation seeded by ``seed * 1_000_003 + e``; batch ``b`` is the same
    whether or not a run was interrupted before it.
    """

    def __init__(self, x: Tensor, model: str | None = None, layer: int | None = None) -> None:
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"TensorStore needs a non-empty [n_tokens, d_model] tensor, got shape {tuple(x.shape)}")
        self.x = x
        # The tensor's bytes stand in for shard checksums: other data, other fingerprint (see provenance).
        raw = x.detach().cpu().contiguous().view(torch.uint8).numpy()
        digest = hashlib.sha256(memoryview(raw)).hexdigest()  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ for Python >= 3.12 only
        self.manifest = {
            "model": model,
            "layer": layer,
            "d_model": int(x.shape[1]),
            "n_tokens": int(x.shape[0]),
            "params_hash": f"in-memory {x.dtype}",
            "shards": [{"index": 0, "sha256": digest}],
        }
        self._order_key: tuple[int, int, bool] | None = None
        self._order_cache = torch.arange(0)

    @property
    def d_model(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])

    def load_all(self, max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.x[:max_tokens].to(dtype)

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        start_batch: int = 0,
        n_batches: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Tensor]:
        n = self.n_tokens
        if n_batches is None:  # one pass, last batch possibly smaller
            order = self._order(0, seed, shuffle)
            for b in range(start_batch, -(-n // batch_size)):
                yield self.x[order[b * batch_size : (b + 1) * batch_size]].to(dtype)
            return
        for b in range(start_batch, n_batches):
            epoch, off = divmod(b * batch_size, n)
            parts, need = [], batch_size
            while need:
                take = self._order(epoch, seed, shuffle)[off : off + need]
                parts.append(take)
                need -= take.numel()
                epoch, off = epoch + 1, 0
            yield self.x[torch.cat(parts)].to(dtype)

    def _order(self, epoch: int, seed: int, shuffle: bool) -> Tensor:
        key = (epoch, seed, shuffle)
        if self._order_key != key:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._order_key = key
            self._order_cache = torch.randperm(self.n_tokens, generator=g) if shuffle else torch.arange(self.n_tokens)
        return self._order_cache


# A function that yields the activations of one epoch from kept-token offset ``skip`` on.
EpochStream = Callable[[int], Iterator[Tensor]]


class StreamStore:
    """Activations computed on the fly, one epoch = ``n_tokens`` kept tokens of the packed corpus."""

    def __init__(
        self, epoch_stream: EpochStream, n_tokens: int, d_model: int, manifest: Manifest, shuffle_batches: int = 16
    ) -> None:
        self.epoch_stream = epoch_stream
        self._n, self._d = int(n_tokens), int(d_model)
        self.manifest = {**manifest, "d_model": self._d, "n_tokens": self._n, "mode": "stream"}
        self.shuffle_batches = shuffle_batches

    @property
    def d_model(self) -> int:
        return self._d

    @property
    def n_tokens(self) -> int:
        return self._n

    def _tokens_from(self, start: int) -> Iterator[Tensor]:
        epoch, off = divmod(start, self._n)
        while True:
            yield from self.epoch_stream(off)
            epoch, off = epoch + 1, 0

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        start_batch: int = 0,
        n_batches: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Tensor]:
        """Batches of the endless stream (``n_batches=None``: the first epoch's full batches)."""
        end = n_batches if n_batches is not None else self._n // batch_size
        chunk = self.shuffle_batches * batch_size
        c = start_batch // self.shuffle_batches
        b = c * self.shuffle_batches
        src = self._tokens_from(c * chunk)
        buf: list[Tensor] = []
        have = 0
        while b < end:
            while have < chunk:
                t = next(src).float()
                buf.append(t)
                have += t.shape[0]
            x = torch.cat(buf)
            block, rest = x[:chunk], x[chunk:]
            buf, have = [rest], rest.shape[0]
            if shuffle:
                block = block[torch.randperm(chunk, generator=torch.Generator().manual_seed(seed * 1_000_003 + c))]
            for i in range(self.shuffle_batches):
                if start_batch <= b < end:
                    yield block[i * batch_size : (i + 1) * batch_size].to(dtype)
                b += 1
            c += 1
