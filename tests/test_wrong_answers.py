"""Wrong answers to the generated task sorted by the operation they write (chapter 04)."""

from __future__ import annotations

import re

import pytest

from mechlib.findings import baseline_finding
from mechlib.records import Record, examples, score
from mechlib.scoring import accuracy_under_rules
from mechlib.tasks import TEMPLATE_OPERATION, TEMPLATES, arithmetic_questions
from mechlib.wrong_answers import operations_written, table, wrong_answers_by_kind


@pytest.mark.parametrize(
    "text,ops",
    [
        ("Jamal has 14 + 9 = 23 shells.\n#### 23", {"+"}),
        ("Noah buys 6 * 11 = 66 apples.", {"*"}),
        ("Emma buys 9 boxes of coins * 4 coins per box = 24 coins.", {"*"}),
        ("9 boxes x 4 each; the next box holds 12", {"*"}),
        ("6 x 11 = 66, or 6 × 11", {"*"}),
        ("Ines has 20 - 7 = 13 eggs left.", {"-"}),
        ("2 + 3 + 4 - 1 = 8", {"+", "-"}),
        ("12 ÷ 4 = 3 and 1/2", {"/"}),
        ("#### 23", set()),
        ("The answer is - 5 apples", set()),  # a minus before one number is no operation
    ],
)
def test_operations_written(text, ops):
    assert operations_written(text) == ops


def _answer(q, generation: str) -> Record:
    return score(q, "p", generation, 8, "eos")


def test_every_template_names_the_operation_it_needs():
    assert set(TEMPLATE_OPERATION) == set(TEMPLATES)
    for q in arithmetic_questions(60, seed=1):  # the needed operation gives the gold answer
        a, b = (int(t) for t in re.findall(r"\d+", q.question)[:2])
        assert {"+": a + b, "*": a * b}[TEMPLATE_OPERATION[q.kind]] == q.answer, q


def test_wrong_answers_are_sorted_by_operation_per_kind():
    qs = {q.kind: q for q in arithmetic_questions(40, seed=0)}
    red, boxes = qs["red_blue"], qs["boxes"]
    records = [
        _answer(red, f"{red.answer} - 1 = 3\n#### 3"),  # another operation
        _answer(red, "5 + 4 = 10\n#### 10"),  # the needed one, a wrong result
        _answer(red, "5 + 4 - 2 = 7 * 1\n#### 7"),  # the needed one and two others
        _answer(red, "#### 1"),  # no calculation
        _answer(red, f"#### {red.answer}"),  # right: not counted
        _answer(boxes, "2 + 3 = 5\n#### 5"),
    ]
    assert [r.correct for r in records] == [False, False, False, False, True, False]
    rows = {w.kind: w for w in wrong_answers_by_kind(records)}
    assert list(rows) == ["boxes", "red_blue"]
    w = rows["red_blue"]
    assert (w.needed, w.n_wrong, w.wrong_operation, w.right_operation, w.no_calculation) == ("+", 4, 2, 1, 1)
    assert w.by_operation == {"*": 1, "-": 2}
    assert (rows["boxes"].needed, rows["boxes"].wrong_operation, rows["boxes"].by_operation) == ("*", 1, {"+": 1})
    assert "red_blue (needs addition): 4 wrong — another operation 2 (multiplication 1, subtraction 2)" in w.line()
    assert table(list(rows.values()), "arithmetic").splitlines() == [rows["boxes"].line(), w.line()]

    text = baseline_finding(6, 1, (0.0, 0.6), 1.0, accuracy_under_rules(records), 48, list(rows.values()))
    assert (
        "Of the 5 wrong answers, 3 write an operation the question does not need (subtraction in 2, addition in 1, "
        "multiplication in 1), 1 write the needed one and get the number wrong, and 1 write no calculation" in text
    )


def test_gsm8k_and_old_records_are_not_sorted():
    q = arithmetic_questions(1, seed=0)[0]
    gsm = Record(**{**_answer(q, "1 - 1 = 0").__dict__, "source": "gsm8k"})
    old = Record(**{**_answer(q, "1 - 1 = 0").__dict__, "source": ""})
    assert wrong_answers_by_kind([gsm, old]) == []
    assert table([], "gsm8k") == "GSM8K: not sorted"
    assert table([], "arithmetic") == "no wrong answers to generated questions to sort"
    assert "wrong answers" not in baseline_finding(2, 0, (0.0, 0.8), 1.0, accuracy_under_rules([gsm, old]), 48, [])


def test_examples_show_the_first_right_and_wrong_answers_with_their_questions():
    qs = arithmetic_questions(5, seed=0)
    records = [_answer(q, f"#### {q.answer + (i % 2)}") for i, q in enumerate(qs)]  # 0, 2, 4 right
    text = examples(records, qs, n=2, chars=5)
    heads = [line for line in text.splitlines() if line.startswith("---")]
    assert [h.split()[1:3] for h in heads] == [
        [qs[0].id, "[correct]"],
        [qs[2].id, "[correct]"],
        [qs[1].id, "[wrong]"],
        [qs[3].id, "[wrong]"],
    ]
    assert f"Q: {qs[1].question}" in text and f"A: #### {qs[1].answer + 1}"[:8] in text
    assert f"gold {qs[1].answer}, parsed {float(qs[1].answer + 1)}" in text and "stopped: eos" in text
