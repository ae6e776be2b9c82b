"""Question sources, prompt formats, per-question records (cache/resume) and the contrast/held-out split."""

from __future__ import annotations

import json

import pytest
import torch
from test_gsm8k import SHARED_GSM8K

from mechlib.gsm8k import extract_answer, extract_answer_with_rule
from mechlib.prompts import GEMMA_MANUAL, INSTRUCTION, PromptFormatError, build_prompt, encode_prompts
from mechlib.records import (
    RecordsError,
    accuracy_by_kind,
    meta_path,
    read_records,
    run_baseline,
    split_contrast_heldout,
    summarize,
)
from mechlib.stopping import stop_reason_of
from mechlib.tasks import TEMPLATES, TaskError, arithmetic_questions, load_questions

# ------------------------------------------------------------------------ arithmetic task


def test_arithmetic_is_deterministic_and_unique():
    a, b = load_questions("arithmetic", 120, seed=3), load_questions("arithmetic", 120, seed=3)
    assert a == b
    assert a != load_questions("arithmetic", 120, seed=4)
    assert len({q.question for q in a}) == len(a) == len({q.id for q in a})
    assert {q.source.split(":")[1] for q in a} == set(TEMPLATES), "every template is used"
    assert load_questions("arithmetic", 50, seed=3) == a[:50], "a prefix of a longer draw"


def test_arithmetic_gold_answers_are_right():
    """Recompute each gold answer from the numbers in the question text."""
    import re

    rules = {
        "plus": lambda x: x[0] + x[1],
        "sum_of": lambda x: x[0] + x[1],
        "red_blue": lambda x: x[0] + x[1],
        "boxes": lambda x: x[0] * x[1],
        "buy_more": lambda x: x[0] + x[1],
    }
    assert set(rules) == set(TEMPLATES)
    for q in arithmetic_questions(200, seed=0):
        nums = [int(x) for x in re.findall(r"\d+", q.question)]
        assert q.answer == rules[q.source.split(":")[1]](nums) > 0, q


def test_arithmetic_mix_follows_the_weights():
    from collections import Counter

    from mechlib.tasks import TEMPLATE_WEIGHTS

    counts = Counter(q.source.split(":")[1] for q in arithmetic_questions(200, seed=0))
    total = sum(TEMPLATE_WEIGHTS.values())
    for kind, w in TEMPLATE_WEIGHTS.items():
        assert abs(counts[kind] / 200 - w / total) < 0.07, (kind, counts)


def test_load_questions_errors():
    with pytest.raises(TaskError, match="unknown task 'math'"):
        load_questions("math", 5, 0)
    with pytest.raises(TaskError, match="positive"):
        load_questions("arithmetic", 0, 0)
    with pytest.raises(TaskError, match="'plus' is exhausted"):
        arithmetic_questions(300, 0, weights={"plus": 1.0})  # only 11 x 8 distinct bare sums
    with pytest.raises(TaskError, match="unknown arithmetic templates"):
        arithmetic_questions(3, 0, weights={"nope": 1.0})


@pytest.mark.skipif(
    not (SHARED_GSM8K / "test.jsonl").is_file(),
    reason=f"GSM8K dev copy not found at {SHARED_GSM8K} (only present on the project's machines)",
)
def test_gsm8k_sample_is_seeded_and_in_file_order():
    a = load_questions("gsm8k", 30, seed=1, gsm8k_path=str(SHARED_GSM8K))
    assert a == load_questions("gsm8k", 30, seed=1, gsm8k_path=str(SHARED_GSM8K))
    assert [q.id for q in a] == sorted(q.id for q in a)
    assert a != load_questions("gsm8k", 30, seed=2, gsm8k_path=str(SHARED_GSM8K))
    with pytest.raises(TaskError, match="only 1319"):
        load_questions("gsm8k", 5000, seed=1, gsm8k_path=str(SHARED_GSM8K))


# ------------------------------------------------------------------------ prompts


def test_gemma_manual_is_the_card_format_verbatim(tiny_tok):
    p = build_prompt(tiny_tok, "What is 2+2?", "gemma_manual")
    assert p == (
        "<start_of_turn>user\nSolve step by step and give final answer as '#### N'.\n\n"
        "What is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert GEMMA_MANUAL.format(instruction=INSTRUCTION, q="x").endswith("<start_of_turn>model\n")


def test_chat_template_missing_is_a_clear_error(tiny_tok):
    assert not tiny_tok.chat_template
    with pytest.raises(PromptFormatError, match=r"has no chat template.*gemma_manual"):
        build_prompt(tiny_tok, "q", "chat_template")
    with pytest.raises(PromptFormatError, match="unknown prompt_format"):
        build_prompt(tiny_tok, "q", "alpaca")


@pytest.fixture
def templated_tok(tiny_tok):
    """The tiny tokenizer with a minimal chat template (removed again after the test)."""
    tiny_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    yield tiny_tok
    tiny_tok.chat_template = None


def test_chat_template_and_single_bos(templated_tok):
    tok = templated_tok
    p = build_prompt(tok, "What is 2+2?", "chat_template")
    assert p.startswith("<bos><user>" + INSTRUCTION) and p.endswith("What is 2+2?<assistant>")
    ids = encode_prompts(tok, [p, "plain text"])
    assert ids[0].count(tok.bos_token_id) == 1, "the template's BOS must not be doubled"
    assert ids[1][0] == tok.bos_token_id, "plain prompts get the tokenizer's BOS"


def test_chat_oneshot_puts_one_worked_example_before_the_question(templated_tok):
    from mechlib.prompts import ONESHOT_ANSWER, ONESHOT_QUESTION

    p = build_prompt(templated_tok, "What is 2+2?", "chat_oneshot")
    assert p == (
        f"<bos><user>{INSTRUCTION}\n\n{ONESHOT_QUESTION}<assistant>{ONESHOT_ANSWER}"
        f"<user>{INSTRUCTION}\n\nWhat is 2+2?<assistant>"
    )
    assert ONESHOT_ANSWER.endswith("#### 5") and "-" in ONESHOT_ANSWER  # an operation no template uses


def test_chat_oneshot_needs_a_chat_template(tiny_tok):
    assert not tiny_tok.chat_template
    with pytest.raises(PromptFormatError, match="chat_oneshot"):
        build_prompt(tiny_tok, "q", "chat_oneshot")


# ------------------------------------------------------------------------ records


class _Loaded:
    def __init__(self, model, tok, name="tiny-llama"):
        self.model, self.tokenizer, self.name = model, tok, name


def _questions(n=6):
    return arithmetic_questions(n, seed=0)


def test_run_baseline_scores_caches_and_resumes(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    loaded, qs, out = _Loaded(model, tok), _questions(), tmp_path / "baseline.jsonl"
    recs = run_baseline(loaded, qs, "gemma_manual", 5, 4, out, progress=False)
    assert [r.id for r in recs] == [q.id for q in qs]
    for r, q in zip(recs, qs):
        assert r.prompt == build_prompt(tok, q.question, "gemma_manual") and r.gold == q.answer
        assert r.source == q.source and r.kind == q.kind == q.source.split(":")[1]
        assert r.parsed == extract_answer(r.generation) and r.correct == (r.parsed == q.answer)
        assert r.parsed_by == (None if r.parsed is None else extract_answer_with_rule(r.generation)[1])
        assert 0 < r.n_new_tokens <= 5 and r.truncated == (r.stop_reason == "limit")
        assert r.stop_reason == stop_reason_of(r.generation, r.n_new_tokens, 5)
    assert read_records(out) == recs
    assert json.loads(meta_path(out).read_text())["max_new_tokens"] == 5

    # a rerun generates nothing
    import mechlib.generate as gen

    calls = []
    real = gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    assert run_baseline(loaded, qs, "gemma_manual", 5, 4, out, progress=False) == recs and calls == []

    # cached generations are re-scored with the current parser (a parser fix needs no regeneration)
    stale = [json.loads(line) for line in out.read_text().splitlines()]
    stale[0].update(parsed=None, correct=not stale[0]["correct"], parsed_by="bogus")
    del stale[1]["source"]  # a record written before records kept the question's source
    out.write_text("".join(json.dumps(r) + "\n" for r in stale))
    assert read_records(out)[1].source == ""
    assert run_baseline(loaded, qs, "gemma_manual", 5, 4, out, progress=False) == recs and calls == []

    # a killed run (only 2 records on disk) resumes with the other 4 only, and gives the same records
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    assert run_baseline(loaded, qs, "gemma_manual", 5, 4, out, progress=False) == recs
    assert calls == [4]

    # other settings: the cache is discarded, not mixed in — also when that run is killed at once
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_baseline(loaded, qs, "gemma_manual", 3, 4, out, progress=False)
    assert read_records(out) == [], "records of the old settings must not survive under the new sidecar"
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    calls.clear()
    run_baseline(loaded, qs, "gemma_manual", 3, 4, out, progress=False)
    assert calls == [4, 2] and json.loads(meta_path(out).read_text())["max_new_tokens"] == 3

    # the model now runs in another dtype: greedy tokens may differ, so nothing is reused
    calls.clear()
    model.to(torch.float64)
    try:
        run_baseline(loaded, qs, "gemma_manual", 3, 4, out, progress=False)
    finally:
        model.to(torch.float32)
    assert calls == [4, 2] and json.loads(meta_path(out).read_text())["dtype"] == "float64"


def test_run_baseline_with_a_hook_differs_and_uses_its_own_file(tiny_llama, tmp_path):
    from mechlib.models import decoder_layers

    model, tok = tiny_llama
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    loaded, qs = _Loaded(model, tok), _questions(4)
    base = run_baseline(loaded, qs, "gemma_manual", 6, 4, tmp_path / "b.jsonl", progress=False)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2
    h = decoder_layers(model)[1].register_forward_hook(lambda _m, _i, o: o + v)
    try:
        steered = run_baseline(loaded, qs, "gemma_manual", 6, 4, tmp_path / "s.jsonl", progress=False)
    finally:
        h.remove()
    assert [r.generation for r in steered] != [r.generation for r in base]


def test_summary_and_split():
    from mechlib.records import Record

    recs = [
        Record(
            id=f"q{i}",
            prompt="p",
            generation="g",
            parsed=1.0,
            gold=1 if i % 3 else 2,
            correct=bool(i % 3),
            n_new_tokens=4,
            stop_reason="limit" if i < 5 else ("eos" if i < 20 else "answer_line"),
            parsed_by="hashes" if i < 10 else "last_number",
            strict=None,
            correct_strict=False,
            flexible=1.0,
            correct_flexible=bool(i % 3),
            parser_version="test",
        )
        for i in range(30)
    ]
    s = summarize(recs)
    assert s.by_rule == {"hashes": (10, 6), "last_number": (20, 14)}
    assert (s.n, s.n_correct) == (30, 20) and s.accuracy == pytest.approx(2 / 3)
    assert s.ci95[0] < 2 / 3 < s.ci95[1] and s.truncated == pytest.approx(5 / 30)
    assert s.finished == pytest.approx(25 / 30) and s.stop_reasons == {"eos": 15, "answer_line": 10, "limit": 5}
    contrast, held = split_contrast_heldout(recs, 10, seed=0)
    assert len(held) == 10 and len(contrast) == 20 and not set(held) & set(contrast)
    assert contrast + held != [r.id for r in recs] and sorted(contrast + held) == sorted(r.id for r in recs)
    # the split depends on the ids and the seed, not on the records' order
    assert set(split_contrast_heldout(list(reversed(recs)), 10, seed=0)[1]) == set(held)
    assert split_contrast_heldout(recs, 10, seed=1)[1] != held
    with pytest.raises(RecordsError, match="n_heldout"):
        split_contrast_heldout(recs, 30, seed=0)


def test_accuracy_by_kind_groups_records_by_their_question_type():
    from mechlib.records import Record

    def rec(i: int, source: str, correct: bool) -> Record:
        return Record(f"q{i}", "p", "g", 1.0, 1, correct, 4, "eos", "hashes", 1.0, correct, 1.0, correct, "t", source)

    recs = [rec(0, "arithmetic:plus", True), rec(1, "arithmetic:boxes", False), rec(2, "arithmetic:plus", False)]
    recs.append(rec(3, "gsm8k", True))
    groups = accuracy_by_kind(recs)
    assert [(g.group, g.n, g.n_correct) for g in groups] == [("boxes", 1, 0), ("gsm8k", 1, 1), ("plus", 2, 1)]
    assert groups[2].accuracy == 0.5 and groups[2].ci95[0] < 0.5 < groups[2].ci95[1]


def test_read_records_names_bad_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"id": "a"}\n')
    with pytest.raises(RecordsError, match=r"r\.jsonl:1"):
        read_records(f)
