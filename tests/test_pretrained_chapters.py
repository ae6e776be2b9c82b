"""A SAELens-format and a sparsify-format SAE go through the book as ``sae_source: pretrained``.

An SAE made here is exported with :func:`mechlib.sae.interop.export_sae`, cut down to a SAELens-only and a
sparsify-only folder (what someone else's tool would publish), and each folder drives chapters 02–07
of a tiny run. Chapter 03's evaluation must be of *that* SAE (its weight fingerprint in the cached
model evals equals the original's) and chapter 05 must rank its latents.

The model is a seeded random-weight tiny Llama (``random:tiny-llama``, 4 layers, d 64), so every
chapter takes seconds; it answers nothing correctly, so chapters 05–06 run on placeholder labels
(``placeholder_labels``) — enough here, where the question is whether the chapters *use the SAE*,
not what they find. Chapters 01 and 04 do not read the SAE: they run once and their run folder is
copied for the second format. The questions come from a GSM8K-format file written here (``task: gsm8k``
with a local ``gsm8k_path``), so these chapters also run the one-question-type path that the tiny books,
on the generated task, never take: no wrong answers sorted by operation, no within-type tests.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mechlib.metrics import sae_fingerprint
from mechlib.models import model_shape
from mechlib.sae import TopKSAE, card_state
from mechlib.sae.interop import HookInfo, export_sae

pytestmark = pytest.mark.slow  # 12 chapter kernels: ~2 min on 2 idle cores; `make unit` still runs it

MODEL, LAYER, D_SAE, K = "random:tiny-llama", 2, 48, 4
SMALL: dict[str, Any] = dict(
    model=MODEL,
    device="cpu",
    layer=LAYER,
    seq_len=32,
    collect_tokens=1200,
    heldout_tokens=256,
    collect_batch_size=4,
    shard_tokens=256,
    sae_source="pretrained",
    d_sae=D_SAE,
    k=K,
    # n_questions > 50: chapters that declare n_questions but not n_heldout validate against its default (50)
    eval_ce_tokens=256,
    n_feature_examples=2,
    task="gsm8k",  # gsm8k_path: a GSM8K-format file the fixture writes
    n_questions=52,
    n_heldout=8,
    prompt_format="gemma_manual",
    max_new_tokens=8,
    gen_batch_size=52,
    placeholder_labels=0.5,
    n_permutations=1000,
    n_bootstrap=200,
    steering_scales=[0.1, -0.05],
    n_random_directions=1,
)
SHARED = ["01", "04"]  # they do not read the SAE: run once, the run folder copied for the second format
SAE_CHAPTERS = ["02", "03", "05", "06", "07"]


def _sae() -> TopKSAE:
    sae = TopKSAE(model_shape(MODEL)[1], D_SAE, K, seed=11)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
    return sae


def _folders(tmp: Path, sae: TopKSAE) -> dict[str, Path]:
    """A SAELens-only folder and a sparsify-only root (one hookpoint folder) of the same SAE."""
    hook = HookInfo(MODEL, LAYER, SMALL["seq_len"], 2, True)
    saelens = export_sae(sae, tmp / "saelens", hook).folder
    shutil.rmtree(saelens / hook.hookpoint)
    sparsify = export_sae(sae, tmp / "sparsify", hook).folder
    for name in ("cfg.json", "sae_weights.safetensors"):
        (sparsify / name).unlink()
    assert not (saelens / hook.hookpoint).exists() and not (sparsify / "cfg.json").exists()
    return {"saelens": saelens, "sparsify": sparsify}


def _gsm8k_file(tmp: Path) -> Path:
    """60 one-step questions in GSM8K's JSONL format (question, answer ending in '#### N')."""
    path = tmp / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    rows = [
        {"question": f"What is {a} plus {a + 3}?", "answer": f"{a} + {a + 3} = {2 * a + 3}\n#### {2 * a + 3}"}
        for a in range(60)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _params(tmp: Path, run: str, spec: Path) -> Path:
    path = tmp / f"{run}.yaml"
    gsm8k = tmp / "gsm8k" / "test.jsonl"
    path.write_text(yaml.safe_dump({**SMALL, "run": run, "sae_pretrained": str(spec), "gsm8k_path": str(gsm8k)}))
    return path


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path, list[str]]]]:
    """Per format: (run folder, spec, chapters run); chapters 01 and 04 shared."""
    from mechlib import paths
    from mechlib.book import run_book

    tmp = tmp_path_factory.mktemp("pretrained")
    out = tmp / "outputs"
    mp = pytest.MonkeyPatch()
    mp.setattr(paths, "OUTPUTS_DIR", out)
    mp.setenv("MECHBOOK_OUTPUTS", str(out))  # the chapters' kernels read it
    mp.setenv("TQDM_DISABLE", "1")
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        sae = _sae()
        folders = _folders(tmp, sae)
        _gsm8k_file(tmp)
        base = _params(tmp, "pre-saelens", folders["saelens"])
        run_book(base, SHARED)
        shutil.copytree(out / "pre-saelens", out / "pre-sparsify", ignore=shutil.ignore_patterns(".lock"))
        result = {}
        for fmt, folder in folders.items():
            done = run_book(_params(tmp, f"pre-{fmt}", folder), SAE_CHAPTERS)
            result[fmt] = (out / f"pre-{fmt}", folder, [r.chapter for r in done])
        yield result
    finally:
        mp.undo()


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_chapters_run_on_the_pretrained_sae(runs, fmt: str) -> None:
    root, spec, done = runs[fmt]
    assert [c[:2] for c in done] == SAE_CHAPTERS
    assert (root / "metrics" / "04_gsm8k_baseline.json").is_file()
    for chapter in ("02_train_sae", "03_evaluate_sae", "05_contrastive_layers", "06_steering", "07_logit_lens"):
        assert _metrics(root, chapter)["finding"], chapter
    trained = _metrics(root, "02_train_sae")
    assert trained["sae_source"] == "pretrained" and trained["checkpoint"] == str(spec)
    assert not (root / "checkpoints" / "sae_final.pt").exists()  # nothing was trained


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_chapter_03_evaluates_that_sae(runs, fmt: str) -> None:
    root, _, _ = runs[fmt]
    m = _metrics(root, "03_evaluate_sae")
    assert (m["sae_source"], m["d_sae"], m["k"], m["layer"]) == ("pretrained", D_SAE, K, LAYER)
    assert m["l0"] <= K
    evals = json.loads((root / "checkpoints" / "03_model_evals.json").read_text())
    assert evals["key"]["sae"] == sae_fingerprint(card_state(_sae()))  # the very weights of the export


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_chapter_05_ranks_the_pretrained_sae_latents(runs, fmt: str) -> None:
    root, spec, _ = runs[fmt]
    features = json.loads((root / "metrics" / f"contrastive_features_L{LAYER}.json").read_text())
    assert features["sae"] == str(spec) and features["layer"] == LAYER
    assert features["features"] and all(0 <= f["feature"] < D_SAE for f in features["features"])


def test_one_question_type_skips_the_within_type_tests(runs) -> None:
    """GSM8K questions share one type: chapter 04 sorts no wrong answers by operation, chapter 05 runs no
    within-type test of the held-out projection, and both say so instead of printing numbers."""
    root = runs["saelens"][0]
    baseline = _metrics(root, "04_gsm8k_baseline")
    assert baseline["task"] == "gsm8k" and baseline["wrong_answers"] == [] and list(baseline["by_kind"]) == ["gsm8k"]
    assert "wrong answers" not in baseline["finding"]
    layers = _metrics(root, "05_contrastive_layers")
    assert layers["n_question_types"] == 1 and layers["spearman_p_within_type"] is None
    assert "within question types" not in layers["finding"]
    chapter_04 = (root / "notebooks" / "04_gsm8k_baseline.ipynb").read_text()
    assert "GSM8K: not sorted" in chapter_04


def test_both_formats_give_the_same_evaluation(runs) -> None:
    a, b = (_metrics(runs[f][0], "03_evaluate_sae") for f in ("saelens", "sparsify"))
    for key in ("var_explained", "mse", "l0", "coverage", "delta_ce_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
