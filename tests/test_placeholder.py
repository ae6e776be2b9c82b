"""Placeholder labels: exact and seeded on the baseline, stable for unchanged answers, marked everywhere."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from mechlib import placeholder
from mechlib.contrast import BaselineSplit
from mechlib.records import Record
from mechlib.scoring import accuracy_under_rules
from mechlib.stopping import StopReason


def rec(qid: str, generation: str = "no idea", correct: bool = False, stop: StopReason = "eos") -> Record:
    return Record(
        id=qid,
        prompt="p",
        generation=generation,
        parsed=None,
        gold=3,
        correct=correct,
        n_new_tokens=4,
        stop_reason=stop,
        parsed_by=None,
        strict=None,
        correct_strict=correct,
        flexible=None,
        correct_flexible=correct,
        parser_version="v",
    )


IDS = [f"q{i}" for i in range(40)]


@pytest.mark.parametrize("fraction, n_true", [(0.5, 20), (0.25, 10), (0.01, 1), (0.99, 39)])
def test_baseline_labels_mark_exactly_the_fraction_and_keep_both_sides(fraction, n_true):
    labels = placeholder.baseline_labels(IDS, fraction, seed=0)
    assert list(labels) == IDS and sum(labels.values()) == n_true


def test_baseline_labels_depend_on_seed_not_on_order():
    a = placeholder.baseline_labels(IDS, 0.5, seed=0)
    assert placeholder.baseline_labels(list(reversed(IDS)), 0.5, seed=0) == a
    assert placeholder.baseline_labels(IDS, 0.5, seed=1) != a


def test_relabelled_records_agree_under_every_rule_but_finished_drops_cut_offs():
    records = [rec(i, stop="limit" if i == "q0" else "eos", correct=True) for i in IDS]
    out = placeholder.relabel_baseline(records, 0.5, seed=3)
    assert sum(r.correct for r in out) == 20
    assert all(r.correct == r.correct_strict == r.correct_flexible for r in out)
    by_rule = {a.rule: a for a in accuracy_under_rules(out)}
    assert by_rule["primary"].n_correct == by_rule["strict"].n_correct == by_rule["flexible"].n_correct == 20
    assert by_rule["finished"].n == 39


def test_steered_answers_keep_the_baseline_label_when_unchanged_and_draw_when_changed():
    base = {r.id: r for r in placeholder.relabel_baseline([rec(i) for i in IDS], 0.5, seed=0)}
    same = placeholder.relabel_steered([rec(i) for i in IDS], base, 0.5, seed=0)
    assert [r.correct for r in same] == [base[i].correct for i in IDS]
    changed = placeholder.relabel_steered([rec(i, generation=f"steered {i}") for i in IDS], base, 0.5, seed=0)
    flips = sum(r.correct != base[r.id].correct for r in changed)
    assert 0 < flips < len(IDS)  # fresh coins: some flip, not all
    again = placeholder.relabel_steered([rec(i, generation=f"steered {i}") for i in IDS], base, 0.5, seed=0)
    assert [r.correct for r in again] == [r.correct for r in changed]


def test_off_changes_nothing_and_marks_nothing():
    records = [rec(i, correct=i == "q1") for i in IDS]
    split = BaselineSplit(
        IDS[:30], IDS[30:], {i: "p" for i in IDS}, {r.id: r.correct for r in records}, {r.id: r for r in records}
    )
    assert placeholder.relabel_split(split, 0.0, 0) is split
    assert placeholder.relabel_steered(records, split.records, 0.0, 0) == records
    assert placeholder.mark_text("finding", 0.0) == "finding"
    fig = plt.figure()
    assert placeholder.mark_figure(fig, 0.0)._suptitle is None
    plt.close(fig)


def test_on_marks_split_text_and_figure():
    records = [rec(i) for i in IDS]
    split = BaselineSplit(
        IDS[:30], IDS[30:], {i: "p" for i in IDS}, {r.id: False for r in records}, {r.id: r for r in records}
    )
    marked = placeholder.relabel_split(split, 0.5, 0)
    assert sum(marked.correct.values()) == 20 and marked.labels(IDS).sum() == 20
    assert placeholder.mark_text("finding", 0.5).startswith("PLACEHOLDER LABELS (placeholder_labels = 0.5)")
    fig = plt.figure()
    assert "PLACEHOLDER" in placeholder.mark_figure(fig, 0.5)._suptitle.get_text()
    plt.close(fig)


@pytest.mark.parametrize("fraction", [1.0, -0.5])
def test_bad_fraction_is_one_clear_error(fraction):
    with pytest.raises(placeholder.PlaceholderError, match=r"fraction in \(0, 1\)"):
        placeholder.baseline_labels(IDS, fraction, 0)
