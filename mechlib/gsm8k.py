"""GSM8K: loading questions (hub or local JSONL); reading answers lives in :mod:`mechlib.answers`.

Why: loading and parsing change for different reasons. The parser (and its rules, and
lm-evaluation-harness's strict/flexible readings) moved to :mod:`mechlib.answers`; its public
functions are re-exported here so ``from mechlib.gsm8k import extract_answer`` keeps working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mechlib.answers import PARSER_VERSION, answers_match, extract_answer, extract_answer_with_rule, gold_from_solution
from mechlib.io import iter_jsonl
from mechlib.paths import resolve

__all__ = [
    "HUB_CONFIG",
    "HUB_ID",
    "PARSER_VERSION",
    "GSM8KError",
    "Question",
    "answers_match",
    "extract_answer",
    "extract_answer_with_rule",
    "gold_from_solution",
    "load_gsm8k",
]

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"


class GSM8KError(ValueError):
    """A GSM8K source the book cannot read; the message names the file, line or what to do."""


@dataclass(frozen=True)
class Question:
    """One question with its gold numeric answer. ``id`` is stable across runs (used for splits)."""

    id: str
    question: str
    answer: float | int
    source: str

    @property
    def kind(self) -> str:
        return kind_of(self.source)


def kind_of(source: str) -> str:
    """A question's type from its source: the template of a generated question
    (``arithmetic:boxes`` → ``boxes``), else the source itself (``gsm8k``)."""
    return source.split(":")[-1]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def local_file(path: str | os.PathLike[str], split: str) -> Path:
    """The JSONL file a local ``gsm8k_path`` names (a folder holding ``{split}.jsonl``, or the file itself);
    :class:`GSM8KError` when there is none. Reads nothing, so the runner checks it before any chapter runs."""
    p = resolve(path)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if not f.is_file():
            present = sorted(x.name for x in p.glob("*.jsonl"))
            raise GSM8KError(
                f"GSM8K folder {p} has no {split}.jsonl (found: {', '.join(present) or 'no .jsonl files'})"
            )
        return f
    if p.is_file():
        return p
    raise GSM8KError(f"GSM8K path {p} does not exist (give a folder holding {split}.jsonl, or a .jsonl file)")


def _rows_from_jsonl(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    for lineno, obj in iter_jsonl(path, GSM8KError):
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("question"), str)
            or not isinstance(obj.get("answer"), str)
        ):
            raise GSM8KError(f"{path}:{lineno}: expected an object with string fields 'question' and 'answer'")
        if not obj["question"].strip():
            raise GSM8KError(f"{path}:{lineno}: empty 'question'")
        rows.append((obj["question"], obj["answer"], lineno))
    if not rows:
        raise GSM8KError(f"{path}: contains no questions (the file is empty)")
    return rows


def _rows_from_hub(split: str) -> list[tuple[str, str, int]]:
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_ID, HUB_CONFIG, split=split)
    except Exception as exc:  # datasets raises many types for "offline"/"not found"
        raise GSM8KError(
            f"could not load GSM8K ({HUB_ID}, config {HUB_CONFIG!r}, split {split!r}) from the Hugging Face hub — "
            f"no network or no cached copy. Pass gsm8k_path: a folder holding {split}.jsonl or a .jsonl file "
            f"(one JSON object a line with 'question' and 'answer'). Original error: {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from None
    return [(row["question"], row["answer"], i + 1) for i, row in enumerate(ds)]


def load_gsm8k(path: str = "", split: str = "test") -> list[Question]:
    """All GSM8K questions of ``split``: from the hub when ``path`` is empty, else a local folder/file.

    Ids are ``gsm8k-{split}-{n:04d}`` with ``n`` the 0-based row number, identical for the hub and
    the local copy of the same file, so splits and records carry over between the two.
    """
    if path:
        f = local_file(path, split)
        rows, where = _rows_from_jsonl(f), str(f)
    else:
        rows, where = _rows_from_hub(split), f"{HUB_ID}/{split}"
    out = []
    for i, (question, solution, lineno) in enumerate(rows):
        try:
            gold = gold_from_solution(solution)
        except ValueError as exc:
            raise GSM8KError(f"{where}:{lineno}: cannot read the gold answer: {exc}") from None
        out.append(Question(id=f"gsm8k-{split}-{i:04d}", question=question.strip(), answer=gold, source="gsm8k"))
    return out
