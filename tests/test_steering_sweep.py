"""The sweep over conditions: one hook for the CAA scales and the controls, mixed batches give the same answers."""

from __future__ import annotations

import pytest
import torch

from mechlib import generate
from mechlib.models import LoadedModel, decoder_layers
from mechlib.steering import SteeringError, SweepCondition, run_conditions, run_sweep, steer_records_path
from mechlib.steering_controls import random_conditions, run_random_control
from mechlib.steering_vector import SteeringVector
from mechlib.tasks import arithmetic_questions


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _calls(monkeypatch) -> list[int]:
    """Record the batch size of every generate_ids call (and still generate)."""
    sizes: list[int] = []
    real = generate.generate_ids

    def counting(model, prompt_ids, *a, **k):
        sizes.append(len(prompt_ids))
        return real(model, prompt_ids, *a, **k)

    monkeypatch.setattr(generate, "generate_ids", counting)
    return sizes


def _conditions(d_model: int) -> list[SweepCondition]:
    caa = SteeringVector(1, torch.randn(d_model, generator=torch.Generator().manual_seed(3)), 10.0)
    return [SweepCondition(caa, s) for s in (0.0, 0.4, -0.3)] + random_conditions(caa, 0.4, 2, seed=5)


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_gemma4", "tiny_qwen35"])
def test_mixed_batches_give_each_condition_its_own_answers(request, arch_fixture, tmp_path, monkeypatch):
    """Conditions sharing batches (a GPU's default) answer exactly as one condition per batch does (a CPU's),
    in fewer, equally shaped batches: every batch, the last one filled, has ``batch_size`` rows."""
    model, tok = request.getfixturevalue(arch_fixture)
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(5, seed=0)
    conditions = _conditions(64)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=4, batch_size=4, progress=False)
    sizes = _calls(monkeypatch)
    apart = run_conditions(loaded, questions, conditions, records_dir=tmp_path / "apart", mix=False, **kw)
    assert sizes == [4, 1] * len(conditions)  # 5 questions per condition: a batch of 4, then 1
    sizes.clear()
    mixed = run_conditions(loaded, questions, conditions, records_dir=tmp_path / "mixed", mix=True, **kw)
    assert sizes == [4] * 7  # 25 rows: 6 full batches and a last one filled from 1 to 4
    assert _hook_count(model) == 0
    for a, m in zip(apart, mixed):
        assert [r.generation for r in a] == [r.generation for r in m]
        assert [r.id for r in m] == [q.id for q in questions]
    # the zero condition is the unsteered model, the others move it
    assert [r.generation for r in mixed[0]] != [r.generation for r in mixed[1]]
    for c, records in zip(conditions, mixed):
        assert steer_records_path(tmp_path / "mixed", 1, c.scale, c.tag).is_file() and len(records) == 5


def test_controls_generated_with_the_sweep_are_read_back_not_generated(tiny_llama, tmp_path, monkeypatch):
    """Chapter 06's order: ``run_sweep(also=controls)`` writes the controls' files under one hook; the
    later ``run_random_control`` call finds every answer there and generates nothing."""
    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(4, seed=2)
    vec = SteeringVector(1, torch.randn(64, generator=torch.Generator().manual_seed(5)), 10.0)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=3, batch_size=4, records_dir=tmp_path, progress=False)
    also = random_conditions(vec, 0.5, 2, seed=7)
    sweep = run_sweep(loaded, questions, vector=vec, scales=[0.5, -0.5], also=also, **kw)
    assert list(sweep) == [0.5, -0.5]  # only the vector's own scales come back
    for c in also:
        assert c.records_path(tmp_path).is_file()

    def boom(*a, **k):
        raise AssertionError("the controls were generated with the sweep")

    monkeypatch.setattr(generate, "generate_ids", boom)
    baseline = {q.id: True for q in questions}

    def controls(n_directions: int):
        return run_random_control(
            loaded,
            questions,
            caa=vec,
            scale=0.5,
            n_directions=n_directions,
            seed=7,
            baseline=baseline,
            caa_at_scale=None,
            n_bootstrap=50,
            **kw,
        )

    assert [c.index for c in controls(2)] == [0, 1]
    # a third direction was not generated with the sweep: asking for it must generate
    with pytest.raises(AssertionError, match="generated with the sweep"):
        controls(3)


def test_conditions_come_back_in_the_order_asked_and_bad_sets_are_refused(tiny_llama, tmp_path):
    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(2, seed=1)
    a = SteeringVector(1, torch.ones(64), 5.0)
    b = a.with_unit(-torch.ones(64))
    kw = dict(prompt_format="gemma_manual", max_new_tokens=2, batch_size=3, records_dir=tmp_path, progress=False)
    asked = [SweepCondition(a, 0.2), SweepCondition(b, 0.2, "_neg"), SweepCondition(a, 0.2)]
    out = run_conditions(loaded, questions, asked, **kw)
    assert len(out) == 3 and out[0] is out[2]  # a repeated condition is one condition, one file
    assert run_conditions(loaded, questions, [], **kw) == []
    with pytest.raises(SteeringError, match="two different vectors"):
        run_conditions(loaded, questions, [SweepCondition(a, 0.2), SweepCondition(b, 0.3)], **kw)
    other_layer = SteeringVector(2, torch.ones(64), 5.0)
    with pytest.raises(SteeringError, match="one layer"):
        run_conditions(loaded, questions, [SweepCondition(a, 0.2), SweepCondition(other_layer, 0.2, "_l2")], **kw)
    assert _hook_count(model) == 0


def test_a_mixed_sweep_replays_one_graph_for_every_scale_and_control(tiny_llama, tmp_path):
    """The GPU path run on CPU (the static-buffer step a CUDA graph captures, run eagerly): all conditions'
    mixed batches share one captured step, and answer as the plain loop does, one condition per batch."""
    from mechlib.graph_decode import GRAPHS

    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(5, seed=0)
    conditions = _conditions(64)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=4, batch_size=4, progress=False)
    plain = run_conditions(loaded, questions, conditions, records_dir=tmp_path / "plain", mix=False, **kw)
    builds, errors = GRAPHS.builds, len(GRAPHS.errors)
    try:
        graphed = run_conditions(
            loaded,
            questions,
            conditions,
            records_dir=tmp_path / "graph",
            mix=True,
            cache="static",
            compile="graph",
            **kw,
        )
        assert GRAPHS.builds == builds + 1, (
            "7 batches of 5 conditions (the last one of a single condition): one step, replayed"
        )
        assert GRAPHS.errors[errors:] == []
    finally:
        GRAPHS.free(model)
    for p, g in zip(plain, graphed):
        assert [r.generation for r in p] == [r.generation for r in g]


def test_a_mixed_sweep_resumes_with_only_the_missing_rows(tiny_llama, tmp_path, monkeypatch):
    """A rerun with two more conditions (say, more random directions) generates only their rows, still in
    full batches; the finished conditions are read back unchanged."""
    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(5, seed=0)
    conditions = _conditions(64)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=4, batch_size=4, progress=False, mix=True)
    first = run_conditions(loaded, questions, conditions[:3], records_dir=tmp_path, **kw)
    sizes = _calls(monkeypatch)
    both = run_conditions(loaded, questions, conditions, records_dir=tmp_path, **kw)
    assert sizes == [4, 4, 4]  # 2 new conditions x 5 questions = 10 rows: 4 + 4 + 2 filled to 4
    assert [[r.generation for r in c] for c in both[:3]] == [[r.generation for r in c] for c in first]
    apart = run_conditions(loaded, questions, conditions[3:], records_dir=tmp_path / "apart", **{**kw, "mix": False})
    assert [[r.generation for r in c] for c in both[3:]] == [[r.generation for r in c] for c in apart]
