"""Question sources: GSM8K (hub or local file) and a generated arithmetic word-problem task.

Why: the study's contrast (correct vs wrong hidden states) needs a task on which the model gets
*some* questions right and some wrong. GSM8K is that task for Gemma 4 E4B (~45–50 %), but
SmolLM2-135M, the book's offline default, solves almost none of it. The generated task mixes five
one-step templates (bare sums, word-problem sums, products, "has a, buys b more") whose numbers
range widely enough that SmolLM2-135M-Instruct gets some of each kind right and some wrong (see
:data:`TEMPLATE_WEIGHTS`).
Everything is drawn from ``random.Random(seed)``: the same seed gives the same questions on any
machine and Python version.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from mechlib.gsm8k import GSM8KError, Question, load_gsm8k

__all__ = [
    "TASKS",
    "TEMPLATE_OPERATION",
    "TEMPLATE_WEIGHTS",
    "Question",
    "TaskError",
    "arithmetic_questions",
    "load_questions",
]

TASKS = ("arithmetic", "gsm8k")


class TaskError(ValueError):
    """A task request the book cannot serve; the message says which value is wrong."""


NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
]
ITEMS = [
    "apples",
    "books",
    "marbles",
    "pencils",
    "stickers",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "oranges",
    "balloons",
    "candles",
    "coins",
    "toys",
    "eggs",
]


@dataclass(frozen=True)
class _Problem:
    text: str
    answer: int


def _pick(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(ITEMS)


def _plus(rng: random.Random) -> _Problem:
    """A bare sum, two-digit plus one-digit."""
    a, b = rng.randint(10, 20), rng.randint(2, 9)
    return _Problem(f"What is {a} plus {b}?", a + b)


def _sum_of(rng: random.Random) -> _Problem:
    """The same sum, phrased as "the sum of"."""
    a, b = rng.randint(10, 20), rng.randint(2, 9)
    return _Problem(f"What is the sum of {a} and {b}?", a + b)


def _red_blue(rng: random.Random) -> _Problem:
    """A one-step word problem: two counts to add (one or two digits each, so some carry)."""
    name, item = _pick(rng)
    a, b = rng.randint(3, 29), rng.randint(3, 19)
    return _Problem(f"{name} has {a} red {item} and {b} blue {item}. How many {item} in total?", a + b)


def _boxes(rng: random.Random) -> _Problem:
    """A one-step word problem: a product (up to 9 × 15)."""
    name, item = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(3, 15)
    return _Problem(
        f"{name} buys {a} boxes of {item}. Each box has {b} {item}. How many {item} does {name} buy?", a * b
    )


def _buy_more(rng: random.Random) -> _Problem:
    """ "Has a, buys b more": a sum the model must first recognise as one (it sometimes multiplies)."""
    name, item = _pick(rng)
    a, b = rng.randint(3, 25), rng.randint(3, 15)
    return _Problem(f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?", a + b)


TEMPLATES: dict[str, Callable[[random.Random], _Problem]] = {
    "plus": _plus,
    "sum_of": _sum_of,
    "red_blue": _red_blue,
    "boxes": _boxes,
    "buy_more": _buy_more,
}

# The one operation each template's question needs (mechlib.wrong_answers sorts wrong answers by it).
TEMPLATE_OPERATION: dict[str, str] = {"plus": "+", "sum_of": "+", "red_blue": "+", "boxes": "*", "buy_more": "+"}

# Relative frequencies. Measured on SmolLM2-135M-Instruct (prompt_format chat_oneshot, greedy, 48 new
# tokens, the first 100 questions of seed 0, 2026-11-29): plus 13/37, sum_of 2/12, red_blue 4/22,
# boxes 16/22, buy_more 0/7 — 35 % overall, 98 of 100 answers ended by themselves. Every kind but the
# rare buy_more gives both right and wrong answers, so "correct" is not just "which template".
TEMPLATE_WEIGHTS: dict[str, float] = {"plus": 2.0, "sum_of": 1.0, "red_blue": 1.5, "boxes": 1.5, "buy_more": 0.5}


def arithmetic_questions(n: int, seed: int = 0, weights: dict[str, float] | None = None) -> list[Question]:
    """``n`` generated word problems; ids ``arith-s{seed}-{i:04d}``; ``source`` names the template."""
    weights = TEMPLATE_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(TEMPLATES)
    if unknown:
        raise TaskError(f"unknown arithmetic templates {sorted(unknown)}; known: {sorted(TEMPLATES)}")
    names = [k for k in TEMPLATES if weights.get(k, 0) > 0]
    if not names:
        raise TaskError("all arithmetic template weights are zero")
    rng = random.Random(seed)
    out: list[Question] = []
    seen: set[str] = set()
    while len(out) < n:
        kind = rng.choices(names, weights=[weights[k] for k in names])[0]
        # no duplicate questions (they would leak between the contrast and held-out sets): redraw
        # within the same template, so the mix keeps following the weights
        for _ in range(1000):
            p = TEMPLATES[kind](rng)
            if p.text not in seen:
                break
        else:
            raise TaskError(f"cannot draw {n} distinct arithmetic questions: template {kind!r} is exhausted")
        seen.add(p.text)
        out.append(
            Question(id=f"arith-s{seed}-{len(out):04d}", question=p.text, answer=p.answer, source=f"arithmetic:{kind}")
        )
    return out


def load_questions(task: str, n: int, seed: int, gsm8k_path: str = "", gsm8k_split: str = "test") -> list[Question]:
    """``n`` questions of ``task`` (``"arithmetic"`` or ``"gsm8k"``), deterministic for ``seed``.

    GSM8K: a seeded sample of ``n`` rows of the split (kept in file order), from the hub when
    ``gsm8k_path`` is empty, else from a local folder (``{split}.jsonl``) or ``.jsonl`` file.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise TaskError(f"n (number of questions) must be a positive integer, got {n!r}")
    if task == "arithmetic":
        return arithmetic_questions(n, seed)
    if task == "gsm8k":
        questions = load_gsm8k(gsm8k_path, gsm8k_split)
        if n > len(questions):
            raise TaskError(f"asked for {n} GSM8K questions but the {gsm8k_split!r} split has only {len(questions)}")
        picked = sorted(random.Random(seed).sample(range(len(questions)), n))
        return [questions[i] for i in picked]
    raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


# Re-exported so callers can catch loading problems from one place.
TaskLoadError = GSM8KError
