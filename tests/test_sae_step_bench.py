"""benchmarks/sae_step.py on CPU (--small): every variant runs at both batch sizes, the equivalence
and profile stages run for the fast variants, the JSON is written, and a failing variant is
recorded without costing the rest of the run (the GPU run's logic, with the torch twins)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sae_step", REPO_ROOT / "benchmarks" / "sae_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


FAST_ARGS = ["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--baseline-steps", "1"]


def test_every_candidate_at_both_batches_with_equivalence_and_profile(bench, tmp_path):
    out = tmp_path / "sae_step.json"
    report = bench.main([*FAST_ARGS, "--equiv-steps", "10", "--out", str(out)])
    rows = report["results"]
    assert not [r for r in rows if r["error"]], rows
    variants = bench.VARIANTS.split(",")
    for batch in report["batches"]:
        assert sorted(r["variant"] for r in rows if r["batch"] == batch and "no_dead" not in r["variant"]) == sorted(
            variants
        )
    assert report["batches"] == [512, 1024]
    assert report["best"] in bench.FAST_BWD
    assert any(r["variant"] == f"{report['best']}_no_dead" and r["n_dead"] == 0 for r in rows)
    assert {r["backend"] for r in rows if r["variant"] in bench.FAST_BWD} == {
        "torch/sparse",
        "torch/seg",
        "torch/dense",
        "torch/dense_gather",
    }
    eq = report["equivalence"]
    assert set(eq) == set(bench.FAST_BWD)
    assert all(e["passed"] and e["heldout_fvu_diff"] <= 0.005 for e in eq.values()), eq
    assert report["profile"] and "Name" in "\n".join(report["profile"])
    saved = json.loads(out.read_text())
    assert saved["stage"] == "done" and saved["best"] == report["best"]


def test_a_failing_variant_is_recorded_and_the_run_goes_on(bench, monkeypatch):
    real = bench.make_trainer

    def broken(kind, *args, **kwargs):
        if kind.startswith("fast_dense"):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(bench, "make_trainer", broken)
    report = bench.main(
        [*FAST_ARGS, "--equiv-steps", "3", "--batches", "256", "--variants", "fast,fast_dense", "--no-profile"]
    )
    by = {r["variant"]: r for r in report["results"]}
    assert "out of memory" in by["fast_dense"]["error"] and by["fast_dense"]["tokens_per_s"] is None
    assert by["fast"]["error"] is None and by["fast"]["tokens_per_s"] > 0
    assert report["best"] == "fast" and set(report["equivalence"]) == {"fast"}


def test_unknown_variant_is_a_clear_error(bench):
    with pytest.raises(SystemExit):
        bench.main([*FAST_ARGS, "--variants", "fast,fast_radix_topk"])
