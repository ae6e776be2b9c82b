"""The final-answer stop rule: rows end after their first complete ``#### N`` line, nothing else changes.

The generator must cut each row exactly where the rule first holds (also when the rule is only
checked every few steps, as on CUDA), keep the tokens before it identical to free generation, and
leave other rows alone; every record says why it stopped.
"""

from __future__ import annotations

import pytest
import torch

from mechlib.generate import generate_ids, greedy_batch, left_pad, shortest_stopping_prefix
from mechlib.stopping import AnswerLineStop, has_final_answer_line, stop_reason_of

PAD = 0


@pytest.mark.parametrize(
    "text, done",
    [
        ("#### 8\n", True),
        ("We add. #### N = 3 + 5 = 8\nmore", True),
        ("#### 8", False),
        ("#### \n", False),
        ("#### N\n", False),
        ("8\n#### 1", False),
        ("so 3 + 5 = 8\n", False),
    ],
)
def test_final_answer_line(text, done):
    assert has_final_answer_line(text) is done


def test_stop_reason():
    assert stop_reason_of("#### 8\n", 5, 48) == "answer_line"
    assert stop_reason_of("#### 8\n", 48, 48) == "answer_line"  # completed on the last token: not truncated
    assert stop_reason_of("#### 8", 48, 48) == "limit"
    assert stop_reason_of("it is 8", 7, 48) == "eos"


def test_shortest_stopping_prefix():
    rule = lambda ids: 7 in ids  # noqa: E731 — monotone, like the answer-line rule
    assert shortest_stopping_prefix([1, 2, 7, 7, 3], rule) == 3
    assert shortest_stopping_prefix([7], rule) == 1
    assert shortest_stopping_prefix([1, 2], rule) is None and shortest_stopping_prefix([], rule) is None


@pytest.mark.parametrize("sync_every", [1, 4], ids=["cpu_sync", "cuda_style_sync"])
def test_rows_stop_at_the_rule_and_match_free_generation(tiny_llama, sync_every):
    model, tok = tiny_llama
    ids = [tok(t)["input_ids"] for t in ["Hello there, how", "A", "The quick brown fox jumps", "12 + 5 ="]]
    free = generate_ids(model, ids, 12, 8, eos_ids=[], pad_id=PAD, progress=False)
    # a token that some rows emit early and at least one row never emits
    stop_tok = next(t for row in free for t in row[1:6] if any(t not in other for other in free))
    rule = lambda row: stop_tok in row  # noqa: E731

    inp, mask = left_pad(ids, PAD, torch.device("cpu"))
    raw = greedy_batch(model, inp, mask, 12, eos_ids=[], pad_id=PAD, sync_every=sync_every, stop_when=rule).tolist()
    got = generate_ids(model, ids, 12, 8, eos_ids=[], pad_id=PAD, progress=False, stop_when=rule)
    for row_free, row_got in zip(free, got):
        cut = row_free.index(stop_tok) + 1 if stop_tok in row_free else len(row_free)
        assert row_got == row_free[:cut]
    assert any(len(r) < 12 for r in got) and any(len(r) == 12 for r in got)
    if sync_every == 1:  # a stopped row is fed pad tokens from the next step on, like a row that hit EOS
        for row_free, row_raw in zip(free, raw):
            if stop_tok in row_free:
                cut = row_free.index(stop_tok) + 1
                assert row_raw[cut:] == [PAD] * (len(row_raw) - cut)


def test_answer_line_stop_decodes_the_row(tiny_tok):
    tok = tiny_tok
    rule = AnswerLineStop(tok)
    ids = tok("So #### 12\nand then", add_special_tokens=False)["input_ids"]
    n = shortest_stopping_prefix(ids, rule)
    assert n is not None and tok.decode(ids[:n]).rstrip(" ").endswith("\n") and "and" not in tok.decode(ids[:n])
