"""Data-parallel plumbing: process groups, rank helpers, all-reduces, and a global-batch SAE step.

Why this module exists: a 1 B-token run takes hours, so users spread collection and training
over several GPUs with ``torchrun``. Everything here degrades to a no-op in one plain process
(no ``RANK``/``WORLD_SIZE`` in the environment), so the notebooks never notice it.

Training semantics kept *global* (what a one-process run with the same global batch computes):

- every rank reads the same global batch (same seed, same order) and trains on its own
  contiguous slice of rows (``local_batch``);
- top-k is per token, so the k-sparse code of a row does not depend on where it is computed;
- the FVU and AuxK denominators are sums over the *global* batch, built from all-reduced
  sums (:func:`global_reference_step`); each rank back-propagates its share of the global loss
  and the gradients are all-reduced with SUM, which is the gradient of the global loss;
- the ``fired`` masks are OR-reduced, so the dead-latent counters (and hence which latents
  AuxK trains) are identical on every rank.

What is equal, as measured (CPU, gloo, torch 2.13, 2 shared cores). The data are exactly the same:
the same batches in the same order, and collection writes the same shards and manifests byte for
byte. The SAE is equal only up to the order of fp32 sums (half a batch per rank, then an
all-reduce): one step's gradients and one Adam update agree to ~1e-7 (``tests/test_distributed.py``
pins 1e-6), but over a run these differences flip top-k ties and compound. At the default book's
shape (d_model 576, d_sae 4608, k 32, batch 1024, lr 1e-3, synthetic sparse activations), 2
processes vs 1 gave a largest |ΔW_dec| of 7e-8 after 100 steps and 5.1e-3 after 300 (relative
Frobenius 1.7e-3; 49 of 4608 decoder rows off by > 1e-3; final batch FVU 0.28558 both, dead latents
270 vs 273). One process with 1 vs 2 threads drifts as much or more (5.4e-2 after 300 steps, FVU
0.28558 vs 0.28541): a data-parallel SAE is as equal to a one-process SAE as two one-process
runs on different thread counts are to each other. For a pluggable fast step (CUDA) whose denominators
are local, :func:`rescaled_step` weights each rank's gradient by ``D_rank / D_global``, which
makes the FVU term exact and the AuxK term approximate (weighted by the FVU denominators
rather than AuxK's own; the error is the sampling spread of those ratios, ~1/sqrt(local batch)).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mechlib.sae.model import StepStats, TopKSAE, aux_loss, aux_topk, fired_mask, fvu_terms, sparse_decode

StepFn = Callable[[TopKSAE, Tensor, Tensor, int, float], StepStats]


class DistributedError(ValueError):
    """A data-parallel setting the run cannot use (e.g. a batch that does not split across ranks)."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the group (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``0, 1, 0`` outside it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(device: str, local_rank: int) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA exists, else CPU; ``cuda`` → this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    In a plain process (``WORLD_SIZE`` unset or 1) no group is created and rank 0 of 1 is
    returned, so callers can use the same code path everywhere.
    """
    rank, world, local_rank = env_world()
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world, local_rank, backend, dev)


def teardown() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """``with process_group() as info:`` — join on entry, always leave on exit (also on error)."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        teardown()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (a new tensor; ``t`` itself is untouched; identity in one process)."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_or(mask: Tensor) -> Tensor:
    """Logical OR of a bool tensor over ranks (gloo has no bool all-reduce, so via uint8 MAX)."""
    if not _active():
        return mask
    out = mask.to(torch.uint8)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def reduce_grads_sum(module: torch.nn.Module) -> None:
    """All-reduce every ``.grad`` with SUM, flattened into one buffer (one collective per step)."""
    if not _active():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def rank_items(n: int, rank: int, world: int) -> range:
    """Items ``i`` with ``i % world == rank``: the round-robin slice of ``n`` items a rank owns."""
    return range(rank, n, world)


def local_rows(x: Tensor, rank: int, world: int) -> Tensor:
    """This rank's contiguous slice of a global batch (the batch must split evenly)."""
    n = x.shape[0]
    if n % world:
        raise DistributedError(
            f"train_batch_size={n} does not split evenly over {world} processes; choose a multiple of {world}"
        )
    per = n // world
    return x[rank * per : (rank + 1) * per]


# ------------------------------------------------------------------------- global-batch steps


def _centred_sq_sum(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum over the global batch of (x - global column mean)^2, global row count)``."""
    n = all_sum(torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device))
    mean = all_sum(x.sum(0)) / n
    return all_sum((x - mean).pow(2).sum()), n


def global_reference_step(sae: TopKSAE, x: Tensor, dead_mask: Tensor, k_aux: int, aux_coef: float) -> StepStats:
    """:func:`mechlib.sae.reference_step` on this rank's rows, with global-batch denominators.

    Each rank back-propagates ``sum_local(e^2) / D_global + aux_coef * sum_local(aux^2) / A_global``;
    SUM-reducing the gradients then gives the gradient of the global loss exactly. The returned
    stats are the global values (identical on every rank). In one process this is the reference
    step up to the order of floating-point sums. The terms are :mod:`mechlib.sae.model`'s own
    (``fvu_terms``, ``aux_topk``, ``aux_loss``), given the global denominators.
    """
    out = sae(x)
    e = x - out.recon
    denom, n = _centred_sq_sum(x)
    se, fvu_part = fvu_terms(e, denom)
    aux_code = aux_topk(out.pre, dead_mask, k_aux)
    if aux_code is not None:
        ed = e.detach()
        aux_denom, _ = _centred_sq_sum(ed)
        aux_part = aux_loss(sparse_decode(aux_code, sae.W_dec), ed, aux_denom)
    else:
        aux_part = torch.zeros((), dtype=x.dtype, device=x.device)
    (fvu_part + aux_coef * aux_part).backward()
    fvu = all_sum(fvu_part.detach())
    aux = all_sum(aux_part.detach())
    mse = all_sum(se.detach()) / (n * x.shape[1])
    return StepStats(fvu + aux_coef * aux, fvu, mse, aux, fired_mask(out.code, sae.d_sae))


def rescaled_step(step_fn: StepFn) -> StepFn:
    """Wrap a step whose loss uses *local* denominators (e.g. the CUDA fast path) for data parallelism.

    After ``step_fn`` has back-propagated ``S_r / D_r + c * Aux_r / A_r`` on this rank's rows,
    the gradients are multiplied by ``D_r / D_global``; SUM-reduced, the FVU term is then exactly
    the global one, the AuxK term is weighted by ``D_r / D_global`` instead of ``A_r / A_global``.
    The stats returned are global FVU/MSE (exact) and the rank-mean AuxK loss (approximate).
    """

    def step(sae: TopKSAE, x: Tensor, dead_mask: Tensor, k_aux: int, aux_coef: float) -> StepStats:
        d_local = (x - x.mean(0)).pow(2).sum()
        d_global, n = _centred_sq_sum(x)
        stats = step_fn(sae, x, dead_mask, k_aux, aux_coef)
        weight = d_local / d_global
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.mul_(weight)
        world = dist.get_world_size() if _active() else 1
        fvu = all_sum(stats.fvu * d_local) / d_global
        mse = all_sum(stats.mse * x.shape[0]) / n
        aux = all_sum(stats.aux_loss) / world
        return StepStats(fvu + aux_coef * aux, fvu, mse, aux, stats.fired)

    return step


def free_port() -> int:
    """A free TCP port on localhost (for a local process group in tests and CPU experiments)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
