"""Figures for the book.

Why: figures must show inline in executed notebooks *and* land as PNG under
``outputs/<run>/figures``. ``save_figure`` writes atomically and leaves the figure open, so the
notebook still displays it; sizes and dpi are fixed so nbval's ``<Figure size …>`` text is stable.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from mechlib.io import atomic_path

DPI = 110


def new_figure(width: float = 8.0, height: float = 4.5, **subplots_kw) -> tuple[Figure, object]:
    """A figure of fixed size; returns ``(fig, axes)`` like ``plt.subplots``."""
    return plt.subplots(figsize=(width, height), **subplots_kw)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as PNG atomically (no half-written figure) and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path
