"""The per-chapter device snapshot the runner's kernels write (mechlib.device_stats)."""

from __future__ import annotations

import pytest
import torch

from mechlib import device_stats


def test_snapshot_on_cpu_names_the_cpu_and_no_gpu_memory(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already in use in this process")
    path = tmp_path / ".device_01.json"
    device_stats.write_snapshot(path)
    snap = device_stats.read(path)
    assert snap is not None and snap.device == "cpu" and snap.peak_gpu_bytes is None
    assert snap.torch == torch.__version__


def test_missing_or_damaged_snapshot_reads_as_none(tmp_path):
    assert device_stats.read(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text('{"device": "cpu"}')
    assert device_stats.read(tmp_path / "bad.json") is None


def test_install_without_the_variable_registers_nothing(monkeypatch):
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    monkeypatch.delenv(device_stats.ENV, raising=False)
    before = list(shell.events.callbacks["post_run_cell"])
    device_stats.install()
    assert shell.events.callbacks["post_run_cell"] == before


def test_kernel_hook_writes_after_each_cell(tmp_path, monkeypatch):
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    target = tmp_path / ".device_x.json"
    monkeypatch.setenv(device_stats.ENV, str(target))
    before = list(shell.events.callbacks["post_run_cell"])
    device_stats.install()
    added = [cb for cb in shell.events.callbacks["post_run_cell"] if cb not in before]
    try:
        assert len(added) == 1 and not target.exists()
        shell.run_cell("x = 1 + 1")
        snap = device_stats.read(target)
        assert snap is not None and snap.device == ("cuda" if torch.cuda.is_initialized() else "cpu")
        target.unlink()
        shell.run_cell("y = 2")  # the next cell writes it again
        assert device_stats.read(target) is not None
    finally:
        for cb in added:  # the shell is shared by the worker's other tests
            shell.events.unregister("post_run_cell", cb)


def test_format_bytes():
    assert device_stats.format_bytes(None) == "—" and device_stats.format_bytes(3 * 2**30) == "3.00 GiB"


def test_the_runner_records_each_chapters_device_and_the_report_shows_it(tmp_path, monkeypatch):
    """A real kernel: the runner's exec_lines hook writes the snapshot, run_book gathers it."""
    import yaml

    import mechlib.paths
    from mechlib.book import run_book

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_fake.py").write_text(
        "# ---\n# jupyter:\n#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}\n"
        '# ---\n\n# %% tags=["parameters"]\nrun = "default"\n\n# %%\nimport torch\nx = torch.ones(2)\n'
    )
    monkeypatch.setattr(mechlib.paths, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.setenv("MECHBOOK_OUTPUTS", str(tmp_path / "outputs"))
    params = tmp_path / "trial.yaml"
    params.write_text(yaml.safe_dump({"k": 7}))
    run_book(params, notebooks_dir=nbdir)
    import json

    devices = json.loads((tmp_path / "outputs" / "trial" / "metrics" / "book_devices.json").read_text())
    assert list(devices) == ["01_fake"] and devices["01_fake"]["device"] == "cpu"
    assert devices["01_fake"]["torch"] == torch.__version__  # read inside the kernel, after the chapter imported it
    report = (tmp_path / "outputs" / "trial" / "REPORT.md").read_text()
    assert "| 01_fake |" in report and "| cpu (" in report
    # a later call that runs another chapter keeps the first one's time and device: the report shows both
    (nbdir / "02_fake.py").write_text((nbdir / "01_fake.py").read_text())
    run_book(params, only=["02"], notebooks_dir=nbdir)
    metrics = tmp_path / "outputs" / "trial" / "metrics"
    timings = json.loads((metrics / "book_timings.json").read_text())
    devices = json.loads((metrics / "book_devices.json").read_text())
    assert list(timings) == list(devices) == ["01_fake", "02_fake"]
    report = (tmp_path / "outputs" / "trial" / "REPORT.md").read_text()
    assert "| 01_fake |" in report and "| 02_fake |" in report


def test_snapshot_counts_the_chapters_decode_graph_captures(monkeypatch, tmp_path):
    """After a chapter that offered batches to mechlib.graph_decode, the snapshot says how many it captured and
    which batches fell back (a GPU run's evidence that the steering sweep replays one graph); before, None."""
    import sys

    from mechlib.graph_decode import GraphHolder

    holder = GraphHolder()
    monkeypatch.setattr(sys.modules["mechlib.graph_decode"], "GRAPHS", holder)
    assert device_stats.snapshot().graph_captures is None and device_stats.snapshot().graphs_note() == "—"
    holder.builds, holder.captures = 3, 2
    holder.errors += ["capture failed: X", "capture failed: X", "not captured, hooks without graph_key(): y"]
    snap = device_stats.snapshot()
    assert snap.graph_captures == 2 and snap.graph_fallbacks == ("capture failed: X", snap.graph_fallbacks[1])
    assert snap.graphs_note() == "2 (2 fallback notes)"
    path = tmp_path / ".device_06.json"
    device_stats.write_snapshot(path)
    assert device_stats.read(path) == snap  # the tuple survives the JSON round trip
    old = {k: v for k, v in snap.as_dict().items() if not k.startswith("graph_")}  # a file from before the fields
    assert device_stats.ChapterDevice.from_dict(old).graph_captures is None


def test_report_shows_the_graph_column_only_when_a_chapter_captured(tmp_path, monkeypatch):
    import json

    import mechlib.paths
    from mechlib.paths import RunPaths
    from mechlib.report import write_report

    monkeypatch.setattr(mechlib.paths, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.setenv("MECHBOOK_OUTPUTS", str(tmp_path / "outputs"))
    paths = RunPaths("g").make()
    cpu = device_stats.ChapterDevice("cpu", "2 CPUs", None, "2.13", None)
    (paths.metrics / "book_timings.json").write_text(json.dumps({"04_gsm8k_baseline": 1.0, "06_steering": 2.0}))
    devices = {"04_gsm8k_baseline": cpu.as_dict(), "06_steering": cpu.as_dict()}
    (paths.metrics / "book_devices.json").write_text(json.dumps(devices))
    assert "CUDA graphs" not in write_report("g").read_text()
    gpu = device_stats.ChapterDevice("cuda", "NVIDIA H200", 2**30, "2.13", "13.0", 1, ())
    devices["06_steering"] = gpu.as_dict()
    (paths.metrics / "book_devices.json").write_text(json.dumps(devices))
    report = write_report("g").read_text()
    assert (
        "decode steps captured as CUDA graphs" in report
        and "| 06_steering | 2 | cuda (NVIDIA H200) | 1.00 GiB | 1 |" in report
    )
