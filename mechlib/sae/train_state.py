"""The training run's state on disk: a fresh start, the resumable checkpoint, the final files, and the
finiteness checks that keep NaN out of all three.

Why apart from :mod:`mechlib.sae.train`: the loop decides *when* state is written (every
``checkpoint_every`` steps, at the end); this module decides *what* a state is and refuses to write a
broken one. A checkpoint must carry everything that influences the next step (weights, Adam moments,
step, RNG, dead counters, history) so a resumed run is the uninterrupted one bit for bit on CPU; the
file format, its sha256 sidecar and the resume checks are :mod:`mechlib.sae.checkpoints`'.
Non-finite weights are refused *before* a write, so the previous checkpoint stays the intact fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechlib.activations.provenance import ActivationsFingerprint
from mechlib.activations.stores import ActivationSource
from mechlib.sae.checkpoints import FINAL_FILE, HISTORY_FILE, train_provenance, write_state
from mechlib.sae.history import HistoryRow, rows_to_json, write_history
from mechlib.sae.model import StepStats, TopKSAE, init_b_dec_, save_card_checkpoint, save_sae

if TYPE_CHECKING:  # the loop imports this module; at run time only the values cross
    from mechlib.sae.train import StepPath, TrainConfig


class TrainingError(ValueError):
    """Training cannot go on (non-finite activations or loss); the message says which and what to do."""


@dataclass
class _Progress:
    """The training state that changes every step (what a checkpoint must carry besides Adam and the RNG)."""

    sae: TopKSAE
    step: int
    history: list[HistoryRow]
    tokens_since_fired: Tensor  # [m] int64


def _new_state(store: ActivationSource, cfg: TrainConfig, meta: dict[str, Any]) -> _Progress:
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(store.d_model, cfg.d_sae, cfg.k, seed=cfg.seed, meta=meta)
    if cfg.init_b_dec == "geometric_median":
        sample = next(iter(store.iter_batches(min(4096, store.n_tokens), shuffle=True, seed=cfg.seed + 10_000)))
        if not bool(torch.isfinite(sample).all()):
            raise _non_finite_error(sample, -1, None, store, sae)
        init_b_dec_(sae, sample.float())
    return _Progress(sae, 0, [], torch.zeros(cfg.d_sae, dtype=torch.int64))


def _save_state(
    path: Path, st: _Progress, opt: torch.optim.Optimizer, cfg: TrainConfig, fp: ActivationsFingerprint, done: bool
) -> None:
    sae = st.sae
    _check_finite_weights(sae, st.step)
    state = {
        "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
        "k": sae.k,
        "meta": sae.meta,
        "opt": opt.state_dict(),
        "step": st.step,
        "history": rows_to_json(st.history),  # plain JSON rows: the checkpoint loads with weights_only
        "tokens_since_fired": st.tokens_since_fired.cpu(),
        "rng": torch.get_rng_state(),
        "cfg": cfg.as_dict(),
        "activations": fp.as_dict(),
        "provenance": train_provenance(fp, cfg).as_dict(),
        "done": done,
    }
    write_state(path, state)  # + train_state.pt.sha256; the state it replaces becomes train_state.prev.pt


def _non_finite_error(
    x: Tensor, step: int, stats: StepStats | None, store: ActivationSource, sae: TopKSAE
) -> TrainingError:
    where = getattr(store, "directory", None) or type(store).__name__
    bad = int((~torch.isfinite(x)).any(dim=-1).sum())
    when = "the b_dec initialisation sample" if step < 0 else f"step {step}"
    if bad:
        return TrainingError(
            f"{when}: {bad} of {x.shape[0]} activation vectors from {where} contain NaN or "
            f"inf; recollect them (model in float16? try model_dtype: bfloat16 or float32)"
        )
    bad_params = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad_params:
        return TrainingError(
            f"{when}: the SAE's {', '.join(bad_params)} hold NaN or inf: training diverged (lower "
            f"lr) or a checkpoint holds non-finite weights (delete train_state.pt and retrain)"
        )
    if stats is None:  # the b_dec sample: finite activations and weights leave nothing to name
        return TrainingError(f"{when}: non-finite values from finite activations and weights")
    return TrainingError(
        f"step {step}: the loss became {float(stats.loss)} (fvu {float(stats.fvu)}, aux "
        f"{float(stats.aux_loss)}) on finite activations: training diverged; lower lr. "
        f"Nothing of this step was saved; the last checkpoint is intact"
    )


def _check_finite_weights(sae: TopKSAE, step: int) -> None:
    """Raise before a checkpoint would store NaN/inf weights (the previous checkpoint stays intact)."""
    bad = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(
            f"after step {step}: the SAE's {', '.join(bad)} hold NaN or inf: training diverged; "
            f"lower lr. Not saved; the last checkpoint is intact"
        )


def _write_final(
    sae: TopKSAE,
    cfg: TrainConfig,
    out_dir: Path,
    st: _Progress,
    path_name: StepPath,
    fp: ActivationsFingerprint,
    renorm: bool = True,
) -> None:
    n_dead = int((st.tokens_since_fired >= cfg.dead_tokens).sum())
    _check_finite_weights(sae, st.step)
    save_card_checkpoint(sae, out_dir / FINAL_FILE, renorm=renorm)
    save_sae(
        sae,
        out_dir,
        {
            **cfg.as_dict(),
            "model": fp.model,
            "layer": fp.layer,
            "step_path": path_name,
            "train_n_tokens_store": fp.n_tokens,
            "steps": st.step,
            "n_dead_at_end": n_dead,
            "dead_fraction_at_end": n_dead / cfg.d_sae,
            "sae_source": "train",
            "provenance": train_provenance(fp, cfg).as_dict(),
            "activations": fp.as_dict(),
        },
    )
    write_history(out_dir / HISTORY_FILE, st.history)
