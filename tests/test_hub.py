"""``hf:`` specs download every file their format needs, at one pinned revision, and keep the layer.

Offline: ``huggingface_hub.snapshot_download`` is replaced by :class:`FakeHub`, which serves local
folders as repos (one folder per revision) and copies the files an ``allow_patterns`` call matches into
a snapshot folder named by the commit, as the real cache does. Each test checks which files and which
revision were asked for, and that the SAE loaded from the "Hub" encodes exactly like the original.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mechlib import hub
from mechlib.hub import HubSpec
from mechlib.sae import SAEError, TopKSAE, check_compatible, load_sae, save_card_checkpoint, save_sae
from mechlib.sae.interop import HookInfo, export_sae

D, M, K, LAYER = 16, 48, 4, 15
HOOK = HookInfo("embedded:smollm2-135m-instruct", LAYER, 64, 2, True)
COMMITS = {"main": "a" * 40, "v1": "b" * 40, "refs/pr/1": "c" * 40}


@dataclass(frozen=True)
class Call:
    repo_id: str
    revision: str | None
    patterns: tuple[str, ...]


class FakeHub:
    """``snapshot_download`` over local folders: ``repos[repo_id][revision name] = folder``."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: dict[str, dict[str, Path]] = {}
        self.calls: list[Call] = []

    def add(self, repo_id: str, folder: Path, revision: str = "main") -> None:
        self.repos.setdefault(repo_id, {})[revision] = folder

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns=None, **_: object) -> str:
        self.calls.append(Call(repo_id, revision, tuple(allow_patterns or ())))
        if repo_id not in self.repos:
            raise FileNotFoundError(f"404 Client Error: Repository Not Found for url .../{repo_id}")
        by_commit = {COMMITS[name]: name for name in self.repos[repo_id]}
        name = by_commit.get(revision or "", revision or "main")
        if name not in self.repos[repo_id]:
            raise FileNotFoundError(f"404 Client Error: Revision Not Found: {revision}")
        src, commit = self.repos[repo_id][name], COMMITS[name]
        dest = self.cache / repo_id.replace("/", "--") / "snapshots" / commit
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest / rel)
        dest.mkdir(parents=True, exist_ok=True)
        return str(dest)

    def requested(self) -> list[str]:
        return [p for c in self.calls for p in c.patterns]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    f = FakeHub(tmp_path / "cache")
    monkeypatch.setattr(hub, "snapshot_download", f)
    return f


def _sae(seed: int = 3) -> TopKSAE:
    sae = TopKSAE(D, M, K, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn(D, M, generator=gen))
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=gen))
        sae.b_dec.copy_(torch.randn(D, generator=gen))
    return sae


def _same_encoding(a: TopKSAE, b: TopKSAE) -> None:
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(9)) * 2
    ca, cb = a.encode(x), b.encode(x)
    assert torch.equal(ca.values, cb.values) and torch.equal(ca.indices, cb.indices)
    assert torch.equal(a.W_dec, b.W_dec)


@pytest.mark.parametrize(
    "spec, repo, revision, path",
    [
        ("hf:me/sae", "me/sae", None, ""),
        ("hf:me/sae@v1.0", "me/sae", "v1.0", ""),
        ("hf:me/sae/layers.15", "me/sae", None, "layers.15"),
        ("hf:me/sae@0123/sub/dir/sae_final.pt", "me/sae", "0123", "sub/dir/sae_final.pt"),
        ("hf:me/sae@refs%2Fpr%2F1/sae.safetensors", "me/sae", "refs/pr/1", "sae.safetensors"),
    ],
)
def test_spec_syntax(spec: str, repo: str, revision: str | None, path: str) -> None:
    assert HubSpec.parse(spec) == HubSpec(repo, revision, path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf:only-a-repo", "expected hf:<owner>/<repo>"),
        ("hf:me/sae@", "one '@<revision>'"),
        ("hf:me/sae@a@b", "one '@<revision>'"),
        ("hf:me/sae/../x.pt", "must not contain"),
    ],
)
def test_bad_specs_are_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(SAEError, match=message):
        load_sae(spec)


def test_saelens_folder_fetches_config_then_its_weights_at_the_same_commit(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    export_sae(sae, tmp_path / "repo", HOOK)  # SAELens files at the root, sparsify's in layers.15/
    fake.add("me/sae", tmp_path / "repo")
    back = load_sae("hf:me/sae")
    assert fake.calls == [
        Call("me/sae", None, ("cfg.json", "*/cfg.json")),
        Call("me/sae", COMMITS["main"], ("sae_weights.safetensors",)),
    ]
    _same_encoding(sae, back)
    assert back.meta["format"] == "saelens" and back.meta["layer"] == LAYER
    assert back.meta["hub_repo"] == "me/sae" and back.meta["hub_revision"] == COMMITS["main"]


def test_revision_is_passed_and_pinned(fake: FakeHub, tmp_path: Path) -> None:
    old, new = _sae(3), _sae(7)
    export_sae(old, tmp_path / "v1", HOOK)
    export_sae(new, tmp_path / "main", HOOK)
    fake.add("me/sae", tmp_path / "main")
    fake.add("me/sae", tmp_path / "v1", "v1")
    back = load_sae("hf:me/sae@v1")
    assert [c.revision for c in fake.calls] == ["v1", COMMITS["v1"]]
    _same_encoding(old, back)
    assert back.meta["hub_revision"] == COMMITS["v1"]
    fake.add("me/sae", tmp_path / "v1", "refs/pr/1")
    load_sae("hf:me/sae@refs%2Fpr%2F1")
    assert fake.calls[-2].revision == "refs/pr/1"


def test_sparsify_hookpoint_folder(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    export_sae(sae, tmp_path / "repo", HOOK)
    for name in ("cfg.json", "sae_weights.safetensors"):  # sparsify's own layout: hookpoint folders only
        (tmp_path / "repo" / name).unlink()
    fake.add("eleuther/sae", tmp_path / "repo")
    back = load_sae("hf:eleuther/sae/layers.15")
    assert fake.requested() == ["layers.15/cfg.json", "layers.15/*/cfg.json", "layers.15/sae.safetensors"]
    _same_encoding(sae, back)
    assert back.meta["format"] == "sparsify" and back.meta["layer"] == LAYER
    fake.calls.clear()
    root = load_sae("hf:eleuther/sae")  # the root with one hookpoint: that one
    assert fake.requested() == ["cfg.json", "*/cfg.json", "layers.15/sae.safetensors"]
    _same_encoding(sae, root)


def test_sparsify_root_with_two_hookpoints_names_them(fake: FakeHub, tmp_path: Path) -> None:
    export_sae(_sae(), tmp_path / "repo", HOOK)
    export_sae(_sae(), tmp_path / "repo", HookInfo("m", 3, 64, 0, False))
    for name in ("cfg.json", "sae_weights.safetensors"):
        (tmp_path / "repo" / name).unlink()
    fake.add("eleuther/sae", tmp_path / "repo")
    with pytest.raises(SAEError, match=r"2 sparsify hookpoints \(layers.15, layers.3\).*hf:eleuther/sae/layers.15"):
        load_sae("hf:eleuther/sae")
    assert not any("sae.safetensors" in p for p in fake.requested())  # no weights downloaded for nothing


def test_card_checkpoint_gets_its_layer_from_the_repo_name(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    save_card_checkpoint(sae, tmp_path / "repo" / "sae_final.pt")  # tensors and k only: no layer inside
    fake.add("someone/Tiny-SAE-L15-topk", tmp_path / "repo")
    back = load_sae("hf:someone/Tiny-SAE-L15-topk/sae_final.pt")
    assert fake.requested() == ["sae_final.pt", "cfg.json", "sae_final.pt.sha256"]
    _same_encoding(sae, back)
    assert back.meta["layer"] == LAYER and "repo name" in back.meta["layer_from"]
    check_compatible(back, D, LAYER)
    with pytest.raises(SAEError, match="trained on layer 15 but the run uses layer 3"):
        check_compatible(back, D, 3)


def test_card_checkpoint_beside_a_saelens_config_takes_its_hook_layer(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    export_sae(sae, tmp_path / "repo", HOOK)  # what `mechlib.hub push` uploads: export + sae_final.pt
    save_card_checkpoint(sae, tmp_path / "repo" / "sae_final.pt")
    fake.add("me/sae-no-layer-in-name", tmp_path / "repo")
    back = load_sae("hf:me/sae-no-layer-in-name/sae_final.pt")
    assert back.meta["layer"] == LAYER
    _same_encoding(sae, back)


def test_card_checkpoint_found_in_a_folder_without_configs(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    save_card_checkpoint(sae, tmp_path / "repo" / "L15" / "sae_final.pt")
    fake.add("me/sae", tmp_path / "repo")
    back = load_sae("hf:me/sae/L15")
    assert fake.requested()[-2:] == ["L15/sae_final.pt", "L15/sae_final.pt.sha256"]
    assert back.meta["layer"] == LAYER
    _same_encoding(sae, back)


def test_book_safetensors_downloads_its_config(fake: FakeHub, tmp_path: Path) -> None:
    sae = _sae()
    save_sae(sae, tmp_path / "repo" / "checkpoints", {"layer": LAYER, "model": "m"})
    fake.add("me/sae", tmp_path / "repo")
    back = load_sae("hf:me/sae/checkpoints/sae.safetensors")
    assert fake.requested() == [
        "checkpoints/sae.safetensors",
        "checkpoints/cfg.json",
        "checkpoints/sae.safetensors.sha256",
    ]
    _same_encoding(sae, back)
    (tmp_path / "repo" / "checkpoints" / "cfg.json").unlink()
    shutil.rmtree(fake.cache)
    with pytest.raises(SAEError, match=r"has no cfg.json beside it"):
        load_sae("hf:me/sae/checkpoints/sae.safetensors")


def test_missing_files_and_failed_downloads_are_one_line(fake: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    fake.add("me/empty", tmp_path / "empty")
    with pytest.raises(SAEError, match=r"no SAE found in the hub repo 'me/empty'.*looked for") as info:
        load_sae("hf:me/empty")
    assert "\n" not in str(info.value)
    with pytest.raises(SAEError, match=r"'x.pt' is not in the Hugging Face hub repo 'me/empty'"):
        load_sae("hf:me/empty/x.pt")
    with pytest.raises(SAEError, match=r"could not download .*'me/gone'.*Repository Not Found.*local path") as info:
        load_sae("hf:me/gone@v2/sae_final.pt")
    assert "revision 'v2'" in str(info.value) and "\n" not in str(info.value)


def test_unknown_config_is_refused(fake: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "cfg.json").write_text(json.dumps({"hidden_size": 8}))
    fake.add("me/model", tmp_path / "repo")
    with pytest.raises(SAEError, match="neither a SAELens, a sparsify nor a mechbook SAE config"):
        load_sae("hf:me/model")
