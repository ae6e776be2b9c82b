"""Training the TopK SAE: Adam, warmup → cosine → floor, AuxK on dead latents, renorm, resume.

Why the loop looks the way it does:
- Every piece of state that influences the next step (weights, Adam moments, step, data
  position, RNG, dead counters, history) goes into one atomic checkpoint (written by
  :mod:`mechlib.sae.train_state`, which also refuses non-finite weights), so a killed run that
  is rerun continues *exactly* where it stopped: resumed == uninterrupted, bit for bit on CPU.
  Only a state computed from the same activations and knobs is resumed, and only an intact one
  (sha256 sidecar; the state before it is the fallback): see :mod:`mechlib.sae.checkpoints`.
- Data order is a pure function of (seed, step): step ``s`` trains on global batch ``s`` of
  ``store.iter_batches(batch_size, shuffle=True, seed=seed, start_batch=s, n_batches=total_steps)``
  (epochs cycle inside the store, each with its own shuffle), so the data position is the step.
- The learning rate is a pure function of the step (:func:`lr_at`), so a resumed run uses exactly
  the LR an uninterrupted run would have used; the schedule keeps no state of its own.
- The step function is pluggable (``reference_step`` in fp32 autograd; ``mechlib.sae.fast.fast_step``
  on CUDA) and :class:`ParallelHooks` is the seam where a data-parallel trainer adds its
  all-reduces (gradients after backward, ``fired`` before the dead counters are updated) and its
  per-rank slice of each global batch, without touching this loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlib.activations.provenance import ActivationsFingerprint, fingerprint_of_store
from mechlib.activations.stores import ActivationSource, TensorStore  # noqa: F401  (re-exported for tests)
from mechlib.io import atomic_write_json, read_json
from mechlib.models import resolve_device
from mechlib.params import BookParams
from mechlib.sae.checkpoints import (  # noqa: F401  (HISTORY_FILE: re-exported)
    CFG_FILE,
    FINAL_FILE,
    HISTORY_FILE,
    OUR_FILES,
    STATE_FILE,
    check_trained_on,
    finals_intact,
    load_train_state,
    why_not_resume,
)
from mechlib.sae.history import HistoryRow, rows_from_json
from mechlib.sae.loading import load_sae
from mechlib.sae.model import (
    SAEError,
    StepStats,
    TopKSAE,
    check_compatible,
    reference_step,
    renorm_decoder_,
)
from mechlib.sae.train_state import (  # noqa: F401  (TrainingError, _check_finite_weights: re-exported)
    TrainingError,
    _check_finite_weights,
    _new_state,
    _non_finite_error,
    _Progress,
    _save_state,
    _write_final,
)

StepFn = Callable[[TopKSAE, Tensor, Tensor, int, float], StepStats]


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the SAE training run (recorded in ``cfg.json``).

    The defaults are :class:`mechlib.params.BookParams`' own (one list of defaults for the book and
    the library); ``from_params`` copies a run's values of the same names.
    """

    d_sae: int = BookParams.d_sae
    k: int = BookParams.k
    k_aux: int = BookParams.k_aux
    aux_coef: float = BookParams.aux_coef
    lr: float = BookParams.lr
    lr_floor: float = BookParams.lr_floor
    warmup_steps: int = BookParams.warmup_steps
    train_batch_size: int = BookParams.train_batch_size
    train_tokens: int = BookParams.train_tokens
    renorm_every: int = BookParams.renorm_every
    dead_tokens: int = BookParams.dead_tokens
    checkpoint_every: int = BookParams.checkpoint_every
    seed: int = BookParams.seed
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Gao et al. / torch defaults; the card does not say
    adam_eps: float = 1e-8
    init_b_dec: Literal["geometric_median", "zeros"] = "geometric_median"

    @classmethod
    def from_params(cls, P: BookParams) -> TrainConfig:
        """The fields of ``P`` with these names (the training section of the book's flat params)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{n: getattr(P, n) for n in names if hasattr(P, n)})

    @property
    def total_steps(self) -> int:
        return max(self.train_tokens // self.train_batch_size, 1)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["total_steps"] = self.total_steps
        return d


# ------------------------------------------------------------------------------------ schedule


def lr_at(step: int, *, lr: float, lr_floor: float, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup → cosine decay → floor (the card's 2e-4 → 6e-5).

    Warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (never 0, so
    step 0 already learns). Then a half cosine from ``lr`` down to ``lr_floor`` reached at the last
    step; steps past ``total_steps`` stay at the floor.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    return lr_floor + 0.5 * (lr - lr_floor) * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------- loop


@dataclass
class ParallelHooks:
    """Where data-parallel training plugs in (identity for one process).

    ``local_batch`` picks this rank's rows of the global batch; ``reduce_grads`` all-reduces
    ``.grad`` after backward; ``reduce_fired`` ORs the ``fired`` masks so dead counters stay global;
    ``is_main`` decides who writes files.
    """

    local_batch: Callable[[Tensor], Tensor] = lambda x: x
    reduce_grads: Callable[[TopKSAE], None] = lambda sae: None
    reduce_fired: Callable[[Tensor], Tensor] = lambda fired: fired
    is_main: bool = True


StepPath = Literal["reference", "fast", "custom", "none"]  # "none": a pretrained SAE, no training step


@dataclass
class TrainResult:
    """What chapter 02 gets back: the SAE and how it came to be (trained here, resumed, or loaded)."""

    sae: TopKSAE
    history: list[HistoryRow]  # one row per step
    step_path: StepPath
    steps: int
    tokens: int
    seconds: float  # wall time of the steps run in this call (0 when nothing was left to do)
    resumed_from: int  # step the run started from (0 = fresh)
    tokens_since_fired: Tensor  # [m] int64, the dead counters at the end
    out_dir: Path
    dead_fraction: float = field(default=0.0)
    sae_source: Literal["train", "pretrained"] = "train"
    sae_pretrained: str | None = None  # the spec a pretrained SAE was loaded from

    @property
    def final_fvu(self) -> float | None:
        return self.history[-1].fvu if self.history else None

    @property
    def start(self) -> str:
        """How this call began, in words: chapter 02's line said "resumed from step 0" of a fresh run."""
        if self.sae_source == "pretrained":
            return f"loaded from {self.sae_pretrained}"
        if self.resumed_from == 0:
            return "trained from scratch"
        if self.resumed_from >= self.steps:
            return f"already trained ({self.steps} steps): nothing left to run"
        return f"resumed from step {self.resumed_from} of {self.steps}"

    def summary(self) -> dict[str, Any]:
        """The JSON summary chapter 02 writes into ``metrics/02_train_sae.json`` (keys as before)."""
        sae = self.sae
        if self.sae_source == "pretrained":
            return {
                "sae_source": "pretrained",
                "sae_pretrained": self.sae_pretrained,
                "d_model": sae.d_model,
                "d_sae": sae.d_sae,
                "k": sae.k,
                "layer": sae.meta.get("layer"),
                "step_path": "none",
            }
        return {
            "sae_source": "train",
            "d_model": sae.d_model,
            "d_sae": sae.d_sae,
            "k": sae.k,
            "step_path": self.step_path,
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "resumed_from": self.resumed_from,
            "final_fvu": self.final_fvu,
            "dead_fraction_at_end": self.dead_fraction,
        }


def pick_step_fn(device: torch.device) -> tuple[StepFn, StepPath]:
    """``mechlib.sae.fast.fast_step`` on CUDA when it imports, else the fp32 reference."""
    if device.type == "cuda":
        try:  # the fast step needs triton on CUDA; a CPU-only install never imports it
            from mechlib.sae.fast import fast_step

            return fast_step, "fast"
        except ImportError:
            pass
    return reference_step, "reference"


def train_sae(
    store: ActivationSource,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    device: str = "auto",
    *,
    step_fn: StepFn | None = None,
    hooks: ParallelHooks | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume, or just load a finished run) an SAE on ``store``; write its files to ``out_dir``.

    Files: ``train_state.pt`` (full resumable state, every ``checkpoint_every`` steps),
    ``sae_final.pt`` (card format), ``sae.safetensors`` + ``cfg.json``, ``train_history.json``.
    ``stop_after`` ends the call after that many total steps, for resume tests: a clean stop, with the
    state at that step checkpointed (a killed run keeps only its last ``checkpoint_every`` save).
    A state written from other activations (collection settings or shard checksums) or other knobs
    is never resumed: training starts from scratch and one line says why (see ``mechlib.activations.provenance``).
    """
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    hooks = hooks or ParallelHooks()
    chosen_fn, path_name = pick_step_fn(dev) if step_fn is None else (step_fn, "custom")
    fp = fingerprint_of_store(store)
    meta = {"model": fp.model, "layer": fp.layer}
    if hooks.is_main:  # temporaries of our atomic writes left by a killed run (a full train_state can be GBs)
        for name in OUR_FILES:
            for stale in out_dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
    saved = load_train_state(out_dir, announce=hooks.is_main)
    why = None if saved is None else why_not_resume(saved, fp, cfg)
    if why is not None:
        if hooks.is_main:
            print(why)
        saved = None
    if saved is not None:
        sae = TopKSAE(fp.d_model, cfg.d_sae, cfg.k, meta=saved["meta"])
        sae.load_state_dict(saved["sae"])
        history = rows_from_json(saved["history"], f"{out_dir / STATE_FILE} history")
        st = _Progress(sae, saved["step"], history, saved["tokens_since_fired"])
        torch.set_rng_state(saved["rng"])
    else:
        st = _new_state(store, cfg, meta)
        if hooks.is_main:  # a fresh run: files of an earlier, different run must not pass for this one's
            for name in OUR_FILES:
                (out_dir / name).unlink(missing_ok=True)
    sae = st.sae = st.sae.to(dev)
    # fused Adam: one kernel over all parameters (3x faster than foreach on 2 CPU cores), same math.
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)
    if saved is not None:
        opt.load_state_dict(saved["opt"])
    since = st.tokens_since_fired = st.tokens_since_fired.to(dev)
    resumed_from, total = st.step, cfg.total_steps
    end = total if stop_after is None else min(total, stop_after)
    t0 = time.perf_counter()
    if st.step < end:
        data = store.iter_batches(
            cfg.train_batch_size, shuffle=True, seed=cfg.seed, start_batch=st.step, n_batches=total
        )
        bar = tqdm(total=total, initial=st.step, desc="train SAE", unit="step", disable=not progress)
        for step in range(st.step, end):
            x = next(data)
            x = hooks.local_batch(x).to(dev, torch.float32, non_blocking=True)
            lr = lr_at(step, lr=cfg.lr, lr_floor=cfg.lr_floor, warmup_steps=cfg.warmup_steps, total_steps=total)
            for g in opt.param_groups:
                g["lr"] = lr
            dead = since >= cfg.dead_tokens
            opt.zero_grad(set_to_none=True)
            stats = chosen_fn(sae, x, dead, cfg.k_aux, cfg.aux_coef)
            if not math.isfinite(float(stats.loss)):  # before the update: no NaN ever reaches a checkpoint
                raise _non_finite_error(x, step, stats, store, sae)
            hooks.reduce_grads(sae)
            opt.step()
            if (step + 1) % cfg.renorm_every == 0:
                renorm_decoder_(sae)
            fired = hooks.reduce_fired(stats.fired)
            since += cfg.train_batch_size
            since[fired] = 0
            st.history.append(
                HistoryRow(
                    step=step,
                    lr=lr,
                    loss=float(stats.loss),
                    fvu=float(stats.fvu),
                    mse=float(stats.mse),
                    aux_loss=float(stats.aux_loss),
                    n_dead=int(dead.sum()),
                )
            )
            st.step, st.tokens_since_fired = step + 1, since
            bar.update(1)
            bar.set_postfix(fvu=f"{float(stats.fvu):.3f}", dead=int(dead.sum()), refresh=False)
            if hooks.is_main and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _save_state(out_dir / STATE_FILE, st, opt, cfg, fp, done=False)
        bar.close()
    seconds = time.perf_counter() - t0
    finished, worked = st.step >= total, st.step > resumed_from
    if hooks.is_main and finished and (worked or not finals_intact(out_dir)):
        _write_final(sae, cfg, out_dir, st, path_name, fp, renorm=worked)  # a finished state is renormalised
    if hooks.is_main and worked:
        _save_state(out_dir / STATE_FILE, st, opt, cfg, fp, done=finished)
    return TrainResult(
        sae=sae,
        history=st.history,
        step_path=path_name,
        steps=st.step,
        tokens=st.step * cfg.train_batch_size,
        seconds=seconds,
        resumed_from=resumed_from,
        tokens_since_fired=since.cpu(),
        out_dir=out_dir,
        dead_fraction=float((since >= cfg.dead_tokens).float().mean()),
    )


def run_sae(
    P: BookParams, store: ActivationSource, out_dir: str | os.PathLike[str], device: str = "auto", progress: bool = True
) -> TrainResult:
    """Chapter 02's switch: train on ``store`` (``sae_source: train``) or load ``sae_pretrained``.

    A pretrained SAE is checked against the activations' width and layer (clear error naming
    both) and its source recorded in ``out_dir/pretrained.json``; its result has no steps.
    """
    out_dir = Path(out_dir)
    if P.sae_source == "pretrained":
        sae = load_sae(P.sae_pretrained, device=resolve_device(device))
        check_compatible(sae, int(store.d_model), store.manifest.get("layer"), source=str(P.sae_pretrained))
        res = TrainResult(
            sae=sae,
            history=[],
            step_path="none",
            steps=0,
            tokens=0,
            seconds=0.0,
            resumed_from=0,
            tokens_since_fired=torch.zeros(sae.d_sae, dtype=torch.int64),
            out_dir=out_dir,
            sae_source="pretrained",
            sae_pretrained=str(P.sae_pretrained),
        )
        atomic_write_json(out_dir / "pretrained.json", res.summary())
        return res
    return train_sae(store, TrainConfig.from_params(P), out_dir, device=device, progress=progress)


def run_sae_for_eval(
    P: BookParams,
    out_dir: str | os.PathLike[str],
    device: str = "auto",
    activations: ActivationsFingerprint | None = None,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Chapter 03: the SAE chapter 02 produced (trained checkpoint or the pretrained file), with its cfg.

    ``activations``: the fingerprint of the training activations now on disk; a trained SAE whose
    ``cfg.json`` records other ones is refused (rerun chapter 02), never evaluated as if current.
    """
    out_dir = Path(out_dir)
    if P.sae_source == "pretrained":
        sae = load_sae(P.sae_pretrained, device=resolve_device(device))
        return sae, dict(sae.meta)
    final = out_dir / FINAL_FILE
    if not final.is_file():
        raise SAEError(f"{final} not found: run chapter 02 (train SAE) for this run first")
    sae = load_sae(final, device=resolve_device(device))
    cfg = read_json(out_dir / CFG_FILE) if (out_dir / CFG_FILE).is_file() else dict(sae.meta)
    if activations is not None:
        check_trained_on(cfg, activations, final)
    return sae, cfg
