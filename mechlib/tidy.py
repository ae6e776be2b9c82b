"""Executed chapters that read like a finished document: one line per progress bar.

Why: a headless kernel has no widget front end, so ``tqdm`` writes text bars, redrawing each line
with ``\\r``, and papermill stores every flush as its own output. A saved chapter then shows a
column of half-finished bars ("0%", "64%", "100%", "100%") where a reader expects the final state.
Jupyter itself coalesces adjacent stream outputs and lets ``\\r`` overwrite the line; doing the same
in the saved file keeps what the reader would have seen live — the last state of every bar — and
nothing else. nbval coalesces streams the same way before comparing, so checked cells are unaffected.
"""

from __future__ import annotations

import os
from typing import Any

import nbformat

from mechlib.io import atomic_write_text


def final_line_states(text: str) -> str:
    """Each ``\\n``-separated line as a terminal would finally show it: the part after its last ``\\r``."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def collapse_streams(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge adjacent stream outputs of the same name in every cell and resolve their ``\\r`` redraws (in place)."""
    for cell in nb.cells:
        merged: list[Any] = []
        for out in cell.get("outputs", []):
            prev = merged[-1] if merged else None
            if (
                out.get("output_type") == "stream"
                and prev is not None
                and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")
            ):
                prev["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream" and "\r" in out["text"]:
                out["text"] = final_line_states(out["text"])
        if "outputs" in cell:
            cell["outputs"] = merged
    return nb


def tidy_notebook_file(path: str | os.PathLike[str]) -> None:
    """:func:`collapse_streams` on a saved notebook, rewritten atomically."""
    nb = nbformat.read(path, as_version=4)
    atomic_write_text(path, nbformat.writes(collapse_streams(nb)))
