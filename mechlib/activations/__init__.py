"""The activations side of the book: where residual-stream vectors come from and how they are read.

- :mod:`.corpus` — the texts (the offline stdlib docs, a local file, or a Hugging Face dataset).
- :mod:`.collect` — packing, stop-after-layer L, the shard write loop (chapter 01).
- :mod:`.collect_config` — the book's collection settings in one place (chapters and ``mechlib.scale``).
- :mod:`.shards` — the on-disk format: checksummed shards + ``manifest.json``, :class:`ActivationStore`.
- :mod:`.stores` — :class:`ActivationSource` (the contract SAE training reads) and its in-memory
  and streaming implementations.
- :mod:`.provenance` — fingerprints of a collection, so products computed from other activations
  are never reused.

Callers import the public names from here: ``from mechlib.activations import ActivationStore``.
"""

from mechlib.activations.collect import (
    HELDOUT_EVERY,
    SPLITS,
    CollectRun,
    Packer,
    collect_activations,
    stream_activations,
)
from mechlib.activations.collect_config import (
    CollectConfig,
    CollectResult,
    collect_config_from_params,
    collect_for_book,
    collect_split,
    open_store,
    open_train_store,
)
from mechlib.activations.corpus import CorpusError, CorpusSpec, iter_texts
from mechlib.activations.provenance import ActivationsFingerprint, Provenance, fingerprint_of_store
from mechlib.activations.shards import ActivationError, ActivationStore, ShardError, StoreSummary
from mechlib.activations.stores import ActivationSource, StreamStore, TensorStore

__all__ = [
    "HELDOUT_EVERY",
    "SPLITS",
    "ActivationError",
    "ActivationSource",
    "ActivationStore",
    "ActivationsFingerprint",
    "CollectConfig",
    "CollectResult",
    "CollectRun",
    "CorpusError",
    "CorpusSpec",
    "Packer",
    "Provenance",
    "ShardError",
    "StoreSummary",
    "StreamStore",
    "TensorStore",
    "collect_activations",
    "collect_config_from_params",
    "collect_for_book",
    "collect_split",
    "fingerprint_of_store",
    "iter_texts",
    "open_store",
    "open_train_store",
    "stream_activations",
]
