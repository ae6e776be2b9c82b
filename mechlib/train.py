"""Training the TopK SAE: Adam, warmup → cosine → floor, AuxK on dead latents, renorm, resume.

Why the loop looks the way it does:
- Every piece of state that influences the next step (weights, Adam moments, step, data
  position, RNG, dead counters, history) goes into one atomic checkpoint, so a killed run that
  is rerun continues *exactly* where it stopped: resumed == uninterrupted, bit for bit on CPU.
  Only a state computed from the same activations and knobs is resumed, and only an intact one
  (sha256 sidecar; the state before it is the fallback): see :mod:`mechlib.checkpoints`.
- Data order is a pure function of (seed, step): step ``s`` trains on global batch ``s`` of
  ``store.iter_batches(batch_size, shuffle=True, seed=seed, start_batch=s, n_batches=total_steps)``
  (epochs cycle inside the store, each with its own shuffle), so the data position is the step.
- The step function is pluggable (``reference_step`` in fp32 autograd; ``mechlib.sae_fast.fast_step``
  on CUDA) and :class:`ParallelHooks` is the seam where a data-parallel trainer adds its
  all-reduces (gradients after backward, ``fired`` before the dead counters are updated) and its
  per-rank slice of each global batch, without touching this loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechlib.checkpoints import (CFG_FILE, FINAL_FILE, HISTORY_FILE, OUR_FILES, STATE_FILE, check_trained_on,
                                 finals_intact, load_train_state, train_provenance, why_not_resume, write_state)
from mechlib.io import atomic_write_json, read_json
from mechlib.params import BookParams
from mechlib.provenance import ActivationsFingerprint, fingerprint_of_store
from mechlib.sae import (FORMULAS, SAEError, StepStats, TopKSAE, init_b_dec_, load_sae, reference_step,
                         renorm_decoder_, save_card_checkpoint, save_sae)
from mechlib.schedule import lr_at
from mechlib.stores import TensorStore  # noqa: F401  (re-exported: train_sae(TensorStore(x), ...))

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
    init_b_dec: str = "geometric_median"  # geometric_median | zeros

    @classmethod
    def from_params(cls, P: Any) -> "TrainConfig":
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


@dataclass
class TrainResult:
    sae: TopKSAE
    history: list[dict[str, float]]
    step_path: str  # "reference" | "fast"
    steps: int
    tokens: int
    seconds: float  # wall time of the steps run in this call (0 when nothing was left to do)
    resumed_from: int  # step the run started from (0 = fresh)
    tokens_since_fired: Tensor  # [m] int64, the dead counters at the end
    out_dir: Path
    dead_fraction: float = field(default=0.0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_step_fn(device: torch.device) -> tuple[StepFn, str]:
    """``mechlib.sae_fast.fast_step`` on CUDA when it imports, else the fp32 reference."""
    if device.type == "cuda":
        try:
            from mechlib.sae_fast import fast_step

            return fast_step, "fast"
        except ImportError:
            pass
    return reference_step, "reference"


def _new_state(store: Any, cfg: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(store.d_model, cfg.d_sae, cfg.k, seed=cfg.seed, meta=meta)
    if cfg.init_b_dec == "geometric_median":
        sample = next(iter(store.iter_batches(min(4096, store.n_tokens), shuffle=True, seed=cfg.seed + 10_000)))
        if not bool(torch.isfinite(sample).all()):
            raise _non_finite_error(sample, -1, None, store, sae)
        init_b_dec_(sae, sample.float())
    return {"sae": sae, "step": 0, "history": [],
            "tokens_since_fired": torch.zeros(cfg.d_sae, dtype=torch.int64), "opt": None,
            "rng": torch.get_rng_state()}


def _save_state(path: Path, st: dict[str, Any], opt: torch.optim.Optimizer, cfg: TrainConfig,
                fp: ActivationsFingerprint, done: bool) -> None:
    sae: TopKSAE = st["sae"]
    _check_finite_weights(sae, st["step"])
    state = {"sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()}, "k": sae.k,
             "meta": sae.meta, "opt": opt.state_dict(), "step": st["step"], "history": st["history"],
             "tokens_since_fired": st["tokens_since_fired"].cpu(), "rng": torch.get_rng_state(),
             "cfg": cfg.as_dict(), "activations": fp.as_dict(),
             "provenance": train_provenance(fp, cfg).as_dict(), "done": done}
    write_state(path, state)  # + train_state.pt.sha256; the state it replaces becomes train_state.prev.pt


def train_sae(store: Any, cfg: TrainConfig, out_dir: str | os.PathLike[str], device: str = "auto", *,
              step_fn: StepFn | None = None, hooks: ParallelHooks | None = None,
              stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume, or just load a finished run) an SAE on ``store``; write its files to ``out_dir``.

    Files: ``train_state.pt`` (full resumable state, every ``checkpoint_every`` steps),
    ``sae_final.pt`` (card format), ``sae.safetensors`` + ``cfg.json``, ``train_history.json``.
    ``stop_after`` ends the call after that many total steps (as if killed), for resume tests.
    A state written from other activations (collection settings or shard checksums) or other knobs
    is never resumed: training starts from scratch and one line says why (see ``mechlib.provenance``).
    """
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    hooks = hooks or ParallelHooks()
    chosen_fn, path_name = (step_fn, "custom") if step_fn is not None else pick_step_fn(dev)
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
        st = {"sae": sae, **{k: saved[k] for k in ("step", "history", "tokens_since_fired")}}
        torch.set_rng_state(saved["rng"])
    else:
        st = _new_state(store, cfg, meta)
        if hooks.is_main:  # a fresh run: files of an earlier, different run must not pass for this one's
            for name in OUR_FILES:
                (out_dir / name).unlink(missing_ok=True)
    sae = st["sae"].to(dev)
    # fused Adam: one kernel over all parameters (3x faster than foreach on 2 CPU cores), same math.
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)
    if saved is not None:
        opt.load_state_dict(saved["opt"])
    since = st["tokens_since_fired"].to(dev)
    resumed_from, total = st["step"], cfg.total_steps
    end = total if stop_after is None else min(total, stop_after)
    t0 = time.perf_counter()
    if st["step"] < end:
        data = store.iter_batches(cfg.train_batch_size, shuffle=True, seed=cfg.seed, start_batch=st["step"],
                                  n_batches=total)
        bar = tqdm(total=total, initial=st["step"], desc="train SAE", unit="step", disable=not progress)
        for step in range(st["step"], end):
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
            st["history"].append({"step": step, "lr": lr, "loss": float(stats.loss), "fvu": float(stats.fvu),
                                  "mse": float(stats.mse), "aux_loss": float(stats.aux_loss),
                                  "n_dead": int(dead.sum())})
            st.update(step=step + 1, tokens_since_fired=since)
            bar.update(1)
            bar.set_postfix(fvu=f"{float(stats.fvu):.3f}", dead=int(dead.sum()), refresh=False)
            if hooks.is_main and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _save_state(out_dir / STATE_FILE, st, opt, cfg, fp, done=False)
        bar.close()
    seconds = time.perf_counter() - t0
    finished, worked = st["step"] >= total, st["step"] > resumed_from
    if hooks.is_main and finished and (worked or not finals_intact(out_dir)):
        _write_final(sae, cfg, out_dir, st, path_name, fp, renorm=worked)  # a finished state is renormalised
    if hooks.is_main and worked:
        _save_state(out_dir / STATE_FILE, st, opt, cfg, fp, done=finished)
    return TrainResult(sae=sae, history=st["history"], step_path=path_name, steps=st["step"],
                       tokens=st["step"] * cfg.train_batch_size, seconds=seconds, resumed_from=resumed_from,
                       tokens_since_fired=since.cpu(), out_dir=out_dir,
                       dead_fraction=float((since >= cfg.dead_tokens).float().mean()))


class TrainingError(ValueError):
    """Training cannot go on (non-finite activations or loss); the message says which and what to do."""


def _non_finite_error(x: Tensor, step: int, stats: StepStats | None, store: Any, sae: TopKSAE) -> TrainingError:
    where = getattr(store, "directory", None) or type(store).__name__
    bad = int((~torch.isfinite(x)).any(dim=-1).sum())
    when = "the b_dec initialisation sample" if step < 0 else f"step {step}"
    if bad:
        return TrainingError(f"{when}: {bad} of {x.shape[0]} activation vectors from {where} contain NaN or "
                             f"inf; recollect them (model in float16? try model_dtype: bfloat16 or float32)")
    bad_params = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad_params:
        return TrainingError(f"{when}: the SAE's {', '.join(bad_params)} hold NaN or inf: training diverged (lower "
                             f"lr) or a checkpoint holds non-finite weights (delete train_state.pt and retrain)")
    return TrainingError(f"step {step}: the loss became {float(stats.loss)} (fvu {float(stats.fvu)}, aux "
                         f"{float(stats.aux_loss)}) on finite activations: training diverged; lower lr. "
                         f"Nothing of this step was saved; the last checkpoint is intact")


def _check_finite_weights(sae: TopKSAE, step: int) -> None:
    """Raise before a checkpoint would store NaN/inf weights (the previous checkpoint stays intact)."""
    bad = [n for n, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"after step {step}: the SAE's {', '.join(bad)} hold NaN or inf: training diverged; "
                            f"lower lr. Not saved; the last checkpoint is intact")


def _write_final(sae: TopKSAE, cfg: TrainConfig, out_dir: Path, st: dict[str, Any], path_name: str,
                 fp: ActivationsFingerprint, renorm: bool = True) -> None:
    since = st["tokens_since_fired"]
    n_dead = int((since >= cfg.dead_tokens).sum())
    _check_finite_weights(sae, st["step"])
    save_card_checkpoint(sae, out_dir / FINAL_FILE, renorm=renorm)
    save_sae(sae, out_dir, {**cfg.as_dict(), "model": fp.model, "layer": fp.layer, "step_path": path_name,
                            "train_n_tokens_store": fp.n_tokens, "steps": st["step"],
                            "n_dead_at_end": n_dead, "dead_fraction_at_end": n_dead / cfg.d_sae,
                            "sae_source": "train", "provenance": train_provenance(fp, cfg).as_dict(),
                            "activations": fp.as_dict()})
    atomic_write_json(out_dir / HISTORY_FILE, st["history"])


def run_sae(P: Any, store: Any, out_dir: str | os.PathLike[str], device: str = "auto",
            progress: bool = True) -> tuple[TopKSAE, dict[str, Any]]:
    """Chapter 02's switch: train on ``store`` (``sae_source: train``) or load ``sae_pretrained``.

    Returns the SAE and a summary dict; a pretrained SAE is checked against the activations' width
    and layer (clear error naming both) and its source recorded in ``out_dir/pretrained.json``.
    """
    out_dir = Path(out_dir)
    if P.sae_source == "pretrained":
        sae = load_sae(P.sae_pretrained, device=resolve_device(device))
        from mechlib.sae import check_compatible

        check_compatible(sae, int(store.d_model), store.manifest.get("layer"), source=str(P.sae_pretrained))
        info = {"sae_source": "pretrained", "sae_pretrained": str(P.sae_pretrained), "d_model": sae.d_model,
                "d_sae": sae.d_sae, "k": sae.k, "layer": sae.meta.get("layer"), "step_path": "none"}
        atomic_write_json(out_dir / "pretrained.json", info)
        return sae, info
    res = train_sae(store, TrainConfig.from_params(P), out_dir, device=device, progress=progress)
    info = {"sae_source": "train", "d_model": res.sae.d_model, "d_sae": res.sae.d_sae, "k": res.sae.k,
            "step_path": res.step_path, "steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
            "resumed_from": res.resumed_from, "final_fvu": res.history[-1]["fvu"] if res.history else None,
            "dead_fraction_at_end": res.dead_fraction}
    return res.sae, info


def run_sae_for_eval(P: Any, out_dir: str | os.PathLike[str], device: str = "auto",
                     activations: ActivationsFingerprint | None = None) -> tuple[TopKSAE, dict]:
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
