"""Chapter 03's steps beyond the held-out activations: the PCA baseline's data and the model-side evals.

Why a module: the chapter should read as a method, not as plumbing. Two decisions live here:
- the PCA baseline is fit on the *training* activations when the run kept them (``collect_mode:
  disk``); a ``stream`` run keeps none, so it is fit on the first half of the held-out tokens and
  says so (the held-out score is then optimistic for PCA, never for the SAE);
- everything that needs the language model (spliced loss/KL, the card-snippet check, feature
  contexts) is cached in ``checkpoints/03_model_evals.json`` under a key holding the SAE's
  checksum and the settings, so a rerun of the chapter does not load the model again, and any
  change of SAE or setting recomputes instead of reusing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from mechlib import metrics
from mechlib.io import atomic_write_json

MODEL_EVALS_FILE = "03_model_evals.json"


class PCABaseline(NamedTuple):
    pca: metrics.PCA
    source: str  # which tokens it was fit on, in words


def pca_baseline(params: Any, run_paths: Any, heldout_x: Tensor, k: int) -> PCABaseline:
    """The k-component PCA baseline, fit on the run's training activations when they were kept."""
    if params.collect_mode == "disk":
        from mechlib.collect import open_store

        train = open_store(params, run_paths, "train")
        return PCABaseline(metrics.fit_pca(train.iter_batches(8192, shuffle=False), k=k),
                           f"train activations ({train.n_tokens} tokens)")
    half = heldout_x.shape[0] // 2
    return PCABaseline(metrics.fit_pca([heldout_x[:half]], k=k), f"first half of the held-out tokens ({half}; stream mode)")


def load_cached(path: str | Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached value at ``path`` if it was saved under the same ``key``, else ``None``."""
    p = Path(path)
    if not p.is_file():
        return None
    saved = json.loads(p.read_text())
    return saved.get("value") if saved.get("key") == key else None


def save_cached(path: str | Path, key: dict[str, Any], value: dict[str, Any]) -> None:
    atomic_write_json(path, {"key": key, "value": value})


def model_evals(params: Any, run_paths: Any, heldout: Any, sae: Any, sae_path: str, x: Tensor, counts: Tensor,
                mean_act: Tensor) -> dict[str, Any]:
    """``{"spliced", "card_snippet", "examples"}``: the evals that need the model, cached by key."""
    from mechlib.sae import card_state

    cache = run_paths.checkpoints / MODEL_EVALS_FILE
    key = {"sae": metrics.sae_fingerprint(card_state(sae)), "tokens": params.eval_ce_tokens, "layer": heldout.layer,
           "model": params.model, "dtype": params.model_dtype, "n_features": params.n_feature_examples,
           "seed": params.seed}
    evals = load_cached(cache, key)
    if evals is None:
        from mechlib.models import load_model

        lm = load_model(params.model, params.model_dtype, params.device)
        ids, keep = metrics.heldout_rows(heldout, params.eval_ce_tokens)
        evals = {"spliced": metrics.spliced_loss(lm.model, heldout.layer, sae, ids, keep, mean_act=mean_act,
                                                 progress=True).as_dict(),
                 "card_snippet": metrics.card_snippet_check(lm.model, heldout.layer, sae_path, sae, ids[0], keep[0]),
                 "examples": metrics.feature_examples(sae, x, heldout, lm.tokenizer, counts,
                                                      params.n_feature_examples, params.seed)}
        save_cached(cache, key, evals)
    return evals
