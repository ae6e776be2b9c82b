"""mechlib — the thin library behind the mechbook research book.

Each module holds one concept (hooks, collection, the TopK SAE, training, metrics, tasks,
statistics, steering, lens, plots, the papermill runner). Notebooks import from here and
hold narrative, not logic.

The public API, importable from the top (``from mechlib import TopKSAE, load_model``), is the
table below: what a researcher needs to use the book's pieces outside the notebooks. Names load
lazily (PEP 562), because ``import mechlib`` must stay cheap: the runner, the hub CLI and the
tests import it without wanting torch, transformers and matplotlib all at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the module that defines it
_API: dict[str, str] = {
    # models and hooks
    "load_model": "mechlib.models",
    "LoadedModel": "mechlib.models",
    "decoder_layers": "mechlib.models",
    "run_to_layer": "mechlib.hooks",
    # activations
    "collect_activations": "mechlib.activations",
    "ActivationSource": "mechlib.activations",
    # the SAE
    "TopKSAE": "mechlib.sae",
    "load_sae": "mechlib.sae",
    "train_sae": "mechlib.sae",
    "TrainConfig": "mechlib.sae",
    "export_sae": "mechlib.sae",
    "HookInfo": "mechlib.sae",
    # generation, steering, lens
    "generate_greedy": "mechlib.generate",
    "SteeringVector": "mechlib.steering_vector",
    "logit_lens": "mechlib.lens",
    # the SAE-feature reward (chapter 08): TRL-compatible, bounded
    "FeatureReward": "mechlib.feature_reward",
    "FeatureRewardSpec": "mechlib.feature_reward",
    # the book
    "BookParams": "mechlib.params",
    "load_params": "mechlib.params",
    "RunPaths": "mechlib.paths",
    "run_book": "mechlib.book",
    "results": "mechlib.results",
}

__all__ = [
    "ActivationSource",
    "BookParams",
    "FeatureReward",
    "FeatureRewardSpec",
    "HookInfo",
    "LoadedModel",
    "RunPaths",
    "SteeringVector",
    "TopKSAE",
    "TrainConfig",
    "collect_activations",
    "decoder_layers",
    "export_sae",
    "generate_greedy",
    "load_model",
    "load_params",
    "load_sae",
    "logit_lens",
    "results",
    "run_book",
    "run_to_layer",
    "train_sae",
]  # = sorted(_API): a literal list, so linters and editors see the re-exports

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from mechlib import results
    from mechlib.activations import ActivationSource, collect_activations
    from mechlib.book import run_book
    from mechlib.feature_reward import FeatureReward, FeatureRewardSpec
    from mechlib.generate import generate_greedy
    from mechlib.hooks import run_to_layer
    from mechlib.lens import logit_lens
    from mechlib.models import LoadedModel, decoder_layers, load_model
    from mechlib.params import BookParams, load_params
    from mechlib.paths import RunPaths
    from mechlib.sae import HookInfo, TopKSAE, TrainConfig, export_sae, load_sae, train_sae
    from mechlib.steering_vector import SteeringVector


def __getattr__(name: str) -> object:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mechlib' has no attribute {name!r}")
    if name == "results":
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
