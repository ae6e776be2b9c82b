"""GSM8K answer parsing (unit + hypothesis property tests) and loading (local, malformed, offline hub)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mechlib.gsm8k import (
    GSM8KError,
    answers_match,
    extract_answer,
    extract_answer_with_rule,
    gold_from_solution,
    load_gsm8k,
)
from mechlib.paths import REPO_ROOT

SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,200", 1200),
        ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
        ("#### -5", -5),
        ("The total is 1,234,567 apples", 1234567),
        ("It costs $3.50 each", 3.5),
        ("The answer is $1,200.", 1200),
        ("So the answer is: 42 apples. Next we", 42),
        ("**Answer:** 7", 7),
        ("20 - 5 = 15", 15),  # a '-' after a space is a sign only when it touches the digit
        ("10-5=5", 5),  # '-' after a digit is subtraction
        ("x = -3.5", -3.5),
        ("\u22124 degrees", -4),  # unicode minus
        ("$-5 and -$6", -6),
        ("#### 18\nQuestion: another one #### 5", 18),  # first #### wins
        ("The answer is 12. Then 3 + 4 = 7", 12),  # 'answer is' beats the last number
        ("#### $1,000.00 total", 1000),
        ("Carla has 3 + 9 = 12.\n#### N = 12\n#### N = 12", 12),  # the instruction's letter copied
        ("#### N\n#### N\nso 5 apples", 5),
        ("1,2,3", 3),  # commas not grouping thousands end the number
        ("12,34", 34),
        ("50% of them", 50),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer_examples(text, expected):
    got = extract_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, rule",
    [
        ("so 4.\n#### 5", "hashes"),
        ("#### N = 5", "hashes"),
        ("The answer is 5. Then 6", "answer_is"),
        ("2 + 3 = 5", "last_number"),
        ("#### N\nwe get 5", "last_number"),
        ("none", None),
    ],
)
def test_extract_answer_reports_its_rule(text, rule):
    assert extract_answer_with_rule(text)[1] == rule


def test_extract_answer_falls_back_when_hashes_have_no_number():
    assert extract_answer("#### \nso we get 9 eggs") == 9


def test_answers_match():
    assert answers_match(1200.0, 1200)
    assert answers_match(0.1 + 0.2, 0.3)
    assert not answers_match(None, 3)
    assert not answers_match(3.01, 3)
    assert not answers_match(float("nan"), 3)


def test_gold_from_solution():
    assert gold_from_solution("He has 2+3=<<2+3=5>>5\n#### 5") == 5
    assert isinstance(gold_from_solution("#### 1,000"), int) and gold_from_solution("#### 1,000") == 1000
    assert gold_from_solution("#### -2.5") == -2.5
    with pytest.raises(ValueError):
        gold_from_solution("no marker 5")


# ------------------------------------------------------------------------ property tests


def _grouped(n: int) -> str:
    return f"{n:,}"


@st.composite
def formatted_numbers(draw):
    """(value, text) — a number written the many ways models and GSM8K write them."""
    whole = draw(st.integers(min_value=0, max_value=10**9))
    decimals = draw(st.sampled_from([0, 0, 1, 2]))
    frac = draw(st.integers(min_value=0, max_value=10**decimals - 1)) if decimals else 0
    negative = draw(st.booleans())
    value = Decimal(whole) + (Decimal(frac) / (Decimal(10) ** decimals) if decimals else 0)
    body = _grouped(whole) if draw(st.booleans()) else str(whole)
    if decimals:
        body += "." + str(frac).zfill(decimals)
    dollar = draw(st.booleans())
    if negative and value != 0:
        body = draw(st.sampled_from(["-$" + body, "$-" + body])) if dollar else "-" + body
        value = -value
    elif dollar:
        body = "$" + body
    return float(value), body


_PREFIX = st.sampled_from(["", "So ", "Step 1: 2 + 2 = 4.\n", "She has 3 cats and 4 dogs. Total: "])
_SUFFIX = st.sampled_from(["", ".", " apples.", "!", "\n", " in total", ", done."])


@settings(max_examples=300, deadline=None)
@given(formatted_numbers(), _PREFIX, _SUFFIX, st.sampled_from(["hashes", "answer_is", "last"]))
@example((1200.0, "1,200"), "", "", "hashes")
@example((-5.0, "-5"), "The result: ", ".", "answer_is")
def test_extract_answer_reads_back_formatted_numbers(num, prefix, suffix, style):
    value, text = num
    if style == "hashes":
        body = f"{prefix}\n#### {text}{suffix}"
    elif style == "answer_is":
        body = f"{prefix}The answer is {text}{suffix}"
    else:
        body = f"{prefix}{text}{suffix}"
    got = extract_answer(body)
    assert got is not None and answers_match(got, value), (body, got, value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_extract_answer_never_crashes_and_returns_finite_or_none(text):
    got = extract_answer(text)
    assert got is None or isinstance(got, float)


# ------------------------------------------------------------------------ loading


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _row(q: str, a: str) -> str:
    return json.dumps({"question": q, "answer": a})


def test_load_local_folder_and_file(tmp_path):
    _write(tmp_path / "test.jsonl", [_row("Two plus two?", "2+2=4\n#### 4"), "", _row("Big?", "#### 1,500")])
    qs = load_gsm8k(str(tmp_path), "test")
    assert [q.id for q in qs] == ["gsm8k-test-0000", "gsm8k-test-0001"]
    assert [q.answer for q in qs] == [4, 1500]
    assert load_gsm8k(str(tmp_path / "test.jsonl"), "test") == qs


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "contains no questions"),
        ([_row("ok", "#### 1"), "{not json"], ":2: not valid JSON"),
        ([json.dumps({"question": "q"})], ":1: expected an object"),
        ([json.dumps(["q", "a"])], ":1: expected an object"),
        ([_row("q", "no marker")], ":1: cannot read the gold answer"),
        ([_row("  ", "#### 3")], ":1: empty 'question'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
    f = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(GSM8KError, match=message) as err:
        load_gsm8k(str(f))
    assert str(f) in str(err.value)


def test_missing_split_and_path(tmp_path):
    _write(tmp_path / "train.jsonl", [_row("q", "#### 1")])
    with pytest.raises(GSM8KError, match=r"no test.jsonl .*train.jsonl"):
        load_gsm8k(str(tmp_path), "test")
    with pytest.raises(GSM8KError, match="does not exist"):
        load_gsm8k(str(tmp_path / "nope"))


def test_hub_offline_says_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(GSM8KError, match="gsm8k_path"):
        load_gsm8k("", "test")


@pytest.mark.skipif(
    not (SHARED_GSM8K / "test.jsonl").is_file(),
    reason=f"GSM8K dev copy not found at {SHARED_GSM8K} (only present on the project's machines)",
)
def test_real_gsm8k_test_split_loads_and_golds_parse():
    qs = load_gsm8k(str(SHARED_GSM8K), "test")
    assert len(qs) == 1319
    assert qs[0].answer == 18  # Janet's ducks
    assert all(isinstance(q.answer, (int, float)) for q in qs)
    # every gold written with a thousands separator is read in full (the seed's parser dropped the tail)
    with open(SHARED_GSM8K / "test.jsonl", encoding="utf-8") as fh:
        raw = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in fh]
    with_comma = [(r, q.answer) for r, q in zip(raw, qs) if "," in r]
    assert all(a == float(r.replace(",", "")) for r, a in with_comma)
