"""Logit lens: read each decoder layer's residual stream through the model's own unembedding.

Why this way: for every decoder layer L we take the layer's *raw output* (captured by a forward
hook), apply the final norm, the unembedding (``lm_head``) and — when the config has one —
the final-logit softcap ``tanh(x / c) * c`` (Gemma 4: c = 30). We never read
``output_hidden_states``, because its last entry is already final-normed on Gemma 4 (and in
transformers 5 generally) while the others are not; hooking the layer outputs treats every layer
the same, and at the last layer the lens reproduces the model's logits exactly. The softcap does
not change the argmax, but it does change probabilities, so it matters for the heat map.

"English word" (used for the commitment layer): a token whose decoded text, after stripping the
leading space / word-boundary marker, is ASCII letters only and at least 2 letters long
(``" Paris"``, ``" the"`` and ``"ing"`` count; ``"a"``, ``"1"``, ``"é"`` and ``"<|im_end|>"`` do not).
Sub-word pieces such as ``"ing"`` count as English-looking too: the test is about the script and
shape of the token, not a dictionary, which keeps it language-agnostic about the vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechlib.hooks import InputValue, LayerOutput, add_forward_hook, layer_output_tensor
from mechlib.models import decoder_layers, final_logit_softcap, final_norm, model_device, output_embedding
from mechlib.prompts import token_label

if TYPE_CHECKING:  # transformers is a heavy import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

_SPACE_MARKERS = " \t\n\u2581\u0120"  # space, SentencePiece "▁", byte-level BPE "Ġ"


def is_english_word(text: str) -> bool:
    """True for a token text that is an ASCII alphabetic word of >= 2 letters (after the leading space marker)."""
    word = text.lstrip(_SPACE_MARKERS).rstrip()
    return len(word) >= 2 and word.isascii() and word.isalpha()


@dataclass
class LensResult:
    prompt: str
    input_ids: list[int]
    input_tokens: list[str]  # prompt tokens, per position (prompts.token_label)
    top_ids: list[list[int]]  # [layer][position]
    top_tokens: list[list[str]]  # [layer][position] (prompts.token_label)
    top_probs: list[list[float]]  # [layer][position], softmax probability of the top token
    english: list[list[bool]]  # [layer][position], is_english_word(top token)
    scored_positions: list[int]  # positions counted in english_fraction (input is not a special token)
    softcap: float | None
    english_fraction: list[float] = field(default_factory=list)  # [layer]

    @property
    def n_layers(self) -> int:
        return len(self.top_ids)


def lens_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm → lm_head → softcap (if any) of residual-stream vectors ``hidden`` [..., d]."""
    logits = output_embedding(model)(final_norm(model)(hidden))
    cap = final_logit_softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def layer_outputs(model: torch.nn.Module, **inputs: InputValue) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's output [batch, seq, d] and the model's own logits, from one forward."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(i: int) -> Callable[[torch.nn.Module, tuple[object, ...], LayerOutput], None]:
        def hook(module: torch.nn.Module, args: tuple[object, ...], output: LayerOutput) -> None:
            captured[i] = layer_output_tensor(output).detach()

        return hook

    inputs.setdefault("use_cache", False)
    with torch.no_grad(), contextlib.ExitStack() as stack:  # every hook removed on exit, also on error
        for i, layer in enumerate(layers):
            stack.enter_context(add_forward_hook(layer, make_hook(i)))
        logits = model(**inputs).logits
    missing = [i for i, c in enumerate(captured) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not run during the forward pass")
    return captured, logits  # type: ignore[return-value]


def logit_lens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str) -> LensResult:
    """Top token and its probability for every decoder layer and prompt position."""
    enc = tokenizer(prompt, return_tensors="pt")
    device = model_device(model)
    input_ids = enc["input_ids"].to(device)
    outs, _ = layer_outputs(model, input_ids=input_ids)
    ids = input_ids[0].tolist()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    scored = [p for p, t in enumerate(ids) if t not in special]
    top_ids, top_tokens, top_probs, english, fraction = [], [], [], [], []
    with torch.no_grad():
        for h in outs:  # one layer at a time: Gemma 4's vocabulary is 262k wide
            probs = torch.softmax(lens_logits(model, h[0]).float(), dim=-1)
            p, i = probs.max(dim=-1)
            toks = [token_label(tokenizer, t) for t in i.tolist()]
            eng = [is_english_word(t) for t in toks]
            top_ids.append(i.tolist())
            top_tokens.append(toks)
            top_probs.append(p.tolist())
            english.append(eng)
            fraction.append(sum(eng[q] for q in scored) / max(len(scored), 1))
    return LensResult(
        prompt=prompt,
        input_ids=ids,
        input_tokens=[token_label(tokenizer, t) for t in ids],
        top_ids=top_ids,
        top_tokens=top_tokens,
        top_probs=top_probs,
        english=english,
        scored_positions=scored,
        softcap=final_logit_softcap(model),
        english_fraction=fraction,
    )


def english_commitment_layer(result: LensResult, threshold: float = 0.5) -> int | None:
    """The first layer whose share of English-word top tokens (over scored positions) is >= ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    for layer, frac in enumerate(result.english_fraction):
        if frac >= threshold:
            return layer
    return None
