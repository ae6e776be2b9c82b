"""Placeholder correctness labels for runs whose model cannot answer (random weights).

Why: chapters 05–06 contrast and steer *correct* against *wrong* answers. A random-weight model
(``model: random:…``, used to run every code path of the book at the study's shapes without the
real weights) answers nothing correctly, so both chapters would stop at "no correct answers".
``placeholder_labels: f`` (a fraction in (0, 1); 0 = off, the default) replaces the parser's verdict
with a seeded draw instead — and every output of those chapters says so (:data:`BANNER` in the
printed tables, the findings, the figure titles, ``"labels": "placeholder"`` in the metrics), so a
placeholder number is never read as a result.

The draw:
- **baseline answers** (chapter 04's records): exactly ``round(f × n)`` of the ``n`` questions are
  marked correct (at least one and at most n − 1 when n ≥ 2, so both sides of the contrast exist),
  chosen by a permutation seeded with ``seed`` of the sorted ids — the same labels in 04, 05 and 06;
- **steered answers** (chapter 06): an answer identical to the question's baseline answer keeps
  the baseline's label; a changed answer is correct when a hash of (seed, question id, answer text)
  falls below ``f``. So steering that changes nothing flips nothing, and a changed answer gets a
  fresh, reproducible coin — McNemar, bootstrap and recovered sets all get discordant pairs to work on.

All scoring rules (primary, strict, flexible; ``finished`` still leaves cut-off answers out) read
the same placeholder label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mechlib.contrast import BaselineSplit, load_baseline_split
from mechlib.records import Record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mechlib.paths import RunPaths

LABEL_KIND_PLACEHOLDER = "placeholder"
LABEL_KIND_PARSER = "parser"


class PlaceholderError(ValueError):
    """A placeholder fraction outside (0, 1); the message names the value."""


def banner(fraction: float) -> str:
    """The one line every placeholder output carries."""
    return (
        f"PLACEHOLDER LABELS (placeholder_labels = {fraction:g}): 'correct' is a seeded draw, not the model's "
        f"answers; these numbers test the code paths, not the model."
    )


def is_on(fraction: float) -> bool:
    return fraction > 0


def label_kind(fraction: float) -> str:
    return LABEL_KIND_PLACEHOLDER if is_on(fraction) else LABEL_KIND_PARSER


def _check(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise PlaceholderError(f"placeholder_labels must be 0 (off) or a fraction in (0, 1), got {fraction!r}")


def baseline_labels(ids: Sequence[str], fraction: float, seed: int) -> dict[str, bool]:
    """``{id: correct}``: exactly ``round(fraction × n)`` ids (clamped to 1..n-1) marked correct, seeded."""
    _check(fraction)
    ordered = sorted(str(i) for i in ids)
    n = len(ordered)
    n_true = min(max(round(fraction * n), 1), n - 1) if n >= 2 else round(fraction * n)
    chosen = set(random.Random(f"placeholder:{seed}").sample(ordered, n_true))
    return {str(i): str(i) in chosen for i in ids}


def answer_label(qid: str, generation: str, fraction: float, seed: int) -> bool:
    """A reproducible coin for one (question, answer text): correct with probability ``fraction``."""
    _check(fraction)
    digest = hashlib.sha256(f"{seed}\0{qid}\0{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def with_label(record: Record, correct: bool) -> Record:
    """``record`` with every scoring rule's verdict set to ``correct``."""
    return dataclasses.replace(record, correct=correct, correct_strict=correct, correct_flexible=correct)


def relabel_baseline(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    labels = baseline_labels([r.id for r in records], fraction, seed)
    return [with_label(r, labels[str(r.id)]) for r in records]


def relabel_steered(
    records: Sequence[Record], baseline: Mapping[str, Record], fraction: float, seed: int
) -> list[Record]:
    """Steered records labelled against the (already relabelled) ``baseline`` records by id
    (returned as they are when ``fraction`` is 0)."""
    if not is_on(fraction):
        return list(records)
    out = []
    for r in records:
        base = baseline[str(r.id)]
        same = base.generation == r.generation
        out.append(with_label(r, base.correct if same else answer_label(str(r.id), r.generation, fraction, seed)))
    return out


def relabel_split(split: BaselineSplit, fraction: float, seed: int) -> BaselineSplit:
    """Chapter 04's :class:`mechlib.contrast.BaselineSplit` with placeholder labels on all its questions
    (unchanged when ``fraction`` is 0)."""
    if not is_on(fraction):
        return split
    ids = list(split.contrast_ids) + list(split.heldout_ids)
    records = relabel_baseline([split.records[i] for i in ids], fraction, seed)
    by_id = {str(r.id): r for r in records}
    return dataclasses.replace(split, correct={i: bool(r.correct) for i, r in by_id.items()}, records=by_id)


def mark_figure(fig: Figure, fraction: float) -> Figure:
    """Put the placeholder warning at the top of ``fig`` (a suptitle, in red; nothing when ``fraction``
    is 0), and return it."""
    if not is_on(fraction):
        return fig
    fig.suptitle(
        f"PLACEHOLDER LABELS (placeholder_labels = {fraction:g}) — not the model's answers",
        color="#b00020",
        fontsize=10,
        fontweight="bold",
    )
    return fig


def mark_text(text: str, fraction: float) -> str:
    """``text`` (a finding, a verdict) preceded by :func:`banner` (unchanged when ``fraction`` is 0)."""
    if not is_on(fraction):
        return text
    return f"{banner(fraction)} {text}"


def baseline_split(paths: RunPaths, fraction: float, seed: int) -> BaselineSplit:
    """Chapter 04's split of run ``paths`` (:func:`mechlib.contrast.load_baseline_split`), with
    placeholder labels when ``fraction`` > 0: the one line chapters 05 and 06 start from."""
    split = load_baseline_split(paths.metrics / "04_gsm8k_baseline.json", paths.records / "baseline.jsonl")
    return relabel_split(split, fraction, seed)


def steered_relabeller(
    baseline: Mapping[str, Record], fraction: float, seed: int
) -> Callable[[Sequence[Record]], list[Record]]:
    """:func:`relabel_steered` bound to the baseline records (the identity, as a list, when off)."""
    return lambda records: relabel_steered(records, baseline, fraction, seed)


def banner_line(fraction: float) -> str:
    """:func:`banner` and a newline when placeholder labels are on, else "" (``print(..., end="")``)."""
    return banner(fraction) + "\n" if is_on(fraction) else ""


def metrics(fraction: float) -> dict[str, Any]:
    """What every placeholder-capable metrics file records: which labels, and the fraction."""
    return {"labels": label_kind(fraction), "placeholder_labels": fraction}
