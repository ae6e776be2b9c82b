"""The papermill runner: ``python -m mechlib.book params/<run>.yaml [--only 01 02]``.

Why a runner of our own: papermill cannot read Jupytext percent-format ``.py`` files, and it
only *warns* about parameters a notebook does not declare. The runner converts each chapter
with jupytext, validates the whole params file against :class:`mechlib.params.BookParams`
first (an unknown key is an error that names it), passes each chapter only the parameters it
declares, stops at the first failing chapter while keeping its executed notebook for reading,
and finally regenerates ``outputs/<run>/REPORT.md`` from the metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from mechlib.io import atomic_write_json, atomic_write_text
from mechlib.params import BookParams, ParamsError, known_keys, load_params
from mechlib.paths import NOTEBOOKS_DIR, REPO_ROOT, RunPaths


class ChapterError(RuntimeError):
    """A chapter failed; the executed notebook (with its traceback) is kept at ``notebook``."""

    def __init__(self, chapter: str, notebook: Path, reason: str):
        super().__init__(f"chapter {chapter} failed: {reason}\n  executed notebook kept for reading: {notebook}")
        self.chapter = chapter
        self.notebook = notebook


@dataclass(frozen=True)
class Chapter:
    number: str  # "01"
    name: str  # "01_collect"
    source: Path  # notebooks/01_collect.py


@dataclass(frozen=True)
class ChapterRun:
    chapter: str
    seconds: float
    notebook: Path


def chapters(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Chapter]:
    """All chapters, in order: ``notebooks/NN_*.py``."""
    found = sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.py"))
    return [Chapter(p.stem[:2], p.stem, p) for p in found]


def select(all_chapters: list[Chapter], only: Sequence[str] | None) -> list[Chapter]:
    if not only:
        return all_chapters
    wanted = {o.zfill(2)[:2] if o.isdigit() else o for o in only}
    chosen = [c for c in all_chapters if c.number in wanted or c.name in wanted]
    missing = wanted - {c.number for c in chosen} - {c.name for c in chosen}
    if missing:
        names = ", ".join(c.name for c in all_chapters)
        raise ParamsError(f"--only: no chapter {', '.join(sorted(missing))}; chapters are: {names}")
    return chosen


def declared_parameters(nb) -> list[str]:
    """Names a chapter declares in its ``parameters`` cell (checked against the schema)."""
    import papermill

    names = list(papermill.inspect_notebook(nb))
    unknown = [n for n in names if n not in known_keys()]
    if unknown:
        raise ParamsError(f"notebook declares parameters missing from mechlib.params.BookParams: {unknown}")
    return names


# Headless kernels have no ipywidgets front end, so tqdm.auto falls back to text bars and warns
# "IProgress not found" into the first output of every executed chapter. The text bars are what
# a saved notebook can show; the warning is noise there. Interactive sessions keep it.
HEADLESS_WARNING_FILTERS = ("ignore:IProgress not found",)


def headless_kernel_env() -> None:
    """Add :data:`HEADLESS_WARNING_FILTERS` to ``PYTHONWARNINGS``, which the kernels inherit."""
    current = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [f for f in HEADLESS_WARNING_FILTERS if f not in current])


def run_chapter(chapter: Chapter, params: BookParams, paths: RunPaths, *, log_output: bool = False) -> ChapterRun:
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb = jupytext.read(chapter.source)
    names = declared_parameters(nb)
    values = {n: getattr(params, n) for n in names}
    out = paths.notebooks / f"{chapter.name}.ipynb"
    # papermill rewrites its output file after every cell (not atomically): it writes a hidden
    # partial file that replaces ``out`` when the chapter ends, passed or failed, so a killed run
    # never leaves a truncated notebook where nbval and readers look.
    partial = out.with_name(f".{chapter.name}.partial.json")
    headless_kernel_env()
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            nb,
            str(partial),
            parameters=values,
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            language="python",
            progress_bar=False,
            log_output=log_output,
        )
    except PapermillExecutionError as exc:
        reason = f"{exc.ename}: {exc.evalue}"
        raise ChapterError(chapter.name, out, reason) from None
    finally:
        if partial.exists():
            os.replace(partial, out)
    return ChapterRun(chapter.name, time.perf_counter() - start, out)


def run_book(params_path: str | Path, only: Sequence[str] | None = None, *, log_output: bool = False,
             notebooks_dir: Path = NOTEBOOKS_DIR) -> list[ChapterRun]:
    """Run the chosen chapters of the book on one params file; return per-chapter timings."""
    params = load_params(params_path)
    todo = select(chapters(notebooks_dir), only)
    if not todo:
        raise ParamsError(f"no chapters found in {notebooks_dir}")
    paths = RunPaths(params.run).make()
    atomic_write_text(paths.root / "params.yaml", yaml.safe_dump(params.as_dict(), sort_keys=True))
    runs: list[ChapterRun] = []
    for chapter in todo:
        print(f"[mechbook] {params.run}: running {chapter.name} ...", flush=True)
        run = run_chapter(chapter, params, paths, log_output=log_output)
        print(f"[mechbook] {params.run}: {chapter.name} done in {run.seconds:.1f} s -> {run.notebook}", flush=True)
        runs.append(run)
    timings = {r.chapter: round(r.seconds, 2) for r in runs}
    timing_file = paths.metrics / "book_timings.json"
    atomic_write_json(timing_file, timings)
    from mechlib.report import write_report

    report = write_report(params.run)
    print(f"[mechbook] {params.run}: report -> {report}", flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechlib.book", description=__doc__.splitlines()[0])
    parser.add_argument("params", help="params file, e.g. params/default.yaml")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these chapters (numbers or names)")
    parser.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    args = parser.parse_args(argv)
    try:
        runs = run_book(args.params, args.only, log_output=args.log_output)
    except (ParamsError, ChapterError) as exc:
        print(f"[mechbook] error: {exc}", file=sys.stderr)
        return 1
    total = sum(r.seconds for r in runs)
    print(f"[mechbook] {len(runs)} chapter(s) in {total:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
