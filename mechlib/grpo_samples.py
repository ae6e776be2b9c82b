"""What each GRPO step sampled, and how both rewards scored it, saved next to the arm's adapter.

Why: reward hacking shows in the curves as the feature reward rising while correctness does not, but
the curves are means. Whether the policy learnt better answers or merely answers the features like
(a repeated token, padding, a stock phrase) can only be read in the completions themselves. TRL keeps
them only for its rich/wandb tables; :class:`SampleRecorder` wraps the arm's reward functions — the
public interface TRL calls with every completion — and keeps what they saw, so nothing private of
TRL's is read and the recorder lives only as long as the arm's training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from mechlib.io import atomic_write_text

SAMPLES_FILE = "samples.jsonl"
Column = Literal["correct", "feature"]
RewardFn: TypeAlias = Callable[..., list[float]]  # TRL's reward: (prompts, completions, **columns) -> one float each


class SamplesError(ValueError):
    """The two rewards were not called on the same completions, or a samples file is malformed."""


@dataclass(frozen=True)
class Sample:
    """One sampled completion and both of its rewards (unweighted: the arm's weights apply afterwards)."""

    step: int  # the optimizer step it was sampled for, 1-based like the step logs
    prompt: int  # index of its training prompt
    completion: str
    correct: float
    feature: float


@dataclass(frozen=True)
class _Call:
    step: int
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    rewards: tuple[float, ...]


class SampleRecorder:
    """Wraps the correctness and the feature reward of one arm; :meth:`samples` pairs what they scored.

    TRL calls every reward function once per generation batch with the same prompts and completions,
    so the k-th call of one pairs with the k-th call of the other (checked). The step comes from the
    ``trainer_state`` TRL passes: ``global_step`` counts the steps already taken.
    """

    def __init__(self, prompts: Sequence[str]) -> None:
        self._index = {p: i for i, p in enumerate(prompts)}
        self._calls: dict[Column, list[_Call]] = {"correct": [], "feature": []}

    def wrap(self, fn: RewardFn, column: Column) -> RewardFn:
        """``fn`` as a plain function under its own ``__name__`` (TRL's log key), recording each call's
        rewards as ``column``. Plain, because TRL treats an ``nn.Module`` reward as a sequence-classification
        model, so a feature reward that is a module must not reach it as one."""

        def reward(**kwargs: Any) -> list[float]:
            values = [float(v) for v in fn(**kwargs)]
            state = kwargs.get("trainer_state")
            step = int(getattr(state, "global_step", 0)) + 1
            call = _Call(step, tuple(kwargs["prompts"]), tuple(kwargs["completions"]), tuple(values))
            self._calls[column].append(call)
            return values

        reward.__name__ = getattr(fn, "__name__", type(fn).__name__)
        return reward

    def samples(self) -> list[Sample]:
        correct, feature = self._calls["correct"], self._calls["feature"]
        if len(correct) != len(feature):
            raise SamplesError(f"the rewards were called {len(correct)} and {len(feature)} times")
        out = []
        for c, f in zip(correct, feature, strict=True):
            if c.completions != f.completions or c.step != f.step:
                raise SamplesError(f"step {c.step}: the two rewards scored different completions")
            out += [
                Sample(c.step, self._index.get(p, -1), text, rc, rf)
                for p, text, rc, rf in zip(c.prompts, c.completions, c.rewards, f.rewards, strict=True)
            ]
        return out


def write_samples(folder: Path, samples: Sequence[Sample]) -> Path:
    """``folder/samples.jsonl``, one sample per line (atomically)."""
    path = folder / SAMPLES_FILE
    atomic_write_text(path, "".join(json.dumps(asdict(s)) + "\n" for s in samples))
    return path


def read_samples(path: str | Path) -> list[Sample]:
    """The samples in a file :func:`write_samples` wrote."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            d = json.loads(line)
            rewards = float(d["correct"]), float(d["feature"])
            out.append(Sample(int(d["step"]), int(d["prompt"]), str(d["completion"]), *rewards))
        except (ValueError, KeyError, TypeError) as exc:
            raise SamplesError(f"{path}:{n}: not a sample ({exc})") from None
    return out


def last_step(samples: Sequence[Sample]) -> list[Sample]:
    """The completions of the last recorded step, highest feature reward first."""
    if not samples:
        return []
    final = max(s.step for s in samples)
    return sorted((s for s in samples if s.step == final), key=lambda s: -s.feature)
