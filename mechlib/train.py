"""Old import path kept for the notebooks until they import :mod:`mechlib.sae` (issue 16; delete then).

``run_sae`` here keeps the old ``(sae, info dict)`` return that ``notebooks/02_train_sae.py``
unpacks; :func:`mechlib.sae.run_sae` returns a :class:`mechlib.sae.TrainResult`.
"""

from __future__ import annotations

import os
from typing import Any

from mechlib.activations.stores import ActivationSource
from mechlib.params import BookParams
from mechlib.sae import HISTORY_FILE, TopKSAE, TrainConfig, run_sae_for_eval
from mechlib.sae import run_sae as _run_sae

__all__ = ["HISTORY_FILE", "TrainConfig", "run_sae", "run_sae_for_eval"]


def run_sae(P: BookParams, store: ActivationSource, out_dir: str | os.PathLike[str], device: str = "auto",
            progress: bool = True) -> tuple[TopKSAE, dict[str, Any]]:
    res = _run_sae(P, store, out_dir, device=device, progress=progress)
    return res.sae, res.summary()
