"""Chapter 03's steps beyond the held-out activations: the PCA baseline's data and the model-side evals.

Why a module: the chapter should read as a method, not as plumbing. Two decisions live here:
- the PCA baseline is fit on the *training* activations when the run kept them (``collect_mode:
  disk``); a ``stream`` run keeps none, so it is fit on the first half of the held-out tokens and
  says so (the held-out score is then optimistic for PCA, never for the SAE);
- everything that needs the language model (spliced loss/KL, the card-snippet check, feature
  contexts) is cached in ``checkpoints/03_model_evals.json`` under a key holding what it was
  computed from — the SAE (weights and file checksum), the held-out activations' fingerprint
  (settings hash + shard checksums), the mean-ablation vector and the settings — so a rerun of
  the chapter does not load the model again, and any change of SAE, activations or setting
  recomputes instead of reusing, saying so in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

from mechlib import metrics
from mechlib.activations.provenance import (
    ActivationsFingerprint,
    fingerprint_of_store,
    read_activations_fingerprint,
    stale_line,
    tensor_digest,
)
from mechlib.io import atomic_write_json, sha256_file
from mechlib.metrics import SplicedLoss
from mechlib.results import CardSnippet, FeatureExamples, Record, ResultsError

if TYPE_CHECKING:  # only named in signatures
    from mechlib.activations.shards import ActivationStore
    from mechlib.params import BookParams
    from mechlib.paths import RunPaths
    from mechlib.sae import TopKSAE

MODEL_EVALS_FILE = "03_model_evals.json"


class PCABaseline(NamedTuple):
    pca: metrics.PCA
    source: str  # which tokens it was fit on, in words


def pca_baseline(params: BookParams, run_paths: RunPaths, heldout_x: Tensor, k: int) -> PCABaseline:
    """The k-component PCA baseline, fit on the run's training activations when they were kept."""
    if params.collect_mode == "disk":
        from mechlib.activations.collect_config import open_store

        train = open_store(params, run_paths, "train")
        return PCABaseline(
            metrics.fit_pca(train.iter_batches(8192, shuffle=False), k=k),
            f"train activations ({train.n_tokens} tokens)",
        )
    half = heldout_x.shape[0] // 2
    return PCABaseline(
        metrics.fit_pca([heldout_x[:half]], k=k), f"first half of the held-out tokens ({half}; stream mode)"
    )


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or damaged: recomputed and rewritten
        return None
    return saved if isinstance(saved, dict) else None


def training_fingerprint(params: BookParams, run_paths: RunPaths) -> ActivationsFingerprint | None:
    """The training activations a trained SAE must have been trained on (``None``: a pretrained SAE, or
    ``collect_mode: stream``, whose training tokens are not on disk to fingerprint here)."""
    if params.sae_source != "train" or params.collect_mode != "disk":
        return None
    return read_activations_fingerprint(run_paths.activations / "train")


def load_cached(path: str | Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached value at ``path`` if it was saved under the same ``key``, else ``None``."""
    saved = _read_cache(Path(path))
    return saved.get("value") if saved is not None and saved.get("key") == key else None


def cache_changes(path: str | Path, key: dict[str, Any]) -> tuple[str, ...]:
    """Names of the key entries that differ from those the cache at ``path`` was saved under
    (empty when there is no readable cache, or when it matches)."""
    saved = _read_cache(Path(path))
    if saved is None or not isinstance(saved.get("key"), dict):
        return ()
    old = saved["key"]
    return tuple(sorted(n for n in set(key) | set(old) if key.get(n) != old.get(n)))


def save_cached(path: str | Path, key: dict[str, Any], value: dict[str, Any]) -> None:
    atomic_write_json(path, {"key": key, "value": value})


# How a changed key entry is named in the chapter's one line.
KEY_WORDS = {
    "sae": "SAE weights",
    "sae_file": "SAE file",
    "heldout": "held-out activations",
    "mean_act": "mean-ablation vector (training activations)",
}


def _file_sha256(spec: str) -> str | None:
    """sha256 of a local SAE file (``None`` for ``hf:`` specs: their weights are keyed instead)."""
    from mechlib.paths import resolve

    if str(spec).startswith("hf:"):
        return None
    path = resolve(str(spec))
    return sha256_file(path) if path.is_file() else None


def model_evals_key(
    params: BookParams, heldout: ActivationStore, sae: TopKSAE, sae_path: str, mean_act: Tensor
) -> dict[str, Any]:
    """What the model evals are computed from: the SAE (weights, file checksum), the held-out activations
    (fingerprint: settings hash + shard checksums), the mean-ablation vector, and the settings."""
    from mechlib.sae import card_state

    return {
        "sae": metrics.sae_fingerprint(card_state(sae)),
        "sae_file": _file_sha256(sae_path),
        "heldout": fingerprint_of_store(heldout).digest,
        "mean_act": tensor_digest(mean_act),
        "tokens": params.eval_ce_tokens,
        "layer": heldout.layer,
        "model": params.model,
        "dtype": params.model_dtype,
        "n_features": params.n_feature_examples,
        "seed": params.seed,
    }


@dataclass(frozen=True)
class ModelEvals(Record):
    """What chapter 03 measures with the model running (the value cached in ``03_model_evals.json``)."""

    spliced: SplicedLoss
    card_snippet: CardSnippet | None  # None: the checkpoint is not a card-format .pt
    examples: list[FeatureExamples]


def model_evals(
    params: BookParams,
    run_paths: RunPaths,
    heldout: ActivationStore,
    sae: TopKSAE,
    sae_path: str,
    x: Tensor,
    counts: Tensor,
    mean_act: Tensor,
) -> ModelEvals:
    """The evals that need the model (spliced loss, the card's snippet, feature contexts), cached by key."""
    cache = run_paths.checkpoints / MODEL_EVALS_FILE
    key = model_evals_key(params, heldout, sae, sae_path, mean_act)
    cached = load_cached(cache, key)
    try:
        evals = None if cached is None else ModelEvals.from_json(cached, str(cache))
    except ResultsError as exc:  # written by an older version: recomputed
        print(f"{exc}: recomputing the model evals")
        evals = None
    if evals is None:
        changed = cache_changes(cache, key)
        if changed:
            print(
                stale_line(
                    ", ".join(KEY_WORDS.get(n, n) for n in changed),
                    f"cached model evals ({cache.name})",
                    "recomputing them",
                )
            )
        from mechlib.models import load_model

        lm = load_model(params.model, params.model_dtype, params.device)
        ids, keep = metrics.heldout_rows(heldout, params.eval_ce_tokens)
        spliced = metrics.spliced_loss(lm.model, heldout.layer, sae, ids, keep, mean_act=mean_act, progress=True)
        snippet = metrics.card_snippet_check(lm.model, heldout.layer, sae_path, sae, ids[0], keep[0])
        examples = metrics.feature_examples(
            sae, x, heldout, lm.tokenizer, counts, params.n_feature_examples, params.seed
        )
        evals = ModelEvals(
            spliced,
            None if snippet is None else CardSnippet.from_json(snippet),
            [FeatureExamples.from_json(e) for e in examples],
        )
        save_cached(cache, key, evals.to_json())
    return evals
