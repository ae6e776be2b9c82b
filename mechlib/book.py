"""The papermill runner: ``python -m mechlib.book params/<run>.yaml [--only 01 02] [-p KEY=VALUE ...]``.

Why a runner of our own: papermill cannot read Jupytext percent-format ``.py`` files, and it
only *warns* about parameters a notebook does not declare. The runner converts each chapter
with jupytext, validates the whole params file against :class:`mechlib.params.BookParams`
first (an unknown key is an error that names it), passes each chapter only the parameters it
declares, stops at the first failing chapter while keeping its executed notebook for reading,
and finally regenerates ``outputs/<run>/REPORT.md`` from the metrics.

Before any chapter runs it also checks what only the runner can: the device exists, ``layer``
and ``steering_layer`` fit the model (read from its config, no weights), the local files the chosen
chapters will read exist (:mod:`mechlib.book_checks`), and no other runner holds the run name
(:mod:`mechlib.runlock`). Every failure ends in one ``[mechbook] error:`` line saying what failed,
where, and that a rerun resumes; the full trace stays in the kept notebook, never on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mechlib import device_stats
from mechlib.book_checks import (
    check_device,
    check_inputs,
    check_layers,
    one_line,
    parse_overrides,
    source_of,
    with_overrides,
)
from mechlib.io import atomic_write_json, atomic_write_text, read_json
from mechlib.params import BookParams, ParamsError, known_keys, load_params
from mechlib.paths import NOTEBOOKS_DIR, REPO_ROOT, RunPaths
from mechlib.runlock import RunLockError, run_lock
from mechlib.tidy import tidy_notebook_file

RESUME_HINT = "rerun the same command to resume (finished work is reused)"


class ChapterError(RuntimeError):
    """A chapter failed; the executed notebook (with its traceback) is kept at ``notebook``.

    ``notebook`` is ``None`` when the chapter failed before papermill wrote anything (a kernel
    that never started); the trace then goes to a ``<chapter>.traceback.txt`` named in ``reason``.
    """

    def __init__(self, chapter: str, notebook: Path | None, reason: str):
        kept = f"executed notebook kept: {notebook}" if notebook else "no notebook was written"
        super().__init__(f"chapter {chapter} failed: {reason}; {kept}; {RESUME_HINT}")
        self.chapter = chapter
        self.notebook = notebook
        self.reason = reason


class ChapterInterrupted(KeyboardInterrupt):
    """Ctrl-C while a chapter ran; still a ``KeyboardInterrupt``, now saying which chapter and cell."""

    def __init__(self, chapter: str, notebook: Path | None, where: str):
        kept = f"executed notebook kept: {notebook}" if notebook else "no notebook was written"
        super().__init__(f"interrupted (Ctrl-C) in chapter {chapter}{where}; {kept}; {RESUME_HINT}")
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


def declared_by(todo: Sequence[Chapter]) -> set[str]:
    """Every parameter that one of ``todo``'s chapters declares."""
    import jupytext

    return {name for chapter in todo for name in declared_parameters(jupytext.read(chapter.source))}


# Headless kernels have no ipywidgets front end, so tqdm.auto falls back to text bars and warns
# "IProgress not found" into the first output of every executed chapter. The text bars are what
# a saved notebook can show; the warning is noise there. Interactive sessions keep it.
HEADLESS_WARNING_FILTERS = ("ignore:IProgress not found",)


# Plain scripts run with MPLBACKEND=Agg (the Makefile exports it: no display needed). A kernel that
# inherited it would draw every figure off-screen and the executed chapter would show none; the
# inline backend is headless too and puts each figure into the notebook as a PNG.
KERNEL_MPLBACKEND = "module://matplotlib_inline.backend_inline"
# The kernel app's own log (not the chapter's warnings, which go into the notebook): without this
# every chapter prints ipykernel's "Kernel is running over TCP without encryption" to the terminal —
# a local kernel on the loopback interface, started and owned by this process.
# The kernel also starts with mechlib.device_stats' hook: the chapter's device and peak GPU memory.
# jupyter_client interrupts (SIGINT) every kernel it shuts down before asking it to exit; a kernel caught
# inside a message handler then logs "KeyboardInterrupt caught in kernel." at ERROR level, after the chapter
# has finished and been saved (about one chapter in ten). Only that line is dropped: a real Ctrl-C still
# ends in the book's own one-line message.
QUIET_SHUTDOWN_LINE = (
    "import logging as _mechbook_logging; _mechbook_logging.getLogger('IPKernelApp').addFilter("
    "lambda record: 'KeyboardInterrupt caught in kernel' not in record.getMessage())"
)
KERNEL_ARGS = (
    "--IPKernelApp.log_level=ERROR",
    f"--IPKernelApp.exec_lines={device_stats.KERNEL_EXEC_LINE}; {QUIET_SHUTDOWN_LINE}",
)


def headless_kernel_env() -> None:
    """The environment the chapter kernels inherit: :data:`HEADLESS_WARNING_FILTERS` added to
    ``PYTHONWARNINGS``, and matplotlib's inline backend (:data:`KERNEL_MPLBACKEND`)."""
    current = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [f for f in HEADLESS_WARNING_FILTERS if f not in current])
    os.environ["MPLBACKEND"] = KERNEL_MPLBACKEND


def run_chapter(chapter: Chapter, params: BookParams, paths: RunPaths, *, log_output: bool = False) -> ChapterRun:
    import jupytext
    import papermill

    nb = jupytext.read(chapter.source)
    names = declared_parameters(nb)
    values = {n: getattr(params, n) for n in names}
    out = paths.notebooks / f"{chapter.name}.ipynb"
    # papermill rewrites its output file after every cell (not atomically): it writes a hidden
    # partial file that replaces ``out`` when the chapter ends, passed or failed, so a killed run
    # never leaves a truncated notebook where nbval and readers look.
    partial = out.with_name(f".{chapter.name}.partial.json")
    headless_kernel_env()
    os.environ[device_stats.ENV] = str(device_file(paths, chapter.name))
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
            extra_arguments=list(KERNEL_ARGS),
        )
        tidy_notebook_file(partial)  # progress bars: their final line only
    except (Exception, KeyboardInterrupt) as exc:
        raise _failure(chapter, _keep(partial, out), exc, paths) from None
    finally:
        _keep(partial, out)
    return ChapterRun(chapter.name, time.perf_counter() - start, out)


def device_file(paths: RunPaths, chapter: str) -> Path:
    """Where a chapter's kernel leaves its :class:`mechlib.device_stats.ChapterDevice` snapshot."""
    return paths.metrics / f".device_{chapter}.json"


def _keep(partial: Path, out: Path) -> Path | None:
    """Move papermill's partial notebook over ``out``; ``out`` if this chapter wrote one, else None."""
    if partial.exists():
        os.replace(partial, out)
        return out
    return None


def _failure(chapter: Chapter, kept: Path | None, exc: BaseException, paths: RunPaths) -> BaseException:
    """The one-line error for ``exc`` ending ``chapter``; what the terminal no longer shows goes into
    the kept notebook (as an error output on the cell that was running)."""
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    cell = _running_cell(kept)
    where = f" in cell {cell[1]}" if cell else ""
    if isinstance(exc, KeyboardInterrupt):
        _annotate(kept, cell, "KeyboardInterrupt", "interrupted (Ctrl-C) while this cell ran")
        return ChapterInterrupted(chapter.name, kept, where)
    if isinstance(exc, PapermillExecutionError):  # the traceback is already in the notebook
        return ChapterError(chapter.name, kept, f"{exc.ename}: {one_line(exc.evalue)}{where}")
    if isinstance(exc, DeadKernelError):
        why = "its process was killed from outside, most often by the out-of-memory killer"
        _annotate(kept, cell, "DeadKernelError", f"the kernel died while this cell ran: {why}")
        return ChapterError(chapter.name, kept, f"the kernel died{where}: {why}")
    trace = traceback.format_exception(exc)
    reason = f"{type(exc).__name__}: {one_line(exc)}{where}"
    if kept is None:
        log = paths.notebooks / f"{chapter.name}.traceback.txt"
        atomic_write_text(log, "".join(trace))
        reason += f" (traceback: {log})"
    _annotate(kept, cell, type(exc).__name__, str(exc), trace)
    return ChapterError(chapter.name, kept, reason)


def _running_cell(notebook: Path | None) -> tuple[int, str] | None:
    """``(index, "[N] `first line`")`` of the last cell papermill started in ``notebook``."""
    if notebook is None:
        return None
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # any error: a notebook we cannot read just gives no location
        return None
    started = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.metadata.get("papermill", {}).get("start_time")
    ]
    if not started:
        return None
    cell = nb.cells[started[-1]]
    lines = [ln.strip() for ln in cell.source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    first = (lines[0][:57] + "...") if lines and len(lines[0]) > 60 else (lines[0] if lines else "")
    count = f"[{cell.execution_count}] " if cell.get("execution_count") else ""
    return started[-1], f"{count}`{first}`"


def _annotate(
    notebook: Path | None, cell: tuple[int, str] | None, ename: str, evalue: str, trace: list[str] | None = None
) -> None:
    """Add an error output to the cell that was running, so the kept notebook shows what ended it."""
    if notebook is None or cell is None:
        return
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
        target = nb.cells[cell[0]]
        target.outputs.append(
            nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=trace or [f"{ename}: {evalue}"])
        )
        target.metadata.setdefault("papermill", {}).update(exception=True, status="failed")
        atomic_write_text(notebook, nbformat.writes(nb))
    except Exception:  # any error: the note is a courtesy; it must never hide the error it explains
        return


def run_book(
    params_path: str | Path,
    only: Sequence[str] | None = None,
    *,
    log_output: bool = False,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    run: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[ChapterRun]:
    """Run the chosen chapters of the book on one params file; return per-chapter timings.

    ``run`` overrides the run name (the output folder), e.g. so that ``make test`` never touches
    what ``make book`` made. Everything that can be checked without running a chapter is checked
    first, before anything is written; ``overrides`` (the command line's ``-p KEY=VALUE``) replace the
    file's values, and the params.yaml saved with the run holds the result; then the run name is locked
    for the whole run (released on error and Ctrl-C too).
    """
    params = with_overrides(load_params(params_path, run=run), overrides or {}, str(params_path))
    todo = select(chapters(notebooks_dir), only)
    if not todo:
        raise ParamsError(f"no chapters found in {notebooks_dir}")
    source = source_of(str(params_path), overrides or {})
    check_device(params.device, source)
    check_layers(params, source)
    check_inputs(params, source, declared_by(todo))
    paths = RunPaths(params.run).make()
    with run_lock(paths.root, params.run, note=lambda msg: print(msg, file=sys.stderr, flush=True)):
        atomic_write_text(paths.root / "params.yaml", yaml.safe_dump(params.as_dict(), sort_keys=True))
        runs: list[ChapterRun] = []
        for chapter in todo:
            print(f"[mechbook] {params.run}: running {chapter.name} ...", flush=True)
            done = run_chapter(chapter, params, paths, log_output=log_output)
            print(
                f"[mechbook] {params.run}: {chapter.name} done in {done.seconds:.1f} s -> {done.notebook}", flush=True
            )
            runs.append(done)
        timings = {r.chapter: round(r.seconds, 2) for r in runs}
        atomic_write_json(paths.metrics / "book_timings.json", _latest(paths.metrics / "book_timings.json", timings))
        devices = {r.chapter: d.as_dict() for r in runs if (d := device_stats.read(device_file(paths, r.chapter)))}
        atomic_write_json(paths.metrics / "book_devices.json", _latest(paths.metrics / "book_devices.json", devices))
        from mechlib.browser import add_contrast_scores
        from mechlib.model_card import write_model_card
        from mechlib.report import write_report

        add_contrast_scores(paths)  # chapter 05's scores into the feature browser's index (if both exist)
        report = write_report(params.run)
        card = write_model_card(params.run)
    print(f"[mechbook] {params.run}: report -> {report}; model card -> {card}", flush=True)
    return runs


def _latest(path: Path, new: dict[str, Any]) -> dict[str, Any]:  # Any: a chapter's JSON entry
    """Each chapter's entry from its latest run: ``new`` (this call's chapters) over what ``path`` held, in
    chapter order. Why: after ``--only 05`` the report should still show the other chapters' times."""
    try:
        old = read_json(path)
    except (OSError, ValueError):  # none yet, or damaged: this call's entries only
        old = {}
    return dict(sorted({**(old if isinstance(old, dict) else {}), **new}.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Exit status: 0 done, 1 bad input or a failed chapter, 130 Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m mechlib.book", description=__doc__.splitlines()[0])
    parser.add_argument("params", help="params file, e.g. params/default.yaml")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these chapters (numbers or names)")
    parser.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    parser.add_argument("--run", metavar="NAME", help="output folder outputs/NAME (default: the params file's run)")
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter of the file (value read as YAML), e.g. -p k=64 -p lr=5e-4",
    )
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.param)
        runs = run_book(args.params, args.only, log_output=args.log_output, run=args.run, overrides=overrides)
    except KeyboardInterrupt as exc:
        msg = str(exc) if isinstance(exc, ChapterInterrupted) else f"interrupted (Ctrl-C); {RESUME_HINT}"
        print(f"[mechbook] error: {one_line(msg)}", file=sys.stderr, flush=True)
        return 130
    except (ParamsError, ChapterError, RunLockError) as exc:
        print(f"[mechbook] error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    total = sum(r.seconds for r in runs)
    print(f"[mechbook] {len(runs)} chapter(s) in {total:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
