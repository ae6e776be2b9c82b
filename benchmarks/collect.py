"""Activation-collection throughput: the study's method vs mechlib's collector, in one run.

One command on a GPU machine (H100/H200), from the repository root::

    python benchmarks/collect.py                # add --compile to also measure torch.compile

builds a **random-weight Gemma 4 E4B** from its published config (``mechlib.tiny.gemma4_e4b_config``;
``Gemma4ForConditionalGeneration``, bf16, SDPA attention, initialised directly on the GPU — speed
does not depend on the weight values) and measures tokens/s at layer 21, seq 1024, for

* ``study``: the study's method — a full-depth forward with ``output_hidden_states=True`` and
  ``hidden_states[22]`` taken (left on the GPU: its device→host copy and disk writes are *not*
  charged to it, so the ratio is conservative);
* ``mechlib_stream``: ``mechlib.activations.collect.stream_activations`` — stop after layer 21, special tokens
  dropped on the GPU, nothing written;
* ``mechlib_disk``: ``mechlib.activations.collect.collect_activations`` — the whole collector: packing, stop
  after layer 21, pinned non_blocking copies on a side stream, background shard writer (bf16
  safetensors + sha256 + manifest);
* ``mechlib_disk_compiled`` with ``--compile``: the same with the layers compiled (compile time
  reported separately, not charged).

All methods consume the same packed rows (the Python docs, tokenised byte-level: a stand-in
tokenizer whose ids are valid Gemma ids — the real tokenizer is gated, and speed does not
depend on which ids are fed). tokens/s counts every processed position (rows × seq_len) for
all methods. Equivalence: the activations mechlib wrote for its first rows are compared with
``hidden_states[22]`` of the study's method on the same rows (relative Frobenius error ≤ 1e-2
and cosine ≥ 0.9999 in bf16; fp32 on CPU must agree to 1e-5). One JSON line per method, then the
ratios, and everything is saved to ``benchmarks/results/collect_<device>_<date>.json``.

``--device cpu --small`` is a smoke test on a tiny Gemma 4 (fp32, seconds); without ``--small``
the benchmark refuses to run on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlib.activations.collect import (  # noqa: E402 (after the sys.path line above)
    ActivationStore,
    Packer,
    collect_activations,
    rows_with_quota,
    split_docs,
    stream_activations,
)
from mechlib.activations.corpus import iter_texts  # noqa: E402
from mechlib.io import atomic_write_json  # noqa: E402
from mechlib.models import decoder_layers  # noqa: E402
from mechlib.tiny import benchmark_gemma4, tiny_tokenizer  # noqa: E402


class Sizes(NamedTuple):  # a NamedTuple, not a dataclass: the tests load this file without registering it
    layer: int
    seq_len: int
    tokens: int
    batch: int
    baseline_batch: int
    dtype: torch.dtype


FULL = Sizes(layer=21, seq_len=1024, tokens=16 * 16 * 1024, batch=16, baseline_batch=8, dtype=torch.bfloat16)
SMALL = Sizes(layer=2, seq_len=128, tokens=8 * 8 * 128, batch=8, baseline_batch=4, dtype=torch.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def packed_rows(tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The rows every method consumes (train split of the Python docs), as [rows, seq_len] ids."""
    packer = Packer(tokenizer, seq_len)
    rows = rows_with_quota(packer.rows(split_docs(iter_texts("python-stdlib-docs"), "train")), packer, n_tokens)
    return torch.stack([r[0] for r in rows])


def run_study(model, rows: torch.Tensor, layer: int, batch: int, device: torch.device) -> float:
    """The study's method over all rows; returns seconds."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, rows.shape[0], batch):
            out = model(input_ids=rows[i : i + batch].to(device), output_hidden_states=True)
            h = out.hidden_states[layer + 1]
            del out
    _sync(device)
    del h
    return time.perf_counter() - t0


def run_stream(model, tok, n_tokens, cfg: Sizes, device) -> tuple[float, int]:
    _sync(device)
    t0 = time.perf_counter()
    kept = 0
    for b in stream_activations(
        model, tok, layer=cfg.layer, n_tokens=n_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch
    ):
        kept += b.acts.shape[0]
    _sync(device)
    return time.perf_counter() - t0, kept


def run_disk(model, tok, out: Path, n_tokens, cfg: Sizes, dtype: str, compile: bool = False):
    shutil.rmtree(out, ignore_errors=True)
    run = collect_activations(
        model,
        tok,
        out,
        layer=cfg.layer,
        n_tokens=n_tokens,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch,
        shard_tokens=cfg.batch * cfg.seq_len * 4,
        dtype=dtype,
        progress=False,
        compile=compile,
    )
    return run


def equivalence(model, store_dir: Path, layer: int, n_rows: int, device: torch.device) -> dict:
    """mechlib's stored activations of the first rows vs the study's hidden_states[layer + 1]."""
    store = ActivationStore(store_dir)
    sh = store.shard(0)
    ctx, keep = sh["context_ids"][:n_rows].long(), sh["keep_mask"][:n_rows]
    with torch.no_grad():
        ref = model(input_ids=ctx.to(device), output_hidden_states=True).hidden_states[layer + 1]
    ref = ref[keep.to(device)].float().cpu()
    got = sh["activations"][: int(keep.sum())].float()
    diff = got - ref
    return {
        "rows": n_rows,
        "tokens": int(keep.sum()),
        "max_abs_diff": float(diff.abs().max()),
        "rel_frobenius_err": float(diff.norm() / ref.norm()),
        "min_cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny Gemma 4, fp32: a CPU smoke test")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per method (default: 262144; small: 8192)")
    ap.add_argument("--batch", type=int, default=None, help="mechlib rows per forward (default 16)")
    ap.add_argument("--baseline-batch", type=int, default=None, help="study-method rows per forward (default 8)")
    ap.add_argument("--compile", action="store_true", help="also measure the collector with compiled layers")
    ap.add_argument("--out-dir", default=None, help="where shards go (default: /dev/shm if present, else a tmp dir)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/collect.py measures GPU throughput and no CUDA GPU is visible here. "
            "For a CPU smoke test run: python benchmarks/collect.py --device cpu --small",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and not args.small:
        print(
            "refusing to run the E4B-sized benchmark on a CPU (hours, ~30 GB); use --device cpu --small "
            "for a smoke test, or run on a GPU",
            file=sys.stderr,
        )
        return 2
    overrides = {key: getattr(args, key) for key in ("tokens", "batch", "baseline_batch")}
    cfg = (SMALL if args.small else FULL)._replace(**{k: v for k, v in overrides.items() if v is not None})
    layer, seq_len = cfg.layer, cfg.seq_len
    shard_dtype = "float32" if cfg.dtype == torch.float32 else "bfloat16"
    base = (
        Path(args.out_dir) if args.out_dir else Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    )
    work = Path(tempfile.mkdtemp(prefix="mechbook-collect-bench-", dir=base))

    t0 = time.perf_counter()
    model = benchmark_gemma4(args.small, device, cfg.dtype)
    _sync(device)
    build_s = time.perf_counter() - t0
    tok = tiny_tokenizer()
    n_layers = len(decoder_layers(model))
    n_rows = cfg.tokens // seq_len
    rows = packed_rows(tok, n_rows * seq_len * 2, seq_len)[:n_rows]  # quota counts kept tokens: ask for more
    n_tokens_kept = int(Packer(tok, seq_len).keep_mask(rows).sum())
    processed = n_rows * seq_len
    layer_params = sum(p.numel() for blk in decoder_layers(model)[: layer + 1] for p in blk.parameters())
    all_params = sum(p.numel() for blk in decoder_layers(model) for p in blk.parameters())

    # warm-up (kernel selection, allocator) for each method on a couple of batches
    run_study(model, rows[: 2 * cfg.baseline_batch], layer, cfg.baseline_batch, device)
    run_disk(model, tok, work / "warm", 2 * cfg.batch * seq_len - 4 * cfg.batch, cfg, shard_dtype)

    results: dict[str, dict[str, Any]] = {}  # method -> its JSON row (numbers and labels)
    secs = run_study(model, rows, layer, cfg.baseline_batch, device)
    results["study"] = {
        "method": "full-depth output_hidden_states=True, hidden_states[L+1]",
        "seconds": secs,
        "tokens_per_s": processed / secs,
        "batch_rows": cfg.baseline_batch,
    }
    secs, kept = run_stream(model, tok, n_tokens_kept, cfg, device)
    results["mechlib_stream"] = {
        "method": "stream_activations: stop after L, no disk",
        "seconds": secs,
        "tokens_per_s": processed / secs,
        "kept_tokens": kept,
        "batch_rows": cfg.batch,
    }
    run = run_disk(model, tok, work / "disk", n_tokens_kept, cfg, shard_dtype)
    assert run.manifest["n_rows"] == n_rows, (run.manifest["n_rows"], n_rows)
    results["mechlib_disk"] = {
        "method": "collect_activations: stop after L, pinned async D2H, background shard writer",
        "seconds": run.seconds,
        "tokens_per_s": processed / run.seconds,
        "kept_tokens": run.computed_tokens,
        "batch_rows": cfg.batch,
        "shard_dtype": shard_dtype,
    }
    equiv = equivalence(model, work / "disk", layer, min(4, n_rows), device)
    if args.compile:
        t1 = time.perf_counter()
        run_disk(model, tok, work / "warm_c", 2 * cfg.batch * seq_len - 4 * cfg.batch, cfg, shard_dtype, compile=True)
        compile_s = time.perf_counter() - t1
        run = run_disk(model, tok, work / "disk_c", n_tokens_kept, cfg, shard_dtype, compile=True)
        results["mechlib_disk_compiled"] = {
            "method": "collect_activations with torch.compile'd layers",
            "seconds": run.seconds,
            "tokens_per_s": processed / run.seconds,
            "compile_warmup_s": compile_s,
            "batch_rows": cfg.batch,
        }
        equiv_c = equivalence(model, work / "disk_c", layer, min(4, n_rows), device)
    shutil.rmtree(work, ignore_errors=True)

    for name, r in results.items():
        r["approx_tflops"] = 2 * (layer_params if name != "study" else all_params) * r["tokens_per_s"] / 1e12
        print(json.dumps({"name": name, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}}))
    base_tps = results["study"]["tokens_per_s"]
    ratios = {f"{k}_vs_study": v["tokens_per_s"] / base_tps for k, v in results.items() if k != "study"}
    tol = (1e-2, 0.9999) if cfg.dtype != torch.float32 else (1e-5, 0.999999)
    checks = {"plain": equiv, **({"compiled": equiv_c} if args.compile else {})}
    ok = all(c["rel_frobenius_err"] <= tol[0] and c["min_cosine"] >= tol[1] for c in checks.values())
    print(
        json.dumps(
            {
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "equivalent": ok,
                "tolerance": {"rel_frobenius_err": tol[0], "min_cosine": tol[1]},
                "equivalence": checks,
            }
        )
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-small" if args.small else "")
    today = dt.date.today().isoformat()
    record = {
        "benchmark": "collect",
        "device": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": today,
        "small": args.small,
        "model": "tiny gemma4" if args.small else "gemma-4-e4b config, random weights",
        "n_layers": n_layers,
        "layer": layer,
        "seq_len": seq_len,
        "processed_tokens": processed,
        "model_dtype": str(cfg.dtype),
        "build_s": build_s,
        "results": results,
        "ratios": ratios,
        "equivalent": ok,
        "equivalence": checks,
        "target_tokens_per_s": 130_000,
    }
    out = Path(args.results) / f"collect_{slug}_{today}.json"
    atomic_write_json(out, record)
    print(f"saved {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
