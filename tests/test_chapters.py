"""Static checks on the chapters: kernelspec header, a parameters cell whose names and defaults
match the schema, and no logic-heavy cells (logic belongs in mechlib)."""

from __future__ import annotations

import ast
import io
import tokenize

import jupytext
import papermill
import pytest

from mechlib.book import chapters
from mechlib.params import BookParams
from mechlib.prompts import GEMMA_MANUAL, INSTRUCTION

CHAPTERS = chapters()
EXPECTED = [
    "01_collect",
    "02_train_sae",
    "03_evaluate_sae",
    "04_gsm8k_baseline",
    "05_contrastive_layers",
    "06_steering",
    "07_logit_lens",
    "08_feature_reward",
]


def test_the_eight_chapters_exist_in_order():
    assert [c.name for c in CHAPTERS] == EXPECTED


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_parameters_cell_matches_schema_defaults(chapter):
    nb = jupytext.read(chapter.source)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    declared = papermill.inspect_notebook(nb)
    assert "run" in declared, "every chapter declares `run`"
    defaults = BookParams()
    for name, info in declared.items():
        assert hasattr(defaults, name), f"{name} is not a BookParams key"
        value = ast.literal_eval(info["default"])
        assert value == getattr(defaults, name), f"{chapter.name}: default of {name} differs from the schema"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_chapter_reads_like_a_paper_section(chapter):
    nb = jupytext.read(chapter.source)
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(markdown) >= 3, "narrative markdown expected"
    assert not any(line.startswith(("def ", "class ")) for c in code for line in c.source.splitlines()), (
        "functions and classes belong in mechlib, not in notebooks"
    )
    # statements, not physical lines: the formatter spreads one long call over several lines, which adds no logic
    statements = sum(_statements(c.source) for c in code)
    assert statements < 100, f"{statements} statements of code: move logic to mechlib"


def _statements(source: str) -> int:
    """Logical lines (one per simple statement or compound-statement header), as Python's tokenizer ends them."""
    tokens = tokenize.generate_tokens(io.StringIO(source + "\n").readline)
    return sum(1 for t in tokens if t.type == tokenize.NEWLINE)


def test_default_params_file_is_the_schema_defaults():
    """One source for defaults: a chapter run in JupyterLab with no injected parameters does the same
    run as ``make book`` (params/default.yaml), because every value that file sets is the schema's."""
    import yaml

    from mechlib.paths import PARAMS_DIR

    values = yaml.safe_load((PARAMS_DIR / "default.yaml").read_text(encoding="utf-8"))
    defaults = BookParams()
    differ = {k: (v, getattr(defaults, k)) for k, v in values.items() if v != getattr(defaults, k)}
    assert not differ, f"params/default.yaml differs from BookParams defaults (file, schema): {differ}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_no_linter_directive_shows_in_the_prose(chapter):
    """A `# noqa` written to quiet ruff on a long markdown line renders as text in the notebook."""
    nb = jupytext.read(chapter.source)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for directive in ("noqa", "type: ignore", "fmt: off", "fmt: skip"):
        assert directive not in prose, f"{chapter.name}: '{directive}' in a markdown cell"


def test_chapter_04_shows_the_gemma_prompt_verbatim():
    """Chapter 04 calls its fenced prompt "verbatim": it must be :data:`GEMMA_MANUAL` line for line."""
    nb = jupytext.read(next(c for c in CHAPTERS if c.name == "04_gsm8k_baseline").source)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    shown = prose.split("```text\n", 1)[1].split("```", 1)[0]
    assert shown == GEMMA_MANUAL.format(instruction=INSTRUCTION, q="{q}")
