"""How wrong answers to the generated arithmetic task go wrong: the operation written against the one needed.

Why: chapter 05 contrasts the hidden states of correctly and wrongly answered questions, and "wrong"
mixes two failures. The model may choose the wrong operation: SmolLM2-135M often subtracts, the
operation of the one-shot example and of no generated question. Or it may write the right operation
and get the number wrong. A direction fitted on the mixture is partly a direction between the two,
so chapter 04 counts them. Each generated question needs exactly one operation
(:data:`mechlib.tasks.TEMPLATE_OPERATION`), so a wrong answer is sorted by the operators it writes
between two numbers (``14 + 9``, ``6 x 11``). GSM8K questions need several steps and are not sorted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mechlib.tasks import TEMPLATE_OPERATION

if TYPE_CHECKING:  # records imports the generation stack; only the type is needed here
    from mechlib.records import Record

__all__ = ["OPERATION_NAMES", "WrongAnswers", "operations_written", "table", "wrong_answers_by_kind"]

# An operator between two numbers, with at most a few words after the first ("9 boxes * 4 coins"): ``x``
# (a word of its own) and ``×`` are multiplication, ``÷`` division. The look-ahead keeps the second
# number unconsumed, so ``2 + 3 + 4`` yields both operators.
_OPERATOR = re.compile(r"\d[^\d\n=]{0,24}?([-+*/\u00d7\u00f7]|\bx\b)\s*(?=\d)")
_CANONICAL = {"x": "*", "\u00d7": "*", "\u00f7": "/"}
OPERATION_NAMES = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}


def operations_written(text: str) -> frozenset[str]:
    """The operators (``+ - * /``) written between two numbers in ``text``."""
    return frozenset(_CANONICAL.get(op, op) for op in _OPERATOR.findall(text))


@dataclass(frozen=True)
class WrongAnswers:
    """The wrong answers to one generated question type, sorted by what they wrote.

    ``wrong_operation + right_operation + no_calculation == n_wrong``. ``wrong_operation`` counts
    answers that write any operation other than ``needed``; ``by_operation`` says which (an answer
    that writes two other operations counts under each).
    """

    kind: str
    needed: str
    n_wrong: int
    wrong_operation: int
    right_operation: int  # only the needed operation: the arithmetic went wrong
    no_calculation: int  # no "a op b" at all, only a number
    by_operation: dict[str, int]

    @property
    def others(self) -> str:
        """The other operations written, with counts ("subtraction 18, multiplication 1"); "" if none."""
        return ", ".join(f"{OPERATION_NAMES[op]} {k}" for op, k in self.by_operation.items())

    def line(self) -> str:
        """The row as chapter 04 prints it."""
        return (
            f"{self.kind:>10} (needs {OPERATION_NAMES[self.needed]}): {self.n_wrong} wrong — another operation "
            f"{self.wrong_operation}" + (f" ({self.others})" if self.others else "") + ", the needed one with a "
            f"wrong result {self.right_operation}, no calculation {self.no_calculation}"
        )


def wrong_answers_by_kind(records: Sequence[Record]) -> list[WrongAnswers]:
    """One row per generated question type with wrong answers, types sorted; ``[]`` for GSM8K records."""
    wrong: dict[str, list[frozenset[str]]] = {}
    for r in records:
        if not r.correct and r.source.startswith("arithmetic:") and r.kind in TEMPLATE_OPERATION:
            wrong.setdefault(r.kind, []).append(operations_written(r.generation))
    rows = []
    for kind in sorted(wrong):
        needed, ops = TEMPLATE_OPERATION[kind], wrong[kind]
        other = Counter(op for written in ops for op in written if op != needed)
        rows.append(
            WrongAnswers(
                kind=kind,
                needed=needed,
                n_wrong=len(ops),
                wrong_operation=sum(bool(written - {needed}) for written in ops),
                right_operation=sum(written == {needed} for written in ops),
                no_calculation=sum(not written for written in ops),
                by_operation=dict(sorted(other.items())),
            )
        )
    return rows


def table(rows: Sequence[WrongAnswers], task: str) -> str:
    """Chapter 04's printout: one :meth:`WrongAnswers.line` per question type, or why there is none."""
    if rows:
        return "\n".join(row.line() for row in rows)
    return "no wrong answers to generated questions to sort" if task == "arithmetic" else "GSM8K: not sorted"
