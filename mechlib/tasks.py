"""Question sources: GSM8K (hub or local file) and a generated arithmetic word-problem task.

Why: the study's contrast (correct vs wrong hidden states) needs a task on which the model gets
*some* questions right and some wrong. GSM8K is that task for Gemma 4 E4B (~45–50 %), but
SmolLM2-135M, the book's offline default, solves almost none of it. The generated task mixes
word-problem templates of graded difficulty so that SmolLM2-135M-Instruct lands in the middle
(measured with the default chat-template prompt and 48 new tokens; see :data:`TEMPLATE_WEIGHTS`).
Everything is drawn from ``random.Random(seed)``: the same seed gives the same questions on any
machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from mechlib.gsm8k import GSM8KError, Question, load_gsm8k

__all__ = ["Question", "TaskError", "load_questions", "arithmetic_questions", "TEMPLATE_WEIGHTS", "TASKS"]

TASKS = ("arithmetic", "gsm8k")


class TaskError(ValueError):
    """A task request the book cannot serve; the message says which value is wrong."""


NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kofi", "Lena",
         "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards", "oranges",
         "balloons", "candles", "coins", "toys", "eggs"]


@dataclass(frozen=True)
class _Problem:
    text: str
    answer: int


def _pick(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(ITEMS)


def _buy_more(rng: random.Random) -> _Problem:
    """One step: has a, buys b more (small numbers): the easiest kind for a 135M model."""
    name, item = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return _Problem(f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?",
                    a + b)


def _buy_more_big(rng: random.Random) -> _Problem:
    """One step addition with two-digit numbers."""
    name, item = _pick(rng)
    a, b = rng.randint(11, 60), rng.randint(11, 39)
    return _Problem(f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?",
                    a + b)


def _give_away(rng: random.Random) -> _Problem:
    """One step subtraction."""
    name, item = _pick(rng)
    a = rng.randint(6, 20)
    b = rng.randint(1, a - 2)
    return _Problem(f"{name} has {a} {item}. {name} gives {b} {item} to a friend. "
                    f"How many {item} does {name} have left?", a - b)


def _sum(rng: random.Random) -> _Problem:
    """A bare sum of two small numbers, phrased as a word problem."""
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return _Problem(f"What is {a} plus {b}?", a + b)


def _boxes(rng: random.Random) -> _Problem:
    """One step multiplication."""
    name, item = _pick(rng)
    a, b = rng.randint(2, 6), rng.randint(2, 10)
    return _Problem(f"{name} buys {a} boxes of {item}. Each box has {b} {item}. How many {item} does {name} buy?",
                    a * b)


def _two_step(rng: random.Random) -> _Problem:
    """Two steps: buys more, then gives some away."""
    name, item = _pick(rng)
    a, b = rng.randint(3, 12), rng.randint(2, 9)
    c = rng.randint(1, a + b - 1)
    return _Problem(f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to a friend. "
                    f"How many {item} does {name} have now?", a + b - c)


TEMPLATES: dict[str, Callable[[random.Random], _Problem]] = {
    "buy_more": _buy_more, "buy_more_big": _buy_more_big, "give_away": _give_away, "sum": _sum,
    "boxes": _boxes, "two_step": _two_step,
}

# Relative frequencies of the templates (tuned on SmolLM2-135M-Instruct, chat_template, 48 tokens).
TEMPLATE_WEIGHTS: dict[str, float] = {
    "buy_more": 1.0, "buy_more_big": 1.0, "give_away": 1.0, "sum": 1.0, "boxes": 1.0, "two_step": 1.0,
}


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
    out, seen = [], set()
    while len(out) < n:
        kind = rng.choices(names, weights=[weights[k] for k in names])[0]
        p = TEMPLATES[kind](rng)
        if p.text in seen:  # no duplicate questions (they would leak between contrast and held-out sets)
            continue
        seen.add(p.text)
        out.append(Question(id=f"arith-s{seed}-{len(out):04d}", question=p.text, answer=p.answer,
                            source=f"arithmetic:{kind}"))
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
