"""The papermill runner on two tiny stand-in chapters (a real kernel, ~10 s)."""

from __future__ import annotations

import json
import os

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

CHAPTER_OK = (
    HEADER
    + """
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

# %%
from tqdm.auto import tqdm
import time
for _ in tqdm(range(3), desc="fake bar", mininterval=0):
    time.sleep(0.05)

# %%
from mechlib import plots
fig, ax = plots.new_figure(3.0, 2.0)
_ = ax.plot([0, 1], [1, 0])
_ = plots.save_figure(fig, RunPaths(P.run).figures / "01_fake.png")
"""
)

CHAPTER_FAILS = (
    HEADER
    + """
# %% tags=["parameters"]
run = "default"

# %%
raise RuntimeError("deliberate failure in chapter 02")
"""
)


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


def test_figures_show_inline_in_executed_chapters_even_under_agg(book, monkeypatch):
    """``make`` exports MPLBACKEND=Agg (scripts must not need a display); the chapters' kernels must
    still use the inline backend, or an executed notebook shows no plot where its text promises one."""
    nbdir, params, out = book
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_book(params, ["01"], notebooks_dir=nbdir)
    nb = nbformat.read(out / "notebooks" / "01_fake.ipynb", as_version=4)
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) == 1, "the figure must be shown in the executed notebook"
    assert (out / "figures" / "01_fake.png").is_file()


def test_failing_chapter_stops_and_keeps_the_executed_notebook(book):
    nbdir, params, out = book
    with pytest.raises(ChapterError, match="deliberate failure") as info:
        run_book(params, None, notebooks_dir=nbdir)
    kept = info.value.notebook
    assert kept == out / "notebooks" / "02_fails.ipynb" and kept.is_file()
    assert "deliberate failure" in kept.read_text()


def test_unknown_key_fails_before_any_chapter_runs(book, tmp_path, capsys):
    _, _, _out = book
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


# ------------------------------------------------------------------ failures end in one line, not a trace

CHAPTER_DIES = (
    HEADER
    + """
# %% tags=["parameters"]
run = "default"

# %%
import os
os.kill(os.getpid(), 9)  # what the out-of-memory killer does
"""
)


@pytest.fixture
def book_main(book, monkeypatch):
    """``main`` running the stand-in chapters of ``book`` (the real ones are never run here)."""
    import functools

    import mechlib.book as book_module

    monkeypatch.setattr(book_module, "run_book", functools.partial(book_module.run_book, notebooks_dir=book[0]))
    return main


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("[mechbook] error:")]


def test_a_failing_chapter_is_one_line_naming_cell_notebook_and_resume(book, book_main, capsys):
    _nbdir, params, out = book
    assert book_main([str(params), "--only", "02"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    kept = out / "notebooks" / "02_fails.ipynb"
    assert "chapter 02_fails failed: RuntimeError: deliberate failure in chapter 02 in cell [" in line
    assert f"executed notebook kept: {kept}" in line and "rerun the same command to resume" in line
    assert "Traceback" in kept.read_text() or "deliberate failure" in kept.read_text()
    assert not (out / ".lock").exists()


def test_a_dead_kernel_is_one_line_and_the_notebook_says_where(book, book_main, capsys):
    nbdir, params, out = book
    (nbdir / "03_dies.py").write_text(CHAPTER_DIES)
    assert book_main([str(params), "--only", "03"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    kept = out / "notebooks" / "03_dies.ipynb"
    # the execution count is there when the kernel announced the cell before dying (a race with SIGKILL)
    import re

    assert re.search(r"chapter 03_dies failed: the kernel died in cell (\[\d+\] )?`import os`", line), line
    assert "out-of-memory killer" in line and str(kept) in line and "rerun the same command to resume" in line
    nb = nbformat.read(kept, as_version=4)
    died = [c for c in nb.cells if any(o.get("ename") == "DeadKernelError" for o in c.get("outputs", []))]
    assert len(died) == 1 and "os.kill" in died[0].source
    assert not (out / ".lock").exists()


def test_ctrl_c_is_one_line_and_exit_130(book, capsys, monkeypatch):
    import mechlib.book as book_module

    _, params, _ = book

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(book_module, "run_book", interrupted)
    assert main([str(params)]) == 130
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == "[mechbook] error: interrupted (Ctrl-C); rerun the same command to resume (finished work is reused)"


def test_ctrl_c_inside_a_chapter_names_it_keeps_the_notebook_and_frees_the_lock(book, book_main, capsys, monkeypatch):
    import papermill

    _nbdir, params, out = book

    def execute(nb, output_path, **kwargs):  # papermill has written the partial notebook when Ctrl-C lands
        cell = [c for c in nb.cells if c.cell_type == "code"][-1]
        cell.metadata["papermill"] = {"start_time": "now"}
        cell.execution_count = 4
        nbformat.write(nb, output_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    assert book_main([str(params), "--only", "01"]) == 130
    (line,) = _error_lines(capsys.readouterr().err)
    kept = out / "notebooks" / "01_fake.ipynb"
    assert line.startswith("[mechbook] error: interrupted (Ctrl-C) in chapter 01_fake in cell [4]")
    assert f"executed notebook kept: {kept}" in line
    assert "KeyboardInterrupt" in kept.read_text() and not (out / ".lock").exists()


def test_a_chapter_that_never_started_keeps_its_trace_in_a_file(book, capsys, monkeypatch):
    import papermill

    _, params, out = book

    def execute(*args, **kwargs):
        raise RuntimeError("Kernel didn't respond in 60 seconds")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    with pytest.raises(ChapterError) as info:
        run_book(params, ["01"], notebooks_dir=book[0])
    trace = out / "notebooks" / "01_fake.traceback.txt"
    assert info.value.notebook is None and "no notebook was written" in str(info.value)
    assert f"(traceback: {trace})" in str(info.value) and "Traceback" in trace.read_text()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ checked before any chapter runs


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"layer": 999},
            "'layer' is 999 but embedded:smollm2-135m-instruct has 30 decoder layers: valid layers are 0..29",
        ),
        ({"steering_layer": 30}, "'steering_layer' is 30 but embedded:smollm2-135m-instruct has 30 decoder layers"),
    ],
)
def test_layers_beyond_the_model_are_refused_before_any_chapter(book, book_main, capsys, values, message):
    _, _, out = book
    params = out.parent.parent / "layers.yaml"
    params.write_text(yaml.safe_dump(values))
    assert book_main([str(params)]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert message in line and str(params) in line
    assert not (out.parent / "layers").exists()


def test_cuda_asked_where_there_is_none_is_refused(book, book_main, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, out = book
    params = out.parent.parent / "gpu.yaml"
    params.write_text("device: cuda:1\n")
    assert book_main([str(params)]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "'device' is 'cuda:1' but torch.cuda.is_available() is False" in line
    assert not (out.parent / "gpu").exists()


CHAPTER_READS_INPUTS = (
    HEADER
    + """
# %% [markdown]
# A stand-in chapter that declares the parameters naming local inputs.

# %% tags=["parameters"]
run = "default"
corpus = "python-stdlib-docs"
task = "arithmetic"
gsm8k_path = ""
gsm8k_split = "test"
sae_source = "train"
sae_pretrained = ""

# %%
print("ran")
"""
)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"task": "gsm8k", "gsm8k_path": "{tmp}/no-such-gsm8k"}, "'gsm8k_path': GSM8K path {tmp}/no-such-gsm8k does"),
        ({"task": "gsm8k", "gsm8k_path": "{tmp}"}, "'gsm8k_path': GSM8K folder {tmp} has no test.jsonl"),
        ({"corpus": "{tmp}/no-such-corpus.txt"}, "'corpus': corpus file not found: {tmp}/no-such-corpus.txt"),
        ({"corpus": "{tmp}/trial.yaml"}, "'corpus': corpus file {tmp}/trial.yaml must end in .txt"),
        ({"sae_source": "pretrained", "sae_pretrained": "{tmp}"}, "'sae_pretrained': SAE checkpoint not found: {tmp}"),
    ],
)
def test_a_missing_local_input_is_refused_before_any_chapter(book, monkeypatch, capsys, values, message):
    """A typo in a path that chapter 04 (or 02) reads must not cost the chapters before it."""
    import functools

    import mechlib.book as book_module

    nbdir, params, out = book
    (nbdir / "03_reads.py").write_text(CHAPTER_READS_INPUTS)
    tmp = str(out.parent.parent)
    params.write_text(yaml.safe_dump({k: v.replace("{tmp}", tmp) for k, v in values.items()}))
    monkeypatch.setattr(book_module, "run_book", functools.partial(book_module.run_book, notebooks_dir=nbdir))
    assert main([str(params)]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert message.replace("{tmp}", tmp) in line and str(params) in line
    assert not out.exists()  # nothing ran, nothing was written
    # only the chapters that declare the parameter bring the check: chapter 01 alone runs
    assert main([str(params), "--only", "01"]) == 0


def test_hub_inputs_are_left_to_the_chapter_that_downloads_them():
    from mechlib.book import check_inputs
    from mechlib.params import validate

    every = {"corpus", "gsm8k_path", "sae_pretrained"}
    check_inputs(validate({"corpus": "hf:org/data", "task": "gsm8k", "gsm8k_path": ""}), "x.yaml", every)
    check_inputs(validate({"sae_source": "pretrained", "sae_pretrained": "hf:org/sae"}), "x.yaml", every)
    # a GSM8K path is not read when the task is the generated one; with task gsm8k the same path is refused
    check_inputs(validate({"task": "arithmetic", "gsm8k_path": "/no/such/file.jsonl"}), "x.yaml", every)
    with pytest.raises(ParamsError, match=r"x\.yaml: 'gsm8k_path': GSM8K path /no/such/file\.jsonl does not exist"):
        check_inputs(validate({"task": "gsm8k", "gsm8k_path": "/no/such/file.jsonl"}), "x.yaml", every)


def test_an_uncached_hub_model_skips_the_layer_check_with_a_note(monkeypatch, capsys):
    from mechlib.book import check_layers
    from mechlib.params import validate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_layers(validate({"model": "mechbook-test-org/not-a-cached-model", "layer": 999}), "x.yaml")
    err = capsys.readouterr().err
    assert err.startswith("[mechbook] note: layer check skipped until the model loads:") and err.count("\n") == 1


def test_a_second_run_of_the_same_name_fails_at_once_naming_the_holder(book, book_main, capsys):
    from mechlib.runlock import run_lock

    _nbdir, params, out = book
    with run_lock(out, "trial"):
        assert book_main([str(params), "--only", "01"]) == 1
        (line,) = _error_lines(capsys.readouterr().err)
        assert f"run 'trial' is already running (pid {os.getpid()} on" in line
        assert not (out / "notebooks" / "01_fake.ipynb").exists()
    assert (out / ".lock").exists() is False


def test_run_name_override_writes_elsewhere(book, book_main):
    _, params, out = book
    assert book_main([str(params), "--only", "01", "--run", "trial-ci"]) == 0
    other = out.with_name("trial-ci")
    assert json.loads((other / "metrics" / "01_fake.json").read_text()) == {"k": 7}
    assert not out.exists(), "the file's own run folder is left alone"
    assert book_main([str(params), "--only", "01", "--run", "../escape"]) == 1


def test_kernels_start_without_their_tcp_warning(book, capfd):
    nbdir, params, _ = book
    run_book(params, ["01"], notebooks_dir=nbdir)
    err = capfd.readouterr().err
    assert "without encryption" not in err and "IPKernelApp" not in err


def test_only_the_shutdown_interrupts_kernel_log_line_is_dropped(book, capfd):
    """jupyter_client's SIGINT at shutdown makes a busy kernel log "KeyboardInterrupt caught in kernel."
    after the chapter finished; that line alone is filtered, other kernel errors still reach the terminal."""
    nbdir, params, _ = book
    (nbdir / "03_logs.py").write_text(
        HEADER + '\n# %% tags=["parameters"]\nrun = "default"\n\n# %%\nlog = get_ipython().kernel.log\n'
        'log.error("KeyboardInterrupt caught in kernel.")\nlog.error("some other kernel error")\n'
    )
    run_book(params, ["03"], notebooks_dir=nbdir)
    err = capfd.readouterr().err
    assert "some other kernel error" in err and "KeyboardInterrupt caught" not in err


def test_p_overrides_one_parameter_each_through_the_schema(book, book_main, capsys):
    _nbdir, params, out = book
    assert book_main([str(params), "--only", "01", "-p", "k=64", "-p", "lr=5e-4"]) == 0
    assert json.loads((out / "metrics" / "01_fake.json").read_text()) == {"k": 64}  # the chapter saw it
    saved = yaml.safe_load((out / "params.yaml").read_text())
    assert saved["k"] == 64 and saved["lr"] == 0.0005 and isinstance(saved["lr"], float)  # 5e-4: a YAML 1.2 float
    assert yaml.safe_load(params.read_text()) == {"k": 7}  # the params file itself is untouched


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "kk=64"], "with -p kk=64: unknown parameter 'kk'. Did you mean 'k'?"),
        (["-p", "k=sixty"], "parameter 'k' must be int, got 'sixty'"),
        (["-p", "k"], "-p 'k': expected KEY=VALUE"),
        (["-p", "k=1", "-p", "k=2"], "-p k: given twice"),
        (["-p", "k=0"], "with -p k=0: 'k' must be positive, got 0"),
        # checked against the model's config: the error still names the override that set it
        (["-p", "layer=999"], "with -p layer=999: 'layer' is 999 but embedded:smollm2-135m-instruct has 30"),
    ],
)
def test_bad_p_overrides_are_one_clear_error_before_any_chapter_runs(book, book_main, capsys, args, message):
    _nbdir, params, out = book
    assert book_main([str(params), "--only", "01", *args]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert message in line
    assert not (out / "metrics" / "01_fake.json").exists()


def test_progress_bars_keep_only_their_final_line(book, monkeypatch):
    nbdir, params, out = book
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the test session disables bars; the kernel must draw this one
    run_book(params, ["01"], notebooks_dir=nbdir)
    nb = nbformat.read(out / "notebooks" / "01_fake.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "fake bar" in c.source]
    streams = [o for o in cell.outputs if o.output_type == "stream"]
    assert len(streams) == 1 and "\r" not in streams[0].text
    lines = [line for line in streams[0].text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fake bar: 100%") and "3/3" in lines[0]


def test_collapse_streams_merges_neighbours_and_resolves_redraws():
    from mechlib.tidy import collapse_streams

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="\rbar 0%"),
        nbformat.v4.new_output("stream", name="stderr", text="\rbar 100%"),
        nbformat.v4.new_output("stream", name="stderr", text="\n"),
        nbformat.v4.new_output("stream", name="stdout", text="a\nb\n"),
        nbformat.v4.new_output("stream", name="stderr", text="w\n"),
    ]
    nb.cells.append(cell)
    collapse_streams(nb)
    assert [(o.name, o.text) for o in cell.outputs] == [
        ("stderr", "bar 100%\n"),
        ("stdout", "a\nb\n"),
        ("stderr", "w\n"),
    ]
