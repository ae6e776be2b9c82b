"""The prepared GPU smoke run (issue 10): its params hold the study's shapes, and its summary reads a
stopped run. The run itself needs a GPU (benchmarks/gpu_book.sh; DRY_RUN=1 runs it on CPU)."""

from __future__ import annotations

import importlib.util
import json

from mechlib import device_stats
from mechlib.models import model_shape
from mechlib.params import load_params
from mechlib.paths import PARAMS_DIR, REPO_ROOT, RunPaths


def summary_module():
    spec = importlib.util.spec_from_file_location("gpu_book_summary", REPO_ROOT / "benchmarks" / "gpu_book_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_params_are_the_studys_shapes_on_a_random_e4b():
    p = load_params(PARAMS_DIR / "gpu_smoke_e4b.yaml")
    study = load_params(PARAMS_DIR / "gemma4_e4b.yaml")
    assert p.model == "random:gemma-4-e4b" and model_shape(p.model) == (42, 2560)
    assert (p.model_dtype, p.device, p.collect_mode, p.placeholder_labels) == ("bfloat16", "cuda", "disk", 0.5)
    for key in (
        "layer",
        "seq_len",
        "d_sae",
        "k",
        "k_aux",
        "train_batch_size",
        "max_new_tokens",
        "steering_scales",
        "prompt_format",
    ):
        assert getattr(p, key) == getattr(study, key), key
    assert p.task == "arithmetic" and not p.gsm8k_path  # no hub on the GPU machine


def test_summary_reads_chapter_times_from_the_log_and_devices_from_the_kernels(tmp_path, monkeypatch):
    import mechlib.paths

    monkeypatch.setattr(mechlib.paths, "OUTPUTS_DIR", tmp_path / "outputs")
    mod = summary_module()
    log = tmp_path / "book.log"
    log.write_text(
        "[mechbook] smoke: running 01_collect ...\n"
        "[mechbook] smoke: 01_collect done in 41.5 s -> x.ipynb\n"
        "[mechbook] smoke: running 02_train_sae ...\n"
    )  # stopped by its time limit in 02
    paths = RunPaths("smoke").make()
    for chapter, peak in (("01_collect", 2**30), ("02_train_sae", 2**31)):
        (paths.metrics / f".device_{chapter}.json").write_text(
            json.dumps(device_stats.ChapterDevice("cuda", "NVIDIA H200", peak, "2.11", "13.0").as_dict())
        )
    assert mod.chapter_times(log) == {"01_collect": 41.5}
    devices = mod.chapter_devices(paths)
    assert devices["02_train_sae"]["peak_gpu_bytes"] == 2**31 and devices["01_collect"]["device"] == "cuda"


def test_summary_reports_chapter_08_apart_from_the_seven(tmp_path, monkeypatch):
    """gpu_book.sh runs chapters 01-07, then 08 in the time they left: a failed 08 says why in its own
    entry, and the book's rc stays the seven's."""
    import argparse

    import mechlib.paths

    monkeypatch.setattr(mechlib.paths, "OUTPUTS_DIR", tmp_path / "outputs")
    mod = summary_module()
    RunPaths("smoke").make()
    book = tmp_path / "book.log"
    book.write_text("".join(f"[mechbook] smoke: 0{n}_x done in {n}.0 s -> x.ipynb\n" for n in range(1, 8)))
    ch08 = tmp_path / "book08.log"
    ch08.write_text("[mechbook] smoke: running 08_feature_reward ...\nModuleNotFoundError: No module named 'trl'\n")
    args = argparse.Namespace(
        run="smoke",
        params="params/gpu_smoke_e4b.yaml",
        book_log=str(book),
        book_rc=0,
        book_seconds=40,
        book_limit=480,
        ch08_log=str(ch08),
        ch08_rc=1,
        ch08_seconds=9,
        ch08_limit=300,
        torchrun_log=str(tmp_path / "absent.log"),
        torchrun_rc=0,
        torchrun_seconds=8,
    )
    summary = mod.summarize(args)
    assert summary["book"]["chapters_finished"] == 7 and summary["book"]["rc"] == 0
    assert summary["chapter_08"]["rc"] == 1 and summary["chapter_08"]["finished"] is False
    assert summary["chapter_08"]["log_tail"][-1] == "ModuleNotFoundError: No module named 'trl'"
    ch08.write_text("[mechbook] smoke: 08_feature_reward done in 61.0 s -> x.ipynb\n")
    summary = mod.summarize(args)
    assert summary["chapter_08"]["finished"] is True and summary["book"]["chapters_finished"] == 8
