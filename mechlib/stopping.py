"""When is a generated answer finished? EOS, a complete final-answer line, or the token limit.

Why: the prompt asks for the final answer as ``#### N``. Small models often write that line and
then keep going — they repeat it, start another problem, or explain again — until
``max_new_tokens`` cuts them off. Scored as it stands, such an answer is "truncated", and a rule
that reads the *last* number then reads the rambling, not the answer. A grader reading the
transcript would stop at the first complete ``#### …`` line, so generation stops there too
(:class:`AnswerLineStop`), and every record says why it stopped (:data:`StopReason`):

- ``"eos"``: the model ended its turn by itself;
- ``"answer_line"``: it completed a final-answer line — ``####`` followed by text holding a
  digit, then a newline (the newline matters: ``#### 1`` may still become ``#### 12``);
- ``"limit"``: it used all ``max_new_tokens`` without either — the only *truncated* answers.

The rule changes which tokens are generated, so :data:`STOP_RULE_VERSION` is part of the
generation cache key (:func:`mechlib.records.settings_of`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mechlib.prompts import decode_text

if TYPE_CHECKING:  # transformers is a heavy import; only the type is needed here
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

StopReason = Literal["eos", "answer_line", "limit"]
STOP_REASONS: tuple[StopReason, ...] = ("eos", "answer_line", "limit")
STOP_RULE_VERSION = "answer-line-v1"

_FINAL_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


def has_final_answer_line(text: str) -> bool:
    """True when ``text`` holds a complete ``#### …N…`` line (ended by a newline)."""
    return _FINAL_LINE.search(text) is not None


@dataclass(frozen=True)
class AnswerLineStop:
    """A row stop rule for :func:`mechlib.generate.generate_ids`: decoded text has a final-answer line.

    Monotone (a longer prefix keeps the completed line), as the generator requires.
    """

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, ids: Sequence[int]) -> bool:
        return has_final_answer_line(decode_text(self.tokenizer, list(ids), skip_special_tokens=True))


def stop_reason_of(text: str, n_new_tokens: int, max_new_tokens: int, *, answer_line_stop: bool = True) -> StopReason:
    """Why a generation of ``n_new_tokens`` tokens (decoded to ``text``) ended."""
    if answer_line_stop and has_final_answer_line(text):
        return "answer_line"
    return "limit" if n_new_tokens >= max_new_tokens else "eos"


StopWhen = Callable[[Sequence[int]], bool]
"""A row's stop rule beside EOS: called with the row's new token ids so far; True once the row is
done (e.g. it has written a complete final-answer line). It must be *monotone* — once True for a
prefix, True for every longer one — so the shortest stopping prefix can be found by bisection."""


def shortest_stopping_prefix(row: Sequence[int], stop_when: StopWhen) -> int | None:
    """The length of the shortest prefix of ``row`` that satisfies the (monotone) ``stop_when``; None if none."""
    if not row or not stop_when(row):
        return None
    lo, hi = 1, len(row)  # invariant: stop_when(row[:hi]) is True
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_when(row[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def mark_stopped(out: Tensor, unfinished: Tensor, upto: int, stop_when: StopWhen) -> None:
    """Mark the unfinished rows whose first ``upto`` tokens of ``out`` satisfy ``stop_when`` as finished (in
    place; a host read, so the decode loops call it every ``sync_every`` steps, the plain and the replayed alike)."""
    rows = out[:, :upto].tolist()
    for i in unfinished.nonzero().flatten().tolist():
        if stop_when(rows[i]):
            unfinished[i] = False
