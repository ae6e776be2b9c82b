"""Which device each chapter ran on, and its peak GPU memory, recorded from inside its kernel.

Why: a chapter runs in its own Jupyter kernel, so the runner (:mod:`mechlib.book`) cannot see the
chapter's CUDA allocator. The runner starts each kernel with :data:`KERNEL_EXEC_LINE`, which
installs a hook that, after every cell, writes a :class:`ChapterDevice` snapshot to the file named
by the environment variable :data:`ENV` — the last cell's snapshot is the chapter's. Nothing is
imported that the chapter did not import itself (torch is read from ``sys.modules``), and the
notebook gets no extra cell. The runner gathers the files into ``metrics/book_devices.json``;
``REPORT.md`` shows them beside each chapter's wall time.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "MECHBOOK_DEVICE_STATS"
KERNEL_EXEC_LINE = "import mechlib.device_stats as _mechbook_device_stats; _mechbook_device_stats.install()"


@dataclass(frozen=True)
class ChapterDevice:
    device: str  # "cuda" when the chapter touched CUDA, else "cpu"
    device_name: str  # the GPU's name, or the CPU count
    peak_gpu_bytes: int | None  # torch.cuda.max_memory_allocated() over the chapter (None on CPU)
    torch: str | None
    cuda: str | None  # the CUDA version torch was built with

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def snapshot() -> ChapterDevice:
    """The device this process used so far (CUDA only when torch already initialised it)."""
    torch = sys.modules.get("torch")
    version = getattr(torch, "__version__", None)
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    if torch is not None and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        return ChapterDevice(
            "cuda", torch.cuda.get_device_name(index), int(torch.cuda.max_memory_allocated(index)), version, cuda
        )
    return ChapterDevice("cpu", f"{os.cpu_count()} CPUs", None, version, cuda)


def write_snapshot(path: str | os.PathLike[str]) -> None:
    from mechlib.io import atomic_write_json  # mechlib.io imports torch: only when a snapshot is written

    atomic_write_json(path, snapshot().as_dict())


def install() -> None:
    """Write a snapshot after every cell to ``$MECHBOOK_DEVICE_STATS`` (nothing when it is unset)."""
    target = os.environ.get(ENV)
    if not target:
        return
    from IPython import get_ipython  # only inside a kernel

    shell = get_ipython()
    if shell is not None:
        shell.events.register("post_run_cell", lambda *_: write_snapshot(target))


def read(path: Path) -> ChapterDevice | None:
    """A snapshot file written by :func:`install`'s hook, or None when the chapter wrote none."""
    try:
        return ChapterDevice(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def format_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"
