"""Formatting shared by ``REPORT.md``'s sections (:mod:`mechlib.report`, :mod:`mechlib.report_steering`).

Why one place: a number must read the same in every table of the report (``0.6962``, ``32``, ``—`` for
a value a chapter did not produce), whichever section prints it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mechlib.paths import RunPaths
from mechlib.results import ChapterResult

__all__ = ["figures", "findings", "fmt", "p_se", "pct", "table"]


def fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) < 1e-3 and value != 0:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")  # 32.0 → "32", 0.6962 stays
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return str(value)


def pct(value: float | None) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{100 * value:.1f} %"


def p_se(p: float | None, se: float | None) -> str:
    """A permutation p with its Monte-Carlo standard error, when known."""
    return fmt(p) if not isinstance(se, (int, float)) else f"{fmt(p)} ± {se:.3f}"


def table(header: list[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figures(paths: RunPaths, prefix: str) -> str:
    figs = sorted(paths.figures.glob(f"{prefix}*.png"))
    return "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs)


def findings(*chapters: ChapterResult | None) -> str:
    """Each chapter's "What this run found" paragraph (written by the chapter from its own numbers)."""
    text = ""
    for result in chapters:
        if result is not None and result.finding:
            text += f"\n**What this run found (chapter {result.FILE[:2]}).** {result.finding}\n"
    return text
