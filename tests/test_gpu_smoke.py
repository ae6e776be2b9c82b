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
