"""Logit lens: exact at the last layer (with Gemma 4's softcap), English-word rule, commitment layer."""

from __future__ import annotations

import re

import pytest
import torch

from mechlib.lens import LensResult, english_commitment_layer, is_english_word, layer_outputs, lens_logits, logit_lens
from mechlib.models import decoder_layers, final_norm, output_embedding
from mechlib.prompts import token_label


def _ids():
    return torch.randint(3, 259, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", ["tiny_gemma4", "tiny_qwen35", "tiny_llama"])
def test_lens_at_last_layer_equals_model_logits(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    outs, logits = layer_outputs(model, input_ids=_ids())
    assert len(outs) == len(decoder_layers(model))
    torch.testing.assert_close(lens_logits(model, outs[-1]), logits, rtol=0, atol=1e-4)
    res = logit_lens(model, tok, "The capital of France is")
    enc = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=enc).logits[0], -1)
    assert res.top_ids[-1] == probs.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(res.top_probs[-1]), probs.max(-1).values, rtol=0, atol=1e-4)
    assert res.n_layers == len(outs) and len(res.top_tokens[0]) == enc.shape[1]


def test_gemma4_lens_applies_the_softcap(tiny_gemma4):
    model, _ = tiny_gemma4
    outs, logits = layer_outputs(model, input_ids=_ids())
    uncapped = output_embedding(model)(final_norm(model)(outs[-1]))
    assert (uncapped - logits).abs().max() > 1e-3  # without the softcap the lens would be off
    torch.testing.assert_close(lens_logits(model, outs[-1]), logits, rtol=0, atol=1e-4)


def test_hooks_are_removed_after_the_lens(tiny_gemma4):
    model, tok = tiny_gemma4
    before = [len(b._forward_hooks) for b in decoder_layers(model)]
    logit_lens(model, tok, "hello world")
    assert [len(b._forward_hooks) for b in decoder_layers(model)] == before


@pytest.mark.parametrize(
    "text,expected",
    [
        (" Paris", True),
        ("the", True),
        ("\u2581Berlin", True),
        ("\u0120word", True),
        ("ing", True),
        (" a", False),
        ("I", False),
        ("42", False),
        (" caf\u00e9", False),
        ("<|im_end|>", False),
        ("", False),
        ("  ", False),
        ("don't", False),
        ("\u4e2d\u6587", False),
    ],
)
def test_is_english_word(text, expected):
    assert is_english_word(text) is expected


def _result(fractions):
    n = len(fractions)
    return LensResult(
        prompt="",
        input_ids=[],
        input_tokens=[],
        top_ids=[[]] * n,
        top_tokens=[[]] * n,
        top_probs=[[]] * n,
        english=[[]] * n,
        scored_positions=[],
        softcap=None,
        english_fraction=fractions,
    )


def test_english_commitment_layer():
    assert english_commitment_layer(_result([0.0, 0.2, 0.5, 0.9]), 0.5) == 2
    assert english_commitment_layer(_result([0.0, 0.2, 0.4]), 0.5) is None
    assert english_commitment_layer(_result([0.3, 0.2, 0.9]), 0.25) == 0
    with pytest.raises(ValueError):
        english_commitment_layer(_result([0.1]), 0.0)


def test_english_fraction_skips_special_positions(tiny_llama):
    model, tok = tiny_llama
    res = logit_lens(model, tok, "abc")
    assert res.input_ids[0] == tok.bos_token_id and 0 not in res.scored_positions
    for layer in range(res.n_layers):
        want = sum(res.english[layer][p] for p in res.scored_positions) / len(res.scored_positions)
        assert res.english_fraction[layer] == pytest.approx(want)


def test_real_smollm2_lens_ends_in_english(smollm2):
    res = logit_lens(smollm2.model, smollm2.tokenizer, "The capital of France is Paris. The capital of Germany is")
    assert res.n_layers == 30
    assert res.top_tokens[-1][-1].strip() == "Berlin"
    layer = english_commitment_layer(res, 0.5)
    # the first layer at >= 0.5, and the last layer's reading is mostly English (the SmolLM2 lens ends in words)
    assert layer is not None and res.english_fraction[layer] >= 0.5 > max(res.english_fraction[:layer], default=0)
    assert res.english_fraction[-1] >= 0.5


def test_token_labels_name_tokens_that_decode_to_nothing(tiny_tok):
    """A lone byte of a multi-byte character decodes to U+FFFD and an id past the vocabulary to '':
    the lens shows the byte (or the id) instead, and leaves clean text alone."""
    byte_ids = [i for i in range(len(tiny_tok)) if "\ufffd" in tiny_tok.decode([i])]
    assert byte_ids  # the byte-level tokenizer has lone high bytes
    for i in byte_ids:
        assert re.fullmatch(r"<0x[0-9A-F]{2}>", token_label(tiny_tok, i))
    assert token_label(tiny_tok, len(tiny_tok) + 7) == f"<id {len(tiny_tok) + 7}>"
    clean = tiny_tok("ab", add_special_tokens=False).input_ids
    assert [token_label(tiny_tok, i) for i in clean] == [tiny_tok.decode([i]) for i in clean]


def test_real_smollm2_labels_split_characters_by_byte(smollm2):
    tok = smollm2.tokenizer
    ids = tok("café 日本", add_special_tokens=False).input_ids
    labels = [token_label(tok, i) for i in ids]
    assert "".join(labels).startswith("café")  # whole characters keep their text
    assert not any("\ufffd" in s or s == "" for s in labels)
    assert any(re.search(r"<0x[0-9A-F]{2}>", s) for s in labels)  # 日 is split across tokens


def test_lens_on_random_weights_shows_no_blank_tokens(tiny_gemma4):
    """Random weights often rank an id past the tiny tokenizer's vocabulary first (seen as '' in chapter 07)."""
    model, tok = tiny_gemma4
    res = logit_lens(model, tok, "The capital of France is")
    shown = [t for layer in res.top_tokens for t in layer] + res.input_tokens
    assert not any(t == "" or "\ufffd" in t for t in shown)
