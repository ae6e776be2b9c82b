"""Where things live: the repository root and one run's output folders.

Why: papermill runs chapters with ``--cwd`` at the repo root, but nbval runs each executed
notebook from its own folder. Every path is therefore resolved from the package location,
never from the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
OUTPUTS_DIR = Path(os.environ.get("MECHBOOK_OUTPUTS", REPO_ROOT / "outputs"))
CACHE_DIR = Path(os.environ.get("MECHBOOK_CACHE", Path.home() / ".cache" / "mechbook"))


def resolve(path: str | os.PathLike[str]) -> Path:
    """Resolve a user-given path: absolute stays, relative is taken from the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


@dataclass(frozen=True)
class RunPaths:
    """The output layout of one run: ``outputs/<run>/{notebooks,figures,metrics,checkpoints,...}``."""

    run: str

    @property
    def root(self) -> Path:
        return OUTPUTS_DIR / self.run

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def records(self) -> Path:
        """Per-question generation records (JSONL), cached so reruns resume."""
        return self.root / "records"

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"

    def rel(self, path: str | os.PathLike[str]) -> str:
        """``path`` as ``outputs/<run>/…`` (what saved outputs print: no machine-specific prefix)."""
        p = Path(path)
        try:
            return str(Path("outputs") / self.run / p.relative_to(self.root))
        except ValueError:
            return str(p)

    def make(self) -> RunPaths:
        for d in (self.notebooks, self.figures, self.metrics, self.checkpoints, self.activations, self.records):
            d.mkdir(parents=True, exist_ok=True)
        return self
