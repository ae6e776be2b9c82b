"""REPORT.md is rendered from the metrics JSON alone: tables, missing chapters, formatting."""

from __future__ import annotations

import json

import pytest
from result_examples import full_metrics

from mechlib import paths, report, results

CLASS_OF = {cls.FILE: cls for cls in results.CHAPTER_RESULTS}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path)
    run = paths.RunPaths("r").make()

    def write(name: str, data: dict) -> None:
        """A chapter's metrics: the keys a test sets, the rest from a minimal example (runner files as given)."""
        cls = CLASS_OF.get(name)
        (run.metrics / f"{name}.json").write_text(json.dumps(data if cls is None else full_metrics(cls, data)))

    return run, write


def _steering_row(scale: float, recovered: list[str]) -> dict:
    return {
        "scale": scale,
        "perturbation": 100 * scale,
        "accuracy": 0.3,
        "delta": 0.04,
        "delta_ci95": [-0.06, 0.16],
        "recovered": len(recovered),
        "n_baseline_wrong": 37,
        "net_flips": 2,
        "mcnemar_p": 0.7266,
        "recovered_ids": recovered,
    }


def test_missing_chapters_say_not_run(run_dir):
    text = report.render_report("r")
    for chapter in ("01", "03", "04", "05", "06", "07"):
        assert f"Chapter {chapter} not run." in text


def test_sae_table_formats_numbers_and_hides_empty_outlier_rows(run_dir):
    _, write = run_dir
    base = {
        "var_explained": 0.69623,
        "var_explained_global": 0.8676,
        "pca_var_explained": 0.4556,
        "mse": 6.7879,
        "l0": 32.0,
        "coverage": 1.0,
        "dead_fraction": 0.0,
        "delta_ce_loss": 0.353,
        "kl": 2.5e-05,
        "n_tokens": 16384,
        "var_explained_excl_outliers": 0.745,
        "pca_var_explained_excl_outliers": 0.458,
    }
    write("03_evaluate_sae", {**base, "n_outlier_tokens": 0})
    text = report.render_report("r")
    assert "| L0 | 32 | 128 |" in text and "| Variance explained (per-dimension, held-out) | 0.6962 | — |" in text
    assert "| Variance explained (seed's global-variance formula) | 0.8676 | 0.939 |" in text  # the card's formula
    assert "| KL (SAE spliced in) | 2.5e-05 | — |" in text
    assert "without outlier-norm tokens" not in text
    write("03_evaluate_sae", {**base, "n_outlier_tokens": 12})
    assert "| Variance explained without outlier-norm tokens | 0.745 | — |" in report.render_report("r")


def test_steering_section_has_signed_perturbation_and_overlap_table(run_dir):
    _, write = run_dir
    rows = [_steering_row(0.02, ["q1", "q2"]), _steering_row(-0.05, ["q2"])]
    overlaps = [
        {"scale_a": 0.02, "scale_b": -0.05, "n_a": 2, "n_b": 1, "intersection": 1, "jaccard": 0.5, "shared_ids": ["q2"]}
    ]
    write("06_steering", {"layer": 17, "baseline_accuracy": 0.26, "rows": rows, "overlaps": overlaps})
    text = report.render_report("r")
    assert "## CAA steering at layer 17 (chapter 06)" in text
    assert "| 0.02 | +2 % | 0.3 | 0.04 | [-0.06, 0.16] | 2/37 | 2 | 0.7266 |" in text
    assert "| -0.05 | -5 % |" in text
    assert "| 0.02 | -0.05 | 2 | 1 | 1 | 0.5 | q2 |" in text
    assert "- scale 0.02: q1, q2" in text


def test_random_control_table_follows_the_steering_table(run_dir):
    _, write = run_dir
    direction = {
        **_steering_row(0.1, ["q3"]),
        "index": 0,
        "cos_with_caa": 0.007,
        "vs_caa": {"a_only": 3, "b_only": 8, "mcnemar_p": 0.227},
    }
    write(
        "06_steering",
        {
            "layer": 17,
            "baseline_accuracy": 0.26,
            "rows": [_steering_row(0.1, [])],
            "random_control": {"scale": 0.1, "caa_accuracy": 0.06, "directions": [direction]},
        },
    )
    text = report.render_report("r")
    assert "### Random-direction control at scale 0.1" in text and "CAA accuracy at this scale: 0.06." in text
    assert "| random #0 | 0.007 | 0.3 | 0.04 | [-0.06, 0.16] | 2 | 0.7266 | 3 | 8 | 0.227 |" in text
    write("06_steering", {"layer": 17, "rows": [], "random_control": {"scale": 0.1, "directions": []}})
    assert "Random-direction control" not in report.render_report("r")


def test_run_section_lists_chapter_times_with_total(run_dir):
    _, write = run_dir
    write(
        "01_collect",
        {
            "n_tokens": 100000,
            "heldout_tokens": 16384,
            "layer": 15,
            "d_model": 576,
            "seq_len": 128,
            "activation_dtype": "float32",
            "mean_norm": 170.40,
            "max_norm": 448.21,
        },
    )
    write("book_timings", {"01_collect": 94.81, "02_train_sae": 31.67})
    text = report.render_report("r")
    assert "100000 training + 16384 held-out tokens" in text and "after layer 15" in text
    assert "| 01_collect | 94.81 |" in text and "| total | 126.48 |" in text


def test_baseline_section_breaks_accuracy_down_by_question_type(run_dir):
    _, write = run_dir
    write(
        "04_gsm8k_baseline",
        {
            "task": "arithmetic",
            "prompt_format": "chat_template",
            "n": 20,
            "accuracy": 0.25,
            "ci95": [0.11, 0.47],
            "finished": 1.0,
            "truncated": 0.0,
            "by_kind": {"plus": {"n": 12, "n_correct": 4, "accuracy": 1 / 3, "ci95": [0.14, 0.61]}},
            "wrong_answers": [
                {
                    "kind": "plus",
                    "needed": "+",
                    "n_wrong": 8,
                    "wrong_operation": 3,
                    "right_operation": 4,
                    "no_calculation": 1,
                    "by_operation": {"-": 3},
                }
            ],
        },
    )
    text = report.render_report("r")
    assert "| arithmetic | chat_template | 20 | 0.25 | [0.11, 0.47] | 100.0 % | 0.0 % |" in text
    assert "| plus | 12 | 4 | 0.3333 | [0.14, 0.61] |" in text
    assert "Wrong answers by the operation they write" in text
    assert "| plus | addition | 8 | 3 | subtraction 3 | 4 | 1 |" in text


def test_scoring_sensitivity_and_truncation_reach_the_report(run_dir):
    _, write = run_dir
    write(
        "04_gsm8k_baseline",
        {
            "task": "arithmetic",
            "prompt_format": "chat_oneshot",
            "n": 20,
            "accuracy": 0.25,
            "ci95": [0.11, 0.47],
            "finished": 0.95,
            "truncated": 0.05,
            "by_scoring_rule": {"strict": {"n": 20, "n_correct": 4, "accuracy": 0.2, "ci95": [0.08, 0.42]}},
        },
    )
    write(
        "05_contrastive_layers",
        {
            "peak_layer": 1,
            "top_abs_d": [0.1, 0.5],
            "null_p": 0.012,
            "null_p_mc_se": 0.0034,
            "scoring_verdict": "Every rule finds layer 1.",
            "scoring_sensitivity": [
                {
                    "rule": "flexible",
                    "n_correct": 5,
                    "n_wrong": 15,
                    "peak_layer": 0,
                    "top_abs_d": 0.4,
                    "p_peak": 0.3,
                    "p_mc_se": 0.014,
                }
            ],
        },
    )
    write(
        "06_steering",
        {
            "layer": 1,
            "baseline_truncated": 0.0,
            "rows": [{"scale": 0.1, "perturbation": 10, "accuracy": 0.2, "truncated": 0.125}],
            "scoring_sensitivity": [
                {
                    "scale": 0.1,
                    "verdict": "+10 %: harms; the conclusion survives.",
                    "rules": [
                        {
                            "rule": "strict",
                            "n": 8,
                            "accuracy": 0.25,
                            "delta": -0.25,
                            "net_flips": -2,
                            "mcnemar_p": 0.5,
                            "effect": "no significant change",
                        }
                    ],
                }
            ],
        },
    )
    text = report.render_report("r")
    assert "| arithmetic | chat_oneshot | 20 | 0.25 | [0.11, 0.47] | 95.0 % | 5.0 % |" in text
    assert "| strict | 20 | 4 | 0.2 | [0.08, 0.42] |" in text
    assert "0.012 ± 0.003" in text and "| flexible | 5 | 15 | 0 | 0.4 | 0.3 ± 0.014 |" in text
    assert "Every rule finds layer 1." in text and "its answers cut off: 0.0 %" in text
    assert "| 12.5 % |" in text and "| 0.1 | strict | 8 | 0.25 | -0.25 | -2 | 0.5 | no significant change |" in text
    assert "- +10 %: harms; the conclusion survives." in text


def test_each_chapters_finding_closes_its_section(run_dir):
    _, write = run_dir
    write("03_evaluate_sae", {"var_explained": 0.7, "finding": "The SAE explains 0.700."})
    write("07_logit_lens", {"english_commitment_layer": 3, "n_layers": 5, "finding": "English from layer 3."})
    text = report.render_report("r")
    assert "**What this run found (chapter 03).** The SAE explains 0.700." in text
    assert text.index("chapter 03).**") < text.index("## Baseline")
    lens = text.index("**What this run found (chapter 07).** English from layer 3.")
    assert lens < text.index("## Feature reward") and "(chapter 03)" not in text[lens:]
    write("08_feature_reward", {"finding": "The reward predicted correctness."})
    assert (
        report.render_report("r")
        .rstrip()
        .endswith("**What this run found (chapter 08).** The reward predicted correctness.")
    )


def test_write_report_is_atomic_and_lands_in_the_run(run_dir):
    run, _ = run_dir
    out = report.write_report("r")
    assert out == run.report and out.read_text().startswith("# mechbook report — run `r`")
    assert not list(run.root.glob("*.tmp*"))


def test_the_card_stands_beside_every_table(run_dir):
    _, write = run_dir
    write(
        "04_gsm8k_baseline",
        {"task": "arithmetic", "prompt_format": "chat_oneshot", "n": 20, "accuracy": 0.25, "ci95": [0.11, 0.47]},
    )
    write("05_contrastive_layers", {"peak_layer": 1, "top_abs_d": [0.1, 0.5], "spearman_rho": 0.2, "top_d": 5})
    write(
        "06_steering",
        {
            "layer": 1,
            "n_heldout": 8,
            "baseline_accuracy": 0.25,
            "mean_resid_norm": 311.734,
            "rows": [{"scale": 0.1, "perturbation": 10, "accuracy": 0.2}],
        },
    )
    write(
        "07_logit_lens",
        {
            "english_commitment_layer": 1,
            "n_layers": 2,
            "english_fraction": [0.0, 0.75],
            "top_tokens": [[",", "."], ["a", " Berlin"]],
            "top_probs": [[0.1, 0.2], [0.3, 0.9]],
        },
    )
    text = report.render_report("r")
    assert "| study card (Gemma 4 E4B) | gsm8k | gemma_manual | 50 | 0.45–0.50 |" in text
    assert "| top-5 |d| at peak |" in text  # the header names the run's top_d, not a fixed 10
    assert "| this run | 1 of 2 | 0.5 |" in text and "| study card (Gemma 4 E4B) | 27 of 42 | 0.896 |" in text
    assert "| baseline | 0 % | 0.25 | 0 |" in text and "311.73 (the card: 95.3 at layer 27" in text
    assert "(the card: 30 of 42)" in text and "| 1 | 0.75 | ' Berlin' | 0.9 |" in text


def test_run_section_shows_each_chapters_device_and_peak_gpu_memory(run_dir):
    _, write = run_dir
    write("book_timings", {"01_collect": 12.5, "02_train_sae": 3.25})
    write(
        "book_devices",
        {
            "01_collect": {
                "device": "cuda",
                "device_name": "NVIDIA H200",
                "peak_gpu_bytes": 3 * 2**30,
                "torch": "2.11",
                "cuda": "12.8",
            }
        },
    )
    text = report.render_report("r")
    assert "| 01_collect | 12.5 | cuda (NVIDIA H200) | 3.00 GiB |" in text
    assert "| 02_train_sae | 3.25 | — | — |" in text and "| total | 15.75 | — | — |" in text
