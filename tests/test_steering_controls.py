"""Random-direction controls: the directions, the paired comparison, and the sweep's own record files."""

from __future__ import annotations

import pytest
import torch

from mechlib.models import LoadedModel, decoder_layers
from mechlib.stats import mcnemar_exact
from mechlib.steering import SteeringError, correctness, run_sweep, steer_records_path
from mechlib.steering_controls import paired_comparison, random_directions, run_random_control
from mechlib.steering_vector import SteeringVector
from mechlib.tasks import arithmetic_questions


def test_random_directions_are_unit_seeded_and_distinct():
    a = random_directions(64, 3, seed=0)
    assert a.shape == (3, 64) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(a, random_directions(64, 3, seed=0))
    assert not torch.equal(a, random_directions(64, 3, seed=1))
    assert (a @ a.T - torch.eye(3)).abs().max() < 0.6  # three different directions, not one repeated
    assert random_directions(64, 0, seed=0).shape == (0, 64)
    with pytest.raises(SteeringError, match="n >= 0"):
        random_directions(64, -1, seed=0)


def test_paired_comparison_counts_discordant_questions():
    a = {"q1": True, "q2": True, "q3": False, "q4": False, "q5": True}
    b = {"q1": True, "q2": False, "q3": True, "q4": True, "q5": False}
    cmp = paired_comparison(a, b)
    assert (cmp.a_only, cmp.b_only) == (2, 2) and cmp.mcnemar_p == mcnemar_exact(2, 2) == 1.0
    with pytest.raises(SteeringError, match="same non-empty set"):
        paired_comparison(a, {"q1": True})


def test_random_control_sweeps_each_direction_into_its_own_files(tiny_llama, tmp_path):
    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(4, seed=2)
    caa = torch.randn(64, generator=torch.Generator().manual_seed(5))
    vec = SteeringVector(1, caa, 10.0)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=3, batch_size=4, records_dir=tmp_path, progress=False)
    caa_sweep = run_sweep(loaded, questions, vector=vec, scales=[0.5], **kw)
    caa_ok = correctness(caa_sweep[0.5])
    baseline = {q.id: i % 2 == 0 for i, q in enumerate(questions)}
    controls = run_random_control(
        loaded,
        questions,
        caa=vec,
        scale=0.5,
        n_directions=2,
        seed=7,
        baseline=baseline,
        caa_at_scale=caa_ok,
        n_bootstrap=200,
        **kw,
    )
    assert [c.index for c in controls] == [0, 1]
    dirs = random_directions(64, 2, seed=7)
    for c, v in zip(controls, dirs):
        assert steer_records_path(tmp_path, 1, 0.5, f"_rand{c.index}").is_file()
        assert c.cos_with_caa == pytest.approx(float(v @ (caa / caa.norm())), abs=1e-6)
        assert c.row.n == len(questions) and c.vs_caa is not None
        # the row is what a plain sweep along the same direction gives
        again = run_sweep(loaded, questions, vector=vec.with_unit(v), scales=[0.5], tag=f"_check{c.index}", **kw)[0.5]
        steered = correctness(again)
        assert c.row.accuracy == sum(steered.values()) / len(steered)
        assert c.vs_caa == paired_comparison(caa_ok, steered)
    # a new CAA vector discards the CAA records only, never the controls'
    run_sweep(loaded, questions, vector=vec.with_unit(-caa), scales=[0.5], **kw)
    assert steer_records_path(tmp_path, 1, 0.5, "_rand0").is_file()
    none_vs = run_random_control(
        loaded,
        questions,
        caa=vec,
        scale=0.5,
        n_directions=1,
        seed=7,
        baseline=baseline,
        caa_at_scale=None,
        n_bootstrap=200,
        **kw,
    )
    assert none_vs[0].vs_caa is None


def test_sweep_tag_must_be_safe_in_file_names(tiny_llama, tmp_path):
    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    with pytest.raises(SteeringError, match="tag must be"):
        run_sweep(
            loaded,
            arithmetic_questions(1, seed=0),
            vector=SteeringVector(1, torch.ones(64), 1.0),
            scales=[0.1],
            prompt_format="gemma_manual",
            max_new_tokens=2,
            batch_size=1,
            records_dir=tmp_path,
            tag="../x",
            progress=False,
        )
