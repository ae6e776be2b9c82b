"""The result of ``benchmarks/gpu_book.sh`` as one JSON file: per-chapter wall time and peak GPU memory,
the device, the GPU's name and the versions, and the torchrun (nccl) step.

Why a separate step: the book may be stopped by its time limit, and then it writes no
``book_timings.json``. Each finished chapter's time is also in the runner's log line
(``[mechbook] RUN: NAME done in X s``) and each chapter's kernel leaves its device snapshot
(:mod:`mechlib.device_stats`) after every cell, so a stopped run still reports what it reached.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from mechlib import device_stats
from mechlib.io import atomic_write_json
from mechlib.paths import RunPaths

DONE = re.compile(r"^\[mechbook\] (?P<run>\S+): (?P<chapter>\S+) done in (?P<s>[0-9.]+) s")


def chapter_times(log: Path) -> dict[str, float]:
    """``{chapter: seconds}`` from the runner's log lines (the chapters that finished)."""
    if not log.is_file():
        return {}
    return {
        m["chapter"]: float(m["s"]) for line in log.read_text(errors="replace").splitlines() if (m := DONE.match(line))
    }


def chapter_devices(paths: RunPaths) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(paths.metrics.glob(".device_*.json")):
        snap = device_stats.read(f)
        if snap is not None:
            out[f.stem.removeprefix(".device_")] = snap.as_dict()
    return out


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["nvidia_smi"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def labels_of(paths: RunPaths) -> dict[str, Any]:
    """What chapters 05-06 say their labels are (``placeholder`` for this run)."""
    out = {}
    for name in ("05_contrastive_layers", "06_steering"):
        f = paths.metrics / f"{name}.json"
        if f.is_file():
            m = json.loads(f.read_text())
            out[name] = {"labels": m.get("labels"), "placeholder_labels": m.get("placeholder_labels")}
    return out


def log_tail(log: Path, lines: int = 6) -> list[str]:
    """The last lines of a step's log: where a failed step says why."""
    return log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    paths = RunPaths(args.run)
    times = chapter_times(Path(args.book_log)) | chapter_times(Path(args.ch08_log))
    devices = chapter_devices(paths)
    chapters = [
        {"chapter": c, "seconds": times.get(c), "finished": c in times, **devices.get(c, {})}
        for c in sorted(set(times) | set(devices))
    ]
    torchrun_log = Path(args.torchrun_log).read_text(errors="replace") if Path(args.torchrun_log).is_file() else ""
    return {
        "what": "python -m mechlib.book on " + args.params + " (chapters 01-07, then 08 in the time left); "
        "torchrun --nproc_per_node 1 -m mechlib.scale collect train on the tiny Gemma 4",
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        "params": args.params,
        "run": args.run,
        "book": {
            "rc": args.book_rc,
            "seconds": args.book_seconds,
            "limit_s": args.book_limit,
            "chapters_finished": sum(c["finished"] for c in chapters),
            "chapters": chapters,
            "labels": labels_of(paths),
        },
        # chapter 08 runs after the seven, in the time they left: rc -1 = skipped (too little time, or 01-07 failed)
        "chapter_08": {
            "rc": args.ch08_rc,
            "seconds": args.ch08_seconds,
            "limit_s": args.ch08_limit,
            "finished": "08_feature_reward" in times,
            "log_tail": log_tail(Path(args.ch08_log)),
        },
        "torchrun": {
            "rc": args.torchrun_rc,
            "seconds": args.torchrun_seconds,
            # NCCL_DEBUG=INFO makes nccl announce itself in the log: evidence, not inference
            "nccl_seen_in_log": "NCCL INFO" in torchrun_log,
            "log_tail": [line for line in torchrun_log.splitlines() if "[mechlib.scale]" in line][-4:],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--params", required=True)
    ap.add_argument("--book-log", required=True)
    ap.add_argument("--book-rc", type=int, required=True)
    ap.add_argument("--book-seconds", type=int, required=True)
    ap.add_argument("--book-limit", type=int, required=True)
    ap.add_argument("--ch08-log", default="")
    ap.add_argument("--ch08-rc", type=int, default=-1)
    ap.add_argument("--ch08-seconds", type=int, default=0)
    ap.add_argument("--ch08-limit", type=int, default=0)
    ap.add_argument("--torchrun-log", required=True)
    ap.add_argument("--torchrun-rc", type=int, required=True)
    ap.add_argument("--torchrun-seconds", type=int, required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    summary = summarize(args)
    gpu = summary["environment"]["gpu"] or "cpu"
    name = f"gpu_book_{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}_{summary['date']}.json"
    for folder in filter(None, (args.results, args.out)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(folder) / name, summary)
    print(json.dumps({k: summary[k] for k in ("environment", "book", "chapter_08", "torchrun")}, indent=1)[:6000])
    print(f"saved {name} in {args.results}" + (f" and {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
