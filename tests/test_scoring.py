"""Scoring rules and the sensitivity verdicts: each rule counts what it says, and the generated
sentences follow the numbers (a conclusion "survives" only when every rule agrees)."""

from __future__ import annotations

import numpy as np
import pytest

from mechlib.findings import baseline_finding
from mechlib.gsm8k import Question
from mechlib.records import score
from mechlib.scoring import RULES, accuracy_under_rules, paired_verdicts, truncation_rate, verdict, verdicts
from mechlib.sensitivity import PeakUnderRule, effect_of, peak_under_rules, peak_verdict, row_verdict, rows_under_rules
from mechlib.stopping import StopReason


def _rec(qid: str, gold: int, text: str, stop: StopReason = "eos"):
    return score(Question(qid, f"question {qid}", gold, "test"), f"prompt {qid}", text, 5, stop)


def test_each_rule_reads_its_own_way():
    strict_only_wrong = _rec("a", 8, "#### N = 3 + 5 = 8\n", "answer_line")  # primary 8; strict finds no '#### <n>'
    flexible_wrong = _rec("b", 8, "#### 8\nI also had 9 more", "limit")  # primary 8 (first ####), flexible 9, cut off
    all_right = _rec("c", 4, "2 + 2 = 4\n#### 4")
    assert [verdict(strict_only_wrong, r) for r in RULES] == [True, False, True, True]
    assert [verdict(flexible_wrong, r) for r in RULES] == [True, True, False, None]
    assert [verdict(all_right, r) for r in RULES] == [True, True, True, True]
    recs = [strict_only_wrong, flexible_wrong, all_right]
    assert verdicts(recs, "finished") == {"a": True, "c": True}
    assert truncation_rate(recs) == pytest.approx(1 / 3) and truncation_rate([]) == 0.0
    acc = {a.rule: a for a in accuracy_under_rules(recs)}
    assert (acc["primary"].n_correct, acc["primary"].n) == (3, 3)
    assert (acc["strict"].n_correct, acc["flexible"].n_correct, acc["finished"].n) == (2, 2, 2)
    with pytest.raises(ValueError, match="unknown scoring rule"):
        verdict(all_right, "lenient")  # type: ignore[arg-type]


def test_paired_verdicts_drop_questions_either_side_leaves_out():
    base = [_rec("a", 1, "#### 1\n", "answer_line"), _rec("b", 2, "#### 5", "limit"), _rec("c", 3, "#### 3\n")]
    steer = [_rec("a", 1, "#### 2", "limit"), _rec("b", 2, "#### 2\n", "answer_line"), _rec("c", 3, "#### 4\n")]
    before, after = paired_verdicts(base, steer, "finished")
    assert before == {"c": True} and after == {"c": False}
    before, after = paired_verdicts(base, steer, "primary")
    assert list(before) == ["a", "b", "c"] and after == {"a": False, "b": True, "c": False}


def test_baseline_finding_says_what_the_numbers_say():
    recs = [_rec(f"q{i}", i, f"#### {i}\n" if i % 2 else "no idea", "eos" if i < 9 else "limit") for i in range(10)]
    by_rule = accuracy_under_rules(recs)
    text = baseline_finding(10, 5, (0.2, 0.8), 0.9, by_rule, 48)
    assert "5 of 10" in text and "90.0%" in text and "48 new tokens" in text
    assert "differ by up to 5.6 percentage points" in text  # 0.500 vs 0.444 (finished only)
    assert "Fewer than 90 %" not in text
    assert "Fewer than 90 %" in baseline_finding(10, 5, (0.2, 0.8), 0.5, by_rule, 48)


def _row(scale, base, after):
    return rows_under_rules(scale, base, after, n_bootstrap=50, seed=0)


def test_row_verdict_survives_only_when_every_rule_agrees():
    n = 24
    base = [_rec(f"q{i}", 1, "#### 1\n" if i < 12 else "#### 2\n", "answer_line") for i in range(n)]
    # steering breaks 10 of the 12 right answers, cleanly (every rule sees it)
    harm = [_rec(f"q{i}", 1, "#### 2\n" if i < 10 or i >= 12 else "#### 1\n", "answer_line") for i in range(n)]
    rows = _row(0.1, base, harm)
    assert [r.rule for r in rows] == list(RULES) and all(r.effect == "harms" for r in rows)
    assert "survives" in row_verdict(rows) and "+10 %" in row_verdict(rows)
    # the same damage, but the broken answers are all cut off: 'finished only' sees no change
    cut = [
        _rec(
            f"q{i}",
            1,
            "#### 2" if i < 10 else ("#### 1\n" if i < 12 else "#### 2\n"),
            "limit" if i < 10 else "answer_line",
        )
        for i in range(n)
    ]
    rows = _row(0.1, base, cut)
    effects = {r.rule: r.effect for r in rows}
    assert effects["primary"] == "harms" and effects["finished"] == "no significant change"
    assert rows[-1].row.n == n - 10
    text = row_verdict(rows)
    assert "depends on how answers are scored" in text and "finished" in text


def test_effect_of_needs_significance():
    from mechlib.steering import steering_row

    base = {str(i): i < 5 for i in range(10)}
    assert effect_of(steering_row(0.1, base, {**base, "5": True}, n_bootstrap=10)) == "no significant change"


def test_peak_under_rules_and_verdict():
    rng = np.random.default_rng(0)
    n, layers, dim = 40, 3, 6
    ids = [f"q{i}" for i in range(n)]
    truth = np.arange(n) % 2 == 0
    h = rng.standard_normal((n, layers, dim))
    h[truth, 2, 0] += 3.0  # layer 2 separates right from wrong
    recs = {i: _rec(i, 1, "#### 1\n" if t else "#### 2\n", "answer_line") for i, t in zip(ids, truth)}
    rows = peak_under_rules(h, ids, recs, top_n=2, seed=0, min_permutations=50)
    assert [r.rule for r in rows] == list(RULES)
    assert all(r.peak_layer == 2 and r.p_peak < 0.05 for r in rows)
    assert "survives" in peak_verdict(rows) and "under every rule" in peak_verdict(rows)
    moved = rows[:1] + [PeakUnderRule(r.rule, r.n_correct, r.n_wrong, 1, 0.5, 0.4, 0.01, 50) for r in rows[1:]]
    text = peak_verdict(moved)
    assert "The peak moves (to layer 1)" in text and "depends on how answers are scored" in text
    assert "under 1 of 4 rules only" in text
    # a rule leaving a side with fewer than 2 questions gives no peak, and says so
    few = {i: _rec(i, 1, "#### 1\n", "answer_line") for i in ids}
    (row,) = peak_under_rules(h, ids, few, top_n=2, seed=0, min_permutations=50, rules=("primary",))
    assert row.peak_layer is None and row.n_wrong == 0
    assert "no peak layer" in peak_verdict([row])
    # an alternative with no peak (one side too small) neither keeps nor moves the layer: it is named apart
    gone = PeakUnderRule("finished", 20, 1, None, None, None, None, 0)
    text = peak_verdict([*rows[:3], gone])
    assert "finished only (cut-off answers left out): too few questions on one side" in text
    assert "Every rule that can be computed (2 of 3 alternatives) finds the same peak layer" in text
    assert "moves" not in text and "under every rule that can be computed (2 of 3 alternatives)." in text


def test_row_verdict_never_prints_a_zero_p():
    """20 answers broken, none fixed: exact McNemar p = 2 · 0.5^20 ≈ 1.9e-06, which ``.3f`` would print as 0.000."""
    base = [_rec(f"q{i}", 1, "#### 1\n", "answer_line") for i in range(40)]
    harm = [_rec(f"q{i}", 1, "#### 2\n" if i < 20 else "#### 1\n", "answer_line") for i in range(40)]
    text = row_verdict(_row(0.1, base, harm))
    assert "McNemar p 1.9e-06" in text and "0.000" not in text
