"""The browser's data, as plain JSON-ready structures: the index of all latents and one record per latent page.

Why separate from the writer: what a page shows (which contexts, which quantile examples, rounding)
is a decision about reading an SAE; where and how files land is another. Token ids are turned into
strings here, once per page (``vocab``), so a page file is self-contained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechlib.browser.effects import Neighbours, TokenEffects
from mechlib.browser.gather import HIST_LOG2_MIN, HIST_PER_OCTAVE, LatentStats, RunningTopK
from mechlib.prompts import token_label

if TYPE_CHECKING:  # transformers is a heavy import; only the type is needed here
    from mechlib.models import Tokenizer

INDEX_FORMAT = "mechbook-browser-index/1"


@dataclass
class IndexData:
    """Column-wise table of every latent (columns are lists of length ``d_sae``), plus run facts."""

    run: str
    model: str
    layer: int
    d_sae: int
    k: int
    n_tokens: int
    density: list[float]
    mean: list[float]
    max: list[float]
    top_tokens: list[list[str]]  # the commonest tokens at the latent's top activations, for search
    page: list[bool]
    contrast: list[float | None]
    contrast_rank: list[int | None]
    contrast_source: str | None = None
    special_ids: list[int] = field(default_factory=list)
    format: str = INDEX_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> IndexData:
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{where}: not a mechbook browser index (format {INDEX_FORMAT!r} expected)")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Decoder:
    """Token id → display string, decoded one id at a time: that is what the model saw as one token.
    A lone id of a multi-byte character would decode to U+FFFD; it shows its bytes instead (``<0xE6>``,
    :func:`mechlib.prompts.token_label`), so a logit effect or a context names the byte. Every id a page
    uses passes through here, so :meth:`vocab` is the site's one shared token table."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> None:
        missing = sorted({int(i) for i in ids if int(i) >= 0} - set(self.cache))
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing])
            self.cache.update((i, token_label(self.tokenizer, i, t)) for i, t in zip(missing, texts, strict=True))

    def vocab(self) -> dict[str, str]:
        return {str(i): s for i, s in sorted(self.cache.items())}


def _r(x: float, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _context(top: RunningTopK, f: int, j: int, before: int) -> dict[str, Any] | None:
    """One context window: ids and activations (``None`` where the collection excluded the token),
    cut to the row's extent; ``center`` is the index of the activating token."""
    if not math.isfinite(float(top.keys[f, j])):
        return None
    ids = top.ids[f, j].tolist()
    acts = top.window[f, j].float().tolist()  # NaN (excluded position) becomes None via _r
    lo = next(i for i, t in enumerate(ids) if t >= 0)
    hi = len(ids) - next(i for i, t in enumerate(reversed(ids)) if t >= 0)
    return {
        "act": _r(float(top.acts[f, j])),
        "center": before - lo,
        "ids": ids[lo:hi],
        "acts": [_r(a, 2) for a in acts[lo:hi]],
    }


def top_contexts(stats: LatentStats, f: int) -> list[dict[str, Any]]:
    out = []
    for j in range(stats.top.k):
        c = _context(stats.top, f, j, stats.before)
        if c is not None:
            out.append(c)
    return out


def quantile_examples(stats: LatentStats, f: int, bands: int = 4, per_band: int = 2) -> list[dict[str, Any]]:
    """Examples from ``bands`` equal-count activation bands of the latent's sampled firings (lowest first)."""
    filled = [j for j in range(stats.sample.k) if math.isfinite(float(stats.sample.keys[f, j]))]
    if not filled:
        return []
    filled.sort(key=lambda j: float(stats.sample.acts[f, j]))
    n = len(filled)
    out = []
    for b in range(bands):
        lo, hi = (b * n) // bands, ((b + 1) * n) // bands
        if hi <= lo:
            continue
        picks = sorted({lo + (i * (hi - lo)) // per_band for i in range(min(per_band, hi - lo))})
        examples = [_context(stats.sample, f, filled[p], stats.before) for p in picks]
        out.append(
            {
                "label": f"{100 * b // bands}–{100 * (b + 1) // bands}th percentile",
                "lo": _r(float(stats.sample.acts[f, filled[lo]])),
                "hi": _r(float(stats.sample.acts[f, filled[hi - 1]])),
                "examples": examples,
            }
        )
    return out


def histogram(stats: LatentStats, f: int) -> dict[str, Any]:
    """The latent's activation histogram trimmed to its non-empty bins (log2 bin edges)."""
    counts = stats.hist[f]
    nz = counts.nonzero().squeeze(1)
    if nz.numel() == 0:
        return {"log2_edges": [], "counts": []}
    a, b = int(nz[0]), int(nz[-1]) + 1
    edges = [HIST_LOG2_MIN + i / HIST_PER_OCTAVE for i in range(a, b + 1)]
    return {"log2_edges": edges, "counts": counts[a:b].tolist()}


def top_tokens(stats: LatentStats, decode: Decoder, n: int = 3) -> list[list[str]]:
    """Per latent, the ``n`` commonest tokens at its top activations (for the index's column and search)."""
    centre = stats.top.ids[:, :, stats.before]  # [m, k]
    filled = torch.isfinite(stats.top.keys)
    decode(centre[filled].tolist())
    out = []
    for f in range(centre.shape[0]):
        ids = centre[f][filled[f]].tolist()
        out.append([decode.cache[i] for i, _ in Counter(ids).most_common(n)])
    return out


def latent_record(
    stats: LatentStats, f: int, row: int, effects: TokenEffects, near: Neighbours, has_page: Tensor, decode: Decoder
) -> dict[str, Any]:
    """Everything one latent's page shows; ``row`` is the latent's row in ``effects``/``near``.
    Token strings go to the shared table (``decode``), not into the record."""
    top = top_contexts(stats, f)
    quant = quantile_examples(stats, f)
    ids = [i for c in top for i in c["ids"]] + [i for q in quant for c in q["examples"] for i in c["ids"]]
    ids += effects.promoted_ids[row].tolist() + effects.suppressed_ids[row].tolist()
    decode(ids)
    count = int(stats.counts[f])
    return {
        "id": f,
        "count": count,
        "density": _r(count / max(stats.n_tokens, 1), 6),
        "mean": _r(float(stats.mean_activation[f])),
        "max": _r(float(stats.top.acts[f, 0])) if count else 0.0,
        "n_tokens": stats.n_tokens,
        "top": top,
        "quantiles": quant,
        "hist": histogram(stats, f),
        "promoted": [[i, _r(v, 3)] for i, v in zip(effects.promoted_ids[row].tolist(), effects.promoted[row].tolist())],
        "suppressed": [
            [i, _r(v, 3)] for i, v in zip(effects.suppressed_ids[row].tolist(), effects.suppressed[row].tolist())
        ],
        "similar": [
            [i, _r(c, 3), bool(has_page[i])] for i, c in zip(near.ids[row].tolist(), near.cosine[row].tolist())
        ],
    }
