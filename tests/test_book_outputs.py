"""Checks on the default run's outputs, after `make book` (run by `make nbval` / `make test`).

nbval re-executes the notebooks and compares their checked cells; these tests assert the metrics
themselves, from the JSON files, as the issues define them.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from mechlib import results
from mechlib.params import BookParams, load_params
from mechlib.paths import PARAMS_DIR, RunPaths

pytestmark = pytest.mark.book_outputs

# `make test` runs the default params into their own run folder (MECHBOOK_TEST_RUN), so that
# outputs/default stays what `make book` made.
PATHS = RunPaths(os.environ.get("MECHBOOK_TEST_RUN", "default"))
PARAMS: BookParams = load_params(PARAMS_DIR / "default.yaml")


def metrics(name: str) -> dict:
    f = PATHS.metrics / f"{name}.json"
    assert f.is_file(), f"{f} missing: run `make book` first"
    return json.loads(f.read_text())


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_collect_metrics():
    m = metrics("01_collect")
    assert m["layer"] == PARAMS.layer
    assert m["n_tokens"] > 0.9 * PARAMS.collect_tokens


def test_sae_metrics_hold_every_key_and_beat_pca():
    m = metrics("03_evaluate_sae")
    keys = [
        "var_explained",
        "var_explained_global",
        "mse",
        "l0",
        "coverage",
        "dead_fraction",
        "pca_var_explained",
        "delta_ce_loss",
        "kl",
        "n_tokens",
    ]
    for key in keys:
        assert finite(m[key]), f"{key} = {m.get(key)!r}"
    assert m["var_explained"] > m["pca_var_explained"], "the SAE must beat the k-component PCA baseline"
    assert 0 < m["var_explained"] < 1 and m["mse"] > 0
    assert 0 < m["l0"] <= PARAMS.k
    assert 0 <= m["coverage"] <= 1 and 0 <= m["dead_fraction"] <= 1
    assert m["kl"] >= 0 and m["n_tokens"] > 0


def test_card_checkpoint_loads_with_the_cards_snippet():
    ck = torch.load(PATHS.checkpoints / "sae_final.pt", map_location="cpu")
    d, m = ck["W_enc"].shape
    assert ck["W_dec"].shape == (m, d) and ck["b_enc"].shape == (m,) and ck["b_dec"].shape == (d,)
    assert int(ck["k"]) == PARAMS.k and m == PARAMS.d_sae
    torch.testing.assert_close(ck["W_dec"].norm(dim=1), torch.ones(m), atol=1e-4, rtol=0)
    x = torch.randn(5, d)
    pre = (x - ck["b_dec"]) @ ck["W_enc"] + ck["b_enc"]
    v, i = pre.topk(int(ck["k"]), dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v).relu()
    # the card's snippet and mechlib's own loader and encoder give the same codes
    from mechlib.sae import dense_code, load_sae

    sae = load_sae(PATHS.checkpoints / "sae_final.pt")
    with torch.no_grad():
        torch.testing.assert_close(dense_code(sae.encode(x), m).float(), f, atol=1e-4, rtol=1e-4)


def test_baseline_metrics():
    m = metrics("04_gsm8k_baseline")
    assert m["n"] == PARAMS.n_questions
    lo, hi = m["ci95"]
    assert 0 <= lo <= m["accuracy"] <= hi <= 1
    assert 0.15 <= m["accuracy"] <= 0.85, "the default task must give both correct and wrong answers"
    assert m["finished"] >= 0.9, "at least 90 % of the default answers must end by themselves (EOS or '#### N')"
    assert m["finished"] + m["truncated"] == pytest.approx(1.0)
    assert sum(m["stop_reasons"].values()) == m["n"] and m["stop_reasons"]["limit"] == round(m["truncated"] * m["n"])
    rules = m["by_scoring_rule"]
    assert set(rules) == {"primary", "strict", "flexible", "finished"}  # JSON keys are written sorted
    assert (
        rules["primary"]["n_correct"] == m["n_correct"]
        and rules["finished"]["n"] == m["stop_reasons"]["eos"] + m["stop_reasons"]["answer_line"]
    )
    # every wrong answer of the generated task is sorted once, under its own question type
    wrong = m["wrong_answers"]
    assert sum(w["n_wrong"] for w in wrong) == m["n"] - m["n_correct"]
    for w in wrong:
        kind = m["by_kind"][w["kind"]]
        assert w["n_wrong"] == kind["n"] - kind["n_correct"]
        assert w["wrong_operation"] + w["right_operation"] + w["no_calculation"] == w["n_wrong"]


def test_contrastive_metrics_and_artifacts():
    m = metrics("05_contrastive_layers")
    assert "top10_abs_d" not in m and m["top_d"] == PARAMS.top_d  # the statistic's key names no fixed n
    n_layers = len(m["top_abs_d"])
    assert n_layers == metrics("07_logit_lens")["n_layers"]
    assert isinstance(m["peak_layer"], int) and 0 <= m["peak_layer"] < n_layers
    assert m["top_abs_d"][m["peak_layer"]] == max(m["top_abs_d"])
    assert 0 <= m["null_p"] <= 1 and -1 <= m["spearman_rho"] <= 1 and 0 <= m["spearman_p"] <= 1
    vec = torch.load(PATHS.checkpoints / f"steering_vec_L{m['peak_layer']}.pt", map_location="cpu")
    v = vec["vector"] if isinstance(vec, dict) else vec
    assert abs(float(v.float().norm()) - 1.0) < 1e-4
    assert (PATHS.metrics / f"contrastive_features_L{PARAMS.layer}.json").is_file()
    assert m["n_permutations"] >= PARAMS.n_permutations >= 1000 and 0 < m["null_p_mc_se"] < 0.02
    sens = m["scoring_sensitivity"]
    assert [r["rule"] for r in sens] == ["primary", "strict", "flexible", "finished"]
    assert sens[0]["peak_layer"] == m["peak_layer"] and sens[0]["p_peak"] == m["null_p"]
    assert f"the peak is layer {m['peak_layer']}" in m["scoring_verdict"]


def test_steering_rows():
    m = metrics("06_steering")
    rows = m["rows"]
    assert [r["scale"] for r in rows] == PARAMS.steering_scales
    for r in rows:
        for key in (
            "scale",
            "perturbation",
            "accuracy",
            "delta",
            "recovered",
            "net_flips",
            "mcnemar_p",
            "recovered_ids",
        ):
            assert key in r, key
        assert len(r["recovered_ids"]) == r["recovered"]
        assert 0 <= r["mcnemar_p"] <= 1 and 0 <= r["accuracy"] <= 1 and 0 <= r["truncated"] <= 1
    assert 0 <= m["baseline_truncated"] <= 1
    sens = m["scoring_sensitivity"]
    assert [s["scale"] for s in sens] == PARAMS.steering_scales
    by_scale = {r["scale"]: r for r in rows}
    for s in sens:
        primary = s["rules"][0]
        assert primary["rule"] == "primary" and primary["net_flips"] == by_scale[s["scale"]]["net_flips"]
        assert {"strict", "flexible"} <= {r["rule"] for r in s["rules"]}
        assert ("survives" in s["verdict"]) != ("depends on how answers are scored" in s["verdict"])


def test_random_direction_control():
    m = metrics("06_steering")
    control = m["random_control"]
    assert control["scale"] == PARAMS.random_control_scale
    directions = control["directions"]
    assert [d["index"] for d in directions] == list(range(PARAMS.n_random_directions))
    caa = {r["scale"]: r for r in m["rows"]}[PARAMS.random_control_scale]
    assert control["caa_accuracy"] == caa["accuracy"]
    for d in directions:
        assert d["scale"] == PARAMS.random_control_scale and d["n"] == m["n_heldout"]
        assert abs(d["cos_with_caa"]) < 0.3  # random in hundreds of dims: nearly orthogonal to CAA
        vs = d["vs_caa"]
        # paired counts agree with the two accuracies: acc_random - acc_caa = (random only - CAA only) / n
        assert d["accuracy"] - caa["accuracy"] == pytest.approx((vs["b_only"] - vs["a_only"]) / d["n"])
        assert 0 <= vs["mcnemar_p"] <= 1 and 0 <= d["truncated"] <= 1


def test_logit_lens_metrics():
    m = metrics("07_logit_lens")
    assert len(m["top_tokens"]) == m["n_layers"]
    e, frac, threshold = m["english_commitment_layer"], m["english_fraction"], m["english_threshold"]
    assert len(frac) == m["n_layers"] and all(0 <= f <= 1 for f in frac)
    # the saved layer is the first whose saved English fraction reaches the saved threshold
    assert e == next((layer for layer, f in enumerate(frac) if f >= threshold), None)


def test_feature_reward_chapter_is_consistent():
    """Chapter 08 (issue 18): the reward is bounded, the Stage Gate scores the held-out answers, every arm took the
    same steps, and "before" is chapter 04's held-out accuracy."""
    m, base = metrics("08_feature_reward"), metrics("04_gsm8k_baseline")
    lo, hi = m["bound"]
    assert -1 <= lo < 0 < hi <= 1 and math.isclose(sum(abs(f["weight"]) for f in m["features"]), 1.0, rel_tol=1e-6)
    assert all(f["cap"] > 0 for f in m["features"])
    assert (PATHS.root / m["spec_file"]).is_file()
    assert m["n_heldout"] == PARAMS.n_heldout == len(base["heldout_ids"])
    names = [r["name"] for r in m["stage_gate"]]
    assert names[-2:] == ["CAA projection", "answer length (tokens)"] and len(names) == 4
    for row in m["stage_gate"]:
        assert row["n"] == PARAMS.n_heldout and 0 <= row["auroc"] <= 1
        assert row["auroc_ci"][0] <= row["auroc"] <= row["auroc_ci"][1]
        assert 0 < row["auroc_p_perm"] <= 1
    caa = metrics("05_contrastive_layers")
    assert math.isclose(m["stage_gate"][2]["spearman_rho"], caa["spearman_rho"], abs_tol=1e-9)  # the same readout
    assert [a["arm"] for a in m["arms"]] == ["correctness", "correctness+feature", "feature"]
    held_correct = sum(1 for i in base["heldout_ids"] for r in _baseline_records() if r["id"] == i and r["correct"])
    for a in m["arms"]:
        assert len(a["steps"]) == PARAMS.grpo_steps == m["grpo"]["steps"]
        h = a["heldout"]
        assert h["n"] == PARAMS.n_heldout and h["k_before"] == held_correct
        assert h["k_after"] - h["k_before"] == h["b"] - h["c"]
        assert (PATHS.root / a["adapter"] / "adapter_model.safetensors").is_file()
        assert len((PATHS.root / a["records"]).read_text().splitlines()) == PARAMS.n_heldout
        n_samples = PARAMS.grpo_steps * PARAMS.grpo_prompts_per_step * PARAMS.grpo_generations
        assert len((PATHS.root / a["samples"]).read_text().splitlines()) == n_samples  # every sampled completion
    assert "Stage Gate 1" in m["finding"] and "GRPO" in m["finding"]


def test_stage_gate_rechecks_from_its_saved_inputs():
    """Every Stage Gate row follows from the saved per-answer scores (scipy, not mechlib): AUROC as the
    Mann-Whitney U over n_correct * n_wrong, Spearman rho; the labels are chapter 04's held-out labels,
    and the other selection's spec is saved beside the trained one."""
    from scipy.stats import mannwhitneyu, spearmanr

    from mechlib.feature_reward import FeatureRewardSpec

    m = results.load(PATHS.metrics, results.FeatureRewardResult)
    base = {r["id"]: r["correct"] for r in _baseline_records()}
    g = m.gate_inputs
    assert g is not None, "08_feature_reward.json holds no gate_inputs"
    assert g.ids == metrics("04_gsm8k_baseline")["heldout_ids"] and g.correct == [base[i] for i in g.ids]
    kinds = {r["id"]: r["source"].split(":")[-1] for r in _baseline_records()}
    assert g.types == [kinds[i] for i in g.ids] and len(set(g.types)) > 1
    assert len(g.scores) == len(m.stage_gate)
    y = [int(c) for c in g.correct]
    for row, scores in zip(m.stage_gate, g.scores, strict=True):
        pos = [s for s, c in zip(scores, g.correct, strict=True) if c]
        neg = [s for s, c in zip(scores, g.correct, strict=True) if not c]
        assert (row.n, row.n_correct) == (len(scores), len(pos))
        auc = mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))
        assert row.auroc is not None and math.isclose(row.auroc, auc, abs_tol=1e-9), row.name
        assert row.spearman_rho is not None
        assert math.isclose(row.spearman_rho, spearmanr(scores, y).statistic, abs_tol=1e-9), row.name
        # the within-type p, redrawn here with other permutations: equal within Monte-Carlo error
        assert row.p_within_type is not None
        redrawn = _within_type_p(scores, g.correct, g.types, 4000)
        assert abs(row.p_within_type - redrawn) < 4 * math.sqrt(redrawn * (1 - redrawn) / 1000) + 0.01, row.name
    assert m.other_spec_file is not None
    other = FeatureRewardSpec.load(PATHS.root / m.other_spec_file)
    trained = FeatureRewardSpec.load(PATHS.root / m.spec_file)
    assert other.layer == trained.layer == m.layer and other.features and other != trained


def _within_type_p(scores: list[float], correct: list[bool], types: list[str], n: int) -> float:
    """Two-sided p of the correct answers' rank sum with labels shuffled within each type (numpy, seed 123)."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(123)
    ranks, y, kinds = rankdata(scores), np.array(correct), np.array(types)
    groups = [np.flatnonzero(kinds == k) for k in set(types)]
    expected = sum(y[g].sum() * ranks[g].mean() for g in groups)
    observed = abs(ranks[y].sum() - expected)
    hits = 0
    for _ in range(n):
        perm = y.copy()
        for g in groups:
            perm[g] = rng.permutation(y[g])
        hits += abs(ranks[perm].sum() - expected) >= observed - 1e-9
    return (1 + hits) / (1 + n)


def _baseline_records() -> list[dict]:
    return [json.loads(line) for line in (PATHS.records / "baseline.jsonl").read_text().splitlines() if line]


def test_report_and_figures():
    text = PATHS.report.read_text()
    for heading in (
        "SAE training metrics",
        "Baseline accuracy",
        "Contrastive layers",
        "CAA steering",
        "Logit lens",
        "Feature reward",
    ):
        assert heading in text
    assert "not run" not in text
    assert "### The peak under each scoring rule" in text and "### Each row under each scoring rule" in text
    figures = sorted(p.name[:2] for p in PATHS.figures.glob("*.png"))
    for chapter in ("02", "03", "05", "06", "07", "08"):
        assert chapter in figures, f"no figure from chapter {chapter}"


def test_every_chapter_that_saves_a_figure_shows_it():
    import nbformat

    for nb_path in sorted(PATHS.notebooks.glob("0*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not any("save_figure" in c.source for c in code):
            continue
        images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images, f"{nb_path.name} saves a figure but shows none inline"


@pytest.mark.parametrize("cls", results.CHAPTER_RESULTS, ids=lambda c: c.FILE)
def test_every_metrics_file_reads_back_into_its_class_unchanged(cls):
    """What a chapter wrote is what report.py and the model card read: every key, every value."""
    raw = metrics(cls.FILE)
    obj = results.load(PATHS.metrics, cls)
    assert obj.to_json() == raw  # same keys, same values (JSON key order aside)
    assert cls.from_json(json.loads(json.dumps(obj.to_json()))) == obj


@pytest.mark.parametrize(
    "chapter",
    [
        "01_collect",
        "02_train_sae",
        "03_evaluate_sae",
        "04_gsm8k_baseline",
        "05_contrastive_layers",
        "06_steering",
        "07_logit_lens",
        "08_feature_reward",
    ],
)
def test_every_chapter_states_what_it_found(chapter):
    finding = metrics(chapter)["finding"]
    assert isinstance(finding, str) and len(finding) > 80
    assert f"**What this run found (chapter {chapter[:2]}).** {finding}" in PATHS.report.read_text()


def test_saved_outputs_carry_no_machine_paths():
    """Executed chapters print paths as ``outputs/<run>/…``: a notebook shared from one machine must not
    show another's folder layout."""
    import nbformat

    from mechlib.paths import REPO_ROOT

    for nb_path in sorted(PATHS.notebooks.glob("0*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) + "".join(
                    v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)
                )
                assert str(REPO_ROOT) not in text, f"{nb_path.name}: {text[:200]!r}"


def test_model_card_is_generated_from_this_run():
    """`make book` writes MODEL_CARD.md beside REPORT.md: Hub front matter, the run's own numbers."""
    import yaml

    card = (PATHS.root / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n", 2)[1])
    for key in ("license", "base_model", "library_name", "tags", "datasets"):
        assert key in front, f"model card front matter lacks {key}"
    sae = metrics("03_evaluate_sae")
    assert f"| {sae['var_explained']:.3f} |" in card, "the card does not state this run's variance explained"
    assert f"| {sae['delta_ce_loss']:.3f} |" in card, "the card does not state this run's spliced loss"
