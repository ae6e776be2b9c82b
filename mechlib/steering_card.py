"""The card's own recipe on our artifact: plain HF ``generate`` with the caller's hook, against our records.

Why: the model card tells readers to load ``steering_vec_L*.pt`` and add it with a few lines of
their own, without mechlib. :func:`check_card_hook` runs exactly those lines (the caller passes
them as ``register``) and checks they steer like :func:`mechlib.steering.run_sweep` did, answer
for answer; :func:`changed_first` puts the questions where steering changed the answer first,
since only those give the check any power. :mod:`mechlib.steering` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mechlib.generate import eos_ids_of, pad_id_of
from mechlib.gsm8k import Question
from mechlib.models import LoadedModel, decoder_layers, model_device
from mechlib.prompts import build_prompt, decode_text, encode_prompts
from mechlib.records import Record

__all__ = ["CardHookCheck", "changed_first", "check_card_hook"]


def changed_first(
    questions: Sequence[Question], steered: Sequence[Record], baseline: Sequence[Record]
) -> list[Question]:
    """``questions`` with those whose steered answer differs from the baseline's first (order kept otherwise)."""
    base = {r.id: r.generation for r in baseline}
    changed = {r.id for r in steered if r.generation != base.get(r.id)}
    return sorted(questions, key=lambda q: q.id not in changed)


@dataclass(frozen=True)
class CardHookCheck:
    """Plain HF ``generate`` with a hook the caller wrote, against mechlib's steered answers."""

    n: int
    n_equal: int
    mismatched_ids: list[str]
    n_steering_changed: int  # of the n answers, how many differ from the unsteered baseline (the check's power)


def check_card_hook(
    loaded: LoadedModel,
    questions: Sequence[Question],
    steered: Sequence[Record],
    baseline: Sequence[Record],
    *,
    layer: int,
    register: Callable[[nn.Module], RemovableHandle],
    prompt_format: str,
    max_new_tokens: int,
) -> CardHookCheck:
    """Do the card's lines on our ``steering_vec_L*.pt`` steer exactly like :func:`mechlib.steering.run_sweep`?

    ``register(layer_module)`` installs the caller's own forward hook (the card's recipe, written
    without mechlib) and returns its handle; each question is generated alone (no padding) with
    HF ``generate``, greedy, and compared with mechlib's record of the same question. A record
    stopped at its final-answer line must be a prefix of the HF text (which runs on to EOS). The
    check only has power where steering changed the answer: those are counted against ``baseline``.
    """
    from transformers import GenerationConfig  # heavy import, on use

    model, tok = loaded.model, loaded.tokenizer
    eos = eos_ids_of(model, tok)
    pad = pad_id_of(model, tok, eos)
    by_id = {r.id: r for r in steered}
    mismatched = []
    handle = register(decoder_layers(model)[layer])
    try:
        for q in questions:
            ids = torch.tensor(
                [encode_prompts(tok, [build_prompt(tok, q.question, prompt_format)])[0]], device=model_device(model)
            )
            with torch.no_grad():  # plain greedy, as mechlib's loop (the model's own sampling defaults ignored)
                out = model.generate(  # type: ignore[operator]  # generate comes from GenerationMixin, not in PreTrainedModel's stubs
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=GenerationConfig(
                        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
                    ),
                )
            text = decode_text(tok, out[0, ids.shape[1] :], skip_special_tokens=True)
            rec = by_id[q.id]
            same = text.startswith(rec.generation) if rec.stop_reason == "answer_line" else text == rec.generation
            if not same:
                mismatched.append(q.id)
    finally:
        handle.remove()
    base = {r.id: r.generation for r in baseline}
    changed = sum(by_id[q.id].generation != base.get(q.id) for q in questions)
    return CardHookCheck(len(questions), len(questions) - len(mismatched), mismatched, changed)
