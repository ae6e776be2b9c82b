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
    # decode steps captured as CUDA graphs in the chapter (mechlib.graph_decode.GRAPHS), and the notes of
    # batches that could not be captured and took the slower path: None when the chapter decoded nothing
    graph_captures: int | None = None
    graph_fallbacks: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChapterDevice:
        """From :meth:`as_dict`'s JSON (a file written before the graph fields existed reads with None)."""
        fallbacks = d.get("graph_fallbacks")
        return cls(**{**d, "graph_fallbacks": None if fallbacks is None else tuple(fallbacks)})

    def graphs_note(self) -> str:
        """The report's cell: CUDA-graph captures of decode steps, and how many distinct fallback notes."""
        if self.graph_captures is None:
            return "—"
        n = len(self.graph_fallbacks or ())
        return f"{self.graph_captures}" + (f" ({n} fallback note{'s' * (n != 1)})" if n else "")


def snapshot() -> ChapterDevice:
    """The device this process used so far (CUDA only when torch already initialised it)."""
    torch = sys.modules.get("torch")
    version = getattr(torch, "__version__", None)
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    captures, fallbacks = _graph_counts()
    if torch is not None and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        name, peak = torch.cuda.get_device_name(index), int(torch.cuda.max_memory_allocated(index))
        return ChapterDevice("cuda", name, peak, version, cuda, captures, fallbacks)
    return ChapterDevice("cpu", f"{os.cpu_count()} CPUs", None, version, cuda, captures, fallbacks)


def _graph_counts() -> tuple[int | None, tuple[str, ...] | None]:
    """``mechlib.graph_decode.GRAPHS``' captures and distinct fallback notes; None when the chapter did not
    try the graph path (the module not imported, or no batch offered to it)."""
    graphs = getattr(sys.modules.get("mechlib.graph_decode"), "GRAPHS", None)
    if graphs is None or not (graphs.builds or graphs.errors):
        return None, None
    return int(graphs.captures), tuple(dict.fromkeys(graphs.errors))[:20]


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
        return ChapterDevice.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def format_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"
