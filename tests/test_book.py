"""The papermill runner on two tiny stand-in chapters (a real kernel, ~10 s)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

import mechlib.paths
from mechlib.book import ChapterError, chapters, main, run_book, select
from mechlib.params import ParamsError

HEADER = """# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---
"""

CHAPTER_OK = HEADER + '''
# %% [markdown]
# A stand-in chapter.

# %% tags=["parameters"]
run = "default"
k = 32

# %%
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.io import atomic_write_json
P = from_namespace(globals())
atomic_write_json(RunPaths(P.run).make().metrics / "01_fake.json", {"k": P.k})
print("k =", P.k)
'''

CHAPTER_FAILS = HEADER + '''
# %% tags=["parameters"]
run = "default"

# %%
raise RuntimeError("deliberate failure in chapter 02")
'''


@pytest.fixture
def book(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_fake.py").write_text(CHAPTER_OK)
    (nbdir / "02_fails.py").write_text(CHAPTER_FAILS)
    # Both this process and the chapter's kernel (a child process) must write under tmp_path.
    monkeypatch.setattr(mechlib.paths, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.setenv("MECHBOOK_OUTPUTS", str(tmp_path / "outputs"))
    params = tmp_path / "trial.yaml"
    params.write_text(yaml.safe_dump({"k": 7}))
    return nbdir, params, tmp_path / "outputs" / "trial"


def test_chapters_are_found_in_order(book):
    nbdir, _, _ = book
    assert [c.name for c in chapters(nbdir)] == ["01_fake", "02_fails"]
    assert [c.name for c in select(chapters(nbdir), ["2"])] == ["02_fails"]
    with pytest.raises(ParamsError, match="no chapter 09"):
        select(chapters(nbdir), ["09"])


def test_runs_a_chapter_with_only_its_declared_parameters(book):
    nbdir, params, out = book
    runs = run_book(params, ["01"], notebooks_dir=nbdir)
    assert [r.chapter for r in runs] == ["01_fake"]
    assert json.loads((out / "metrics" / "01_fake.json").read_text()) == {"k": 7}
    nb = nbformat.read(out / "notebooks" / "01_fake.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "k = 7" in injected[0].source and "d_sae" not in injected[0].source
    assert (out / "REPORT.md").is_file() and (out / "params.yaml").is_file()


def test_failing_chapter_stops_and_keeps_the_executed_notebook(book):
    nbdir, params, out = book
    with pytest.raises(ChapterError, match="deliberate failure") as info:
        run_book(params, None, notebooks_dir=nbdir)
    kept = info.value.notebook
    assert kept == out / "notebooks" / "02_fails.ipynb" and kept.is_file()
    assert "deliberate failure" in kept.read_text()


def test_unknown_key_fails_before_any_chapter_runs(book, tmp_path, capsys):
    _, _, out = book
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_question: 10\n")
    assert main([str(bad)]) == 1
    assert "unknown parameter 'n_question'. Did you mean 'n_questions'?" in capsys.readouterr().err
    assert not (tmp_path / "outputs" / "bad").exists()


def test_headless_kernel_env_adds_the_progress_filter_once_and_keeps_the_users(monkeypatch):
    from mechlib.book import headless_kernel_env

    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    headless_kernel_env()
    headless_kernel_env()
    assert os.environ["PYTHONWARNINGS"] == "error::DeprecationWarning,ignore:IProgress not found"
