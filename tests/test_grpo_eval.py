"""Chapter 08's evaluation shortcut on a tiny Llama: base answers the adapted model reproduces are
verified by one teacher-forced forward, the rest regenerated, and the records equal a full regeneration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mechlib.greedy_check import Candidate, candidate, chain_matches, verify_records
from mechlib.grpo_eval import evaluate_arm, evaluate_arm_verified
from mechlib.gsm8k import Question
from mechlib.models import CausalLM, LoadedModel
from mechlib.prompts import build_prompt
from mechlib.records import Record, read_records, run_baseline, score
from mechlib.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
# the byte symbols of printable ASCII: the tiny model is made to write text that re-tokenises exactly
ASCII = [i for i in range(3, 259) if (t := TOK.decode([i])).isascii() and (t.isprintable() or t == "\n")]
STOP_CHAR = TOK.convert_tokens_to_ids("7")  # a second EOS id, so some answers end at EOS
FORMAT, MAX_NEW, BATCH = "gemma_manual", 12, 3
QUESTIONS = [Question(f"q{i}", f"What is {i} + {3 * i}?", 4 * i, "test") for i in range(8)]


def tiny_loaded() -> LoadedModel:
    """A fresh tiny Llama that writes printable ASCII and also stops at "7" (deterministic)."""
    model = tiny_model("llama", seed=0)
    model.requires_grad_(False)
    head = model.get_output_embeddings().weight
    other = torch.ones(head.shape[0], dtype=torch.bool)
    other[ASCII] = False
    head[other] = 0
    model.generation_config.eos_token_id = [1, STOP_CHAR]
    return LoadedModel(model, TOK, "tiny-llama", 4, 64)


def save_adapter(path: Path, scale: float) -> Path:
    """A LoRA adapter on q/v projections; ``scale`` 0 leaves peft's B = 0 (the identity adapter)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_loaded().model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Record]:
    out = tmp_path_factory.mktemp("base") / "baseline.jsonl"
    records = run_baseline(tiny_loaded(), QUESTIONS, FORMAT, MAX_NEW, BATCH, out, progress=False)
    assert {r.stop_reason for r in records} == {"eos", "limit"}  # both stop paths are exercised
    return {r.id: r for r in records}


def full(adapter: Path, out: Path) -> list[Record]:
    return evaluate_arm(tiny_loaded, adapter, QUESTIONS, FORMAT, MAX_NEW, BATCH, out, progress=False)


def same_answers(a: list[Record], b: list[Record]) -> bool:
    keys = [(r.id, r.generation, r.n_new_tokens, r.stop_reason, r.correct, r.prompt) for r in a]
    return keys == [(r.id, r.generation, r.n_new_tokens, r.stop_reason, r.correct, r.prompt) for r in b]


def test_identity_adapter_verifies_every_answer(base, tmp_path):
    adapter = save_adapter(tmp_path / "zero", 0.0)
    out = tmp_path / "after.jsonl"
    result = evaluate_arm_verified(tiny_loaded, adapter, QUESTIONS, base, FORMAT, MAX_NEW, BATCH, out, False)
    assert (result.n_cached, result.n_verified, result.n_regenerated) == (0, len(QUESTIONS), 0)
    assert result.records == full(adapter, tmp_path / "full.jsonl")
    assert read_records(out) == result.records  # run_baseline's file format
    again = evaluate_arm_verified(tiny_loaded, adapter, QUESTIONS, base, FORMAT, MAX_NEW, BATCH, out, False)
    assert (again.n_cached, again.records) == (len(QUESTIONS), result.records)


def test_changed_answers_are_regenerated_and_equal_a_full_run(base, tmp_path):
    adapter = save_adapter(tmp_path / "moved", 0.02)
    expected = full(adapter, tmp_path / "full.jsonl")
    changed = sum(r.generation != base[r.id].generation for r in expected)
    assert 0 < changed < len(QUESTIONS)  # the adapter changes some answers, not all
    result = evaluate_arm_verified(
        tiny_loaded, adapter, QUESTIONS, base, FORMAT, MAX_NEW, BATCH, tmp_path / "after.jsonl", False
    )
    assert result.n_regenerated >= changed and result.n_verified > 0
    assert result.n_verified + result.n_regenerated == len(QUESTIONS)
    assert same_answers(result.records, expected)
    short = evaluate_arm(
        tiny_loaded, adapter, QUESTIONS, FORMAT, MAX_NEW, BATCH, tmp_path / "kw.jsonl", False, base_records=base
    )
    assert same_answers(short, expected)


def test_a_prompt_mismatch_is_regenerated(base, tmp_path):
    adapter = save_adapter(tmp_path / "zero", 0.0)
    edited = dict(base)
    edited["q2"] = replace(base["q2"], prompt=base["q2"].prompt + " ")
    del edited["q5"]  # no base record at all
    loaded = tiny_loaded()
    verified = verify_records(loaded, QUESTIONS, edited, FORMAT, MAX_NEW, BATCH)
    assert verified.regenerate == ["q2", "q5"]
    result = evaluate_arm_verified(
        tiny_loaded, adapter, QUESTIONS, edited, FORMAT, MAX_NEW, BATCH, tmp_path / "after.jsonl", False
    )
    assert (result.n_verified, result.n_regenerated) == (len(QUESTIONS) - 2, 2)
    assert same_answers(result.records, full(adapter, tmp_path / "full.jsonl"))


def test_records_that_cannot_be_the_greedy_answer_are_not_candidates():
    q = QUESTIONS[0]
    prompt = build_prompt(TOK, q.question, FORMAT)
    eos = [1]

    def rec(text: str, n: int, reason: str) -> Record:
        return score(q, prompt, text, n, reason)  # type: ignore[arg-type]

    ok = candidate(q, rec("so 4", 4, "eos"), prompt, TOK, eos, MAX_NEW)
    assert ok is not None and ok.answer_ids == list(TOK("so 4", add_special_tokens=False)["input_ids"])
    assert candidate(q, rec("#### 4\n", 7, "answer_line"), prompt, TOK, eos, MAX_NEW) is not None
    assert candidate(q, rec("#### 4\nmore", 11, "answer_line"), prompt, TOK, eos, MAX_NEW) is None  # stops earlier
    assert candidate(q, rec("so 4", 5, "eos"), prompt, TOK, eos, MAX_NEW) is None  # other ids than generated
    assert candidate(q, rec("so 4", 4, "eos"), prompt, TOK, eos, 3) is None  # longer than the limit
    assert candidate(q, rec("so 4", 4, "limit"), prompt, TOK, eos, MAX_NEW) is None  # another max_new_tokens
    assert candidate(q, rec("so 4", 4, "eos"), prompt, TOK, [], MAX_NEW) is None  # no EOS to stop at
    assert candidate(q, rec("so 4", 4, "eos"), prompt + " ", TOK, eos, MAX_NEW) is None  # another prompt
    c = Candidate("q0", [2, 5], [7, 8], "eos")
    assert chain_matches(c, [7, 8, 1], eos) and not chain_matches(c, [7, 8, 9], eos)
    assert chain_matches(c._replace(stop_reason="limit"), [7, 8, 9], eos)
    assert not chain_matches(c, [7, 9, 1], eos)


def ascii_writer(model: CausalLM) -> CausalLM:
    """``model`` with an untied unembedding that only scores printable ASCII, stopping also at "7"."""
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    other = torch.ones(weight.shape[0], dtype=torch.bool)
    other[ASCII] = False
    weight[other] = 0
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.generation_config.eos_token_id = [1, STOP_CHAR]
    return model


def test_every_architecture_verifies_its_own_answers(tiny_any, tmp_path):
    """The unchanged model reproduces its own greedy answers under teacher forcing, whatever the cache
    kind (Gemma 4's sliding/KV-shared layers, Qwen 3.5's recurrent layers, Llama)."""
    model, tok, arch = tiny_any
    loaded = LoadedModel(ascii_writer(model), tok, arch, 4, 64)
    records = run_baseline(loaded, QUESTIONS, FORMAT, MAX_NEW, BATCH, tmp_path / "b.jsonl", progress=False)
    verified = verify_records(loaded, QUESTIONS, {r.id: r for r in records}, FORMAT, MAX_NEW, BATCH)
    assert verified.regenerate == [] and [verified.records[q.id] for q in QUESTIONS] == records
