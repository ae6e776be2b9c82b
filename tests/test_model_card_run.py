"""MODEL_CARD.md of a finished run: front matter the Hub can parse, and numbers equal to the run's metrics files.

Rendered from a *copy* of the run ``make nbval`` validates (``$MECHBOOK_TEST_RUN``: ``make test``'s
outputs/test-default, or outputs/default after ``make book``) and from partial runs made from it, so
outputs/ is never written. Marked ``book_outputs``: ``make unit`` runs before any book and leaves these out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from card_text import close, front_matter, table_rows

from mechlib.model_card import CARD_FILE, render_model_card, write_model_card
from mechlib.model_card_data import ModelCardError, read_run
from mechlib.paths import RunPaths

pytestmark = pytest.mark.book_outputs

REQUIRED = {"license", "base_model", "library_name", "tags", "datasets"}
RUN = RunPaths(os.environ.get("MECHBOOK_TEST_RUN", "default"))


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    """params.yaml, metrics/ and the steering vector of the finished run, copied (read-only use of outputs/)."""
    src = Path(RUN.root)
    assert (src / "params.yaml").is_file() and (src / "metrics" / "03_evaluate_sae.json").is_file(), (
        f"{src}: no finished run to render a card from: run `make book` first"
    )
    dst = tmp_path / "copied"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "params.yaml", dst / "params.yaml")
    shutil.copytree(src / "metrics", dst / "metrics")
    for f in (src / "checkpoints").glob("steering_vec_L*"):
        shutil.copy(f, dst / "checkpoints" / f.name)
    return dst


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / f"{name}.json").read_text())


def test_front_matter_parses_with_the_required_keys(run_copy: Path) -> None:
    card = render_model_card(read_run(run_copy))
    meta = front_matter(card)
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
    rows = {r[0]: r[1] for r in table_rows(card, "metric")}
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
        assert close(rows[label], value), (label, rows[label], value)
    assert m["finding"] in card and _metrics(run_copy, "02_train_sae")["finding"] in card


def test_experiment_numbers_in_the_card_equal_the_metrics_files(run_copy: Path) -> None:
    card = render_model_card(read_run(run_copy))
    b = _metrics(run_copy, "04_gsm8k_baseline")
    assert f"**{b['accuracy']:.3f}** ({b['n_correct']} of {b['n']}" in card
    for rule, n, correct, acc in table_rows(card, "scoring rule"):
        want = b["by_scoring_rule"][rule]
        assert (int(n), int(correct)) == (want["n"], want["n_correct"]) and close(acc, want["accuracy"])
    c = _metrics(run_copy, "05_contrastive_layers")
    ours = table_rows(card, "", "peak layer")[0]
    top = c["top_abs_d"] if "top_abs_d" in c else c["top10_abs_d"]  # runs made before the rename
    assert ours[1] == f"{c['peak_layer']} of {len(top)}"
    assert close(ours[2], top[c["peak_layer"]]) and close(ours[4], c["spearman_rho"])
    s = _metrics(run_copy, "06_steering")
    table = table_rows(card, "scale")
    assert len(table) == len(s["rows"])
    for cells, row in zip(table, s["rows"]):
        assert close(cells[0], row["scale"], 5e-3) and close(cells[1], row["accuracy"])
        assert close(cells[2], row["delta"]) and close(cells[6], row["mcnemar_p"])
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
    assert set(front_matter(card)) >= REQUIRED
    for chapter in ("05 (contrastive layers)", "06 (steering)", "07 (logit lens)", "08"):
        assert f"Chapter {chapter} has not run" in card
    assert (
        "partial run: chapter(s) 05 (contrastive layers), 06 (steering), 07 (logit lens), 08 (feature reward) "
        "have not run" in card
    )
    assert _metrics(run_copy, "04_gsm8k_baseline")["finding"] in card  # what did run is still there


def test_write_model_card_writes_into_the_run_folder(run_copy: Path) -> None:
    before = sorted(p.name for p in (run_copy / "metrics").iterdir())
    path = write_model_card("copied", root=run_copy)
    assert path == run_copy / CARD_FILE and path.read_text() == render_model_card(read_run(run_copy))
    assert sorted(p.name for p in (run_copy / "metrics").iterdir()) == before
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_malformed_metrics_file_is_one_line_naming_file_and_key(run_copy: Path) -> None:
    path = run_copy / "metrics" / "06_steering.json"
    m = json.loads(path.read_text())
    m["rows"][1]["accuracy"] = "high"
    path.write_text(json.dumps(m))
    with pytest.raises(ModelCardError, match=r"06_steering\.json: rows\[1\]\.accuracy: expected float, got 'high'$"):
        read_run(run_copy)


def test_card_links_the_feature_browser_when_the_run_has_one(run_copy: Path):
    shutil.rmtree(run_copy / "browser", ignore_errors=True)
    without = render_model_card(read_run(run_copy))
    (run_copy / "browser").mkdir()
    (run_copy / "browser" / "index.html").write_text("<!doctype html><title>x</title>")
    with_site = render_model_card(read_run(run_copy))
    assert "Feature browser:" not in without
    assert "Feature browser:" in with_site and f"outputs/{run_copy.name}/browser/index.html" in with_site


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
