"""One row of an SAE training run's history, per step: what chapter 02 plots and summarises.

Why typed: the training loop writes these rows, the checkpoint carries them across a restart,
``train_history.json`` keeps them, and chapter 02, the plots and ``mechlib.scale`` read them back.
A field name is checked once, here, instead of as a string key in each of those places. On disk
(the JSON file and the checkpoint) a row stays a plain JSON object with the same keys as before,
so older runs still resume and read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mechlib.io import atomic_write_json, read_json


class HistoryError(ValueError):
    """A training history file or checkpoint row that is not what :class:`HistoryRow` writes."""


@dataclass(frozen=True)
class HistoryRow:
    """The training step ``step`` (0-based): its learning rate and its batch's loss terms."""

    step: int
    lr: float
    loss: float  # fvu + aux_coef * aux_loss
    fvu: float  # fraction of variance unexplained on this training batch
    mse: float
    aux_loss: float  # AuxK: 0 while no latent is dead
    n_dead: int  # latents that had not fired for ``dead_tokens`` tokens before this step

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, object], where: str = "training history") -> HistoryRow:
        values: dict[str, int | float] = {}
        for f in fields(cls):
            v = d.get(f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise HistoryError(f"{where}: step row {dict(d)!r:.120}: {f.name!r} must be a number, got {v!r}")
            values[f.name] = int(v) if f.type == "int" else float(v)
        return cls(**values)  # type: ignore[arg-type]  # each value has its field's type (checked above)


def rows_to_json(rows: Sequence[HistoryRow]) -> list[dict[str, float]]:
    return [r.to_json() for r in rows]


def rows_from_json(items: object, where: str = "training history") -> list[HistoryRow]:
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise HistoryError(f"{where}: expected a list of step rows")
    return [HistoryRow.from_json(i, where) for i in items]


def write_history(path: Path, rows: Sequence[HistoryRow]) -> None:
    """``train_history.json``, atomically."""
    atomic_write_json(path, rows_to_json(rows))


def read_history(path: Path) -> list[HistoryRow]:
    """The rows of ``train_history.json``; a malformed file is one :class:`HistoryError` naming it."""
    return rows_from_json(read_json(path), str(path))
