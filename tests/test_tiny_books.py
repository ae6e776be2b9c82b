"""Checks on the tiny random-weight books that `make test` runs (params/tiny_gemma4.yaml, tiny_qwen35.yaml).

Why: those books run every chapter on the study's architecture classes (Gemma 4 through
``language_model``, per-layer inputs, KV-shared layers, the softcap; Qwen 3.5's hybrid layers) with
placeholder labels. Running is half the check; these tests assert that the outputs say what they
are — the device each chapter ran on, and "placeholder" on every product of chapters 05–06 — and
that the placeholder labels are the documented seeded fraction.

Run folders: ``MECHBOOK_TINY_RUNS`` (comma-separated ``params-stem=run-folder`` pairs), by default
what `make test` writes: ``tiny_gemma4=test-tiny_gemma4,tiny_qwen35=test-tiny_qwen35``.
"""

from __future__ import annotations

import json
import os

import pytest

from mechlib.models import model_shape
from mechlib.params import load_params
from mechlib.paths import PARAMS_DIR, RunPaths

pytestmark = pytest.mark.book_outputs

RUNS = dict(
    pair.split("=", 1)
    for pair in os.environ.get("MECHBOOK_TINY_RUNS", "tiny_gemma4=test-tiny_gemma4,tiny_qwen35=test-tiny_qwen35").split(
        ","
    )
)
CHAPTERS = [
    "01_collect",
    "02_train_sae",
    "03_evaluate_sae",
    "04_gsm8k_baseline",
    "05_contrastive_layers",
    "06_steering",
    "07_logit_lens",
    "08_feature_reward",
]


@pytest.fixture(params=sorted(RUNS), ids=str)
def book(request):
    params = load_params(PARAMS_DIR / f"{request.param}.yaml", run=RUNS[request.param])
    paths = RunPaths(params.run)
    assert (paths.metrics / "book_timings.json").is_file(), (
        f"{paths.root} has no finished book: "
        f"run `python -m mechlib.book params/{request.param}.yaml --run {params.run}`"
    )
    return params, paths


def load(paths: RunPaths, name: str) -> dict:
    return json.loads((paths.metrics / f"{name}.json").read_text())


def test_every_chapter_ran_and_recorded_its_device(book):
    _params, paths = book
    assert list(load(paths, "book_timings")) == CHAPTERS
    devices = load(paths, "book_devices")
    assert sorted(devices) == CHAPTERS
    for chapter, d in devices.items():
        assert d["device"] in ("cpu", "cuda"), chapter
        assert (d["peak_gpu_bytes"] is None) == (d["device"] == "cpu"), chapter
    report = (paths.root / "REPORT.md").read_text()
    assert "| 08_feature_reward |" in report and ("| cpu (" in report or "| cuda (" in report)


def test_placeholder_labels_are_the_seeded_fraction(book):
    params, paths = book
    assert params.model.startswith("random:") and 0 < params.placeholder_labels < 1
    m04, m05, m06 = load(paths, "04_gsm8k_baseline"), load(paths, "05_contrastive_layers"), load(paths, "06_steering")
    assert m04["placeholder_labels"] == params.placeholder_labels
    n_correct = m05["n_correct"] + round(m06["baseline_accuracy"] * m06["n_heldout"])
    assert n_correct == round(params.placeholder_labels * m04["n"])  # exact, over contrast + held-out


def test_every_output_of_chapters_05_and_06_says_placeholder(book):
    params, paths = book
    m05, m06 = load(paths, "05_contrastive_layers"), load(paths, "06_steering")
    features = load(paths, f"contrastive_features_L{params.layer}")
    for m in (m05, m06, features):
        assert m["labels"] == "placeholder" and m["placeholder_labels"] == params.placeholder_labels
    assert m05["finding"].startswith("PLACEHOLDER LABELS") and m05["scoring_verdict"].startswith("PLACEHOLDER")
    assert m06["finding"].startswith("PLACEHOLDER LABELS")
    assert all(s["verdict"].startswith("PLACEHOLDER") for s in m06["scoring_sensitivity"])
    report = (paths.root / "REPORT.md").read_text()
    assert report.count("PLACEHOLDER LABELS") >= 2  # the layers and steering findings
    for name in ("05_contrastive_layers", "06_steering"):
        nb = (paths.notebooks / f"{name}.ipynb").read_text()
        assert nb.count("PLACEHOLDER LABELS") >= 3, name  # tables, figure title, finding


def test_the_feature_reward_chapter_runs_on_the_architecture_and_says_placeholder(book):
    """Chapter 08 on the study's classes: the SAE reward hooks the layer, TRL trains a LoRA adapter per arm (LoRA on
    Gemma 4's / Qwen 3.5's attention projections), and every text of the chapter is marked placeholder."""
    params, paths = book
    m = load(paths, "08_feature_reward")
    assert m["labels"] == "placeholder" and m["layer"] == params.layer
    for text in (m["finding"], m["stage_gate_verdict"], m["training_verdict"]):
        assert text.startswith("PLACEHOLDER LABELS") and text.count("PLACEHOLDER LABELS") == 1
    assert [len(a["steps"]) for a in m["arms"]] == [params.grpo_steps] * 3
    for a in m["arms"]:
        assert (paths.root / a["adapter"] / "adapter_model.safetensors").is_file()
        assert a["heldout"]["n"] == params.n_heldout
    nb = (paths.notebooks / "08_feature_reward.ipynb").read_text()
    assert nb.count("PLACEHOLDER LABELS") >= 3  # tables, figure title, finding


def test_the_contrast_and_lens_cover_every_layer_of_the_architecture(book):
    params, paths = book
    n_layers, _ = model_shape(params.model)
    assert len(load(paths, "05_contrastive_layers")["top_abs_d"]) == n_layers
    rows = load(paths, "06_steering")["rows"]
    assert [r["scale"] for r in rows] == params.steering_scales
    lens = (paths.root / "REPORT.md").read_text()
    assert "## " in lens and (paths.figures / "07_logit_lens.png").is_file()
