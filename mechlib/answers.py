"""Reading the numeric answer out of a model's text, our way and lm-evaluation-harness's two ways.

Why: every accuracy in the book is only as good as this parser, and small parsing slips move
accuracy by whole points (the seed dropped everything after the comma of "1,200"). Bump
:data:`PARSER_VERSION` whenever any function here could return something different for some
text: cached scores are keyed by it.

Our reading (:func:`extract_answer_with_rule`); the first rule that finds a number wins:

1. ``"hashes"`` — the first ``####`` followed by a number (the format the prompt asks for; later
   ``####`` lines are usually the model rambling on). Small models copy the instruction's letter
   (``#### N = 21``) or write the last line as a sum (``#### N = 3 + 5 = 8``, ``#### 10 + 8 = 18``):
   when the number's line has an ``=`` after it and the last ``=`` is followed by a number that does
   not itself start an expression, that number — the result — is the answer; else the first number.
2. ``"answer_is"`` — the *last* "answer is N" / "answer: N" / "answer = N" (case-insensitive).
3. ``"last_number"`` — the last number anywhere (covers "... = 42" endings).

What a number is, and why:

- A sign (``-`` or the unicode minus ``−``) must touch the number (``-5``, ``-$5``, ``$-5``): in
  "10 - 4" the ``-`` is subtraction, and a bullet "- 24" is not −24. A ``-`` right after a digit,
  letter, ``)``, ``]`` or ``.`` is subtraction too ("10-5" is 10 and 5).
- ``,`` is a thousands separator only between groups of exactly three digits ("1,200" is 1200,
  "12,345,678" one number); otherwise it is punctuation ("1,2,3" is 1, 2, 3; "1,20" is 1 and 20).
- ``0.5`` and ``.5`` are decimals; a ``.`` not followed by a digit ends the sentence ("is 8." → 8).
- ``a/b`` with integer parts and b ≠ 0 is a fraction ("1/2" → 0.5): GSM8K-style answers are
  sometimes written so, and reading "1/2" as 1 or 2 is always wrong. Mixed numbers ("1 1/2") and
  decimal or comma parts ("1.5/2") are not fractions; no number starts right after a ``/`` (in
  "1.5/2" or a date "12/25/2023" only the first part is read).

lm-evaluation-harness (``lm_eval/tasks/gsm8k/gsm8k.yaml``, task version 3.0, read at commit
47f16bf6a68e) scores GSM8K with two filters, then ``exact_match`` on *strings*:

- strict-match: ``re.findall(r"#### (\\-?[0-9\\.\\,]+)", text)``, the first match, stripped;
- flexible-extract: ``re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)``, the last match
  (``group_select: -1``), its first non-empty group, stripped;
- no match: the string ``"[invalid]"``, which never equals a gold.
- Both prediction and gold (the whole solution text) then have, in this order, the
  ``regexes_to_ignore`` ``","``, ``"\\$"``, ``"(?s).*#### "``, ``"\\.$"`` removed and are lowercased
  (``ignore_case: true``; the yaml sets ``ignore_punctuation: false``), and are compared with ``==``.

:func:`strict_raw` / :func:`flexible_raw` return the filtered string (None for "[invalid]") and
:func:`harness_exact_match` repeats that string comparison exactly. :func:`extract_strict` and
:func:`extract_flexible` turn the normalised string into a float (None unless it is
``-?digits[.[digits]]`` or ``-?.digits``), for comparison with :func:`answers_match`. That numeric
comparison agrees with the harness's except where the prediction is a non-canonical spelling of the
gold — "5.00", "05", "5..", "-0" for golds 5, 5, 5, 0 — which the harness counts wrong and we count
right (GSM8K golds are canonical integers). The harness's own quirks are kept on purpose:
strict needs exactly one space after ``####``; "−5" (unicode minus) and "$5" after ``#### `` do not
match strict; flexible reads "1,2,3" as 123, "1/2" as 2, and "10 - 4" as 4.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

PARSER_VERSION: str = "answers-v2"

_NUMBER = re.compile(
    r"(?<![\w)\]./])"  # must not continue a word, a number, a bracket or a ratio ("1/2/3")
    r"(?P<sign>[-\u2212])?\$?(?P<sign2>[-\u2212])?"  # -5, −5, -$5, $-5; never across whitespace
    r"(?=\.?\d)"
    r"(?:(?P<num>\d+)/(?P<den>0*[1-9]\d*)(?![\d/]|\.\d)"  # 1/2, 3/4
    r"|(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?)"  # 1,200  12.5  .5
)
_HASHES = re.compile(r"####")
# between "####" and its number: spaces, ':', '=', '*', and a short copied name ("#### N = 21")
_HASH_LEAD = re.compile(r"[\s:=*]*(?:[A-Za-z]{1,3}\s*[=:][\s=*]*)?")
_AFTER_EQUALS = re.compile(r"[ \t*]*")
# a number followed by an operator and an operand starts an expression ("= 2 + 3"), so is no result
_CONTINUES = re.compile(r"[ \t]*[-+*/x×÷^][ \t]*[\d$(]")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(?:equal to\s*)?", re.IGNORECASE)

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_HARNESS_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
_PLAIN_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class Readings:
    """One text read every way: ours (value and rule) and the harness's strict and flexible."""

    primary: float | None
    primary_rule: str | None
    strict: float | None
    flexible: float | None


def _value(m: re.Match[str]) -> float:
    """The float a :data:`_NUMBER` match stands for."""
    if m.group("num") is not None:
        value = int(m.group("num")) / int(m.group("den"))
    else:
        value = float((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
    return -value if (m.group("sign") or m.group("sign2")) else value


def _result_after_last_equals(text: str, start: int) -> float | None:
    """The number after the last ``=`` on the line from ``start``, when it is a result (not the
    start of another expression); None otherwise."""
    line_end = text.find("\n", start)
    line_end = len(text) if line_end < 0 else line_end
    eq = text.rfind("=", start, line_end)
    if eq < 0:
        return None
    after = _AFTER_EQUALS.match(text, eq + 1, line_end)
    assert after is not None  # the pattern matches the empty string too
    m = _NUMBER.match(text, after.end(), line_end)
    if m is None or _CONTINUES.match(text, m.end(), line_end):
        return None
    return _value(m)


def _read_after_hashes(tail: str) -> float | None:
    """The answer in the text right after a ``####`` marker (rule 1 of the module docstring)."""
    lead = _HASH_LEAD.match(tail)
    first = _NUMBER.match(tail, lead.end() if lead else 0)
    if first is None:
        return None
    result = _result_after_last_equals(tail, first.end())
    return _value(first) if result is None else result


def extract_answer_with_rule(text: str) -> tuple[float | None, str | None]:
    """``(value, rule)``: the answer and which rule of the module docstring found it
    (``"hashes"``, ``"answer_is"`` or ``"last_number"``; ``(None, None)`` when there is no number)."""
    if not isinstance(text, str):
        return None, None
    for m in _HASHES.finditer(text):
        value = _read_after_hashes(text[m.end() :])
        if value is not None:
            return value, "hashes"
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        tail = text[m.end() :]
        found = _NUMBER.match(tail, len(tail) - len(tail.lstrip(" *:$")))
        if found:
            return _value(found), "answer_is"
    last = next(reversed(list(_NUMBER.finditer(text))), None)
    return (_value(last), "last_number") if last else (None, None)


def extract_answer(text: str) -> float | None:
    """The numeric answer in a generation, by the rules in the module docstring; None if no number."""
    return extract_answer_with_rule(text)[0]


def answers_match(pred: float | None, gold: float | int) -> bool:
    """True when the parsed answer equals the gold one (up to float round-off; None never matches)."""
    if pred is None or not math.isfinite(pred):
        return False
    return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-6)


def gold_from_solution(solution: str) -> float | int:
    """The gold answer of a GSM8K solution: read after its last ``####`` like rule 1 (ints stay int).

    Why the same reading as for generations: a gold and a prediction written alike ("3/4",
    "1,200") must parse alike, or a right answer scores as wrong."""
    idx = solution.rfind("####")
    if idx < 0:
        raise ValueError("no '####' in the answer text")
    tail = solution[idx + 4 :]
    value = _read_after_hashes(tail)
    if value is None:  # a hand-made file's "#### about 5": the first number after the marker
        first = _NUMBER.search(tail)
        value = _value(first) if first else None
    if value is None:
        raise ValueError(f"no number after '####' in {solution[idx:][:60]!r}")
    return int(value) if value.is_integer() else value


# ------------------------------------------------------------------ lm-evaluation-harness


def strict_raw(text: str) -> str | None:
    """The harness's strict-match filter output: first ``#### (\\-?[0-9\\.\\,]+)`` group, stripped."""
    found = _STRICT.findall(text)
    return found[0].strip() if found else None


def flexible_raw(text: str) -> str | None:
    """The harness's flexible-extract filter output: the last match's first non-empty group, stripped."""
    found = _FLEXIBLE.findall(text)
    return next(group for group in found[-1] if group).strip() if found else None


def harness_normalise(s: str) -> str:
    """What ``exact_match`` compares: ``regexes_to_ignore`` removed in order, then lowercased."""
    for pattern in _HARNESS_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def harness_exact_match(prediction: str | None, gold_solution: str) -> bool:
    """The harness's verdict for a filtered prediction (None = "[invalid]") against a gold solution."""
    return harness_normalise("[invalid]" if prediction is None else prediction) == harness_normalise(gold_solution)


def _harness_number(raw: str | None) -> float | None:
    """The float of a filtered prediction after normalisation; None when that is not a plain decimal."""
    if raw is None:
        return None
    s = harness_normalise(raw)
    return float(s) if _PLAIN_DECIMAL.fullmatch(s) else None


def extract_strict(text: str) -> float | None:
    """lm-evaluation-harness strict-match as a number (see the module docstring for what differs)."""
    return _harness_number(strict_raw(text)) if isinstance(text, str) else None


def extract_flexible(text: str) -> float | None:
    """lm-evaluation-harness flexible-extract as a number (see the module docstring for what differs)."""
    return _harness_number(flexible_raw(text)) if isinstance(text, str) else None


def read_all(text: str) -> Readings:
    """Every reading of ``text``: ours with its rule, and the harness's strict and flexible."""
    value, rule = extract_answer_with_rule(text)
    return Readings(primary=value, primary_rule=rule, strict=extract_strict(text), flexible=extract_flexible(text))
