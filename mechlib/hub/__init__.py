"""The Hugging Face Hub both ways: ``hf:`` specs that download everything an SAE format needs, and
``python -m mechlib.hub push outputs/<run> <repo>`` that publishes a run's SAE.

Why a module of its own: an SAE on the Hub is never one file. The card's ``sae_final.pt`` carries no
layer, a ``sae.safetensors`` is useless without the ``cfg.json`` beside it, and a SAELens or sparsify
folder is two files whose names depend on the format. A spec names *where* the SAE is; this module
decides *which* files that needs, downloads exactly those at one pinned commit, and hands
:func:`mechlib.sae.load_sae` a local path plus what the path alone cannot say (the layer, the commit).

Spec syntax (``sae_pretrained`` and :func:`mechlib.sae.load_sae`)::

    hf:<owner>/<repo>[@<revision>][/<path-in-repo>]

    hf:caiovicentino1/Gemma-4-E4B-SAE-L21-topk/sae_final.pt     the card's checkpoint (layer from the name)
    hf:me/my-sae@v1.0                                           a SAELens folder at the repo root, tag v1.0
    hf:EleutherAI/sae-x@0123abc.../layers.15                    one sparsify hookpoint at a commit
    hf:me/my-sae@refs%2Fpr%2F1/sae.safetensors                  a '/' inside a revision is written %2F

Downloads use ``huggingface_hub.snapshot_download(allow_patterns=...)``: configs first (small), then
only the weights file the config calls for, pinned to the commit the first call resolved, so the two
never come from different commits. ``python -m mechlib.hub push`` (:mod:`mechlib.hub.push`) publishes a run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from huggingface_hub import snapshot_download

from mechlib.sae.interop import SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, layer_of_cfg
from mechlib.sae.model import SAEError

PREFIX = "hf:"
CARD_FILE = "sae_final.pt"  # the study card's checkpoint name
EXAMPLE = "hf:caiovicentino1/Gemma-4-E4B-SAE-L21-topk/sae_final.pt"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# a layer number in a repo or file name: "L21", "layer_21", "layers.21", "blocks.21"
_LAYER_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])(?:L|[Ll]ayers?[._-]?|blocks\.)(\d+)(?=$|[^0-9])")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf:<owner>/<repo>[@<revision>][/<path>]``; ``path`` is "" for the repo root."""

    repo_id: str
    revision: str | None
    path: str

    @classmethod
    def parse(cls, spec: str) -> HubSpec:
        if not spec.startswith(PREFIX):
            raise SAEError(f"'{spec}': a hub spec starts with '{PREFIX}'")
        parts = spec[len(PREFIX) :].split("/", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise SAEError(f"'{spec}': expected hf:<owner>/<repo>[@<revision>][/<path-in-repo>], e.g. {EXAMPLE}")
        name, _, revision = parts[1].partition("@")
        if not name or (parts[1].endswith("@") or "@" in revision):
            raise SAEError(f"'{spec}': expected one '@<revision>' after the repo name, e.g. hf:owner/repo@v1.0")
        path = parts[2].strip("/") if len(parts) == 3 else ""
        if any(p in ("", ".", "..") for p in path.split("/")) and path:
            raise SAEError(f"'{spec}': the path in the repo must not contain empty, '.' or '..' parts")
        return cls(f"{parts[0]}/{name}", unquote(revision) or None, path)

    @property
    def folder(self) -> str:
        """The folder in the repo that holds the SAE (the path itself, or its parent for a file)."""
        if not self.is_file:
            return self.path
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    @property
    def is_file(self) -> bool:
        return self.path.endswith((".pt", ".pth", ".safetensors"))

    def in_folder(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


@dataclass(frozen=True)
class Downloaded:
    """What :func:`download` fetched: the local path to hand to ``load_sae`` and the facts it cannot read."""

    path: Path  # a local file or folder, laid out as in the repo
    spec: HubSpec
    commit: str | None  # the commit the files came from (None when the hub did not say)
    files: tuple[str, ...]  # paths in the repo that were requested
    layer: int | None  # from the repo's config or, failing that, the repo/file name
    layer_from: str | None = None  # where ``layer`` came from, recorded in the SAE's meta

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hub_repo": self.spec.repo_id,
            "hub_revision": self.commit or self.spec.revision,
            "hub_files": list(self.files),
        }
        if self.layer is not None:
            out.update(layer=self.layer, layer_from=self.layer_from)
        return out


@dataclass
class _Fetch:
    """One repo at one revision; every call after the first is pinned to the first one's commit."""

    spec: HubSpec
    revision: str | None
    requested: list[str] = field(default_factory=list)
    root: Path | None = None

    def get(self, patterns: list[str]) -> Path:
        self.requested += [p for p in patterns if p not in self.requested]
        root = Path(snapshot_download(self.spec.repo_id, revision=self.revision, allow_patterns=patterns))
        if self.revision is None or not _COMMIT.match(self.revision):
            # the cache folder of a snapshot is named by its commit: pin the next call to it
            self.revision = root.name if _COMMIT.match(root.name) else self.revision
        self.root = root
        return root


def download(spec_text: str) -> Downloaded:
    """Download the files ``spec_text`` needs (see the module docstring) and say where they are.

    Any failure — offline, gated repo, missing file, unknown format — is one :class:`SAEError` line.
    """
    spec = HubSpec.parse(spec_text)
    fetch = _Fetch(spec, spec.revision)
    try:
        path = _fetch_file(fetch) if spec.is_file else _fetch_folder(fetch)
    except SAEError:
        raise
    except Exception as exc:  # offline mode, no network, gated repo, unknown revision: one message
        where = f"'{spec.path}' in " if spec.path else ""
        at = f" at revision '{spec.revision}'" if spec.revision else ""
        raise SAEError(
            f"could not download {where}the Hugging Face hub repo '{spec.repo_id}'{at} "
            f"({type(exc).__name__}: {_first_line(exc)}). Without network access, download the files "
            "elsewhere and set sae_pretrained to their local path."
        ) from None
    in_repo = path.relative_to(fetch.root).as_posix() if fetch.root else spec.path
    layer, layer_from = _layer(path, spec, "" if in_repo == "." else in_repo)
    return Downloaded(
        path,
        spec,
        fetch.revision if fetch.revision and _COMMIT.match(fetch.revision) else None,
        tuple(fetch.requested),
        layer,
        layer_from,
    )


def _fetch_file(fetch: _Fetch) -> Path:
    """A weights file and the ``cfg.json`` beside it (required for safetensors, optional for the card's .pt)."""
    spec = fetch.spec
    wanted = [spec.path, spec.in_folder(SAELENS_CFG)]
    if spec.path.endswith(".safetensors") or spec.path.endswith(CARD_FILE):
        wanted.append(spec.path + ".sha256")  # the book's checksum sidecar, when the repo has one
    root = fetch.get(wanted)
    local = root / spec.path
    if not local.is_file():
        raise SAEError(f"'{spec.path}' is not in the Hugging Face hub repo '{spec.repo_id}'" + _at(fetch))
    if local.suffix == ".safetensors" and not (root / spec.in_folder(SAELENS_CFG)).is_file():
        raise SAEError(
            f"'{spec.path}' in the hub repo '{spec.repo_id}' has no {SAELENS_CFG} beside it"
            f"{_at(fetch)}: a safetensors SAE needs its config"
        )
    return local


def _fetch_folder(fetch: _Fetch) -> Path:
    """A folder: read its configs, then fetch the one weights file they call for."""
    spec = fetch.spec
    root = fetch.get([spec.in_folder(SAELENS_CFG), spec.in_folder("*/" + SAELENS_CFG)])
    folder = root / spec.folder if spec.folder else root
    cfg = _read_cfg(folder / SAELENS_CFG)
    if cfg is not None:
        weights = weights_file(cfg)
        if weights is None:
            raise SAEError(
                f"'{spec.in_folder(SAELENS_CFG)}' in the hub repo '{spec.repo_id}' is neither a SAELens, "
                f"a sparsify nor a mechbook SAE config (keys {sorted(cfg)[:8]})"
            )
        fetch.get([spec.in_folder(weights)])
        return _must_exist(folder, weights, fetch)
    subs = (
        sorted(
            p.parent.name
            for p in folder.glob(f"*/{SAELENS_CFG}")
            if weights_file(_read_cfg(p) or {}) == SPARSIFY_WEIGHTS
        )
        if folder.is_dir()
        else []
    )
    if len(subs) == 1:
        fetch.get([spec.in_folder(f"{subs[0]}/{SPARSIFY_WEIGHTS}")])
        return _must_exist(folder / subs[0], SPARSIFY_WEIGHTS, fetch)
    if len(subs) > 1:
        raise SAEError(
            f"the hub repo '{spec.repo_id}' holds {len(subs)} sparsify hookpoints ({', '.join(subs)}); "
            f"name one, e.g. hf:{spec.repo_id}/{spec.in_folder(subs[0])}"
        )
    fetch.get([spec.in_folder(CARD_FILE), spec.in_folder(CARD_FILE + ".sha256")])
    return _must_exist(
        folder,
        CARD_FILE,
        fetch,
        looked_for=(f"{SAELENS_CFG} (SAELens, sparsify), layers.N/{SAELENS_CFG} (sparsify) or {CARD_FILE}"),
    )


def weights_file(cfg: dict[str, Any]) -> str | None:
    """The weights file a ``cfg.json`` belongs with: SAELens, sparsify's hookpoint, or the book's own."""
    if "d_in" in cfg and "d_sae" in cfg:
        return SAELENS_WEIGHTS
    if "d_in" in cfg and "num_latents" in cfg:
        return SPARSIFY_WEIGHTS
    if "d_model" in cfg and "d_sae" in cfg and "k" in cfg:
        return SPARSIFY_WEIGHTS  # the book's checkpoints/: sae.safetensors + cfg.json (same file name)
    return None


def _must_exist(folder: Path, name: str, fetch: _Fetch, looked_for: str | None = None) -> Path:
    if (folder / name).is_file():
        return folder
    spec = fetch.spec
    what = looked_for or spec.in_folder(name)
    raise SAEError(
        f"no SAE found in the hub repo '{spec.repo_id}'{' under ' + spec.folder if spec.folder else ''}"
        f"{_at(fetch)}: looked for {what}"
    )


def _at(fetch: _Fetch) -> str:
    return f" (revision {fetch.revision})" if fetch.revision else ""


def _read_cfg(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SAEError(f"{path}: could not read the SAE config ({type(exc).__name__}: {exc})") from None
    return cfg if isinstance(cfg, dict) else None


def _layer(path: Path, spec: HubSpec, in_repo: str) -> tuple[int | None, str | None]:
    """The layer the SAE reads: its config's, else the only layer number in the path or repo name.

    Why: the card's ``sae_final.pt`` holds tensors and ``k`` only, so without this the layer check
    against the run's ``layer`` would silently be skipped for exactly the study's own checkpoint.
    """
    cfg_file = (path if path.is_dir() else path.parent) / SAELENS_CFG
    layer = layer_of_cfg(_read_cfg(cfg_file) or {})
    if layer is not None:
        return layer, f"the {SAELENS_CFG} beside the weights"
    for text, where in ((in_repo, "the path in the repo"), (spec.repo_id.split("/", 1)[1], "the repo name")):
        found = {int(m) for m in _LAYER_IN_NAME.findall(text)}
        if len(found) == 1:
            return found.pop(), f"{where} ('{text}')"
    return None, None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def main(argv: list[str] | None = None) -> int:
    """``python -m mechlib.hub push RUN REPO [--revision R] [--private] [--dry-run]``; 0 done, 1 error."""
    # push needs the model card (the book's report layer): imported only when pushing, so that
    # ``load_sae("hf:…")`` (which imports this package) does not pull it in
    from mechlib.hub.push import PushError, find_run, plan_push, upload

    parser = argparse.ArgumentParser(prog="python -m mechlib.hub", description="Publish a run's SAE on the Hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload outputs/<run>'s SAE, steering vector, features and model card")
    push.add_argument("run", help="the run folder, e.g. outputs/default (or just the run name)")
    push.add_argument("repo", help="the Hugging Face repo, <owner>/<name> (created if missing)")
    push.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--dry-run", action="store_true", help="print what would be uploaded where, upload nothing")
    args = parser.parse_args(argv)
    try:
        plan = plan_push(find_run(args.run), args.repo, args.revision, args.private)
        print(plan.describe(), flush=True)
        if not args.dry_run:
            print(f"[mechbook] pushed: {upload(plan)}", flush=True)
    except (PushError, SAEError) as exc:
        print(f"[mechbook] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # no token, no network, no permission: one line, not a traceback
        print(
            f"[mechbook] error: upload to {args.repo} failed ({type(exc).__name__}: {_first_line(exc)})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0
