"""Is a known greedy answer still the greedy answer of changed weights? One teacher-forced forward says.

Why: chapter 08 evaluates GRPO adapters on the held-out questions by regenerating every greedy
answer (:func:`mechlib.records.run_baseline`), yet after a few GRPO steps most answers are the
base model's, token for token. This is the verification step of speculative decoding: run the
adapted model ONCE over prompt + the base answer's tokens and compare, at every answer position,
its argmax with the base's next token (and, for an answer that ended at EOS, that the argmax after
its last token is an EOS id). If the whole chain matches, greedy decoding from the adapted model
emits exactly these tokens and stops at the same point — the stop rules (EOS,
:class:`mechlib.stopping.AnswerLineStop` on the decoded text, ``max_new_tokens``) read nothing but
the tokens, and they are checked on the very ids that were verified. Only answers that fail go to
generation.

The records hold text, so the answer's ids are the re-tokenised text. Where those are not the ids
the model generated, the argmax chain fails (or the text/length checks below do) and the question
is regenerated: the shortcut can miss a saving, never return a wrong answer.

Float noise: the batched teacher-forced forward rounds differently from incremental decoding (other
matmul shapes, another batch). A near-tie argmax can therefore come out differently — the same noise
greedy generation already has between batch compositions and with the shared-prompt-prefix
prefill (:mod:`mechlib.generate`), not a new kind of inexactness.

Layout: as generation's prefill, ``[shared prefix | left padding | prompt rest | answer | right
padding]``, positions ``cumsum(mask) − 1``. The prompts' common prefix (chat template, worked
example: most prompt tokens) runs once at batch 1 and its cache is copied per batch, where that
attends exactly (:func:`mechlib.kv_cache.prefix_sharing_exact`); left padding the prompts lines
the answers up in the same columns, so only those columns' logits are computed (``logits_to_keep``).
Tests: an unchanged model verifies all its own answers on tiny Llama, Gemma 4 and Qwen 3.5; on
tiny Llama with LoRA adapters the records equal a full regeneration. SmolLM2, 50 held-out
questions, zero adapter, 2 CPU cores: all 50 verify in ~6 s, against ~12 s to regenerate them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from mechlib.decode_step import supports_logits_to_keep
from mechlib.generate import eos_ids_of, pad_id_of
from mechlib.gsm8k import Question
from mechlib.kv_cache import copy_for_batch, prefix_cache, usable_prefix_len
from mechlib.models import CausalLM, LoadedModel, Tokenizer, model_device
from mechlib.prompts import build_prompt, decode_text, encode_prompts
from mechlib.records import Record, score
from mechlib.stopping import AnswerLineStop, StopReason, shortest_stopping_prefix, stop_reason_of

if TYPE_CHECKING:
    from transformers import DynamicCache


class GreedyCheckError(ValueError):
    """Settings the check cannot use; the message names the value."""


class Candidate(NamedTuple):
    """One base answer to verify: its prompt and answer ids, and how it must have stopped."""

    qid: str
    prompt_ids: list[int]
    answer_ids: list[int]
    stop_reason: StopReason  # "eos": the argmax after the last answer token must be an EOS id


class Verified(NamedTuple):
    """The outcome of :func:`verify_records`: the base records that are the adapted model's own
    greedy answers (by question id, scored against the questions), and the ids to regenerate."""

    records: dict[str, Record]
    regenerate: list[str]


def candidate(
    q: Question,
    base: Record | None,
    prompt: str,
    tokenizer: Tokenizer,
    eos_ids: Sequence[int],
    max_new_tokens: int,
) -> Candidate | None:
    """The ids to teacher-force for ``base`` (the base model's record of ``q``), or None when the
    record cannot be the greedy answer under these settings (then ``q`` is regenerated).

    Checked without the model: the record answers ``q`` with today's ``prompt``; its text
    re-tokenises to ids that decode back to it, as many as it says it generated, no EOS among
    them, within ``max_new_tokens``; the stop rule, applied to those ids, stops exactly at their
    end (answer line) or nowhere before, and gives the record's stop reason.
    """
    if base is None or base.id != q.id or base.prompt != prompt:
        return None
    ids = list(tokenizer(base.generation, add_special_tokens=False)["input_ids"])
    n = len(ids)
    if n != base.n_new_tokens or n > max_new_tokens or set(ids) & set(eos_ids):
        return None
    if decode_text(tokenizer, ids, skip_special_tokens=True) != base.generation:
        return None
    stop_at = shortest_stopping_prefix(ids, AnswerLineStop(tokenizer))
    if stop_at is not None and stop_at != n:
        return None  # generation would have stopped earlier
    reason = stop_reason_of(base.generation, n, max_new_tokens)
    if reason != base.stop_reason or (reason == "eos" and not eos_ids):
        return None
    return Candidate(q.id, encode_prompts(tokenizer, [prompt])[0], ids, reason)


def _shared_prefix(model: CausalLM, cands: Sequence[Candidate]) -> tuple[int, DynamicCache | None]:
    """How many leading prompt tokens all candidates share, and their batch-1 cache (0, None: none)."""
    longest = max(len(c.prompt_ids) for c in cands) + max(len(c.answer_ids) for c in cands)  # padded width
    n = usable_prefix_len(model, [c.prompt_ids for c in cands], longest)
    if not n:
        return 0, None
    extra = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    prefix = torch.tensor(cands[0].prompt_ids[:n], dtype=torch.long, device=model_device(model))
    return n, prefix_cache(model, prefix, 1, extra)


def _batch_argmax(
    model: CausalLM, cands: Sequence[Candidate], pad_id: int, n_prefix: int, kv: DynamicCache | None
) -> list[list[int]]:
    """The argmax at each candidate's answer positions: prompt end, then after each answer token
    (``len(answer) + 1`` ids per candidate), from one forward of the batch."""
    device = model_device(model)
    heads = [c.prompt_ids[n_prefix:] for c in cands]
    head_w = max(map(len, heads))
    tail_w = max(len(c.answer_ids) for c in cands)
    ids = torch.full((len(cands), head_w + tail_w), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (h, c) in enumerate(zip(heads, cands)):
        row = h + c.answer_ids
        ids[i, head_w - len(h) : head_w - len(h) + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, head_w - len(h) : head_w - len(h) + len(row)] = 1
    full = torch.cat([mask.new_ones((len(cands), n_prefix)), mask], dim=1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)[:, n_prefix:]
    keep = torch.arange(head_w - 1, head_w + tail_w, device=device)  # answer columns, in input coordinates
    kwargs: dict[str, object] = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    if kv is not None:
        kwargs.update(past_key_values=copy_for_batch(kv, len(cands)), use_cache=True)
    out = model(
        input_ids=ids.to(device),
        attention_mask=full.to(device),
        position_ids=positions.to(device),
        return_dict=True,
        **kwargs,
    )
    logits = out.logits if "logits_to_keep" in kwargs else out.logits[:, keep]
    best = logits.argmax(-1).tolist()
    return [best[i][: len(c.answer_ids) + 1] for i, c in enumerate(cands)]


def chain_matches(c: Candidate, argmax: Sequence[int], eos_ids: Sequence[int]) -> bool:
    """Whether greedy decoding would emit ``c.answer_ids`` and stop where the base did: every answer
    token is the argmax before it, and an EOS-ended answer's next argmax is an EOS id."""
    n = len(c.answer_ids)
    if list(argmax[:n]) != c.answer_ids:
        return False
    return c.stop_reason != "eos" or argmax[n] in set(eos_ids)


def teacher_forced_matches(
    model: CausalLM, cands: Sequence[Candidate], eos_ids: Sequence[int], pad_id: int, batch_size: int
) -> list[bool]:
    """:func:`chain_matches` for every candidate, from batched teacher-forced forwards (no grad)."""
    if batch_size < 1:
        raise GreedyCheckError(f"batch_size must be >= 1, got {batch_size}")
    if not cands:
        return []
    order = sorted(range(len(cands)), key=lambda i: len(cands[i].prompt_ids) + len(cands[i].answer_ids))
    ok = [False] * len(cands)
    with torch.inference_mode():
        n_prefix, kv = _shared_prefix(model, cands)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [cands[i] for i in idx]
            for i, c, argmax in zip(idx, batch, _batch_argmax(model, batch, pad_id, n_prefix, kv)):
                ok[i] = chain_matches(c, argmax, eos_ids)
    return ok


def verify_records(
    loaded: LoadedModel,
    questions: Sequence[Question],
    base_records: Mapping[str, Record],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
) -> Verified:
    """Which of ``base_records`` (by question id) are ``loaded``'s own greedy answers to ``questions``.

    A verified record is the base record re-scored against the question (what
    :func:`mechlib.records.run_baseline` would write for the same tokens); every other question —
    no base record, another prompt or settings, a token the adapted model would not pick — is
    listed for regeneration, in question order.
    """
    model, tok = loaded.model, loaded.tokenizer
    eos = eos_ids_of(model, tok)
    pad = pad_id_of(model, tok, eos)
    prompts = {q.id: build_prompt(tok, q.question, prompt_format) for q in questions}
    found = {q.id: candidate(q, base_records.get(q.id), prompts[q.id], tok, eos, max_new_tokens) for q in questions}
    cands = [c for c in found.values() if c is not None]
    matches = dict(zip([c.qid for c in cands], teacher_forced_matches(model, cands, eos, pad, batch_size)))
    by_id = {q.id: q for q in questions}
    records = {
        c.qid: score(by_id[c.qid], prompts[c.qid], base_records[c.qid].generation, len(c.answer_ids), c.stop_reason)
        for c in cands
        if matches[c.qid]
    }
    return Verified(records, [q.id for q in questions if q.id not in records])
