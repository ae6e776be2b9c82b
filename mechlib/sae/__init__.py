"""The TopK SAE side of the book: the model and its one loss, the fast step, training, file formats.

Modules, in the order of the "same loss in every path" contract:

- :mod:`.model` — :class:`TopKSAE`, the math (module docstring), :func:`reference_step` (the
  contract) and the card / safetensors file formats; :mod:`.loading` — :func:`load_sae` for every
  format the book reads (card, safetensors, SAELens, sparsify, the Hub).
- :mod:`.sparse_grad` — the sparse autograd functions the reference step uses.
- :mod:`.fast` and :mod:`.triton_kernels` — the CUDA fast step, tested against the reference
  (the kernels import nothing of mechlib).
- :mod:`.distributed` — data-parallel plumbing and the global-batch step (same loss terms).
- :mod:`.train` — the training loop and its LR schedule; :mod:`.train_state` — what a state holds
  (fresh, checkpoint, final files); :mod:`.checkpoints` — its resumable file and the resume checks.
- :mod:`.interop` — SAELens / sparsify export and import.

Callers import the public names from here: ``from mechlib.sae import TopKSAE, load_sae``.
Modules inside this package import each other by module (``mechlib.sae.model``) where they can, so
the import graph has no cycles through this file; importing any submodule still runs this file first,
which imports model, train, loading and interop.
"""

from mechlib.sae.interop import HookInfo, encode_dense, export_sae
from mechlib.sae.loading import load_sae
from mechlib.sae.model import (
    CARD_KEYS,
    FORMULAS,
    SAEError,
    SAEOutput,
    StepStats,
    TopKCode,
    TopKSAE,
    autograd_step,
    card_state,
    check_compatible,
    dense_code,
    fired_mask,
    init_b_dec_,
    reference_step,
    renorm_decoder_,
    sae_from_state,
    save_card_checkpoint,
    save_sae,
    sparse_decode,
    topk_code,
)
from mechlib.sae.train import (
    HISTORY_FILE,
    ParallelHooks,
    TrainConfig,
    TrainingError,
    TrainResult,
    lr_at,
    run_sae,
    run_sae_for_eval,
    train_sae,
)

__all__ = [
    "CARD_KEYS",
    "FORMULAS",
    "HISTORY_FILE",
    "HookInfo",
    "ParallelHooks",
    "SAEError",
    "SAEOutput",
    "StepStats",
    "TopKCode",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "autograd_step",
    "card_state",
    "check_compatible",
    "dense_code",
    "encode_dense",
    "export_sae",
    "fired_mask",
    "init_b_dec_",
    "load_sae",
    "lr_at",
    "reference_step",
    "renorm_decoder_",
    "run_sae",
    "run_sae_for_eval",
    "sae_from_state",
    "save_card_checkpoint",
    "save_sae",
    "sparse_decode",
    "topk_code",
    "train_sae",
]
