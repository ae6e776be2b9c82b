"""How fast the feature browser's one streaming pass runs, at a chosen SAE shape, on synthetic activations.

Why synthetic: the pass's cost depends on the shapes (tokens, d_model, d_sae, k) and on how often a
firing beats a latent's current k-th value, not on what the activations mean. It reports the SAE
encode alone and the whole pass, so the bookkeeping (histograms, running top-k merges, context
windows) can be projected separately from the matmul. Results land in benchmarks/results/.

    python benchmarks/browser_gather.py --device cpu --tokens 32768 --d-model 576 --d-sae 32768 --k 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mechlib.browser.gather import ShardTokens, gather_latent_stats
from mechlib.io import atomic_write_json
from mechlib.sae import TopKSAE


def synthetic_shards(tokens: int, d_model: int, shard_tokens: int, seq_len: int, seed: int = 0) -> list[ShardTokens]:
    gen = torch.Generator().manual_seed(seed)
    shards, first_row = [], 0
    for start in range(0, tokens, shard_tokens):
        n = min(shard_tokens, tokens - start)
        rows = -(-n // seq_len)
        ctx = torch.randint(3, 49152, (rows, seq_len), generator=gen, dtype=torch.int32)
        r = torch.arange(n) // seq_len
        p = (torch.arange(n) % seq_len).to(torch.int32)
        shards.append(ShardTokens(torch.randn(n, d_model, generator=gen), r + first_row, p, ctx, first_row))
        first_row += rows
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sae = TopKSAE(args.d_model, args.d_sae, args.k, seed=0).to(dev)
    shards = synthetic_shards(args.tokens, args.d_model, args.shard_tokens, 1024)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        for sh in shards:
            for s in range(0, sh.activations.shape[0], args.batch_tokens):
                sae.encode(sh.activations[s : s + args.batch_tokens].to(dev))
        sync()
        encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = gather_latent_stats(sae, shards, batch_tokens=args.batch_tokens, device=dev)
    sync()
    total_s = time.perf_counter() - t0
    result = {
        "shape": vars(args),
        "encode_s": round(encode_s, 3),
        "pass_s": round(total_s, 3),
        "bookkeeping_s": round(total_s - encode_s, 3),
        "tokens_per_s": round(args.tokens / total_s),
        "bookkeeping_s_per_million_firings": round((total_s - encode_s) / (args.tokens * args.k / 1e6), 4),
        "latents_fired": int((stats.counts > 0).sum()),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / f"browser_gather_{dev.type}_{time.strftime('%Y-%m-%d')}.json"
    atomic_write_json(out, result)


if __name__ == "__main__":
    main()
