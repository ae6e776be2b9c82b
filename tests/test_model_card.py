"""MODEL_CARD.md from hand-made runs: a run with no metrics, placeholder and random-weight runs, bad run folders,
chapter 08's section.

The card of a finished run (front matter, numbers equal to its metrics files, partial runs made from it) is checked
in ``test_model_card_run.py``, after the book has run (``make nbval``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from card_text import front_matter, table_rows

from mechlib.model_card import render_model_card
from mechlib.model_card_data import ModelCardError, read_run
from mechlib.paths import REPO_ROOT


def test_a_run_with_no_metrics_at_all_renders(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(REPO_ROOT / "params" / "gemma4_e4b.yaml", run / "params.yaml")
    card = render_model_card(read_run(run))
    meta = front_matter(card)
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


def test_bad_run_folders_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="no such run folder"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCardError, match=r"params.yaml not found"):
        read_run(tmp_path / "empty")


def test_card_section_of_chapter_08_carries_its_numbers() -> None:
    """The reward section reads FeatureRewardResult only: its readouts and arms, placeholder labels named."""
    import dataclasses

    from result_examples import EXAMPLES

    from mechlib.report_reward import card_section
    from mechlib.results import FeatureRewardResult

    m = EXAMPLES[FeatureRewardResult]
    assert isinstance(m, FeatureRewardResult)
    text = card_section(m)
    (gate,) = table_rows(text, "readout", "AUROC [95 % CI]")
    assert gate[0] == "SAE reward" and gate[1] == "0.750 [0.25, 1.00]" and gate[-1] == "4 (2)"
    (arm,) = table_rows(text, "arm")
    assert arm[0] == "correctness" and arm[2].startswith("2/4") and arm[5] == "1.000"
    assert f"**What this run found.** {m.finding}" in text
    assert "Placeholder labels" not in text
    fake = card_section(dataclasses.replace(m, labels="placeholder", placeholder_labels=0.5))
    assert "**Placeholder labels** (0.5 marked correct at random)" in fake
    assert "Chapter 08 has not run" in card_section(None)
