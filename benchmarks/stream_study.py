"""The streaming study end to end: model and TopK SAE on one GPU, as ``collect_mode: stream`` runs.

One command on a GPU machine (H100/H200), from the repository root::

    python benchmarks/stream_study.py --seconds 60          # --compile false|layers|stack

builds the random-weight Gemma 4 E4B (as ``benchmarks/collect.py``), streams layer-21 activations
of packed seq-1024 rows through :class:`mechlib.activations.stores.StreamStore` (the class
``collect_mode: stream`` trains from; batches of 16 rows, shuffled in chunks of 16 SAE batches)
into :func:`mechlib.sae.train.train_sae` with ``mechlib.sae.fast.fast_step`` at the study's shape
(d_sae 32768, k 128, k_aux 512, batch 8192, Adam, decoder renorm) — the loop chapter 02 runs.
What differs from the book, and why: the forward is ``stream_batches`` with the collector's
``compile`` mode (the book's stream store runs the eager hooked stop), ``init_b_dec`` is zeros
(the geometric median would run the model before the clock starts), and ``dead_tokens`` is 4
batches so that AuxK is live within a short run as it is in a long one (its dead count is reported).

A warm-up run of 2 shuffle chunks (compilation, Triton autotuning) sets the step count of the timed
run to about ``--seconds``. Reported: SAE tokens/s (tokens trained per second of the training
loop), the model's processed tokens/s, and the split of the loop's time between the model's
forwards and the SAE steps, measured with CUDA events around each (the rest — Adam, renorm, the
shuffle and host syncs — is ``other``). JSON to ``benchmarks/results/stream_study_<device>_<date>.json``.

``--device cpu --small`` is a smoke test (tiny Gemma 4, d_sae 256, fp32 torch twins of the step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlib.activations.collect import batch_rows, packed_rows, stream_batches  # noqa: E402
from mechlib.activations.corpus import CorpusSpec, iter_texts  # noqa: E402
from mechlib.activations.forward import layer_forward  # noqa: E402
from mechlib.activations.stores import StreamStore  # noqa: E402
from mechlib.io import atomic_write_json, atomic_write_text  # noqa: E402
from mechlib.models import d_model  # noqa: E402
from mechlib.sae.train import TrainConfig, train_sae  # noqa: E402
from mechlib.tiny import benchmark_gemma4, tiny_tokenizer  # noqa: E402


class Sizes(NamedTuple):  # a NamedTuple: the tests load this file without registering it
    layer: int
    seq_len: int
    rows: int  # model rows per forward
    dtype: torch.dtype
    d_sae: int
    k: int
    k_aux: int
    batch: int  # SAE tokens per step
    shuffle_batches: int
    epoch_tokens: int
    seconds: float


FULL = Sizes(21, 1024, 16, torch.bfloat16, 32768, 128, 512, 8192, 16, 5_000_000, 60.0)
SMALL = Sizes(2, 128, 8, torch.float32, 256, 8, 16, 256, 4, 20_000, 2.0)


class Spans:
    """Summed durations of code regions: CUDA events on a GPU (the work, not its launch), wall time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_s = 0.0

    @contextmanager
    def span(self) -> Iterator[None]:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.events.append((a, b))
        else:
            t0 = time.perf_counter()
            yield
            self.cpu_s += time.perf_counter() - t0

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.cpu_s


def write_corpus(path: Path, repeat: int) -> Path:
    """The Python docs as ``.jsonl`` (``repeat`` times): reading it is not what is measured."""
    texts = list(iter_texts("python-stdlib-docs"))
    lines = [json.dumps({"text": text}) + "\n" for text in texts]
    atomic_write_text(path, "".join(lines * repeat))
    return path


class Study:
    """A StreamStore over the model plus a timed ``train_sae`` on it."""

    def __init__(self, model, tok, corpus: Path, cfg: Sizes, compile: bool | str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model_spans, self.sae_spans = Spans(device), Spans(device)
        self.processed = 0
        self.step_times: list[float] = []
        forward = layer_forward(model, cfg.layer, compile)

        def timed_forward(ids: torch.Tensor) -> torch.Tensor:
            with self.model_spans.span():
                out = forward(ids)
            self.processed += ids.numel()
            return out

        def epoch_stream(skip: int) -> Iterator[torch.Tensor]:
            _, rows = packed_rows(tok, cfg.epoch_tokens, cfg.seq_len, CorpusSpec(str(corpus)), "train", True, 2)
            for b in stream_batches(timed_forward, batch_rows(rows, cfg.rows), device):
                yield b.acts  # skip is always 0 here: every run starts fresh

        self.store = StreamStore(
            epoch_stream,
            cfg.epoch_tokens,
            d_model(model),
            {"model": "bench", "layer": cfg.layer, "params_hash": "bench", "shards": []},
            shuffle_batches=cfg.shuffle_batches,
        )

    def step_fn(self):
        from mechlib.sae.fast import fast_step

        def step(sae, x, dead, k_aux, aux_coef):
            self.step_times.append(time.perf_counter())
            with self.sae_spans.span():
                return fast_step(sae, x, dead, k_aux, aux_coef)

        return step

    def train(self, steps: int, out_dir: Path):
        cfg = self.cfg
        tc = TrainConfig(
            d_sae=cfg.d_sae,
            k=cfg.k,
            k_aux=cfg.k_aux,
            train_batch_size=cfg.batch,
            train_tokens=steps * cfg.batch,
            warmup_steps=max(1, steps // 10),
            dead_tokens=4 * cfg.batch,
            checkpoint_every=10**9,
            init_b_dec="zeros",
        )
        return train_sae(self.store, tc, out_dir, device=str(self.device), step_fn=self.step_fn(), progress=False)


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny Gemma 4, small SAE: a CPU smoke test")
    ap.add_argument("--seconds", type=float, default=None, help="timed training seconds (default 60; small 2)")
    ap.add_argument("--compile", default=None, help="false, layers or stack (default: stack on CUDA, false on CPU)")
    ap.add_argument("--rows", type=int, default=None, help="model rows per forward (default 16)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA GPU visible; for a smoke test: python benchmarks/stream_study.py --device cpu --small",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and not args.small:
        print("refusing the E4B-sized study on a CPU; use --device cpu --small", file=sys.stderr)
        return 2
    chosen = args.compile or ("stack" if device.type == "cuda" else "false")
    compile: bool | str = {"false": False, "true": True}.get(chosen.lower(), chosen)
    cfg = (SMALL if args.small else FULL)._replace(
        **{k: v for k, v in {"seconds": args.seconds, "rows": args.rows}.items() if v is not None}
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-small" if args.small else "")
    today = dt.date.today().isoformat()
    out = Path(args.results) / f"stream_study_{slug}_{today}.json"
    record: dict[str, Any] = {
        "benchmark": "stream_study",
        "device": name,
        "torch": torch.__version__,
        "date": today,
        "small": args.small,
        "sizes": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg._asdict().items()},
        "compile": compile,
        "target_tokens_per_s": 110_000,
    }
    with tempfile.TemporaryDirectory(prefix="mechbook-stream-study-") as tmp:
        try:
            record |= _run(cfg, compile, device, Path(tmp), args.small)
            rc = 0
        except Exception as exc:  # saved, so a GPU session keeps the reason
            import traceback

            record |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            rc = 1
    atomic_write_json(out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}))
    print(f"saved {out}")
    return rc


def _run(cfg: Sizes, compile: bool | str, device: torch.device, tmp: Path, small: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = benchmark_gemma4(small, device, cfg.dtype)
    corpus = write_corpus(tmp / "corpus.jsonl", repeat=1 if small else 4)
    setup_s = time.perf_counter() - t0

    warm_steps = 2 * cfg.shuffle_batches
    t0 = time.perf_counter()
    compile_error = None
    try:
        warm = Study(model, tiny_tokenizer(), corpus, cfg, compile, device)
        warm.train(warm_steps, tmp / "warm")
    except Exception as exc:  # a compile mode that fails on this GPU: measure the eager path instead
        if compile is False:
            raise
        compile_error, compile = f"{type(exc).__name__}: {exc}", False
        warm = Study(model, tiny_tokenizer(), corpus, cfg, compile, device)
        warm.train(warm_steps, tmp / "warm2")
    warmup_s = time.perf_counter() - t0
    # the second chunk (its model forwards and its steps) is steady state: it sets the step count
    chunk_s = warm.step_times[-1] - warm.step_times[cfg.shuffle_batches - 1]
    per_step = chunk_s / (cfg.shuffle_batches - 1) if chunk_s > 0 else 1.0
    steps = max(cfg.shuffle_batches, math.ceil(cfg.seconds / per_step / cfg.shuffle_batches) * cfg.shuffle_batches)

    study = Study(model, tiny_tokenizer(), corpus, cfg, compile, device)
    result = study.train(steps, tmp / "run")
    model_s, sae_s = study.model_spans.seconds(), study.sae_spans.seconds()
    tokens = result.tokens
    last = result.history[-1]
    return {
        "compile_used": compile,
        "compile_error": compile_error,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "steps": steps,
        "seconds": result.seconds,
        "sae_tokens": tokens,
        "tokens_per_s": tokens / result.seconds,
        "model_processed_tokens": study.processed,
        "model_tokens_per_s": study.processed / model_s if model_s else None,
        "sae_step_tokens_per_s": tokens / sae_s if sae_s else None,
        "time_split": {
            "model_s": model_s,
            "sae_step_s": sae_s,
            "other_s": result.seconds - model_s - sae_s,
            "model_fraction": model_s / result.seconds,
            "sae_fraction": sae_s / result.seconds,
        },
        "step_path": result.step_path,
        "final_fvu": last.fvu,
        "n_dead_last_step": last.n_dead,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


if __name__ == "__main__":
    sys.exit(main())
