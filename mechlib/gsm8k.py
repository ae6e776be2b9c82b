"""GSM8K: loading questions (hub or local JSONL) and reading numeric answers out of text.

Why: the study's accuracy numbers are only as good as its answer parser. The seed's parser
dropped the part of "1,200" after the comma, so every answer above 999 written the usual way
counted as wrong. :func:`extract_answer` reads thousands separators, ``$``, decimals,
negatives and trailing text, and falls back sensibly when a generation never writes ``####``.

The extraction rule, in order (the first rule that finds a number wins):

1. ``#### N`` — the number right after the *first* ``####`` that is followed by a number (the
   format the prompt asks for; later ``####`` lines are usually the model rambling on). Small
   models often copy the instruction's letter: ``#### N = 21`` reads as 21.
2. ``answer is N`` / ``answer: N`` / ``answer = N`` (case-insensitive, e.g. "The final answer
   is $1,200.") — the *last* such phrase.
3. The *last* number anywhere in the text (this covers "… = 42" endings).

A number is an optional sign, an optional ``$``, digits with optional ``,`` thousands groups
(``1,200``, ``12,345,678``) or plain digits, and an optional decimal part. A ``-`` is a sign only
when it does not follow a digit, letter or closing bracket, so ``10-5`` reads as 10 and 5, not
10 and −5. A comma that does not separate groups of exactly three digits ends the number
("1,2,3" reads as 1, 2, 3).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mechlib.io import iter_jsonl

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"

# sign (-, unicode minus), optional $ on either side of the sign, then the digits.
_NUMBER = re.compile(
    r"(?<![\w)\].])"  # a sign/number must not continue a word, a number or a bracket
    r"(?P<sign>[-\u2212])?\$?\s?(?P<sign2>[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?P<frac>\.\d+)?"
)
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(?:equal to\s*)?", re.IGNORECASE)


class GSM8KError(ValueError):
    """A GSM8K source the book cannot read; the message names the file, line or what to do."""


@dataclass(frozen=True)
class Question:
    """One question with its gold numeric answer. ``id`` is stable across runs (used for splits)."""

    id: str
    question: str
    answer: float | int
    source: str


def _to_number(m: re.Match[str]) -> float:
    digits = m.group("int").replace(",", "") + (m.group("frac") or "")
    value = float(digits)
    return -value if (m.group("sign") or m.group("sign2")) else value


def _numbers(text: str) -> list[tuple[int, float]]:
    """All numbers in ``text`` as (start offset, value)."""
    return [(m.start(), _to_number(m)) for m in _NUMBER.finditer(text)]


def _first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return _to_number(m) if m else None


def extract_answer_with_rule(text: str) -> tuple[float | None, str | None]:
    """``(value, rule)``: the answer and which rule of the module docstring found it
    (``"hashes"``, ``"answer_is"`` or ``"last_number"``; ``(None, None)`` when there is no number)."""
    if not isinstance(text, str):
        return None, None
    for m in _HASHES.finditer(text):
        tail = text[m.end():]
        # the number must come right after the marker (spaces, ':', '=', '*' allowed between, and a
        # short variable name copied from the instruction: "#### N = 21")
        lead = re.match(r"[\s:=*]*(?:[A-Za-z]{1,3}\s*[=:][\s=*]*)?", tail)
        value_match = _NUMBER.match(tail, lead.end() if lead else 0)
        if value_match:
            return _to_number(value_match), "hashes"
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        tail = text[m.end():]
        value_match = _NUMBER.match(tail, len(tail) - len(tail.lstrip(" *:$")) if tail else 0)
        if value_match:
            return _to_number(value_match), "answer_is"
    found = _numbers(text)
    return (found[-1][1], "last_number") if found else (None, None)


def extract_answer(text: str) -> float | None:
    """The numeric answer in a generation, by the rule in the module docstring; None if no number."""
    return extract_answer_with_rule(text)[0]


def answers_match(pred: float | None, gold: float | int) -> bool:
    """True when the parsed answer equals the gold one (up to float round-off; None never matches)."""
    if pred is None or not math.isfinite(pred):
        return False
    return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-6)


def gold_from_solution(solution: str) -> float | int:
    """The gold answer of a GSM8K solution text: the number after its ``####`` (ints kept as int)."""
    idx = solution.rfind("####")
    if idx < 0:
        raise ValueError("no '####' in the answer text")
    value = _first_number(solution[idx + 4:])
    if value is None:
        raise ValueError(f"no number after '####' in {solution[idx:][:60]!r}")
    return int(value) if value.is_integer() else value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _local_file(path: str | os.PathLike[str], split: str) -> Path:
    from mechlib.paths import resolve

    p = resolve(path)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if not f.is_file():
            present = sorted(x.name for x in p.glob("*.jsonl"))
            raise GSM8KError(f"GSM8K folder {p} has no {split}.jsonl (found: {', '.join(present) or 'no .jsonl files'})")
        return f
    if p.is_file():
        return p
    raise GSM8KError(f"GSM8K path {p} does not exist (give a folder holding {split}.jsonl, or a .jsonl file)")


def _rows_from_jsonl(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    for lineno, obj in iter_jsonl(path, GSM8KError):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) \
                or not isinstance(obj.get("answer"), str):
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
    except Exception as exc:  # noqa: BLE001 — datasets raises many types for "offline"/"not found"
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
        f = _local_file(path, split)
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
