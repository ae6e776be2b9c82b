"""MODEL_CARD.md: front matter the Hub can parse, and numbers equal to the run's metrics files.

Rendered from a *copy* of an existing run (outputs/default, or the `make test` run; skipped on a clean
clone before any book has run) and from partial runs made from it, so outputs/ is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mechlib.model_card import CARD_FILE, render_model_card, write_model_card
from mechlib.model_card_data import ModelCardError, read_run
from mechlib.paths import OUTPUTS_DIR, REPO_ROOT

REQUIRED = {"license", "base_model", "library_name", "tags", "datasets"}


def _source_run() -> Path | None:
    for name in ("default", os.environ.get("MECHBOOK_TEST_RUN", "test-default")):
        root = OUTPUTS_DIR / name
        if (root / "params.yaml").is_file() and (root / "metrics" / "03_evaluate_sae.json").is_file():
            return root
    return None


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    """params.yaml, metrics/ and the steering vector of an existing run, copied (read-only use of outputs/)."""
    src = _source_run()
    if src is None:
        pytest.skip("no finished run in outputs/ (make book) to render a card from")
    dst = tmp_path / "copied"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "params.yaml", dst / "params.yaml")
    shutil.copytree(src / "metrics", dst / "metrics")
    for f in (src / "checkpoints").glob("steering_vec_L*"):
        shutil.copy(f, dst / "checkpoints" / f.name)
    return dst


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(card: str, *header: str) -> list[list[str]]:
    """Body cells of the markdown table whose header row begins with the cells ``header``."""
    lines = card.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("|") and _cells(line)[: len(header)] == list(header)
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def _close(cell: str, value: float | int, tol: float = 5e-4) -> bool:
    return abs(float(cell) - float(value)) <= tol + 1e-9


def test_front_matter_parses_with_the_required_keys(run_copy: Path) -> None:
    card = render_model_card(read_run(run_copy))
    meta = _front_matter(card)
    assert set(meta) >= REQUIRED
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    cfg = _metrics(run_copy, "01_collect")
    assert (
        meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        if params["model"].startswith("embedded:")
        else meta["base_model"] == params["model"]
    )
    assert f"layer-{cfg['layer']}" in meta["tags"] and "sparse-autoencoder" in meta["tags"]
    assert isinstance(meta["datasets"], list) and meta["library_name"] == "saelens"


def test_sae_metrics_in_the_card_equal_the_metrics_file(run_copy: Path) -> None:
    card = render_model_card(read_run(run_copy))
    m = _metrics(run_copy, "03_evaluate_sae")
    rows = {r[0]: r[1] for r in _table_rows(card, "metric")}
    expected = {
        "Variance explained (per-dimension, held-out)": m["var_explained"],
        "Variance explained (the seed's global formula)": m["var_explained_global"],
        "MSE (per element)": m["mse"],
        "L0": m["l0"],
        "Coverage (latents firing on held-out tokens)": m["coverage"],
        "Dead fraction": m["dead_fraction"],
        "Δ next-token loss, SAE spliced in (nats)": m["delta_ce_loss"],
        "KL, SAE spliced in": m["kl"],
        "Loss recovered vs mean ablation": m["ce_loss_recovered"],
    }
    for label, value in expected.items():
        assert _close(rows[label], value), (label, rows[label], value)
    assert m["finding"] in card and _metrics(run_copy, "02_train_sae")["finding"] in card


def test_experiment_numbers_in_the_card_equal_the_metrics_files(run_copy: Path) -> None:
    card = render_model_card(read_run(run_copy))
    b = _metrics(run_copy, "04_gsm8k_baseline")
    assert f"**{b['accuracy']:.3f}** ({b['n_correct']} of {b['n']}" in card
    for rule, n, correct, acc in _table_rows(card, "scoring rule"):
        want = b["by_scoring_rule"][rule]
        assert (int(n), int(correct)) == (want["n"], want["n_correct"]) and _close(acc, want["accuracy"])
    c = _metrics(run_copy, "05_contrastive_layers")
    ours = _table_rows(card, "", "peak layer")[0]
    top = c["top_abs_d"] if "top_abs_d" in c else c["top10_abs_d"]  # runs made before the rename
    assert ours[1] == f"{c['peak_layer']} of {len(top)}"
    assert _close(ours[2], top[c["peak_layer"]]) and _close(ours[4], c["spearman_rho"])
    s = _metrics(run_copy, "06_steering")
    table = _table_rows(card, "scale")
    assert len(table) == len(s["rows"])
    for cells, row in zip(table, s["rows"]):
        assert _close(cells[0], row["scale"], 5e-3) and _close(cells[1], row["accuracy"])
        assert _close(cells[2], row["delta"]) and _close(cells[6], row["mcnemar_p"])
        assert cells[4] == f"{row['recovered']}/{row['n_baseline_wrong']}"
    lens = _metrics(run_copy, "07_logit_lens")
    assert f"layer **{lens['english_commitment_layer']}** of {lens['n_layers']}" in card
    for name in ("04_gsm8k_baseline", "05_contrastive_layers", "06_steering", "07_logit_lens"):
        assert _metrics(run_copy, name)["finding"] in card, name
    assert f"steering_vec_L{c['peak_layer']}.pt" in card


def test_usage_snippets_name_the_run_model_and_layer(run_copy: Path) -> None:
    layer = _metrics(run_copy, "01_collect")["layer"]
    card = render_model_card(read_run(run_copy), repo_id="someone/my-sae")
    assert 'snapshot_download("someone/my-sae")' in card and "SAE.load_from_disk(path" in card
    assert f'Sae.load_from_disk(f"{{path}}/layers.{layer}")' in card
    assert f"hidden_states[{layer + 1}]" in card and 'pre = (x - ck["b_dec"]) @ ck["W_enc"] + ck["b_enc"]' in card
    for block in re.findall(r"```python\n(.*?)```", card, flags=re.S):
        compile(block, "snippet", "exec")  # every snippet is valid Python


def test_partial_run_says_what_is_missing(run_copy: Path) -> None:
    for name in ("05_contrastive_layers", "06_steering", "07_logit_lens", "08_feature_reward"):
        (run_copy / "metrics" / f"{name}.json").unlink(missing_ok=True)
    card = render_model_card(read_run(run_copy))
    assert set(_front_matter(card)) >= REQUIRED
    for chapter in ("05 (contrastive layers)", "06 (steering)", "07 (logit lens)", "08"):
        assert f"Chapter {chapter} has not run" in card
    assert (
        "partial run: chapter(s) 05 (contrastive layers), 06 (steering), 07 (logit lens), 08 (feature reward) "
        "have not run" in card
    )
    assert _metrics(run_copy, "04_gsm8k_baseline")["finding"] in card  # what did run is still there


def test_a_run_with_no_metrics_at_all_renders(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(REPO_ROOT / "params" / "gemma4_e4b.yaml", run / "params.yaml")
    card = render_model_card(read_run(run))
    meta = _front_matter(card)
    assert meta["base_model"] == "google/gemma-4-e4b" and meta["license"] == "gemma"
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu", "openai/gsm8k"]
    assert card.count("has not run for this run") == 6  # the sections of chapters 03, 04, 05, 06, 07 and 08
    assert "chapter(s) 01 (collection), 02 (SAE training), 03 (SAE evaluation), 04 (baseline accuracy)" in card
    assert "blocks.21.hook_resid_post" in card and "hidden_states[22]" in card
    assert "placeholder labels" not in card and "random-weight" not in card


def test_placeholder_and_random_runs_say_so(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    run.mkdir()
    values = yaml.safe_load((REPO_ROOT / "params" / "default.yaml").read_text())
    values.update(model="random:tiny-llama", layer=2, placeholder_labels=0.5, prompt_format="gemma_manual")
    (run / "params.yaml").write_text(yaml.safe_dump(values))
    values.update(sae_source="pretrained", sae_pretrained="hf:someone/sae@v1")
    (run / "params.yaml").write_text(yaml.safe_dump(values))
    card = render_model_card(read_run(run), repo_id="me/sae")
    assert "not trained by this run: loaded from `hf:someone/sae@v1`" in card
    assert "sae_final.pt" not in card and 'load_file(f"{path}/sae_weights.safetensors")' in card
    for block in re.findall(r"```python\n(.*?)```", card, flags=re.S):
        compile(block, "snippet", "exec")
    assert "placeholder labels (placeholder_labels = 0.5)" in card and "`random:tiny-llama` is a random-weight" in card


def test_write_model_card_writes_into_the_run_folder(run_copy: Path) -> None:
    before = sorted(p.name for p in (run_copy / "metrics").iterdir())
    path = write_model_card("copied", root=run_copy)
    assert path == run_copy / CARD_FILE and path.read_text() == render_model_card(read_run(run_copy))
    assert sorted(p.name for p in (run_copy / "metrics").iterdir()) == before
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_run_folders_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="no such run folder"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCardError, match=r"params.yaml not found"):
        read_run(tmp_path / "empty")


def test_a_malformed_metrics_file_is_one_line_naming_file_and_key(run_copy: Path) -> None:
    path = run_copy / "metrics" / "06_steering.json"
    m = json.loads(path.read_text())
    m["rows"][1]["accuracy"] = "high"
    path.write_text(json.dumps(m))
    with pytest.raises(ModelCardError, match=r"06_steering\.json: rows\[1\]\.accuracy: expected float, got 'high'$"):
        read_run(run_copy)


def test_card_links_the_feature_browser_when_the_run_has_one(run_copy: Path):
    from mechlib.model_card import render_model_card
    from mechlib.model_card_data import read_run

    shutil.rmtree(run_copy / "browser", ignore_errors=True)
    without = render_model_card(read_run(run_copy))
    (run_copy / "browser").mkdir()
    (run_copy / "browser" / "index.html").write_text("<!doctype html><title>x</title>")
    with_site = render_model_card(read_run(run_copy))
    assert "Feature browser:" not in without
    assert "Feature browser:" in with_site and f"outputs/{run_copy.name}/browser/index.html" in with_site


def test_card_section_of_chapter_08_carries_its_numbers() -> None:
    """The reward section reads FeatureRewardResult only: its readouts and arms, placeholder labels named."""
    import dataclasses

    from result_examples import EXAMPLES

    from mechlib.report_reward import card_section
    from mechlib.results import FeatureRewardResult

    m = EXAMPLES[FeatureRewardResult]
    assert isinstance(m, FeatureRewardResult)
    text = card_section(m)
    (gate,) = _table_rows(text, "readout", "AUROC [95 % CI]")
    assert gate[0] == "SAE reward" and gate[1] == "0.750 [0.25, 1.00]" and gate[-1] == "4 (2)"
    (arm,) = _table_rows(text, "arm")
    assert arm[0] == "correctness" and arm[2].startswith("2/4") and arm[5] == "1.000"
    assert f"**What this run found.** {m.finding}" in text
    assert "Placeholder labels" not in text
    fake = card_section(dataclasses.replace(m, labels="placeholder", placeholder_labels=0.5))
    assert "**Placeholder labels** (0.5 marked correct at random)" in fake
    assert "Chapter 08 has not run" in card_section(None)
