"""``python -m mechlib.hub push``: the plan (what goes where), the CLI's errors, and the commit it makes —
all offline: ``HfApi`` is replaced by a fake that writes the commit into a local folder, which the fake
hub of test_hub.py then serves back to ``load_sae("hf:...")``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_hub import COMMITS, FakeHub, _same_encoding

from mechlib import hub
from mechlib.hub import push as hub_push
from mechlib.hub.push import PushError, plan_push
from mechlib.paths import REPO_ROOT
from mechlib.sae import TopKSAE, load_sae, renorm_decoder_, save_card_checkpoint
from mechlib.sae.interop import HookInfo, export_sae

LAYER = 15


class FakeApi:
    """The three ``HfApi`` calls a push makes; the commit's files are copied into ``repos/<repo_id>/``."""

    def __init__(self, repos: Path) -> None:
        self.repos = repos
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id: str, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def create_commit(self, repo_id: str, operations, **kw):
        ops = list(operations)
        self.calls.append(("create_commit", {"repo_id": repo_id, "paths": [o.path_in_repo for o in ops], **kw}))
        for op in ops:
            dest = self.repos / repo_id / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, dest)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{'d' * 40}"})()


def _sae() -> TopKSAE:
    """The run's SAE, decoder rows renormalised as chapter 02 leaves them (so the export and sae_final.pt agree)."""
    sae = TopKSAE(16, 48, 4, seed=5)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(48, generator=torch.Generator().manual_seed(6)))
        sae.W_dec.mul_(1.5)
    renorm_decoder_(sae)
    return sae


def _run(tmp: Path, *, trained: bool = True, chapter05: bool = True) -> Path:
    root = tmp / "outputs" / "myrun"
    (root / "checkpoints").mkdir(parents=True)
    (root / "metrics").mkdir()
    params = yaml.safe_load((REPO_ROOT / "params" / "default.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "run": "myrun"}))
    export_sae(_sae(), root / "export", HookInfo("embedded:smollm2-135m-instruct", LAYER, 128, 2, True))
    if trained:
        save_card_checkpoint(_sae(), root / "checkpoints" / "sae_final.pt", renorm=False)
    if chapter05:
        torch.save(torch.ones(16) / 4, root / "checkpoints" / "steering_vec_L22.pt")
        (root / "checkpoints" / "steering_vec_L22.json").write_text(json.dumps({"layer": 22}))
        (root / "metrics" / f"contrastive_features_L{LAYER}.json").write_text(json.dumps({"features": []}))
    return root


def test_plan_lists_every_file_and_where_it_goes(tmp_path: Path) -> None:
    root = _run(tmp_path)
    plan = plan_push(root, "me/sae", "v1", private=True)
    assert {u.in_repo: u.local.relative_to(root).as_posix() for u in plan.uploads} == {
        "cfg.json": "export/cfg.json",
        "sae_weights.safetensors": "export/sae_weights.safetensors",
        "layers.15/cfg.json": "export/layers.15/cfg.json",
        "layers.15/sae.safetensors": "export/layers.15/sae.safetensors",
        "sae_final.pt": "checkpoints/sae_final.pt",
        "sae_final.pt.sha256": "checkpoints/sae_final.pt.sha256",
        "steering_vec_L22.pt": "checkpoints/steering_vec_L22.pt",
        "steering_vec_L22.json": "checkpoints/steering_vec_L22.json",
        "contrastive_features_L15.json": "metrics/contrastive_features_L15.json",
        "README.md": "MODEL_CARD.md",
    }
    assert plan.skipped == () and (plan.revision, plan.private) == ("v1", True)
    text = plan.describe()
    assert text.startswith(f"push {root} -> me/sae@v1 (private): 10 files")
    assert "README.md" in text and "<- MODEL_CARD.md" in text


def test_pretrained_partial_run_says_what_it_skips(tmp_path: Path) -> None:
    plan = plan_push(_run(tmp_path, trained=False, chapter05=False), "me/sae")
    assert {u.in_repo for u in plan.uploads} == {
        "cfg.json",
        "sae_weights.safetensors",
        "layers.15/cfg.json",
        "layers.15/sae.safetensors",
        "README.md",
    }
    assert [s.split(" ")[0] for s in plan.skipped] == [
        "sae_final.pt",
        "steering_vec_L*.pt",
        "contrastive_features_L*.json",
    ]


def test_missing_run_or_export_or_bad_repo_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert hub.main(["push", str(tmp_path / "nope"), "me/sae"]) == 1
    assert (
        capsys.readouterr().err.strip() == f"[mechbook] error: {tmp_path / 'nope'}: no such run folder "
        "(expected outputs/<run>, written by python -m mechlib.book)"
    )
    root = _run(tmp_path)
    shutil.rmtree(root / "export")
    assert hub.main(["push", str(root), "me/sae"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export: no SAE export" in err and "--only 02" in err
    with pytest.raises(PushError, match="not a Hugging Face repo id"):
        plan_push(root, "me/x/y")
    with pytest.raises(PushError, match="<owner>/<name>"):
        plan_push(root, "just-a-name")


def test_dry_run_prints_the_plan_and_uploads_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    root = _run(tmp_path)
    monkeypatch.setattr(hub_push, "HfApi", lambda: pytest.fail("a dry run must not contact the Hub"))
    assert hub.main(["push", str(root), "me/sae", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"push {root} -> me/sae: 10 files") and "sae_weights.safetensors" in out
    assert not (root / "MODEL_CARD.md").exists()


def test_push_commits_the_plan_and_the_hub_copy_loads_back(tmp_path: Path, capsys, monkeypatch) -> None:
    root = _run(tmp_path)
    api = FakeApi(tmp_path / "repos")
    monkeypatch.setattr(hub_push, "HfApi", lambda: api)
    assert hub.main(["push", str(root), "me/sae", "--revision", "v1", "--private"]) == 0
    assert "pushed: https://huggingface.co/me/sae/commit/" in capsys.readouterr().out
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/sae", "private": True, "exist_ok": True}
    assert api.calls[1][1] == {"repo_id": "me/sae", "branch": "v1", "exist_ok": True}
    commit = api.calls[2][1]
    assert commit["revision"] == "v1" and sorted(commit["paths"]) == sorted(
        u.in_repo for u in plan_push(root, "me/sae").uploads
    )
    readme = (tmp_path / "repos" / "me/sae" / "README.md").read_text()
    assert readme == (root / "MODEL_CARD.md").read_text() and 'snapshot_download("me/sae")' in readme
    fake = FakeHub(tmp_path / "cache")  # now read it back as a user would
    fake.add("me/sae", tmp_path / "repos" / "me/sae", "v1")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    for spec in ("hf:me/sae@v1", "hf:me/sae@v1/layers.15", "hf:me/sae@v1/sae_final.pt"):
        back = load_sae(spec)
        _same_encoding(_sae(), back)
        assert back.meta["layer"] == LAYER and back.meta["hub_revision"] == COMMITS["v1"], spec
