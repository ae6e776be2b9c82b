"""Steered greedy generation throughput: HF ``generate`` vs mechlib's decode loop, in one run.

One command on a GPU machine (H100/H200), from the repository root::

    python benchmarks/generate.py                 # all methods; --only NAME[,NAME] for a subset

builds a **random-weight Gemma 4 E4B** from its published config (``mechlib.tiny.gemma4_e4b_config``;
``Gemma4ForConditionalGeneration``, bf16, SDPA, initialised on the GPU — speed does not depend on
the weight values) and generates, for random 160-token prompts, exactly 256 new tokens per row
(EOS ignored), with the **CAA steering hook on** (``mechlib.steering.steering_hook`` at layer 27,
+5 %) for every method:

* ``hf_dynamic_b1`` / ``hf_dynamic_b64``: HF ``generate``, greedy, dynamic cache (the study's way is b1);
* ``hf_static_b128`` / ``hf_static_b256``: HF ``generate`` with ``cache_implementation="static"``
  (HF auto-compiles the decode step on CUDA);
* ``mechlib_b128`` / ``mechlib_b256``: ``mechlib.generate.generate_ids`` (static cache, decode step
  compiled by inductor with CUDA graphs, ``mode="reduce-overhead"``, hook guards on, EOS ignored);
* ``mechlib_cudagraphs_b256``: the same loop with dynamo's ``cudagraphs`` backend (CUDA graphs of the
  eager kernels, no inductor code generation: a shorter first call);
* ``mechlib_dynamic_b128``: mechlib's loop without static cache or compile (the exact CPU path).

Each method is called twice with the same shapes: the first call (``first_call_s``: cache
allocation, compilation, CUDA-graph capture) and the steady call (``seconds``), from which
``answers_per_min = batch × 60 / seconds`` and ``ms_per_step``. Row 0's prompt is the same in
every method; ``prefix_agree_hf`` is how many of its tokens match ``hf_dynamic_b64``'s before the
first difference (bf16 kernels differ between eager and compiled paths, and random weights give
near-tied logits, so a short prefix is expected there; the exactness proof is the CPU test suite).
One JSON line per method (a method that fails records its error and the run goes on); everything
is saved to ``benchmarks/results/generate_<device>_<date>.json``.

``--device cpu --small`` is a smoke test on a tiny Gemma 4 (fp32, seconds): no compilation there
(mechlib compiles only on CUDA; HF auto-compiles only on CUDA). Without ``--small`` the benchmark
refuses to run on a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlib.generate import generate_ids  # noqa: E402
from mechlib.io import atomic_write_json  # noqa: E402
from mechlib.models import decoder_layers  # noqa: E402
from mechlib.steering import steering_hook  # noqa: E402
from mechlib.tiny import benchmark_gemma4  # noqa: E402


class Sizes(NamedTuple):  # a NamedTuple, not a dataclass: the tests load this file without registering it
    prompt_len: int
    new_tokens: int
    dtype: torch.dtype
    steer_layer: int
    batches: dict[str, int]  # method name -> batch size


FULL = Sizes(
    prompt_len=160,
    new_tokens=256,
    dtype=torch.bfloat16,
    steer_layer=27,
    batches={
        "hf_dynamic_b1": 1,
        "hf_dynamic_b64": 64,
        "hf_static_b128": 128,
        "hf_static_b256": 256,
        "mechlib_b128": 128,
        "mechlib_b256": 256,
        "mechlib_cudagraphs_b256": 256,
        "mechlib_dynamic_b128": 128,
    },
)
SMALL = Sizes(
    prompt_len=16,
    new_tokens=8,
    dtype=torch.float32,
    steer_layer=3,
    batches={
        "hf_dynamic_b1": 1,
        "hf_dynamic_b64": 4,
        "hf_static_b128": 8,
        "hf_static_b256": 16,
        "mechlib_b128": 8,
        "mechlib_b256": 16,
        "mechlib_cudagraphs_b256": 16,
        "mechlib_dynamic_b128": 8,
    },
)
PAD = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(n: int, length: int, vocab: int) -> torch.Tensor:
    """``n`` random prompts of ``length`` ids (ids 3.. avoid pad/eos/bos), identical for every method."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, min(vocab, 32_000), (n, length), generator=g)


def run_hf(model, ids: torch.Tensor, new_tokens: int, static: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, pad_token_id=PAD, cache_implementation="static" if static else None
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[:, ids.shape[1] :].tolist()


def run_mechlib(model, ids: torch.Tensor, new_tokens: int, static: bool, compile=None) -> list[list[int]]:
    rows = [r.tolist() for r in ids.cpu()]
    return generate_ids(
        model,
        rows,
        new_tokens,
        len(rows),
        eos_ids=[],
        pad_id=PAD,
        ignore_eos=True,
        cache="static" if static else "dynamic",
        compile=compile if static else False,
        progress=False,
    )


def method_fn(name: str, device: torch.device):
    if name.startswith("hf_"):
        return lambda m, ids, n: run_hf(m, ids, n, static="static" in name)
    if "cudagraphs" in name:  # dynamo + CUDA graphs of the eager kernels, no inductor codegen (short compile)
        comp = {"backend": "cudagraphs"} if device.type == "cuda" else None
        return lambda m, ids, n: run_mechlib(m, ids, n, static=True, compile=comp)
    return lambda m, ids, n: run_mechlib(m, ids, n, static="dynamic" not in name)


def prefix_agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(name: str, model, pool: torch.Tensor, batch: int, new_tokens: int, device: torch.device) -> dict:
    fn = method_fn(name, device)
    ids = pool[:batch].to(device)
    _sync(device)
    t = time.perf_counter()
    fn(model, ids, new_tokens)
    _sync(device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = fn(model, ids, new_tokens)
    _sync(device)
    secs = time.perf_counter() - t
    assert all(len(r) == new_tokens for r in out), f"{name}: expected {new_tokens} tokens per row"
    return {
        "method": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "first_call_s": round(first, 3),
        "seconds": round(secs, 3),
        "answers_per_min": round(batch * 60 / secs, 1),
        "new_tokens_per_s": round(batch * new_tokens / secs, 1),
        "ms_per_step": round(1000 * secs / new_tokens, 2),
        "row0": out[0],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny Gemma 4 smoke test (fp32; runs on CPU)")
    ap.add_argument("--only", default="", help="comma-separated subset of methods")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.small:
        ap.error("the full benchmark needs a CUDA GPU; use --device cpu --small for the smoke test")
    cfg = SMALL if args.small else FULL
    names = [n for n in cfg.batches if not args.only or n in args.only.split(",")]

    t = time.perf_counter()
    model = benchmark_gemma4(args.small, device, cfg.dtype, pad_id=PAD)
    _sync(device)
    build_s = time.perf_counter() - t
    d = model.config.get_text_config().hidden_size
    layer = min(cfg.steer_layer, len(decoder_layers(model)) - 1)
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0))
    pool = prompts(max(cfg.batches.values()), cfg.prompt_len, model.config.get_text_config().vocab_size)

    results = {}
    with steering_hook(decoder_layers(model)[layer], vec, scale=0.05, mean_norm=100.0):
        for name in names:
            try:
                r = measure(name, model, pool, cfg.batches[name], cfg.new_tokens, device)
            except Exception as exc:  # any error: one failing method must not lose the others' numbers
                r = {"method": name, "batch": cfg.batches[name], "error": f"{type(exc).__name__}: {exc}"[:500]}
            results[name] = r
            print(json.dumps({k: v for k, v in r.items() if k != "row0"}), flush=True)
            if device.type == "cuda":
                from mechlib.generate import free_generation_cache

                free_generation_cache(model)
                torch.cuda.empty_cache()
    ok = {k: r for k, r in results.items() if "error" not in r}
    ref = ok.get("hf_dynamic_b64", {}).get("row0")
    for r in ok.values():
        r["prefix_agree_hf"] = prefix_agree(r["row0"], ref) if ref else None
        r["row0"] = r["row0"][:32]
    hf_best = max((r["answers_per_min"] for k, r in ok.items() if k.startswith("hf_")), default=None)
    ratios = {
        f"{k}_vs_best_hf": round(r["answers_per_min"] / hf_best, 2)
        for k, r in ok.items()
        if k.startswith("mechlib") and hf_best
    }
    print(json.dumps({"ratios": ratios, "prefix_agree_hf": {k: r["prefix_agree_hf"] for k, r in ok.items()}}))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-small" if args.small else "")
    today = dt.date.today().isoformat()
    import transformers

    record = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": today,
        "model": "tiny gemma4" if args.small else "gemma-4-e4b config, random weights",
        "model_dtype": str(cfg.dtype),
        "prompt_len": cfg.prompt_len,
        "steer_layer": layer,
        "steering": "mechlib.steering.steering_hook, scale 0.05 x mean_norm 100",
        "build_s": round(build_s, 2),
        "results": results,
        "ratios": ratios,
    }
    out = Path(args.results) / f"generate_{slug}_{today}.json"
    atomic_write_json(out, record)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
