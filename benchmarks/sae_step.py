"""TopK SAE training-step throughput: the study's fp32 dense method vs TF32 vs mechlib's fast path(s).

One command on a GPU machine (H100/H200), from the repository root::

    python benchmarks/sae_step.py

measures, in ONE run and on the same synthetic data, tokens/s and peak GPU memory of the full
training step (forward, AuxK, backward, Adam, decoder renorm every 10 steps) at the study's shape
(d=2560, m=32768, k=128, k_aux=512, aux coef 0.125) at batch 8192 (the study's) and 16384, for

* ``fp32_dense``: the study's method written the straightforward way — dense fp32 ``pre``,
  ``topk``, scatter into a dense [N, m] code, dense decode, masked dense AuxK, autograd, Adam;
* ``tf32_dense``: the same with TF32 matmuls;
* ``fast``: ``mechlib.sae.fast.fast_step`` as shipped (Triton, bf16 encoder GEMM, ``torch.topk``,
  ``bwd="sparse"``: ``pass_a``/``pass_b``) + fused Adam;
* ``fast_seg`` / ``fast_dense`` / ``fast_dense_gather``: the candidate backwards
  (``MECHLIB_SAE_BWD=seg|dense|dense_gather``: tensor-core segment kernels / three dense bf16 GEMMs
  over ``pre``'s buffer / two GEMMs and a gather for the value gradients; see ``mechlib.sae.fast``);
* ``<best>_topk<chunk>``: only if the two-stage top-k (``topk_chunked``) beat one ``torch.topk`` by
  >= 3 % when timed alone (``topk`` in the JSON: the selection alone at chunks 512 ... 8192), the
  fastest variant with it;
* ``<best>_no_dead``: the fastest fast variant when no latent is dead (AuxK skipped, steady state).

The radix top-k kernel is gone (it lost to ``torch.topk`` on the H100, 24.3 vs 21.4 ms/step), so
no variant measures it. A variant that fails (error, out of memory) is recorded with its error
and the run goes on. Then: the 100-step equivalence (same initial weights and data, Adam steps of
the fp32 reference and of every fast variant that ran: held-out FVU within 0.005, exactly k
distinct latents per row, unit decoder rows), a per-kernel profile of the fastest fast variant
at batch 8192, and ``target_met`` for it (>= 1 M tok/s, <= 6 GiB, equivalence passed). The JSON
(``benchmarks/results/sae_step_<device>_<date>.json``) is rewritten after every stage, so a run
cut short by a time limit still leaves what it measured.

How to read it: ``results`` rows (variant, batch, ms/step, tok/s, peak GiB, or ``error``);
``best`` names the fastest fast variant at the study batch; ``equivalence[<variant>].passed``;
``profile`` lists that variant's kernels by CUDA time; ``kernel_configs`` the launch configs picked.

Synthetic activations: each token is a sum of ``k_true`` random unit "true features" (of
``n_true``) with exponential magnitudes, plus a shared mean direction and Gaussian noise, scaled
so the mean token norm is 95 — the study model's mean residual norm at layer 27 (95.3); per
dimension that is ~1.9, i.e. unit-ish after a fixed scale. Speed does not depend on values, but
realistic structure makes the equivalence check meaningful (the SAE learns, FVU falls).

Peak memory is the trainer's: parameters, gradients, Adam moments and step buffers; the pool
of input batches and the data generator are allocated before and subtracted. ``AuxK`` runs with
``--dead-frac`` of the latents marked dead (default 10 %, >= k_aux so the full top-512 runs).

``--device cpu --small`` is a smoke test (tiny shapes, torch twins instead of Triton, < 1 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # mechlib, and sae_step_parts when imported by path

from sae_step_parts import (  # noqa: E402
    AUX_COEF,
    FAST_BWD,
    LR,
    RENORM_EVERY,
    SMALL,
    STUDY,
    TOPK_CHUNKS,  # noqa: F401 (re-exported: tests read bench.TOPK_CHUNKS)
    VARIANTS,
    Equivalence,
    SyntheticActivations,
    Timing,
    TopkTiming,  # noqa: F401 (re-exported, as above)
    _error,
    _free,
    _set_tf32,
    _sync,
    _triton_info,
    exact_fvu,
    fast_backend,
    ratios,
    study_step,
    time_topk,
)

from mechlib.io import atomic_write_json  # noqa: E402
from mechlib.sae import TopKSAE, init_b_dec_, renorm_decoder_  # noqa: E402
from mechlib.sae.fast import fast_step, select  # noqa: E402


def _fastest(results: list[Timing], batch: int) -> list[Timing]:
    """The fast variants that ran at ``batch`` with dead latents, fastest first."""
    ok = [r for r in results if r.batch == batch and r.ms_per_step and not r.variant.endswith("_no_dead")]
    return sorted((r for r in ok if fast_backend(r.variant, torch.device("cpu"))), key=lambda r: r.ms_per_step or 0.0)


def make_trainer(kind: str, shape: dict, device: torch.device, init_x: torch.Tensor, dead: torch.Tensor):
    """(sae, step(x) -> fvu tensor, backend) for one variant, from the same seed-0 initial weights."""
    sae = TopKSAE(shape["d"], shape["m"], shape["k"], seed=0).to(device)
    init_b_dec_(sae, init_x[:4096])
    backend = fast_backend(kind, device)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=(backend is not None and device.type == "cuda") or None)
    step_dead = torch.zeros_like(dead) if kind.endswith("_no_dead") else dead
    count = [0]

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if backend is not None:
            fvu = fast_step(sae, x, step_dead, shape["k_aux"], AUX_COEF, backend=backend).fvu
        else:
            fvu = study_step(sae, x, dead, shape["k_aux"], AUX_COEF)
        opt.step()
        count[0] += 1
        if count[0] % RENORM_EVERY == 0:
            renorm_decoder_(sae)
        return fvu

    return sae, step, backend


def time_variant(
    kind: str, shape: dict, device: torch.device, pool: list[torch.Tensor], dead: torch.Tensor, steps: int, warmup: int
) -> Timing:
    """Time one variant; a failure (any exception, out of memory included) is returned, not raised."""
    _free(device)
    cuda, batch = device.type == "cuda", pool[0].shape[0]
    if cuda:
        data_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    _set_tf32(kind == "tf32_dense")
    try:
        _sae, step, backend = make_trainer(kind, shape, device, pool[0], dead)
        t_warm = time.perf_counter()
        for i in range(warmup):
            step(pool[i % len(pool)])
        _sync(device)
        t_warm = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        for i in range(steps):
            fvu = step(pool[i % len(pool)])
        _sync(device)
        seconds = time.perf_counter() - t0
        last_fvu = round(float(fvu), 5)
    except Exception as exc:  # recorded; the rest of the run goes on
        return Timing(kind, batch, steps=steps, warmup_steps=warmup, error=_error(exc))
    finally:
        _set_tf32(False)
    peak = (torch.cuda.max_memory_allocated() - data_bytes) / 2**30 if cuda else None
    return Timing(
        kind,
        batch,
        tokens_per_s=round(steps * batch / seconds, 1),
        ms_per_step=round(1e3 * seconds / steps, 3),
        peak_gib=None if peak is None else round(peak, 3),
        steps=steps,
        warmup_steps=warmup,
        warmup_s=round(t_warm, 2),
        last_fvu=last_fvu,
        backend="autograd" if backend is None else f"{backend.name}/{backend.bwd}",
        optimizer="Adam(fused)" if backend is not None and cuda else "Adam",
        n_dead=0 if kind.endswith("_no_dead") else int(dead.sum()),
    )


def _train(kind: str, shape: dict, device: torch.device, data: SyntheticActivations, dead: torch.Tensor, steps: int):
    sae, step, backend = make_trainer(kind, shape, device, data.batch(shape["batch"], 0), dead)
    held_out = data.batch(shape["batch"], step=10**6)
    start = exact_fvu(sae, held_out)
    fvus = [float(step(data.batch(shape["batch"], s))) for s in range(steps)]
    return sae, backend, start, round(sum(fvus[-10:]) / len(fvus[-10:]), 5), exact_fvu(sae, held_out), held_out


def equivalence(
    shape: dict, device: torch.device, data: SyntheticActivations, dead: torch.Tensor, steps: int, kinds: list[str]
) -> tuple[dict, list[Equivalence]]:
    """The fp32 dense reference once, then each fast variant in ``kinds`` from the same init and batches."""
    _, _, ref_start, ref_last10, ref_fvu, held_out = _train("fp32_dense", shape, device, data, dead, steps)
    ref = {"steps": steps, "lr": LR, "renorm_every": RENORM_EVERY, "n_dead": int(dead.sum())}
    ref |= {"fp32_heldout_fvu_start": round(ref_start, 5), "fp32_train_fvu_last10": ref_last10}
    ref["fp32_heldout_fvu"] = round(ref_fvu, 5)
    out = []
    for kind in kinds:
        _free(device)
        eq = Equivalence(kind, steps, ref_heldout_fvu=round(ref_fvu, 5))
        try:
            sae, backend, start, eq.train_fvu_last10, fvu, _ = _train(kind, shape, device, data, dead, steps)
            eq.heldout_fvu_start, eq.heldout_fvu = round(start, 5), round(fvu, 5)
            eq.heldout_fvu_diff = round(abs(fvu - ref_fvu), 5)
            with torch.no_grad():
                cdt = backend.compute or torch.float32
                pre = torch.addmm(sae.b_enc.to(cdt), (held_out - sae.b_dec).to(cdt), sae.W_enc.to(cdt))
                dead_idx = dead.nonzero().flatten()
                ka = min(shape["k_aux"], dead_idx.numel())
                sel = select(backend, pre, sae.k, dead_idx, ka)
                distinct = torch.sort(sel.idx.long(), dim=1).values.diff(dim=1).ne(0).sum(1) + 1
                eq.exactly_k_active = bool((distinct == sae.k).all())
                eq.aux_only_dead = bool(dead[sel.aux_idx.long()].all()) if ka else True
                eq.max_decoder_norm_error = float((sae.W_dec.norm(dim=1) - 1).abs().max())
            eq.passed = (
                eq.heldout_fvu_diff <= 0.005
                and eq.exactly_k_active
                and eq.aux_only_dead
                and eq.max_decoder_norm_error < 1e-4
                and fvu < start
            )
        except Exception as exc:  # recorded; the other variants still run
            eq.error = _error(exc)
        out.append(eq)
    return ref, out


def profile_variant(kind: str, shape: dict, device: torch.device, pool: list[torch.Tensor], dead: torch.Tensor):
    from torch.profiler import ProfilerActivity, profile

    _, step, _ = make_trainer(kind, shape, device, pool[0], dead)
    for i in range(2):
        step(pool[i % len(pool)])
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            step(pool[i % len(pool)])
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25).splitlines()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--batches", default=None, help="comma-separated (default: the study's and twice it)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per fast variant (default 20; small 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; small 1)")
    ap.add_argument("--baseline-steps", type=int, default=None, help="timed steps of fp32/tf32 dense (default 5)")
    ap.add_argument("--equiv-steps", type=int, default=None, help="equivalence run length (default 200; small 20)")
    ap.add_argument("--dead-frac", type=float, default=0.10)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...; small: not saved)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu --small for the smoke test")
    kinds = [v for v in args.variants.split(",") if v]
    unknown = [v for v in kinds if v not in FAST_BWD and v not in ("fp32_dense", "tf32_dense")]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: fp32_dense, tf32_dense, {', '.join(FAST_BWD)}")
    shape = dict(SMALL if args.small else STUDY)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [shape["batch"], 2 * shape["batch"]]
    steps = args.steps or (3 if args.small else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    base_steps = args.baseline_steps or (2 if args.small else 5)
    equiv_steps = args.equiv_steps or (20 if args.small else 200)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or (
        None if args.small else ROOT / "benchmarks" / "results" / f"sae_step_{slug}_{dt.date.today()}.json"
    )

    data = SyntheticActivations(shape["d"], shape["n_true"], shape["k_true"], device)
    gen = torch.Generator().manual_seed(1)
    dead = torch.zeros(shape["m"], dtype=torch.bool)
    dead[torch.randperm(shape["m"], generator=gen)[: int(args.dead_frac * shape["m"])]] = True
    dead = dead.to(device)
    report: dict = {
        "device": name,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "shape": shape,
        "batches": batches,
        "aux_coef": AUX_COEF,
        "lr": LR,
        "dead_frac": args.dead_frac,
        "target": {"tokens_per_s": 1.0e6, "peak_gib": 6.0, "batch": shape["batch"]},
    }
    results: list[Timing] = []

    def save(stage: str) -> None:  # after every stage: a run cut short keeps what it measured
        report["triton"], report["kernel_configs"] = _triton_info()
        report.update(stage=stage, results=[dataclasses.asdict(r) for r in results], ratios=ratios(results))
        if out:
            atomic_write_json(out, report)

    for batch in batches:
        pool = [data.batch(batch, step=10_000 + i) for i in range(4)]
        for kind in kinds:
            dense = kind in ("fp32_dense", "tf32_dense")
            res = time_variant(
                kind, shape, device, pool, dead, base_steps if dense else steps, min(warmup, 2) if dense else warmup
            )
            print(json.dumps(dataclasses.asdict(res)), flush=True)
            results.append(res)
            save(f"timed {kind} b{batch}")
        del pool
    head = shape["batch"] if shape["batch"] in batches else batches[0]  # the headline batch
    pool = [data.batch(head, step=10_000 + i) for i in range(4)]
    topk = time_topk(shape, device, pool[0])
    report["topk"] = [dataclasses.asdict(t) for t in topk]
    print(json.dumps({"topk": report["topk"]}), flush=True)
    fast_ok = _fastest(results, head)
    plain = next((t.ms for t in topk if t.chunk == 0 and t.ms), None)
    chunked = sorted((t for t in topk if t.chunk and t.ms), key=lambda t: t.ms or 0.0)
    if fast_ok and plain and chunked and (chunked[0].ms or plain) < 0.97 * plain:  # a 2-stage top-k won alone
        res = time_variant(f"{fast_ok[0].variant}_topk{chunked[0].chunk}", shape, device, pool, dead, steps, warmup)
        print(json.dumps(dataclasses.asdict(res)), flush=True)
        results.append(res)
        fast_ok = _fastest(results, head)
    save("timed topk")
    best = fast_ok[0].variant if fast_ok else None
    report["best"] = best
    print(json.dumps({"ratios": ratios(results), "best": best}), flush=True)
    if best is None:
        save("no fast variant ran")
        return report
    res = time_variant(f"{best}_no_dead", shape, device, pool, dead, steps, warmup)
    print(json.dumps(dataclasses.asdict(res)), flush=True)
    results.append(res)
    save("timed no_dead")

    try:
        ref, eqs = equivalence(shape, device, data, dead, equiv_steps, [r.variant for r in fast_ok])
    except Exception as exc:  # the fp32 reference run itself failed: the timings above stand
        ref, eqs = {"error": _error(exc)}, [Equivalence(r.variant, equiv_steps, error="no reference") for r in fast_ok]
    report["equivalence_reference"], report["equivalence"] = ref, {e.variant: dataclasses.asdict(e) for e in eqs}
    print(json.dumps({"equivalence": report["equivalence"]}), flush=True)
    save("equivalence")
    try:
        report["profile"] = [] if args.no_profile else profile_variant(best, shape, device, pool, dead)
    except Exception as exc:  # the measurements above stand without it
        report["profile"] = [f"profile failed: {_error(exc)}"]
    print("\n".join(report["profile"][:30]))
    top, eq_best = fast_ok[0], eqs[0]
    if top.peak_gib is not None:
        report["target_met"] = (top.tokens_per_s or 0) >= 1.0e6 and top.peak_gib <= 6.0 and eq_best.passed
    save("done")
    if out:
        print(f"saved {out}")
    return report


if __name__ == "__main__":
    main()
