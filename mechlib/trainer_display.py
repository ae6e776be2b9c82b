"""How a Hugging Face ``Trainer`` (TRL's GRPO here) shows itself in a chapter: one progress bar, no chatter.

Why: a ``Trainer`` prints its whole log dict at every logging step (``PrinterCallback``, or the
progress callback's ``write``), and transformers/TRL/peft warn about settings that do not apply
to a CPU LoRA run. In a book that is noise the reader cannot act on. :func:`quiet_training`
lowers those libraries to errors only for the duration of a run; :func:`step_bar` is a
``tqdm.auto`` bar over the steps (so ``TQDM_DISABLE`` and notebooks behave like every other bar).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm


@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """Hide the library chatter a reader cannot act on (deprecation notes, "generation flags are not valid",
    peft/TRL advice for other setups); errors and our own warnings still show."""
    import transformers

    level = transformers.logging.get_verbosity()
    loggers = [logging.getLogger(n) for n in ("trl", "peft", "accelerate")]
    levels = [lg.level for lg in loggers]
    transformers.logging.set_verbosity_error()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for module in ("trl", "transformers", "peft", "accelerate", "torch"):
                warnings.filterwarnings("ignore", category=UserWarning, module=module)
                warnings.filterwarnings("ignore", category=FutureWarning, module=module)
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
            yield
    finally:
        transformers.logging.set_verbosity(level)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _step_bar_class() -> type:
    """A ``TrainerCallback`` showing one tqdm bar over the optimizer steps with the latest rewards
    (built on first use: transformers is a heavy import)."""
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        def __init__(self, desc: str, disable: bool, postfix: tuple[str, ...]) -> None:
            self.desc, self.disable, self.postfix = desc, disable, postfix
            self.bar: tqdm[Any] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", disable=self.disable)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.bar is not None and logs:
                shown = {k.split("/")[-2] if "/" in k else k: logs[k] for k in self.postfix if k in logs}
                if shown:
                    self.bar.set_postfix(shown, refresh=False)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return StepBar


def step_bar(desc: str, disable: bool = False, postfix: Sequence[str] = ()) -> Any:
    """A ``TrainerCallback`` (typed Any: its class needs transformers) that shows one ``tqdm.auto`` bar
    over the optimizer steps, with the latest values of the log keys ``postfix`` beside it."""
    return _step_bar_class()(desc, disable, tuple(postfix))
