"""Publish a run's SAE: ``python -m mechlib.hub push outputs/<run> <owner>/<repo> [--revision R] [--private]``.

Why a plan first: what goes where in the repo is the part worth checking, and checking it must not need
network or a token. :func:`plan_push` builds the list of (local file, path in the repo) as a typed
:class:`PushPlan` that ``--dry-run`` prints; :func:`upload` is then one ``huggingface_hub`` commit.

Repo layout (what :func:`mechlib.sae.load_sae` and the model card's snippets expect)::

    cfg.json, sae_weights.safetensors        SAELens (the run's export/ folder)
    layers.<L>/cfg.json, layers.<L>/sae.safetensors      sparsify hookpoint
    sae_final.pt (+ .sha256)                 the study card's format (trained runs only)
    steering_vec_L<peak>.pt, .json           chapter 05's unit steering vector and its metadata
    contrastive_features_L<L>.json           chapter 05's SAE latents ranked by correct − wrong
    README.md                                MODEL_CARD.md, regenerated with the repo id in its snippets
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from mechlib import paths
from mechlib.model_card import CARD_FILE, write_model_card


class PushError(ValueError):
    """A run folder or repo id that cannot be pushed (one line naming it)."""


@dataclass(frozen=True)
class Upload:
    local: Path
    in_repo: str
    what: str


@dataclass(frozen=True)
class PushPlan:
    run_root: Path
    repo_id: str
    revision: str | None  # a branch (created if missing); None: the default branch
    private: bool
    uploads: tuple[Upload, ...]
    skipped: tuple[str, ...]  # what a full push holds but this run lacks, each with the reason

    def describe(self) -> str:
        where = (
            f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "") + (" (private)" if self.private else "")
        )
        width = max(len(u.in_repo) for u in self.uploads)
        lines = [f"push {self.run_root} -> {where}: {len(self.uploads)} files"]
        lines += [f"  {u.in_repo:<{width}}  <- {self._rel(u.local)}  ({u.what})" for u in self.uploads]
        lines += [f"  skipped: {s}" for s in self.skipped]
        return "\n".join(lines)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.run_root))
        except ValueError:
            return str(path)


def find_run(arg: str) -> Path:
    """``outputs/<run>`` as given (relative to the repo root if not found here), or a bare run name."""
    for candidate in (Path(arg).expanduser(), paths.resolve(arg), paths.OUTPUTS_DIR / arg):
        if candidate.is_dir():
            return candidate.resolve()
    raise PushError(f"{arg}: no such run folder (expected outputs/<run>, written by python -m mechlib.book)")


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"'{repo_id}' is not a Hugging Face repo id ({str(exc).split('.')[0]})") from None
    if "/" not in repo_id:
        raise PushError(f"'{repo_id}': give the repo as <owner>/<name>, e.g. your-name/{repo_id}")


def plan_push(run_root: Path, repo_id: str, revision: str | None = None, private: bool = False) -> PushPlan:
    """What a push of ``run_root`` uploads, and where; nothing is read beyond file names, nothing written."""
    _check_repo_id(repo_id)
    if not run_root.is_dir():
        raise PushError(f"{run_root}: no such run folder (expected outputs/<run>, written by python -m mechlib.book)")
    export = run_root / "export"
    if not ((export / "cfg.json").is_file() and (export / "sae_weights.safetensors").is_file()):
        raise PushError(
            f"{export}: no SAE export (cfg.json + sae_weights.safetensors); run chapter 02 first: "
            f"python -m mechlib.book params/{run_root.name}.yaml --only 02"
        )
    uploads = [
        Upload(f, f.relative_to(export).as_posix(), "SAELens" if f.parent == export else "sparsify")
        for f in sorted(export.rglob("*"))
        if f.is_file() and not f.name.startswith(".")
    ]
    skipped = []
    ck = run_root / "checkpoints"
    card = ck / "sae_final.pt"
    if card.is_file():
        uploads.append(Upload(card, card.name, "the study card's format"))
        if (ck / "sae_final.pt.sha256").is_file():
            uploads.append(Upload(ck / "sae_final.pt.sha256", "sae_final.pt.sha256", "its checksum"))
    else:
        skipped.append("sae_final.pt (no checkpoints/sae_final.pt: a pretrained SAE, or chapter 02 has not trained)")
    vectors = sorted(ck.glob("steering_vec_L*.pt"))
    for vec in vectors:
        uploads.append(Upload(vec, vec.name, "unit steering vector"))
        if vec.with_suffix(".json").is_file():
            uploads.append(Upload(vec.with_suffix(".json"), vec.with_suffix(".json").name, "its metadata"))
    if not vectors:
        skipped.append("steering_vec_L*.pt (chapter 05 has not run)")
    features = sorted((run_root / "metrics").glob("contrastive_features_L*.json"))
    uploads += [Upload(f, f.name, "SAE latents ranked by correct − wrong") for f in features]
    if not features:
        skipped.append("contrastive_features_L*.json (chapter 05 has not run)")
    uploads.append(Upload(run_root / CARD_FILE, "README.md", "model card, regenerated before the upload"))
    return PushPlan(run_root, repo_id, revision, private, tuple(uploads), tuple(skipped))


def upload(plan: PushPlan, api: HfApi | None = None) -> str:
    """Regenerate the model card for ``plan.repo_id``, then upload everything in one commit; its URL."""
    write_model_card(plan.run_root.name, root=plan.run_root, repo_id=plan.repo_id)
    api = api or HfApi()
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
    if plan.revision:
        api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=u.in_repo, path_or_fileobj=str(u.local)) for u in plan.uploads]
    info = api.create_commit(
        plan.repo_id,
        ops,
        revision=plan.revision,
        commit_message=f"mechbook run {plan.run_root.name}: SAE (SAELens + sparsify), model card",
    )
    return str(getattr(info, "commit_url", info))
