"""Entry points for long runs outside the notebooks, on one or many GPUs (torchrun).

    torchrun --nproc_per_node N -m mechlib.scale collect params/<run>.yaml
    torchrun --nproc_per_node N -m mechlib.scale train   params/<run>.yaml
    python -m mechlib.scale train params/<run>.yaml          # one process, same files

Why a separate entry point: the notebooks run in one Jupyter kernel (one process), while a
1 B-token run wants every GPU of a machine and must survive preemption. Both entry points write
exactly the files the chapters read (``outputs/<run>/activations``, ``outputs/<run>/checkpoints``),
so a user can collect and train here, then run the book, which finds the work done and resumes
or skips it. Killed and restarted, each resumes from what is on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from mechlib.distributed import (DistInfo, StepFn, all_or, barrier, global_reference_step, local_rows,
                                 process_group, reduce_grads_sum, rescaled_step)


def train_hooks(info: DistInfo):
    """The :class:`mechlib.train.ParallelHooks` of this rank: contiguous slice of each global batch,
    SUM of gradients, OR of the ``fired`` masks, files written by rank 0 only."""
    from mechlib.train import ParallelHooks

    if not info.distributed:
        return ParallelHooks()
    return ParallelHooks(local_batch=lambda x: local_rows(x, info.rank, info.world_size),
                         reduce_grads=reduce_grads_sum, reduce_fired=all_or, is_main=info.is_main)


def train_step_fn(info: DistInfo) -> StepFn | None:
    """``None`` (train.py's own choice) in one process; with several, the global-batch step —
    exact reference math on CPU, the fast CUDA step with rescaled gradients on GPUs."""
    if not info.distributed:
        return None
    from mechlib.train import pick_step_fn

    fn, name = pick_step_fn(info.device)
    return rescaled_step(fn) if name == "fast" else global_reference_step


def train(params_path: str | Path, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the run's SAE on its collected activations (one process or one rank of torchrun)."""
    from mechlib.params import load_params
    from mechlib.paths import RunPaths
    from mechlib.train import TrainConfig, train_sae

    P = load_params(params_path)
    paths = RunPaths(P.run).make()
    store = open_train_store(P, paths)
    with process_group(device or P.device) as info:
        res = train_sae(store, TrainConfig.from_params(P), paths.checkpoints, device=str(info.device),
                        step_fn=train_step_fn(info), hooks=train_hooks(info), progress=progress and info.is_main)
        barrier()
        summary = {"run": P.run, "world_size": info.world_size, "steps": res.steps, "tokens": res.tokens,
                   "resumed_from": res.resumed_from, "seconds": round(res.seconds, 2),
                   "final_fvu": res.history[-1]["fvu"] if res.history else None,
                   "checkpoints": str(paths.checkpoints)}
        if info.is_main:
            print(f"[mechlib.scale] train {P.run}: {summary}", flush=True)
    return summary


def open_train_store(P: Any, paths: Any):
    """The training activations chapter 01 wrote (``outputs/<run>/activations``)."""
    from mechlib.collect import open_store

    return open_store(P, paths)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechlib.scale", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("collect", "train"))
    parser.add_argument("params", help="params file, e.g. params/default.yaml")
    parser.add_argument("--device", default=None, help="override the params' device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from mechlib.params import ParamsError

    try:
        if args.command == "train":
            train(args.params, args.device, progress=not args.no_progress)
        else:
            collect(args.params, args.device, progress=not args.no_progress)
    except (ParamsError, ValueError) as exc:
        print(f"[mechlib.scale] error: {exc}", file=sys.stderr)
        return 1
    return 0


def collect(params_path: str | Path, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    raise NotImplementedError("data-parallel collection lands with mechlib.collect")


if __name__ == "__main__":
    sys.exit(main())
