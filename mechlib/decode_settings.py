"""What a batch of :mod:`mechlib.generate` is decoded with: EOS and pad ids, left padding, the bundled settings.

Why a module of its own: these are the decode loop's *inputs* — what ``generate`` would stop on and
pad with, how prompts are laid out, which cache and compile path a device gets, where a finished row
is cut — and callers that only prepare prompts (:mod:`mechlib.layer_states`, :mod:`mechlib.greedy_check`)
need them without the loop. They depend on nothing of the loop's; :mod:`mechlib.generate` imports
them and re-exports their names, where callers have always found them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mechlib.graph_decode import GRAPH_MODES, GraphMode
from mechlib.models import CausalLM, Tokenizer
from mechlib.stopping import StopWhen, mark_stopped, shortest_stopping_prefix

CacheKind = Literal["auto", "dynamic", "static"]
ResolvedCache = Literal["dynamic", "static"]
# off / on with the defaults / torch.compile keyword arguments / a captured CUDA graph (mechlib.graph_decode)
CompileOption = bool | Mapping[str, object] | GraphMode


class GenerationError(ValueError):
    """Generation settings that cannot work; the message says which."""


def eos_ids_of(model: CausalLM, tokenizer: Tokenizer | None = None) -> list[int]:
    """The EOS ids ``generate`` would stop on: ``generation_config.eos_token_id`` (int or list),
    else the tokenizer's ``eos_token_id``."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def pad_id_of(model: CausalLM, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> int:
    """The pad id ``generate`` would use (its fallback is the first EOS id)."""
    for src in (getattr(model, "generation_config", None), tokenizer):
        pid = getattr(src, "pad_token_id", None)
        if pid is not None:
            return int(pid)
    if eos_ids:
        return int(eos_ids[0])
    raise GenerationError("the model/tokenizer define neither a pad token nor an EOS token; pass pad_token_id")


def left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every prompt right-aligned (left padding)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise GenerationError("every prompt must have at least one token")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def resolve_cache(cache: CacheKind, device: torch.device) -> ResolvedCache:
    if cache == "auto":
        return "static" if device.type == "cuda" else "dynamic"
    return cache


def default_compile(device: torch.device, cache: ResolvedCache) -> CompileOption:
    """What ``compile=None`` means — the one place chapters 04 and 06 (records, steering sweeps and
    controls all pass None) get their decode path: on CUDA with the static cache, the captured
    CUDA-graph step (``"graph"``, :mod:`mechlib.graph_decode`; issue 11); elsewhere uncompiled."""
    return "graph" if device.type == "cuda" and cache == "static" else False


@dataclass(frozen=True)
class DecodeSettings:
    """How a batch is decoded: the bundle :func:`mechlib.generate.generate_ids` hands to every batch it runs.

    ``cache`` is resolved (never ``"auto"``); ``sync_every``: how many steps between host syncs (EOS,
    stop rule, dropping finished rows); ``share_prefix``: run the rows' common prompt prefix once
    (dynamic cache only; every hook must treat the rows alike — see :mod:`mechlib.generate`).
    """

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    ignore_eos: bool = False
    cache: ResolvedCache = "dynamic"
    compile: CompileOption = False
    sync_every: int = 1
    stop_when: StopWhen | None = None
    share_prefix: bool = False

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.cache not in ("dynamic", "static"):
            raise GenerationError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if isinstance(self.compile, str) and self.compile not in GRAPH_MODES:
            raise GenerationError(
                f"compile must be a bool, torch.compile kwargs or one of {GRAPH_MODES}, got {self.compile!r}"
            )

    @property
    def compiled(self) -> bool:
        """Whether the decode step is compiled or captured (only ever with the static cache)."""
        return bool(self.compile) and self.cache == "static"

    @property
    def graph(self) -> bool:
        """Whether the decode step is a replayed CUDA graph (:mod:`mechlib.graph_decode`)."""
        return isinstance(self.compile, str) and self.cache == "static"

    def mark_stopped(self, out: torch.Tensor, unfinished: torch.Tensor, upto: int) -> None:
        """Mark rows whose first ``upto`` tokens of ``out`` satisfy ``stop_when`` as finished (in place)."""
        if self.stop_when is not None:
            mark_stopped(out, unfinished, upto, self.stop_when)

    def cut(self, row: list[int]) -> list[int]:
        """A finished row's ids: cut before its first EOS, then after its shortest stopping prefix
        (a row stopped by the rule may run up to ``sync_every − 1`` tokens past it). Whole with ``ignore_eos``."""
        if self.ignore_eos:
            return row
        eos = set(self.eos_ids)
        row = row[: next((j for j, tok in enumerate(row) if tok in eos), len(row))]
        if self.stop_when is not None:
            row = row[: shortest_stopping_prefix(row, self.stop_when) or len(row)]
        return row
