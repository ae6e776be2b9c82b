"""Scoring rules: the book's primary reading of an answer, and the alternatives it is checked against.

Why: "correct" is a parser's verdict on free text, and a small model's text is messy. A result
that holds only under one way of reading answers is a result about the reader. Every record
carries three readings (:mod:`mechlib.records`) and why it stopped, so each headline can be
recomputed under:

- ``primary``: mechbook's parser (:mod:`mechlib.answers`) — the result of the first ``####``
  line, else the last "answer is N", else the last number;
- ``strict``: lm-evaluation-harness's *strict-match* — only a number right after ``#### ``;
- ``flexible``: lm-evaluation-harness's *flexible-extract* — the last number-like string;
- ``finished``: the primary reading, with answers cut off at ``max_new_tokens`` left out (in a
  paired comparison, a question is left out when either side was cut off).

The two harness rules make our accuracies comparable with published GSM8K numbers; the last one
asks whether a result is about arithmetic or about answers that never got to their end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mechlib.records import Record
from mechlib.stats import wilson_ci

ScoringRule = Literal["primary", "strict", "flexible", "finished"]
RULES: tuple[ScoringRule, ...] = ("primary", "strict", "flexible", "finished")
ALTERNATIVES: tuple[ScoringRule, ...] = RULES[1:]
RULE_LABELS: dict[ScoringRule, str] = {
    "primary": "primary (mechbook parser)",
    "strict": "strict (lm-eval '#### N')",
    "flexible": "flexible (lm-eval last number)",
    "finished": "finished only (cut-off answers left out)",
}


def verdict(record: Record, rule: ScoringRule) -> bool | None:
    """Whether ``record`` is correct under ``rule``; None when the rule leaves it out."""
    if rule == "primary":
        return record.correct
    if rule == "strict":
        return record.correct_strict
    if rule == "flexible":
        return record.correct_flexible
    if rule == "finished":
        return None if record.truncated else record.correct
    raise ValueError(f"unknown scoring rule {rule!r}; choose one of {', '.join(RULES)}")


def verdicts(records: Sequence[Record], rule: ScoringRule) -> dict[str, bool]:
    """``{id: correct}`` under ``rule``, without the records it leaves out (order kept)."""
    out = {}
    for r in records:
        v = verdict(r, rule)
        if v is not None:
            out[r.id] = v
    return out


def paired_verdicts(
    before: Sequence[Record], after: Sequence[Record], rule: ScoringRule
) -> tuple[dict[str, bool], dict[str, bool]]:
    """Verdicts of two conditions on the questions both keep under ``rule`` (``before``'s order)."""
    a, b = verdicts(before, rule), verdicts(after, rule)
    keep = [i for i in a if i in b]
    return {i: a[i] for i in keep}, {i: b[i] for i in keep}


def truncation_rate(records: Sequence[Record]) -> float:
    """Fraction of answers cut off at ``max_new_tokens`` (0 for no records)."""
    return sum(r.truncated for r in records) / len(records) if records else 0.0


@dataclass(frozen=True)
class RuleAccuracy:
    """Accuracy under one scoring rule, over the questions that rule keeps."""

    rule: ScoringRule
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]


def accuracy_under_rules(records: Sequence[Record]) -> list[RuleAccuracy]:
    """Accuracy with its Wilson interval under every rule of :data:`RULES`."""
    out = []
    for rule in RULES:
        v = verdicts(records, rule)
        k, n = sum(v.values()), len(v)
        out.append(RuleAccuracy(rule, n, k, k / n if n else float("nan"), wilson_ci(k, n) if n else (0.0, 1.0)))
    return out
