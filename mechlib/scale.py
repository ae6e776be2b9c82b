"""Entry points for long runs outside the notebooks, on one or many GPUs (torchrun).

    torchrun --nproc_per_node N -m mechlib.scale collect params/<run>.yaml
    torchrun --nproc_per_node N -m mechlib.scale train   params/<run>.yaml
    torchrun --nproc_per_node N -m mechlib.scale collect train params/<run>.yaml   # both, in order
    python -m mechlib.scale train params/<run>.yaml          # one process, same files

Why a separate entry point: the notebooks run in one Jupyter kernel (one process), while a
1 B-token run wants every GPU of a machine and must survive preemption. Both entry points write
exactly the files the chapters read (``outputs/<run>/activations``, ``outputs/<run>/checkpoints``),
with arguments built by the same functions of the params as the chapters'
(:func:`mechlib.activations.collect_config.collect_config_from_params`, ``TrainConfig.from_params``), so a
user can collect and train here, then run the book, which finds the work done and resumes or
skips it. Killed and restarted, each resumes from what is on disk — only what was computed from
the same inputs (:mod:`mechlib.activations.provenance`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mechlib.activations.collect_config import collect_config_from_params, collect_split, open_train_store
from mechlib.activations.shards import MANIFEST, Manifest, ShardEntry, ShardError, rank_manifest_name, read_manifest
from mechlib.book_checks import check_device, check_inputs, check_layers
from mechlib.io import atomic_write_json
from mechlib.models import load_model
from mechlib.params import load_params
from mechlib.paths import RunPaths
from mechlib.runlock import RunLockError, run_lock
from mechlib.sae.distributed import (
    DistInfo,
    StepFn,
    all_or,
    barrier,
    global_reference_step,
    local_rows,
    process_group,
    reduce_grads_sum,
    rescaled_step,
)
from mechlib.sae.train import ParallelHooks, pick_step_fn, train_sae


def train_hooks(info: DistInfo) -> ParallelHooks:
    """The :class:`mechlib.sae.train.ParallelHooks` of this rank: contiguous slice of each global batch,
    SUM of gradients, OR of the ``fired`` masks, files written by rank 0 only."""
    if not info.distributed:
        return ParallelHooks()
    return ParallelHooks(
        local_batch=lambda x: local_rows(x, info.rank, info.world_size),
        reduce_grads=reduce_grads_sum,
        reduce_fired=all_or,
        is_main=info.is_main,
    )


def train_step_fn(info: DistInfo) -> StepFn | None:
    """``None`` (train.py's own choice) in one process; with several, the global-batch step —
    exact reference math on CPU, the fast CUDA step with rescaled gradients on GPUs."""
    if not info.distributed:
        return None
    fn, name = pick_step_fn(info.device)
    return rescaled_step(fn) if name == "fast" else global_reference_step


def train(
    params_path: str | Path, device: str | None = None, progress: bool = True, info: DistInfo | None = None
) -> dict[str, Any]:
    """Train the run's SAE on its collected activations (one process or one rank of torchrun).

    ``info``: the process group already joined (by :func:`main`); ``None`` joins and leaves one here.
    """
    P = load_params(params_path)
    paths = RunPaths(P.run).make()
    if P.sae_source == "pretrained":
        print(f"[mechlib.scale] train {P.run}: sae_source is 'pretrained' ({P.sae_pretrained}); nothing to train")
        return {"run": P.run, "steps": 0, "sae_source": "pretrained"}
    with _group(info, device or P.device) as info:
        store = open_train_store(P, paths, str(info.device))
        res = train_sae(
            store,
            P.train_config(),
            paths.checkpoints,
            device=str(info.device),
            step_fn=train_step_fn(info),
            hooks=train_hooks(info),
            progress=progress and info.is_main,
        )
        barrier()
        summary = {
            "run": P.run,
            "world_size": info.world_size,
            "steps": res.steps,
            "tokens": res.tokens,
            "resumed_from": res.resumed_from,
            "seconds": round(res.seconds, 2),
            "final_fvu": res.final_fvu,
            "checkpoints": str(paths.checkpoints),
        }
        if info.is_main:
            print(f"[mechlib.scale] train {P.run}: {summary}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechlib.scale", description=__doc__.splitlines()[0])
    parser.add_argument(
        "commands",
        nargs="+",
        choices=("collect", "train"),
        metavar="{collect,train}",
        help="collect, train, or both in order",
    )
    parser.add_argument("params", help="params file, e.g. params/default.yaml")
    parser.add_argument("--device", default=None, help="override the params' device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        P = load_params(args.params)  # a bad params file fails before any process group exists
        # ... and so do a device this machine lacks, a layer past the model's last and a missing corpus file
        check_device(args.device or P.device, args.params if args.device is None else "--device")
        check_layers(P, args.params)
        reads_corpus = "collect" in args.commands or P.collect_mode == "stream"
        check_inputs(P, args.params, {"corpus"} if reads_corpus else set())
        with _run_lock(P.run), process_group(args.device or P.device) as info:  # one group for all commands
            for command in args.commands:
                {"collect": collect, "train": train}[command](
                    args.params, args.device, progress=not args.no_progress, info=info
                )
    except (ValueError, RunLockError) as exc:  # ParamsError, ModelLoadError, ShardError, SAEError, a held run
        print(f"[mechlib.scale] error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_lock(run: str) -> contextlib.AbstractContextManager[object]:
    """The run's lock (:mod:`mechlib.runlock`), held by rank 0 (``RANK``, set by torchrun) for all ranks.

    Why: ``python -m mechlib.book`` on the same run name writes the same shards and checkpoints; the
    book and this entry point refuse to start while the other holds the run. Only rank 0 takes it (the
    ranks of one torchrun are one runner); if it cannot, rank 0 exits with the holder named and
    torchrun stops the other ranks.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return run_lock(RunPaths(run).root, run, note=lambda msg: print(msg, file=sys.stderr, flush=True))


@contextlib.contextmanager
def _group(info: DistInfo | None, device: str) -> Iterator[DistInfo]:
    if info is not None:
        yield info
    else:
        with process_group(device) as joined:
            yield joined


def collect(
    params_path: str | Path, device: str | None = None, progress: bool = True, info: DistInfo | None = None
) -> dict[str, Any]:
    """Collect the run's ``train`` (``collect_mode: disk``) and ``heldout`` activations, data parallel.

    Rank ``r`` of ``N`` computes shards ``r, r+N, r+2N, ...`` of each split (the shards one process
    would write, byte for byte); after a barrier rank 0 merges the per-rank manifests into the
    ``manifest.json`` chapter 01 writes. A rerun (any number of ranks) skips verified shards.
    """
    P = load_params(params_path)
    paths = RunPaths(P.run).make()
    summary: dict[str, Any] = {"run": P.run}
    with _group(info, device or P.device) as info:
        loaded = load_model(P.model, dtype=P.model_dtype, device=str(info.device))
        cfg = collect_config_from_params(P)  # the same function chapter 01 uses: the same tokens
        for split, _ in cfg.splits:
            out = paths.activations / split
            run = collect_split(
                loaded,
                cfg,
                out,
                split,
                progress=progress and info.is_main,
                rank=info.rank,
                world_size=info.world_size,
                sync=barrier,
            )
            barrier()
            manifest = merge_rank_manifests(out, info.world_size) if info.distributed and info.is_main else None
            barrier()
            summary[split] = {
                "computed_tokens_rank0": run.computed_tokens,
                "seconds": round(run.seconds, 2),
                "n_tokens": (manifest or run.manifest)["n_tokens"],
            }
        summary["world_size"] = info.world_size
        if info.is_main:
            print(f"[mechlib.scale] collect {P.run}: {summary}", flush=True)
    return summary


def merge_rank_manifests(out_dir: Path, world_size: int) -> Manifest:
    """Rank 0, after a barrier: the union of the ranks' manifests → ``manifest.json``; drop the parts.

    Raises :class:`mechlib.activations.shards.ShardError` naming the folder if a shard index is missing (a rank
    that did not finish) — nothing is merged then, so a rerun completes it.
    """
    parts = [read_manifest(out_dir, rank_manifest_name(r)) for r in range(world_size)]
    if any(p is None for p in parts):
        missing = [rank_manifest_name(r) for r, p in enumerate(parts) if p is None]
        raise ShardError(f"{out_dir}: rank manifests {missing} are missing; rerun the collection")
    manifests = [p for p in parts if p is not None]
    entries: dict[int, ShardEntry] = {}
    for part in manifests:
        entries.update({e["index"]: e for e in part["shards"]})
    shards = [entries[i] for i in sorted(entries)]
    if [e["index"] for e in shards] != list(range(len(shards))):
        raise ShardError(f"{out_dir}: shards {sorted(entries)} are not contiguous from 0; rerun the collection")
    merged = {**manifests[0], "shards": shards, "n_tokens": sum(e["n_tokens"] for e in shards)}
    merged["complete"] = merged["n_tokens"] == merged["n_tokens_requested"]
    atomic_write_json(out_dir / MANIFEST, merged)
    for leftover in out_dir.glob(rank_manifest_name("*")):  # also those of an earlier run with more ranks
        leftover.unlink(missing_ok=True)
    return merged


if __name__ == "__main__":
    sys.exit(main())
