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
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlib.io import atomic_write_json  # noqa: E402
from mechlib.sae import TopKSAE, init_b_dec_, renorm_decoder_  # noqa: E402
from mechlib.sae.fast import Backend, Bwd, default_backend, fast_step, select, topk_chunked  # noqa: E402

FAST_BWD: dict[str, Bwd] = {
    "fast": "sparse",
    "fast_seg": "seg",
    "fast_dense": "dense",
    "fast_dense_gather": "dense_gather",
}
VARIANTS = "fp32_dense,tf32_dense," + ",".join(FAST_BWD)

STUDY = dict(d=2560, m=32768, k=128, k_aux=512, batch=8192, n_true=16384, k_true=64)  # batch: the headline
SMALL = dict(d=64, m=512, k=16, k_aux=32, batch=512, n_true=1024, k_true=8)
AUX_COEF, LR, RENORM_EVERY, TARGET_NORM = 0.125, 2e-4, 10, 95.0


class SyntheticActivations:
    """Seeded synthetic residual-stream batches (see the module docstring); batch(step) is reproducible."""

    def __init__(self, d: int, n_true: int, k_true: int, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        feats = torch.randn(n_true, d, generator=gen, device=device)
        self.features = feats / feats.norm(dim=1, keepdim=True)
        mean = torch.randn(d, generator=gen, device=device)
        self.mean = mean / mean.norm() * 2.0
        self.k_true, self.device, self.seed, self.scale = k_true, device, seed, 1.0
        probe = self.batch(256, step=-1)
        self.scale = TARGET_NORM / float(probe.norm(dim=1).mean())

    def batch(self, n: int, step: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step + 17)
        ids = torch.randint(0, self.features.shape[0], (n, self.k_true), generator=gen, device=self.device)
        mags = -torch.log(torch.rand(n, self.k_true, generator=gen, device=self.device).clamp_min(1e-6))
        x = F.embedding_bag(ids, self.features, per_sample_weights=mags, mode="sum") + self.mean
        x += 0.05 * torch.randn(x.shape, generator=gen, device=self.device)
        return x * self.scale


def study_step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int, aux_coef: float) -> torch.Tensor:
    """The study's method: dense pre, topk, scatter to dense latents, dense decode, autograd."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    e = x - (acts @ sae.W_dec + sae.b_dec)
    fvu = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss = fvu
    n_dead = int(dead.sum())
    if k_aux > 0 and n_dead > 0:
        a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, a_idx, a_vals.relu()) @ sae.W_dec
        ed = e.detach()
        loss = loss + aux_coef * (e_hat - ed).pow(2).sum() / (ed - ed.mean(0)).pow(2).sum()
    loss.backward()
    return fvu.detach()


@dataclasses.dataclass
class Timing:
    """One variant at one batch size; ``error`` set (and the numbers None) when it failed."""

    variant: str
    batch: int
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    peak_gib: float | None = None
    steps: int = 0
    warmup_steps: int = 0
    warmup_s: float | None = None
    last_fvu: float | None = None
    backend: str = ""
    optimizer: str = ""
    n_dead: int = 0
    error: str | None = None


@dataclasses.dataclass
class Equivalence:
    """``steps`` Adam steps of one fast variant beside the fp32 reference, same init and data."""

    variant: str
    steps: int
    heldout_fvu_start: float | None = None
    heldout_fvu: float | None = None
    train_fvu_last10: float | None = None
    ref_heldout_fvu: float | None = None
    heldout_fvu_diff: float | None = None
    exactly_k_active: bool = False
    aux_only_dead: bool = False
    max_decoder_norm_error: float | None = None
    passed: bool = False
    error: str | None = None


_KIND = re.compile(r"(fast(?:_[a-z]+)*?)(?:_topk(\d+))?(_no_dead)?")  # e.g. fast_seg_topk1024_no_dead


def fast_backend(kind: str, device: torch.device) -> Backend | None:
    """The fast step's backend for a ``fast*`` variant (None for the dense baselines)."""
    match = _KIND.fullmatch(kind)
    if match is None or match.group(1) not in FAST_BWD:
        return None
    chunk = int(match.group(2) or 0)
    return dataclasses.replace(default_backend(device), bwd=FAST_BWD[match.group(1)], topk_chunk=chunk)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:600]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


@dataclasses.dataclass
class TopkTiming:
    """The step's main selection alone: one ``torch.topk`` (chunk 0) or ``topk_chunked`` at ``chunk``."""

    chunk: int
    ms: float | None = None
    error: str | None = None


TOPK_CHUNKS = (0, 512, 1024, 2048, 4096, 8192)


@torch.no_grad()
def time_topk(shape: dict, device: torch.device, x: torch.Tensor, reps: int = 10) -> list[TopkTiming]:
    """Time the selection on a fresh SAE's pre-activations (bf16 on CUDA, as the fast step's)."""
    sae = TopKSAE(shape["d"], shape["m"], shape["k"], seed=0).to(device)
    cdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    pre = torch.addmm(sae.b_enc.to(cdt), (x - sae.b_dec).to(cdt), sae.W_enc.to(cdt))
    out = []
    for chunk in TOPK_CHUNKS:
        try:
            for _ in range(2):
                topk_chunked(pre, shape["k"], chunk)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                topk_chunked(pre, shape["k"], chunk)
            _sync(device)
            out.append(TopkTiming(chunk, round(1e3 * (time.perf_counter() - t0) / reps, 3)))
        except Exception as exc:  # recorded; the run goes on
            out.append(TopkTiming(chunk, error=_error(exc)))
    return out


@torch.no_grad()
def exact_fvu(sae: TopKSAE, x: torch.Tensor) -> float:
    """Held-out FVU with the exact fp32 encoding (same formula as training)."""
    pre = sae.pre_acts(x)
    vals, idx = pre.topk(sae.k, dim=-1)
    recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals.relu(), mode="sum") + sae.b_dec
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


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


def _triton_info() -> tuple[str | None, dict]:
    """Triton's version and the launch configurations the kernels picked (empty without triton)."""
    try:
        import triton

        from mechlib.sae.triton_kernels import CHOSEN
    except ImportError:
        return None, {}
    return triton.__version__, {"/".join(map(str, key)): cfg for key, cfg in CHOSEN.items()}


def ratios(results: list[Timing]) -> dict[str, float]:
    """tok/s of each fast variant over each dense baseline at the same batch."""
    ok = [r for r in results if r.tokens_per_s]
    return {
        f"{a.variant}_over_{b.variant}_b{a.batch}": round(a.tokens_per_s / b.tokens_per_s, 2)  # type: ignore[operator]
        for a in ok
        if a.variant.startswith("fast")
        for b in ok
        if b.batch == a.batch and b.variant in ("fp32_dense", "tf32_dense")
    }


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
