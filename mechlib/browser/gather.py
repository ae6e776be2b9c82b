"""Per-latent statistics for the feature browser, gathered in ONE streaming pass over held-out shards.

Why one pass: at the study's size (32 768 latents, 1 M held-out tokens) the dense activation matrix
is 131 GB, and rereading the shards per statistic multiplies the cost. Each shard is encoded once
(sub-batches of ``batch_tokens``), its sparse codes kept for that shard only, and every statistic
is updated from them:

- firing count, activation sum and a log-binned histogram per latent (``bincount`` on the codes);
- the top-``contexts`` activations per latent: a running top-k (``RunningTopK``) merged with each
  batch's candidates in a few vectorised sorts; only candidates above a latent's current k-th value
  are considered, so after the first shards almost nothing is merged;
- a uniform random sample of each latent's firings (the same structure with uniform random keys:
  the entries holding the ``sample`` largest keys are a uniform sample without replacement), from which the
  browser shows examples at a few activation quantiles, not only the top.

A context (the window of token ids around the token, and the latent's activation at each of them)
is recorded when an entry enters a top list, while its shard's codes are at hand: contexts never
cross shards, since a shard holds whole packed rows.

Cost, measured on 2 CPU cores that other jobs were loading (load average 5–7), 2026-11-30:

- the default run (d_model 576, d_sae 4608, k 32, 16 384 held-out tokens): the pass 12–15 s, the whole
  site 23 s, 31 s with loading the SAE and the model (19 s of CPU time);
- ``benchmarks/browser_gather.py`` at d_model 576, d_sae 32 768, k 128, 32 768 tokens: 130 s, of which
  60 s the SAE encode and 70 s the bookkeeping, i.e. about 17 s per million firings (tokens × k).

Projection (not a measurement) for the study (1 M held-out tokens, d_model 2560, d_sae 32 768, k 128:
128 M firings). On these CPUs: the encode is 172 TFLOP, about 2 h at the 20 GFLOP/s measured above,
and the bookkeeping ~35 min — a GPU job. On one H100 the encode is ~1–2 s of matmul (at 100–200 TFLOP/s
TF32) plus top-k; the bookkeeping is a few sorts of ≤ 1 M elements per 4096-token batch, a shard-wide sort
of the 128 M firings (the context lookup) and the merges, which we expect to take seconds to tens of
seconds; memory is dominated by the shard (10 GB fp32 for 1 M × 2560) and its firing arrays (128 M
firings × ~64 bytes of indices, keys and sort orders: ~8 GB). Measure it
with ``python benchmarks/browser_gather.py --device cuda --tokens 1000000 --d-model 2560 --shard-tokens
1048576`` on a GPU before relying on it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# Histogram bins: quarter octaves from 2^-8 to 2^12 (scale free: no first pass to find each latent's range).
HIST_PER_OCTAVE = 4
HIST_LOG2_MIN = -8
HIST_LOG2_MAX = 12
N_HIST_BINS = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_PER_OCTAVE


def hist_edges() -> list[float]:
    """Bin edges of the activation histograms (the first and last bins also hold what falls outside)."""
    return [2.0 ** (HIST_LOG2_MIN + i / HIST_PER_OCTAVE) for i in range(N_HIST_BINS + 1)]


class ShardTokens(NamedTuple):
    """One shard's kept tokens and the packed rows they come from (see ``mechlib.activations.shards``)."""

    activations: Tensor  # [n, d] residual-stream vectors of the kept tokens
    row: Tensor  # [n] global packed-row index of each token
    position: Tensor  # [n] position of the token in its row
    context_ids: Tensor  # [rows, seq_len] token ids of the shard's rows
    first_row: int  # global index of context_ids[0]


def iter_store_shards(store) -> Iterator[ShardTokens]:
    """Shards of a ``mechlib.activations.ActivationStore``, one at a time (checksums verified by the store)."""
    for i, entry in enumerate(store.entries):
        sh = store.shard(i)
        yield ShardTokens(sh["activations"], sh["row"], sh["position"], sh["context_ids"], int(entry["first_row"]))


class RunningTopK:
    """The ``k`` entries with the largest keys per latent, each with its activation and context window.

    Ties keep the earlier token (tokens arrive in increasing global index), so the result equals a
    stable sort of all entries — what the brute-force oracle in the tests computes.
    """

    def __init__(self, n_latents: int, k: int, width: int, device: torch.device | str = "cpu"):
        self.k, self.width = int(k), int(width)
        self.keys = torch.full((n_latents, k), -math.inf, device=device)
        self.acts = torch.zeros((n_latents, k), device=device)
        self.tokens = torch.full((n_latents, k), -1, dtype=torch.long, device=device)
        self.ids = torch.full((n_latents, k, width), -1, dtype=torch.int32, device=device)
        self.window = torch.zeros((n_latents, k, width), dtype=torch.float16, device=device)

    def offer(
        self, lat: Tensor, key: Tensor, act: Tensor, token: Tensor, window_of: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> None:
        """Merge candidates (1-D, same length); ``window_of(i)`` gives the ids/activations of candidates ``i``."""
        ok = key > self.keys[lat, -1]
        if not bool(ok.any()):
            return
        cand = ok.nonzero().squeeze(1)
        lat, key, token = lat[cand], key[cand], token[cand]
        rows, new_per_row = torch.unique(lat, return_counts=True)  # sorted
        k = self.k
        n_old = rows.numel() * k
        all_lat = torch.cat([rows.repeat_interleave(k), lat])
        all_key = torch.cat([self.keys[rows].reshape(-1), key])
        all_tok = torch.cat([self.tokens[rows].reshape(-1), token])
        # lat ascending, then key descending, then token ascending: three stable sorts, last key first
        order = torch.argsort(all_tok, stable=True)
        order = order[torch.argsort(all_key[order], descending=True, stable=True)]
        order = order[torch.argsort(all_lat[order], stable=True)]
        group = torch.searchsorted(rows, all_lat[order])
        starts = torch.cumsum(new_per_row + k, 0) - (new_per_row + k)
        rank = torch.arange(order.numel(), device=order.device) - starts[group]
        keep = rank < k
        src, slot, grp = order[keep], rank[keep], group[keep]
        from_old = src < n_old
        lat_idx, old_flat = rows[grp], src.clamp(max=n_old - 1)
        old_r, old_s = rows[old_flat // k], old_flat % k
        keys = torch.where(from_old, self.keys[old_r, old_s], all_key[src])
        acts = self.acts[old_r, old_s].clone()
        toks = torch.where(from_old, self.tokens[old_r, old_s], all_tok[src])
        ids, window = self.ids[old_r, old_s].clone(), self.window[old_r, old_s].clone()
        new = (~from_old).nonzero().squeeze(1)
        if new.numel():
            chosen = cand[src[new] - n_old]
            acts[new] = act[chosen]
            ids[new], window[new] = window_of(chosen)
        self.keys[lat_idx, slot], self.acts[lat_idx, slot], self.tokens[lat_idx, slot] = keys, acts, toks
        self.ids[lat_idx, slot], self.window[lat_idx, slot] = ids, window


@dataclass
class LatentStats:
    """What the browser shows per latent, for all ``d_sae`` latents (tensors on the CPU)."""

    n_tokens: int
    counts: Tensor  # [m] tokens on which the latent fired (activation > 0)
    sums: Tensor  # [m] sum of its activations
    hist: Tensor  # [m, N_HIST_BINS] counts per log-spaced bin
    top: RunningTopK  # top activations with context windows
    sample: RunningTopK  # uniform sample of firings (keys are random) with context windows
    before: int  # window: tokens before the activating one
    after: int  # and after it
    seconds: float

    @property
    def density(self) -> Tensor:
        return self.counts.double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens where the latent fired (0 for latents that never fired)."""
        return self.sums.double() / self.counts.clamp(min=1).double()


class FiringLookup(NamedTuple):
    """A shard's firings sorted by ``token * d_sae + latent``: any (token, latent) activation by binary search,
    without the dense [n, d_sae] matrix (1 M tokens × 32 768 latents would be 131 GB)."""

    keys: Tensor  # sorted
    acts: Tensor
    d_sae: int

    def __call__(self, token: Tensor, latent: Tensor) -> Tensor:
        q = token * self.d_sae + latent
        at = torch.searchsorted(self.keys, q).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == q, self.acts[at], torch.zeros((), dtype=self.acts.dtype, device=q.device))


def _windows(
    lookup: FiringLookup,
    kept_index: Tensor,
    ctx: Tensor,
    rows: Tensor,
    pos: Tensor,
    lat: Tensor,
    before: int,
    after: int,
) -> tuple[Tensor, Tensor]:
    """Token ids and the latent's activation at positions ``pos - before … pos + after`` of each row.

    Positions outside the row get id -1; positions the collection excluded (BOS, special tokens) get
    their id and activation NaN, so the page can show them greyed out.
    """
    offsets = torch.arange(-before, after + 1, device=pos.device)
    q = pos[:, None] + offsets[None]  # [C, W]
    inside = (q >= 0) & (q < ctx.shape[1])
    qc = q.clamp(0, ctx.shape[1] - 1)
    ids = torch.where(inside, ctx[rows[:, None], qc], -1).to(torch.int32)
    u = kept_index[rows[:, None], qc]  # [C, W] local token index, -1 where excluded
    act = lookup(u.clamp(min=0), lat[:, None].expand_as(u))
    act = torch.where(inside & (u >= 0), act, math.nan)
    return ids, act.to(torch.float16)


@torch.no_grad()
def gather_latent_stats(
    sae,
    shards: Iterable[ShardTokens],
    *,
    contexts: int = 10,
    sample: int = 32,
    before: int = 12,
    after: int = 4,
    batch_tokens: int = 8192,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> LatentStats:
    """One pass over ``shards``: counts, sums, histograms, top contexts and a firing sample per latent."""
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    m, width = sae.d_sae, before + after + 1
    if contexts < 1 or sample < 1 or before < 0 or after < 0:
        raise ValueError(
            f"browser gather: need contexts >= 1, sample >= 1, before/after >= 0 "
            f"(got {contexts}, {sample}, {before}, {after})"
        )
    counts = torch.zeros(m, dtype=torch.long, device=device)
    sums = torch.zeros(m, dtype=torch.float64, device=device)
    hist = torch.zeros(m * N_HIST_BINS, dtype=torch.long, device=device)
    top = RunningTopK(m, contexts, width, device)
    reservoir = RunningTopK(m, sample, width, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_seen = 0
    for sh in tqdm(shards, desc="browser: held-out shards", disable=not progress):
        x = sh.activations
        n = x.shape[0]
        rows = (sh.row - sh.first_row).to(device)
        pos = sh.position.long().to(device)
        ctx = sh.context_ids.long().to(device)
        kept_index = torch.full(ctx.shape, -1, dtype=torch.long, device=device)
        kept_index[rows, pos] = torch.arange(n, device=device)
        vals, idxs = [], []
        for s in range(0, n, batch_tokens):
            code = sae.encode(x[s : s + batch_tokens].to(device=device, dtype=sae.W_enc.dtype))
            vals.append(code.values.float())
            idxs.append(code.indices)
        codes_v, codes_i = torch.cat(vals), torch.cat(idxs)
        k = codes_v.shape[1]
        fired = codes_v > 0
        lat = codes_i[fired]
        act = codes_v[fired]
        local = torch.arange(n, device=device)[:, None].expand(n, k)[fired]
        counts += torch.bincount(lat, minlength=m)
        sums.index_add_(0, lat, act.double())
        b = ((torch.log2(act) - HIST_LOG2_MIN) * HIST_PER_OCTAVE).floor().long().clamp(0, N_HIST_BINS - 1)
        hist += torch.bincount(lat * N_HIST_BINS + b, minlength=m * N_HIST_BINS)

        order = torch.argsort(local * m + lat)
        lookup = FiringLookup((local * m + lat)[order], act[order], m)

        def window_of(i: Tensor) -> tuple[Tensor, Tensor]:
            # called only by the offer() calls below, within this iteration: the loop variables are this batch's
            return _windows(lookup, kept_index, ctx, rows[local[i]], pos[local[i]], lat[i], before, after)  # noqa: B023

        token = local + n_seen
        keys = torch.rand(lat.shape, generator=gen, device=device)
        # offered a batch at a time, so each batch's thresholds prune the next (one shard may be the whole set)
        bounds = torch.searchsorted(local, torch.arange(0, n + batch_tokens, batch_tokens, device=device)).tolist()
        for a, b in itertools.pairwise(bounds):
            if b > a:

                def part(i: Tensor, a: int = a) -> tuple[Tensor, Tensor]:
                    return window_of(i + a)

                top.offer(lat[a:b], act[a:b], act[a:b], token[a:b], part)
                reservoir.offer(lat[a:b], keys[a:b], act[a:b], token[a:b], part)
        n_seen += n
    cpu = {"device": "cpu"}
    for t in (top, reservoir):
        for name in ("keys", "acts", "tokens", "ids", "window"):
            setattr(t, name, getattr(t, name).to(**cpu))
    return LatentStats(
        n_seen,
        counts.cpu(),
        sums.cpu(),
        hist.view(m, N_HIST_BINS).cpu(),
        top,
        reservoir,
        before,
        after,
        time.perf_counter() - t0,
    )
