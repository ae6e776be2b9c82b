"""Training checkpoints on disk: checksummed, with a fallback, and keyed by what they were computed from.

Why: two ways a checkpoint misleads without an error. A damaged file — one flipped exponent bit
in ``sae_final.pt`` gave a variance explained of -1.6e70 with exit code 0, and a truncated
``train_state.pt`` failed with torch's zip error naming no file. And a stale one — after chapter
01 recollected with other settings, chapter 02 "resumed" an SAE trained on the old activations.
So every checkpoint has a ``.sha256`` sidecar verified on load (:mod:`mechlib.io`), the state
before the last is kept as ``train_state.prev.pt`` to fall back on, and every state and exported
SAE records its :class:`mechlib.activations.provenance.Provenance` (activations fingerprint + training
config), which must match before anything is resumed or evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechlib.activations.provenance import PREFIX, ActivationsFingerprint, Provenance, ProvenanceError, stale_line
from mechlib.io import atomic_torch_save_checksummed, checksum_path, verify_sha256
from mechlib.sae.model import SAEError

if TYPE_CHECKING:
    from mechlib.sae.train import TrainConfig

STATE_FILE = "train_state.pt"
PREV_STATE_FILE = "train_state.prev.pt"  # the checkpoint before the last: the fallback if the last is damaged
HISTORY_FILE = "train_history.json"
FINAL_FILE = "sae_final.pt"
EXPORT_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
# Every file a training run writes (with the checksum sidecars): removed when a different run starts.
OUR_FILES = (
    *tuple(n + s for n in (STATE_FILE, PREV_STATE_FILE, FINAL_FILE, EXPORT_FILE) for s in ("", ".sha256")),
    CFG_FILE,
    HISTORY_FILE,
)


def train_provenance(fp: ActivationsFingerprint, cfg: TrainConfig) -> Provenance:
    """What an SAE is computed from: the activations (settings + shard checksums) and every training knob."""
    return Provenance.of(activations=fp, train_config=cfg.as_dict())


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state with its ``.sha256``; the state it replaces becomes ``train_state.prev.pt``."""
    atomic_torch_save_checksummed(state, path, keep_previous=path.with_name(PREV_STATE_FILE))


def _state_problem(path: Path) -> str | None:
    ok = verify_sha256(path)
    if ok is None:
        return f"{path} has no checksum file {checksum_path(path).name} (not written by this mechbook; not trusted)"
    return None if ok else f"{path} does not match its checksum {checksum_path(path).name} (corrupt or truncated)"


def load_train_state(out_dir: str | Path, announce: bool = True) -> dict[str, Any] | None:
    """The last intact training state in ``out_dir`` (``None``: nothing to resume).

    ``train_state.pt`` must match its ``.sha256`` sidecar and load; if it does not, the checkpoint
    before it (``train_state.prev.pt``) is used, and if that is damaged too, training starts over.
    Each fallback is said in one line naming the file (``announce``: print it; rank 0 only).
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = out_dir / name
        if not path.is_file():
            continue
        problem = _state_problem(path)
        if problem is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:  # torch's zip reader names neither the file nor a remedy
                problem = f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
            else:
                if problems and announce:
                    print(
                        f"{PREFIX} {'; '.join(problems)}: resuming from the checkpoint before it, {path.name} "
                        f"(step {state.get('step')})"
                    )
                return state
        problems.append(problem)
    if problems and announce:
        print(f"{PREFIX} {'; '.join(problems)}: no intact training state left, training from scratch")
    return None


def _activations_detail(fp: ActivationsFingerprint, saved: Mapping[str, Any] | None) -> str:
    if saved is None:
        return ""
    try:
        return fp.describe_change(ActivationsFingerprint.from_dict(saved))
    except (ProvenanceError, AttributeError):
        return ""


def why_not_resume(saved: Mapping[str, Any], fp: ActivationsFingerprint, cfg: TrainConfig) -> str | None:
    """``None`` if the state ``saved`` was computed from exactly these activations and knobs, else the line to print."""
    try:
        old = Provenance.from_dict(saved.get("provenance"))
    except ProvenanceError:
        old = None
    if old is None:
        return (
            f"{PREFIX} {STATE_FILE} has no provenance record (written by an older mechbook), so what it was "
            f"trained on is unknown: training from scratch"
        )
    changed = train_provenance(fp, cfg).changed(old)
    if not changed:
        return None
    inputs, details = [], []
    if "activations" in changed:
        inputs.append("activations")
        details.append(_activations_detail(fp, saved.get("activations")))
    if "train_config" in changed:
        inputs.append("training settings")
        now, then = cfg.as_dict(), saved.get("cfg") or {}
        details.append(
            ", ".join(
                f"{k} {then.get(k)!r} → {now.get(k)!r}"
                for k in sorted(set(now) | set(then))
                if now.get(k) != then.get(k)
            )
        )
    return stale_line(" and ".join(inputs), "saved SAE", "training from scratch", "; ".join(d for d in details if d))


def finals_intact(out_dir: Path) -> bool:
    """The exported SAE files exist and match their checksums (else a finished run rewrites them)."""
    bad = [n for n in (FINAL_FILE, EXPORT_FILE) if not (out_dir / n).is_file() or verify_sha256(out_dir / n) is False]
    if bad and (out_dir / FINAL_FILE).is_file():
        print(
            f"{PREFIX} {', '.join(bad)} in {out_dir}: missing or not matching the checksum; rewriting from "
            f"the intact {STATE_FILE}"
        )
    return not bad


def check_trained_on(cfg: Mapping[str, Any], fp: ActivationsFingerprint, final: Path) -> None:
    """Raise :class:`SAEError` unless the SAE whose ``cfg.json`` is ``cfg`` was trained on the activations ``fp``.

    Why: chapter 03 run alone after chapter 01 recollected would otherwise evaluate an SAE trained
    on tokens that no longer exist against held-out tokens collected differently.
    """
    want = Provenance.of(activations=fp).as_dict()["activations"]
    saved = (cfg.get("provenance") or {}).get("activations") if isinstance(cfg.get("provenance"), Mapping) else None
    if saved is None:
        raise SAEError(
            f"{final}: its {CFG_FILE} has no provenance record (written by an older mechbook), so the "
            f"activations it was trained on are unknown; rerun chapter 02 to retrain it"
        )
    if saved != want:
        detail = _activations_detail(fp, cfg.get("activations"))
        raise SAEError(
            f"{final}: trained on other activations than chapter 01's current ones"
            f"{f' ({detail})' if detail else ''}; rerun chapter 02 to retrain it"
        )
