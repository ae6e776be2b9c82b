"""The parts of ``benchmarks/sae_step.py`` that hold no policy: its shapes, the synthetic activations,
the study's reference step, the result rows, the top-k timing and the device helpers.

Why a second file: ``sae_step.py`` keeps what a reader checks to trust a run (which variants are timed,
how the best is chosen, the equivalence against the fp32 reference, the targets); these are the pieces it
is built from, each small and plain. ``sae_step.py`` imports each of them by name, so ``bench.<name>``
still finds them (tests/test_sae_step_bench.py) and monkeypatching ``bench.time_topk`` still reaches ``main``.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time

import torch
import torch.nn.functional as F

from mechlib.sae import TopKSAE
from mechlib.sae.fast import Backend, Bwd, default_backend, topk_chunked

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
    """Seeded synthetic residual-stream batches (see ``sae_step.py``'s docstring); batch(step) is reproducible."""

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
