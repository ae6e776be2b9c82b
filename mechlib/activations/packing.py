"""Packing: a corpus split into rows of exactly ``seq_len`` token ids, with the mask of kept positions.

Why packing (and not one document per row, as the study does): documents are concatenated
(separated by EOS) and cut into full rows, each starting with BOS, so no position is padding and
every computed token can be kept. What is *not* kept — special tokens (their residual norms are many
times larger and dominate SAE training) and the first ``exclude_first_positions`` of each row (the
BOS attention sink, and SmolLM2's occasional second sink at position 1) — is a per-row
``keep_mask``, stored with the shards, so nothing is hidden. Every 10th corpus document is held out.
Collection to disk and streaming (:mod:`mechlib.activations.collect`) read the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mechlib.activations.corpus import CorpusError, CorpusSpec

if TYPE_CHECKING:  # transformers is heavy; annotations only
    from transformers import PreTrainedTokenizerBase as Tokenizer

__all__ = [
    "HELDOUT_EVERY",
    "SPLITS",
    "PackedBatch",
    "Packer",
    "Row",
    "batch_rows",
    "packed_rows",
    "rows_with_quota",
    "split_docs",
]

HELDOUT_EVERY = 10  # document i is held out iff i % 10 == 9
SPLITS = ("train", "heldout")


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [B, T] int64
    keep: torch.Tensor  # [B, T] bool — False for special tokens and tokens past the quota
    doc: torch.Tensor  # [B, T] int64 — corpus document index, -1 for the row-start token
    first_row: int  # global index of the first row


class Packer:
    """Turns documents into full rows of ``seq_len`` token ids: ``[BOS] tok tok … EOS tok …``."""

    def __init__(
        self, tokenizer: Tokenizer, seq_len: int, exclude_special_tokens: bool = True, exclude_first_positions: int = 2
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if not 0 <= exclude_first_positions < seq_len:
            raise ValueError(f"exclude_first_positions must be in 0..{seq_len - 1}, got {exclude_first_positions}")
        self.exclude_first_positions = exclude_first_positions
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.sep_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids |= {i for i in (self.start_id, self.sep_id, tokenizer.pad_token_id) if i is not None}
        self.special_ids = sorted(ids) if exclude_special_tokens else []
        self._special = torch.tensor(self.special_ids, dtype=torch.long)

    def rows(self, docs: Iterable[tuple[int, str]]) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (ids, doc indices) for each full row; a final partial row is dropped."""
        body = self.seq_len - (self.start_id is not None)
        buf_ids: list[int] = []
        buf_doc: list[int] = []
        for doc_index, text in docs:
            toks = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if self.sep_id is not None:
                toks = [*toks, self.sep_id]
            buf_ids.extend(toks)
            buf_doc.extend([doc_index] * len(toks))
            while len(buf_ids) >= body:
                ids, doc = buf_ids[:body], buf_doc[:body]
                del buf_ids[:body], buf_doc[:body]
                if self.start_id is not None:
                    ids, doc = [self.start_id, *ids], [-1, *doc]
                yield ids, doc

    def keep_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """False for special tokens and for the first ``exclude_first_positions`` positions of a row."""
        keep = torch.ones_like(ids, dtype=torch.bool) if not len(self.special_ids) else ~torch.isin(ids, self._special)
        keep[..., : self.exclude_first_positions] = False
        return keep


def split_docs(texts: Iterable[str], split: str) -> Iterator[tuple[int, str]]:
    """(document index, text) of the documents that belong to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for i, text in enumerate(texts):
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout"):
            yield i, text


Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids [T], keep [T], doc [T]


def rows_with_quota(rows: Iterator[tuple[list[int], list[int]]], packer: Packer, n_tokens: int) -> Iterator[Row]:
    """Rows until ``n_tokens`` kept tokens in total; kept tokens past the quota are masked off."""
    got = 0
    rows = iter(rows)
    while got < n_tokens:
        try:
            ids, doc = next(rows)
        except StopIteration:
            raise CorpusError(
                f"the corpus ran out after {got} of {n_tokens} requested tokens; "
                f"lower the token count or use a larger corpus"
            ) from None
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = packer.keep_mask(ids_t)
        room = n_tokens - got
        if int(keep.sum()) > room:
            keep &= keep.cumsum(0) <= room
        got += int(keep.sum())
        yield ids_t, keep, torch.tensor(doc, dtype=torch.long)


def _stack(chunk: list[Row], first_row: int) -> PackedBatch:
    ids, keep, doc = (torch.stack(x) for x in zip(*chunk))
    return PackedBatch(ids, keep, doc, first_row)


def batch_rows(rows: Iterable[Row], batch_size: int, first_row: int = 0) -> Iterator[PackedBatch]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield _stack(chunk, first_row)
            first_row += len(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk, first_row)


def packed_rows(
    tokenizer: Tokenizer,
    n_tokens: int,
    seq_len: int,
    corpus: CorpusSpec,
    split: str,
    exclude_special_tokens: bool,
    exclude_first_positions: int = 2,
) -> tuple[Packer, Iterator[Row]]:
    """The packer and its rows of ``split`` until ``n_tokens`` kept tokens (collection and streaming alike)."""
    packer = Packer(tokenizer, seq_len, exclude_special_tokens, exclude_first_positions)
    return packer, rows_with_quota(packer.rows(split_docs(corpus.texts(), split)), packer, n_tokens)
