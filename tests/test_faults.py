"""Kill -9 and resume: a collection and a training run, SIGKILLed at an arbitrary point, then rerun,
end exactly where an uninterrupted run ends (bit-identical on CPU with fixed seeds).

The killed runs are real subprocesses (``python -m mechlib.scale ...``, what a preempted user runs);
the kill point is random but always mid-run: after the k-th shard of the manifest (k drawn at
random) for collection, and a random delay after the first periodic checkpoint for training. A
corrupted shard met by a later command is named in one error message, and nothing is written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_run import one_thread, write_params

from mechlib.paths import REPO_ROOT

SEED = int(os.environ.get("MECHBOOK_FAULT_SEED", time.time_ns() % 10_000))
FAULT_SIZES = dict(collect_tokens=6000, train_tokens=64 * 150, checkpoint_every=5)


def _start(args: list[str], outputs: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MECHBOOK_OUTPUTS": str(outputs),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "wb") as fh:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(
            [sys.executable, "-m", "mechlib.scale", *args, "--no-progress"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` (True); False if it finished cleanly first (this poller came too
    late: a fast or loaded machine); fail if it failed or hung."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            rc = proc.wait(30)
            assert rc in (-signal.SIGKILL, 0), f"rc={rc}:\n{log.read_text()[-3000:]}"
            return rc == -signal.SIGKILL  # 0: it exited between ready() and the kill
        if proc.poll() is not None:
            assert proc.returncode == 0, f"run failed (rc={proc.returncode}):\n{log.read_text()[-3000:]}"
            return False
        time.sleep(0.003)
    proc.kill()
    pytest.fail(f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}")


KILL_TRIES = 3  # a kill that came after the run's end is retried at an earlier point, never skipped


def _manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def outputs(monkeypatch, tmp_path):
    """Point mechlib.paths at an output root; returns a function that switches it."""
    from mechlib import paths

    def use(name: str) -> Path:
        root = tmp_path / name
        monkeypatch.setattr(paths, "OUTPUTS_DIR", root)
        return root

    return use


def test_collection_killed_and_rerun_equals_uninterrupted(tmp_path, outputs):
    from mechlib import scale

    params = write_params(tmp_path, "fault", n_docs=600, **FAULT_SIZES)
    clean = outputs("clean")
    scale.collect(params, progress=False)
    want = json.loads((clean / "fault/activations/train/manifest.json").read_text())
    n_shards = len(want["shards"])
    assert n_shards >= 20
    kill_after = random.Random(SEED).randint(1, n_shards // 2)

    killed = outputs("killed")
    train_dir = killed / "fault/activations/train"
    for _ in range(KILL_TRIES):  # ~4 ms a shard here: half the run is ~0.1 s, which a busy poller can miss
        shutil.rmtree(killed, ignore_errors=True)
        proc = _start(["collect", str(params)], killed, tmp_path / "collect.log")
        hit = _kill_when(
            proc,
            lambda at=kill_after: len((_manifest(train_dir / "manifest.json") or {}).get("shards", [])) >= at,
            tmp_path / "collect.log",
        )
        at_kill = _manifest(train_dir / "manifest.json")
        if hit and at_kill is not None and not at_kill["complete"]:
            break
        kill_after = max(1, kill_after // 4)
    else:
        pytest.fail(f"seed {SEED}: {KILL_TRIES} kills all came after the collection had finished")

    summary = scale.collect(params, progress=False)  # the rerun resumes
    assert 0 < summary["train"]["computed_tokens_rank0"] < FAULT_SIZES["collect_tokens"], summary
    got = json.loads((train_dir / "manifest.json").read_text())
    assert got == want, f"seed {SEED}: resumed manifest differs from the uninterrupted one"
    for split in ("train", "heldout"):
        folder = killed / "fault/activations" / split
        assert not list(folder.glob(".*.tmp")), "a half-written temporary file survived the rerun"
        assert sorted(p.name for p in folder.glob("shard_*")) == sorted(
            e["file"] for e in json.loads((folder / "manifest.json").read_text())["shards"]
        )


def test_training_killed_and_rerun_equals_uninterrupted(tmp_path, outputs):
    from mechlib import scale

    params = write_params(tmp_path, "fault", **FAULT_SIZES | {"collect_tokens": 1200})
    clean = outputs("clean")
    scale.collect(params, progress=False)
    scale.train(params, progress=False)
    killed = outputs("killed")
    shutil.copytree(clean / "fault/activations", killed / "fault/activations")
    ckpt = killed / "fault/checkpoints"
    delay = random.Random(SEED).uniform(0.0, 0.2)
    for _ in range(KILL_TRIES):  # ~1 s of training after the first checkpoint here; less on a faster machine
        shutil.rmtree(ckpt, ignore_errors=True)
        first_seen: list[float] = []

        def ready(wait: float = delay, first_seen: list[float] = first_seen) -> bool:
            if not first_seen and (ckpt / "train_state.pt").is_file():
                first_seen.append(time.monotonic())
            return bool(first_seen) and time.monotonic() - first_seen[0] >= wait

        proc = _start(["train", str(params)], killed, tmp_path / "train.log")
        if _kill_when(proc, ready, tmp_path / "train.log") and not (ckpt / "sae_final.pt").exists():
            break
        delay /= 10
    else:
        pytest.fail(f"seed {SEED}: {KILL_TRIES} kills all came after training had finished")

    summary = scale.train(params, progress=False)  # the rerun resumes from the last checkpoint
    total = FAULT_SIZES["train_tokens"] // 64
    assert 5 <= summary["resumed_from"] < total and summary["steps"] == total, summary
    want = torch.load(clean / "fault/checkpoints/sae_final.pt")
    got = torch.load(ckpt / "sae_final.pt")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(got[key], want[key]), f"seed {SEED}: {key} differs after kill and resume"
    assert got["k"] == want["k"]
    history = [json.loads((root / "fault/checkpoints/train_history.json").read_text()) for root in (clean, killed)]
    assert history[0] == history[1]
    assert not list(ckpt.glob(".*.tmp")), "a temporary file of a killed checkpoint write survived the rerun"


def test_corrupt_shard_named_by_the_next_command(tmp_path, outputs, capsys):
    """Training on a collection whose shard was damaged after the fact: one message naming the file,
    exit code 1, and no checkpoint written."""
    from mechlib import scale

    params = write_params(tmp_path, "corrupt", collect_tokens=1200, train_tokens=64 * 10)
    root = outputs("out")
    scale.collect(params, progress=False)
    shard = root / "corrupt/activations/train/shard_00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x55
    shard.write_bytes(bytes(data))
    assert scale.main(["train", str(params), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard_00003.safetensors" in err and "corrupt" in err, err
    assert not list((root / "corrupt/checkpoints").glob("*.pt"))
    # A truncated shard (a copy cut short, a full disk) is caught the same way.
    shard.write_bytes(bytes(data[: len(data) // 3]))
    assert scale.main(["collect", str(params), "--no-progress"]) == 1
    assert "shard_00003.safetensors" in capsys.readouterr().err


SLOW_CHAPTER = """# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% tags=["parameters"]
run = "default"

# %%
print("first cell done", flush=True)

# %%
import time
time.sleep(120)
"""


def test_book_runner_killed_mid_chapter_leaves_no_truncated_notebook(tmp_path):
    """papermill rewrites its output after every cell; the runner points it at a hidden partial file,
    so a kill leaves the previous complete notebook (here a stand-in) untouched."""
    import nbformat

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_slow.py").write_text(SLOW_CHAPTER)
    params = tmp_path / "slow.yaml"
    params.write_text("seed: 1\n")
    out = tmp_path / "outputs/slow/notebooks"
    out.mkdir(parents=True)
    previous = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("a finished earlier run")])
    nbformat.write(previous, out / "01_slow.ipynb")
    before = (out / "01_slow.ipynb").read_bytes()
    env = {**os.environ, "MECHBOOK_OUTPUTS": str(tmp_path / "outputs"), "TQDM_DISABLE": "1"}
    code = (
        f"from mechlib.book import run_book; "
        f"run_book({str(params)!r}, notebooks_dir=__import__('pathlib').Path({str(nbdir)!r}))"
    )
    log = tmp_path / "book.log"
    with open(log, "wb") as fh:  # its own session, so the kernel it starts is killed with it
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    partial = out / ".01_slow.partial.json"
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_file() and "first cell done" in partial.read_text(errors="replace")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the chapter never got past its first cell"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert (out / "01_slow.ipynb").read_bytes() == before
    assert [p.name for p in out.glob("*.ipynb")] == ["01_slow.ipynb"]  # nbval sees no partial notebook


def test_training_removes_temporaries_of_a_write_killed_midway(tmp_path):
    """A kill inside an atomic write leaves ``.<name>.<random>.tmp`` (a full train_state of the study's
    SAE is ~2 GB); the next run removes ours and leaves other files alone."""
    from mechlib.activations.stores import TensorStore
    from mechlib.sae.train import TrainConfig, train_sae

    ours = tmp_path / ".train_state.pt.k3j9.tmp"
    ours.write_bytes(b"half a checkpoint")
    other = tmp_path / ".steering_vec_L3.pt.x1.tmp"  # another chapter's file in the same folder
    other.write_bytes(b"not ours")
    cfg = TrainConfig(d_sae=16, k=2, train_batch_size=16, train_tokens=32, warmup_steps=1, init_b_dec="zeros")
    train_sae(TensorStore(torch.randn(64, 8)), cfg, tmp_path, device="cpu", progress=False)
    assert not ours.exists() and other.exists()
    assert (tmp_path / "sae_final.pt").is_file()


# Every write in the library, chapters and benchmarks goes through mechlib.io's atomic helpers. The
# few raw writes below are atomic by other means, each with its reason.
RAW_WRITE = (
    r"torch\.save\(|\.write_text\(|\.write_bytes\(|save_file\(|\.savefig\(|json\.dump\(|np\.save\(|"
    r"\.to_csv\(|open\([^)]*['\"][wax]b?\+?['\"]|execute_notebook\(|save_pretrained\("
)
ALLOWED = {
    ("mechlib/io.py", "*"): "the atomic helpers themselves",
    ("mechlib/plots.py", ".savefig("): "inside io.atomic_path",
    ("mechlib/models.py", "save_pretrained("): "into a temporary folder renamed into place",
    ("mechlib/models.py", ".write_text("): "the marker file, inside that temporary folder",
    ("mechlib/grpo.py", "save_pretrained("): "a GRPO arm's adapter, into a temporary folder renamed into place",
    ("mechlib/grpo.py", ".write_text("): "the arm's JSON, inside that temporary folder",
    ("mechlib/book.py", "execute_notebook("): "to a hidden partial file, os.replace'd at the end",
    ("mechlib/runlock.py", "open("): "the lock must be created with O_CREAT|O_EXCL (a rename would overwrite a "
    "rival's lock); readers treat an empty lock file as being written",
    ("mechlib/runlock.py", "json.dump("): "into that exclusively created lock file",
}


def test_every_writer_is_atomic():
    import re

    offenders = []
    files = [*REPO_ROOT.glob("mechlib/**/*.py"), *REPO_ROOT.glob("notebooks/*.py"), *REPO_ROOT.glob("benchmarks/*.py")]
    for path in files:
        rel = path.relative_to(REPO_ROOT).as_posix()
        if (rel, "*") in ALLOWED:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in re.finditer(RAW_WRITE, code):
                token = m.group(0)
                if not any(rel == f and token.startswith(t.rstrip("(")) for f, t in ALLOWED):
                    offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "raw (non-atomic) writes; use mechlib.io:\n" + "\n".join(offenders)


def test_killed_data_parallel_collection_resumes_in_one_process(tmp_path, tiny_llama):
    """A torchrun collection killed before rank 0's merge leaves only ``manifest.rank<r>.json`` files.
    A rerun (here with one process) trusts the shards they list, computes only the rest, and ends with
    the manifest an uninterrupted run writes; the per-rank files are gone."""
    from mechlib.activations.collect import collect_activations
    from mechlib.activations.shards import ShardError
    from mechlib.scale import merge_rank_manifests

    model, tok = tiny_llama
    small = dict(layer=1, n_tokens=700, seq_len=32, batch_size=4, shard_tokens=128, progress=False)
    want = collect_activations(model, tok, tmp_path / "clean", **small).manifest
    folder = tmp_path / "killed"
    rank0 = collect_activations(model, tok, folder, rank=0, world_size=2, **small)  # rank 1 never ran
    assert not (folder / "manifest.json").exists() and (folder / "manifest.rank0.json").is_file()
    assert {e["index"] % 2 for e in rank0.manifest["shards"]} == {0}
    with pytest.raises(ShardError, match=r"manifest\.rank1\.json.*missing"):
        merge_rank_manifests(folder, 2)  # rank 0 would refuse to merge an unfinished collection
    rerun = collect_activations(model, tok, folder, **small)
    assert rerun.computed_tokens == 700 - rank0.manifest["n_tokens"] > 0
    assert json.loads((folder / "manifest.json").read_text()) == want
    assert not list(folder.glob("manifest.rank*.json"))
