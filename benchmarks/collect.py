"""Activation-collection throughput: the study's method vs each way mechlib collects, in one run.

One command on a GPU machine (H100/H200), from the repository root::

    python benchmarks/collect.py                       # every method, 10 s each after its warm-up
    python benchmarks/collect.py --methods study,stream_stack --seconds 20

builds a **random-weight Gemma 4 E4B** from its published config (``mechlib.tiny.gemma4_e4b_config``;
``Gemma4ForConditionalGeneration``, bf16, SDPA attention, initialised on the GPU — speed does not
depend on the weight values) and measures tokens/s at layer 21, seq 1024. Methods, in run order
(the ones that matter most first, so a time budget cuts the least informative):

* ``study``: a full-depth forward with ``output_hidden_states=True``, ``hidden_states[22]`` taken
  and left on the GPU (no copy or disk charged to it: the ratio is conservative);
* ``stream_eager``: ``stream_activations`` — pack, stop after layer 21 (hook), keep-mask on the GPU;
* ``stream_stack``: the same with ``compile="stack"`` (the truncated stack as one static graph);
* ``disk``: ``collect_activations`` — the whole collector to bf16 shards (pinned async D2H, gather
  and file threads, sha256, manifest) with the fastest stream configuration measured before it;
* ``stream_stack_b32``: ``compile="stack"`` at 32 rows per forward instead of 16;
* ``stream_layers``: ``compile="layers"`` (``compile=True``: each layer's forward compiled);
* ``stream_eager_cudnn``: ``stream_eager`` with SDPA trying cuDNN attention first (the kernel lever;
  compare with ``stream_eager``, and ``attention_cudnn_first`` with ``attention`` for what it changed).

Each method runs a few warm-up batches (compilation included; reported as ``warmup_s``, not
timed), then as many batches as fit in ``--seconds``; tokens/s counts every processed position
(rows × seq_len). A failing method records its error and the run goes on; the JSON is rewritten
after every method, so a run killed by its time limit keeps what it measured. ``--budget-s``
skips the methods that would start after that many seconds.

The corpus: the Python docs written once to a ``.jsonl`` (repeated 4×, so no method runs out),
so that reading the stand-in corpus (``ast`` over the standard library, ~100 k chars/s) is not
what is measured; packing and tokenising (a byte-level stand-in tokenizer whose ids are valid
Gemma ids) are, as in a real run. Attention: every SDPA call of one eager forward is recorded
with the kernels torch accepts for it (``can_use_flash/efficient/cudnn_attention``) and the one
its priority order picks — the check that no layer falls back to the math kernel.

Equivalence: each method's first activations are compared with ``hidden_states[22]`` of the study's
method on the same rows, computed before anything is compiled (relative Frobenius error ≤ 1e-2 and
cosine ≥ 0.9999 in bf16; fp32 on CPU ≤ 1e-5). Saved to ``benchmarks/results/collect_<device>_<date>.json``.

``--device cpu --small`` is a smoke test on a tiny Gemma 4 (fp32, seconds; compiled methods are
skipped unless named with ``--methods``); without ``--small`` the benchmark refuses a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from mechlib.activations.forward import forward_to_layer, record_sdpa  # noqa: E402
from mechlib.io import atomic_write_json, atomic_write_text  # noqa: E402
from mechlib.models import decoder_layers  # noqa: E402
from mechlib.tiny import benchmark_gemma4, tiny_tokenizer  # noqa: E402


class Sizes(NamedTuple):  # a NamedTuple, not a dataclass: the tests load this file without registering it
    layer: int
    seq_len: int
    batch: int
    baseline_batch: int
    dtype: torch.dtype
    seconds: float
    warmup_batches: int


FULL = Sizes(layer=21, seq_len=1024, batch=16, baseline_batch=8, dtype=torch.bfloat16, seconds=10.0, warmup_batches=3)
SMALL = Sizes(layer=2, seq_len=128, batch=8, baseline_batch=4, dtype=torch.float32, seconds=0.3, warmup_batches=1)
ALL_METHODS = (
    "study",
    "stream_eager",
    "stream_stack",
    "disk",
    "stream_stack_b32",
    "stream_layers",
    "stream_eager_cudnn",
)
CPU_METHODS = ("study", "stream_eager", "disk", "stream_eager_cudnn")  # compiling on 2 CPU cores takes minutes
REF_ROWS = 4


class Method(NamedTuple):
    compile: bool | str
    batch: int
    cudnn_first: bool = False  # SDPA tries cuDNN attention first (torch's default order: flash, efficient, math, cuDNN)


@contextmanager
def sdpa_priority(cudnn_first: bool) -> Iterator[None]:
    """torch's default SDPA backend order, or cuDNN first (the attention-kernel lever)."""
    if not cudnn_first:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_corpus(path: Path, repeat: int = 4) -> Path:
    """The Python docs as ``.jsonl`` (``repeat`` times): a fast-reading copy of the stand-in corpus."""
    texts = list(iter_texts("python-stdlib-docs"))
    lines = [json.dumps({"text": text}) + "\n" for text in texts]
    atomic_write_text(path, "".join(lines * repeat))
    return path


def pack(tokenizer, corpus: Path, n_rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_rows`` train rows (ids, keep) exactly as the collector packs them."""
    packer = Packer(tokenizer, seq_len)
    rows = rows_with_quota(packer.rows(split_docs(iter_texts(str(corpus)), "train")), packer, 10**12)
    got = [next(rows) for _ in range(n_rows)]
    return torch.stack([r[0] for r in got]), torch.stack([r[1] for r in got])


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got = got[: ref.shape[0]].float().cpu()
    diff = got - ref
    return {
        "tokens": int(ref.shape[0]),
        "max_abs_diff": float(diff.abs().max()),
        "rel_frobenius_err": float(diff.norm() / ref.norm()),
        "min_cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()),
    }


class Bench:
    """The model, corpus and reference every method shares, and the timing loops."""

    def __init__(self, model, tok, corpus: Path, cfg: Sizes, device: torch.device, work: Path):
        self.model, self.tok, self.corpus, self.cfg, self.device, self.work = model, tok, corpus, cfg, device, work
        ids, keep = pack(tok, corpus, REF_ROWS, cfg.seq_len)
        with torch.no_grad():  # the reference, before anything is compiled
            hs = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states[cfg.layer + 1]
        self.ref = hs[keep.to(device)].float().cpu()

    def study(self, seconds: float) -> dict[str, Any]:
        cfg, b = self.cfg, self.cfg.baseline_batch
        n_rows = max(b * (cfg.warmup_batches + 1), 256 if cfg.dtype != torch.float32 else 4 * b)
        rows, _ = pack(self.tok, self.corpus, n_rows, cfg.seq_len)
        rows = rows.pin_memory() if self.device.type == "cuda" else rows

        def batches() -> Iterator[torch.Tensor]:
            while True:
                for i in range(0, n_rows - b + 1, b):
                    yield rows[i : i + b].to(self.device, non_blocking=True)

        def step(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.model(input_ids=ids, output_hidden_states=True).hidden_states[cfg.layer + 1]

        return self._timed(map(step, batches()), b, seconds, first=None)

    def stream(self, m: Method, seconds: float) -> dict[str, Any]:
        it = stream_activations(
            self.model,
            self.tok,
            layer=self.cfg.layer,
            n_tokens=10**12,
            seq_len=self.cfg.seq_len,
            batch_size=m.batch,
            corpus=str(self.corpus),
            compile=m.compile,
        )
        first: list[torch.Tensor] = []
        with sdpa_priority(m.cudnn_first):  # around the generator's whole consumption
            out = self._timed((s.acts for s in it), m.batch, seconds, first)
        return {**out, "compile": m.compile, "cudnn_first": m.cudnn_first, "equivalence": compare(first[0], self.ref)}

    def _timed(self, outputs: Iterator[torch.Tensor], batch: int, seconds: float, first) -> dict[str, Any]:
        t0 = time.perf_counter()
        for i in range(self.cfg.warmup_batches):
            h = next(outputs)
            if i == 0 and first is not None:
                first.append(h.float().cpu())
        _sync(self.device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        while n == 0 or time.perf_counter() - t0 < seconds:  # >= 1 batch: a stall before the first check times none
            next(outputs)
            n += 1
        _sync(self.device)
        secs = time.perf_counter() - t0
        processed = n * batch * self.cfg.seq_len
        return {"warmup_s": warm, "seconds": secs, "processed_tokens": processed, "tokens_per_s": processed / secs}

    def disk(self, m: Method, seconds: float, rate: float) -> dict[str, Any]:
        cfg = self.cfg
        dtype = "float32" if cfg.dtype == torch.float32 else "bfloat16"
        shard = m.batch * cfg.seq_len * 4

        def collect(out: Path, n_tokens: int):
            return collect_activations(
                self.model,
                self.tok,
                out,
                layer=cfg.layer,
                n_tokens=n_tokens,
                seq_len=cfg.seq_len,
                batch_size=m.batch,
                shard_tokens=shard,
                corpus=str(self.corpus),
                dtype=dtype,
                compile=m.compile,
                progress=False,
            )

        t0 = time.perf_counter()
        collect(self.work / "warm", shard)
        warm = time.perf_counter() - t0
        run = collect(self.work / "disk", max(int(rate * seconds * 0.99), shard))  # ~``seconds`` (kept ≈ 99 %)
        processed = run.manifest["n_rows"] * cfg.seq_len
        sh = ActivationStore(self.work / "disk").shard(0)
        shutil.rmtree(self.work / "disk", ignore_errors=True)
        return {
            "warmup_s": warm,
            "seconds": run.seconds,
            "processed_tokens": processed,
            "tokens_per_s": processed / run.seconds,
            "compile": m.compile,
            "shard_dtype": dtype,
            "equivalence": compare(sh["activations"], self.ref),
        }


def attention_kernels(model, layer: int, ids: torch.Tensor) -> list[dict[str, Any]]:
    """Every SDPA call of one eager forward to ``layer``, grouped by what decides the kernel."""
    with torch.no_grad(), record_sdpa() as calls:
        forward_to_layer(model, layer, ids)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(calls):
        groups.setdefault((c.q_shape, c.k_shape, c.mask, c.is_causal, c.enable_gqa, c.kernel), []).append(i)
    keys = ("q_shape", "k_shape", "mask", "is_causal", "enable_gqa", "kernel")
    return [{**dict(zip(keys, k)), "calls": idx} for k, idx in groups.items()]


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny Gemma 4, fp32: a CPU smoke test")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per method (default 10; small 0.3)")
    ap.add_argument("--batch", type=int, default=None, help="mechlib rows per forward (default 16)")
    ap.add_argument("--baseline-batch", type=int, default=None, help="study-method rows per forward (default 8)")
    ap.add_argument("--methods", default=None, help=f"comma list of {','.join(ALL_METHODS)} (default: all)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no method after this many seconds")
    ap.add_argument(
        "--out-dir", default=None, help="where shards go (default: /dev/shm if it has 16 GiB free, else tmp)"
    )
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def _refuse(args, device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return (
            "benchmarks/collect.py measures GPU throughput and no CUDA GPU is visible here. "
            "For a CPU smoke test run: python benchmarks/collect.py --device cpu --small"
        )
    if device.type == "cpu" and not args.small:
        return (
            "refusing to run the E4B-sized benchmark on a CPU (hours, ~30 GB); use --device cpu --small "
            "for a smoke test, or run on a GPU"
        )
    return None


def _scratch(need_bytes: int) -> Path:
    """/dev/shm when it has room for the disk method's shards (a container's may be 64 MB), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= need_bytes:
        return shm
    return Path(tempfile.gettempdir())


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if (why := _refuse(args, device)) is not None:
        print(why, file=sys.stderr)
        return 2
    start = time.perf_counter()
    overrides = {"seconds": args.seconds, "batch": args.batch, "baseline_batch": args.baseline_batch}
    cfg = (SMALL if args.small else FULL)._replace(**{k: v for k, v in overrides.items() if v is not None})
    default = CPU_METHODS if device.type == "cpu" else ALL_METHODS
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(default)
    if bad := sorted(set(methods) - set(ALL_METHODS)):
        print(f"unknown methods {bad}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    base = Path(args.out_dir) if args.out_dir else _scratch(16 << 30 if not args.small else 0)
    work = Path(tempfile.mkdtemp(prefix="mechbook-collect-bench-", dir=base))
    try:
        return _run(args, cfg, methods, device, work, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, cfg: Sizes, methods: list[str], device: torch.device, work: Path, start: float) -> int:
    t0 = time.perf_counter()
    model = benchmark_gemma4(args.small, device, cfg.dtype)
    _sync(device)
    build_s = time.perf_counter() - t0
    tok = tiny_tokenizer()
    t0 = time.perf_counter()
    corpus = write_corpus(work / "corpus.jsonl", repeat=4 if not args.small else 1)
    corpus_s = time.perf_counter() - t0
    bench = Bench(model, tok, corpus, cfg, device, work)
    layer = cfg.layer
    layer_params = sum(p.numel() for blk in decoder_layers(model)[: layer + 1] for p in blk.parameters())
    all_params = sum(p.numel() for blk in decoder_layers(model) for p in blk.parameters())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-small" if args.small else "")
    today = dt.date.today().isoformat()
    out = Path(args.results) / f"collect_{slug}_{today}.json"
    results: dict[str, dict[str, Any]] = {}
    record: dict[str, Any] = {
        "benchmark": "collect",
        "device": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": today,
        "small": args.small,
        "model": "tiny gemma4" if args.small else "gemma-4-e4b config, random weights",
        "n_layers": len(decoder_layers(model)),
        "layer": layer,
        "seq_len": cfg.seq_len,
        "model_dtype": str(cfg.dtype),
        "seconds_per_method": cfg.seconds,
        "warmup_batches": cfg.warmup_batches,
        "build_s": build_s,
        "corpus_write_s": corpus_s,
        "shard_dir": str(work.parent),
        "results": results,
        "target_tokens_per_s": 130_000,
    }
    try:
        ids, _ = pack(tok, corpus, 2, cfg.seq_len)
        record["attention"] = attention_kernels(model, layer, ids.to(device))
        with sdpa_priority(True):
            record["attention_cudnn_first"] = attention_kernels(model, layer, ids.to(device))
    except Exception as exc:  # a diagnostic: never costs the measurements
        record["attention_error"] = f"{type(exc).__name__}: {exc}"

    tol = (1e-2, 0.9999) if cfg.dtype != torch.float32 else (1e-5, 0.999999)
    streams = {
        "stream_eager": Method(False, cfg.batch),
        "stream_stack": Method("stack", cfg.batch),
        "stream_stack_b32": Method("stack", 32 if not args.small else 2 * cfg.batch),
        "stream_layers": Method("layers", cfg.batch),
        "stream_eager_cudnn": Method(False, cfg.batch, cudnn_first=True),
    }
    jobs: dict[str, Callable[[], dict[str, Any]]] = {"study": lambda: bench.study(cfg.seconds)}
    for key, m in streams.items():
        jobs[key] = functools.partial(bench.stream, m, cfg.seconds)

    def disk() -> dict[str, Any]:
        done = {k: results[k] for k in streams if "tokens_per_s" in results.get(k, {})}
        best = max(done, key=lambda k: done[k]["tokens_per_s"]) if done else "stream_eager"
        rate = done[best]["tokens_per_s"] if done else 20_000.0
        r = bench.disk(streams[best], cfg.seconds, rate)
        return {**r, "config_of": best, "vs_that_stream": r["tokens_per_s"] / rate if done else None}

    jobs["disk"] = disk
    for key in [m for m in ALL_METHODS if m in methods]:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            results[key] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        try:
            r = jobs[key]()
            batch_rows = cfg.baseline_batch if key == "study" else streams.get(key, Method(False, cfg.batch)).batch
            params = all_params if key == "study" else layer_params
            r |= {"batch_rows": batch_rows, "approx_tflops": 2 * params * r["tokens_per_s"] / 1e12}
            if "equivalence" in r:
                e = r["equivalence"]
                r["equivalent"] = e["rel_frobenius_err"] <= tol[0] and e["min_cosine"] >= tol[1]
        except Exception as exc:  # one broken method must not cost the rest of the run
            r = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[key] = r
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "traceback"}
        print(json.dumps({"name": key, **shown}), flush=True)
        _summarise(record, tol)
        atomic_write_json(out, record)
    print(json.dumps({k: record[k] for k in ("ratios", "equivalent", "all_ran")}))
    print(f"saved {out}")
    return 0 if record["equivalent"] and record["all_ran"] else 1


def _summarise(record: dict[str, Any], tol: tuple[float, float]) -> None:
    results = record["results"]
    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}
    base = ok.get("study", {}).get("tokens_per_s")
    record["ratios"] = {f"{k}_vs_study": v["tokens_per_s"] / base for k, v in ok.items() if base and k != "study"}
    record["equivalent"] = all(v.get("equivalent", True) for v in ok.values())
    record["all_ran"] = len(ok) == len(results)
    record["tolerance"] = {"rel_frobenius_err": tol[0], "min_cosine": tol[1]}
    record["best_stream"] = max(
        (k for k in ok if k.startswith("stream")), key=lambda k: ok[k]["tokens_per_s"], default=None
    )


if __name__ == "__main__":
    sys.exit(main())
