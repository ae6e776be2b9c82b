"""Prompt formats for the GSM8K-style tasks, and how prompts become token ids.

Why: the study's numbers depend on the exact prompt. ``gemma_manual`` is the card's manual Gemma
chat format, verbatim; ``chat_template`` asks the tokenizer's own chat template for the same
instruction (what a non-Gemma model such as SmolLM2 was trained on); ``chat_oneshot`` puts one
worked example before the question in that template. With the zero-shot instruction SmolLM2-135M
explains at length and most answers run into ``max_new_tokens`` before any final line; with one
example it answers in a line and ends with ``#### N`` — answers that finish can be scored. Tokenising is here too, so
that generation (chapter 04/06) and hidden-state collection (chapter 05) see the same ids: a
chat template that already starts with the BOS token must not get a second one from the
tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # transformers and torch are heavy imports; only the types are needed here
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Solve step by step and give final answer as '#### N'."
GEMMA_MANUAL = "<start_of_turn>user\n{instruction}\n\n{q}<end_of_turn>\n<start_of_turn>model\n"
PromptFormat = Literal["chat_template", "chat_oneshot", "gemma_manual"]
PROMPT_FORMATS: tuple[PromptFormat, ...] = get_args(PromptFormat)

# ``chat_oneshot``: one worked example as an earlier chat turn, so a small model sees what
# "give final answer as '#### N'" means. Its operation (taking away) is none of the generated
# task's (mechlib.tasks), so the example shows the format without solving any template for it.
ONESHOT_QUESTION = "Tom had 9 apples and ate 4 of them. How many apples are left?"
ONESHOT_ANSWER = "Tom has 9 - 4 = 5 apples left.\n#### 5"


class PromptFormatError(ValueError):
    """A prompt format the tokenizer cannot produce; the message says which and why."""


def user_message(question_text: str) -> str:
    """The user turn: the card's instruction, a blank line, the question."""
    return f"{INSTRUCTION}\n\n{question_text}"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: PreTrainedTokenizerBase, question_text: str, prompt_format: str) -> str:
    """The full prompt text for one question, ending where the model's answer starts."""
    if prompt_format == "gemma_manual":
        return GEMMA_MANUAL.format(instruction=INSTRUCTION, q=question_text)
    if prompt_format in ("chat_template", "chat_oneshot"):
        if not has_chat_template(tokenizer):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise PromptFormatError(
                f"prompt_format {prompt_format!r} was asked for, but the tokenizer of {name!r} has no chat template. "
                f"Use prompt_format: gemma_manual (the card's manual format) or a model that ships a chat template."
            )
        shot = (
            [
                {"role": "user", "content": user_message(ONESHOT_QUESTION)},
                {"role": "assistant", "content": ONESHOT_ANSWER},
            ]
            if prompt_format == "chat_oneshot"
            else []
        )
        text = tokenizer.apply_chat_template(
            [*shot, {"role": "user", "content": user_message(question_text)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)  # tokenize=False: one conversation renders to one string
        return text
    raise PromptFormatError(f"unknown prompt_format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int] | Tensor, skip_special_tokens: bool = False) -> str:
    """The text of one id sequence. ``tokenizer.decode`` is typed ``str | list[str]`` (a batch decodes to a
    list); one sequence always decodes to a string, which this says once for every caller."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int, text: str | None = None) -> str:
    """One token as a reader can name it: its text, unless that is empty or holds U+FFFD.

    Why: a lone id of a multi-byte character decodes to U+FFFD ("\ufffd"), and an id the tokenizer does
    not know (a model whose embedding is wider than its vocabulary) to "" — a lens table full of blank
    or identical cells says nothing. Then the vocabulary piece is shown instead, with the bytes of a
    byte-level BPE piece written ``<0xE6>`` (SentencePiece's byte-fallback pieces already read so), or
    ``<id N>`` where there is no piece at all. Text that decodes cleanly is returned unchanged.
    ``text``: the id's decoded text, where the caller already has it (the browser decodes in batches).
    """
    text = decode_text(tokenizer, [token_id]) if text is None else text
    if text and "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str) or not piece:
        return f"<id {token_id}>"
    raw = _byte_level_bytes(piece)
    if raw is None:
        return piece
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"<0x{b:02X}>" for b in raw)


def _byte_level_bytes(piece: str) -> bytes | None:
    """The bytes behind a GPT-2 byte-level BPE piece ("Ġæ" → b" \xe6"), or None if it is not one."""
    to_byte = _byte_level_table()
    if not all(c in to_byte for c in piece):
        return None
    return bytes(to_byte[c] for c in piece)


@cache
def _byte_level_table() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the table byte-level BPE is built on

    return {c: b for b, c in bytes_to_unicode().items()}


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt. The tokenizer's special tokens (BOS) are added unless the prompt
    text already starts with the BOS token (chat templates such as Gemma's write it themselves)."""
    bos = getattr(tokenizer, "bos_token", None)
    out = []
    for p in prompts:
        add_special = not (bos and p.startswith(bos))
        out.append(list(tokenizer(p, add_special_tokens=add_special)["input_ids"]))
    return out


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """An id to fill padding that an attention mask hides (its value never matters): the tokenizer's pad,
    else EOS, else 0."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
