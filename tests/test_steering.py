"""The CAA hook on the study's classes: exact displacement at one layer, always removed; the table."""

from __future__ import annotations

import pytest
import torch

from mechlib.models import decoder_layers
from mechlib.stats import mcnemar_exact
from mechlib.steering import (
    SteeringError,
    SteeringVector,
    correctness,
    recovered_overlaps,
    scale_tag,
    steering_delta,
    steering_hook,
    steering_row,
)

PROMPTS = ["Tom has 3 apples and buys 4 more.", "What is 12 + 30?"]


def _observe(model, tok, extra_layer_hook=None):
    """Run a forward; return each decoder layer's input and output (as seen *after* any other hooks)."""
    layers = decoder_layers(model)
    ins, outs, handles = {}, {}, []

    def pre(i):
        def fn(_m, args, kwargs):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return fn

    def post(i):
        def fn(_m, _a, out):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i)))
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    try:
        with torch.no_grad():
            logits = model(**enc).logits
    finally:
        for h in handles:
            h.remove()
    return ins, outs, logits


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("scale", [0.1, -0.05])
def test_hook_moves_residual_exactly_at_one_layer(tiny_any, scale):
    model, tok, arch = tiny_any
    layers = decoder_layers(model)
    layer = len(layers) // 2
    clean_in, clean_out, clean_logits = _observe(model, tok)
    mean_norm = float(clean_out[layer].norm(dim=-1).mean())
    vector = torch.randn(clean_out[layer].shape[-1], generator=torch.Generator().manual_seed(1)) * 7.0
    with steering_hook(layers[layer], vector, scale, mean_norm) as delta:
        steered_in, steered_out, steered_logits = _observe(model, tok)
    assert _hook_count(model) == 0

    expected = scale * mean_norm * vector / vector.norm()
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=0)
    assert float(delta.norm()) == pytest.approx(abs(scale) * mean_norm, rel=1e-5)
    # the steered layer's output is the clean output plus the delta, at every position, bit for bit
    assert torch.equal(steered_out[layer], clean_out[layer] + delta)
    # everything before it is untouched
    for i in range(layer):
        assert torch.equal(steered_in[i], clean_in[i]) and torch.equal(steered_out[i], clean_out[i]), (arch, i)
    assert torch.equal(steered_in[layer], clean_in[layer])
    # the next layer receives the steered stream, and the model's output changes
    torch.testing.assert_close(steered_in[layer + 1], steered_out[layer], rtol=0, atol=0)
    assert not torch.allclose(steered_logits, clean_logits)


def test_zero_scale_changes_nothing(tiny_gemma4):
    model, tok = tiny_gemma4
    layers = decoder_layers(model)
    _, clean_out, clean_logits = _observe(model, tok)
    with steering_hook(layers[2], torch.ones(clean_out[2].shape[-1]), 0.0, 5.0):
        _, _, logits = _observe(model, tok)
    assert torch.equal(logits, clean_logits)


def test_hook_removed_after_exception_in_body(tiny_gemma4):
    model, tok = tiny_gemma4
    layers = decoder_layers(model)
    _, _, clean_logits = _observe(model, tok)
    with pytest.raises(RuntimeError, match="boom"), steering_hook(layers[3], torch.ones(64), 0.5, 10.0):
        assert _hook_count(model) == 1
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    _, _, after = _observe(model, tok)
    assert torch.equal(after, clean_logits)


def test_hook_removed_after_exception_inside_forward(tiny_qwen35):
    model, tok = tiny_qwen35
    layers = decoder_layers(model)
    # wrong width: raises inside the forward
    with pytest.raises(SteeringError, match="dims"), steering_hook(layers[1], torch.ones(10), 0.5, 10.0):
        _observe(model, tok)
    assert _hook_count(model) == 0


def test_hook_steers_every_generation_step(tiny_llama):
    """During HF generate the hook fires at prefill and each decode step (each new position steered)."""
    model, tok = tiny_llama
    layers = decoder_layers(model)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    seen = []
    counter = layers[1].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    try:
        with steering_hook(layers[1], torch.ones(64), 0.5, 10.0), torch.no_grad():
            steered = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        counter.remove()
    assert seen[0] == enc["input_ids"].shape[1] and seen[1:] == [1, 1, 1]
    with torch.no_grad():
        clean = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert steered.shape == clean.shape and _hook_count(model) == 0


def test_bad_vectors_are_refused():
    with pytest.raises(SteeringError):
        steering_delta(torch.zeros(4), 0.1, 1.0)
    with pytest.raises(SteeringError):
        steering_delta(torch.ones(2, 2), 0.1, 1.0)
    with pytest.raises(SteeringError, match="mean_norm"):
        steering_delta(torch.ones(4), 0.1, 0.0)


def test_steering_row_counts_and_tests():
    baseline = {"a": True, "b": False, "c": False, "d": True, "e": False, "f": True}
    steered = {"a": True, "b": True, "c": False, "d": False, "e": True, "f": True}
    row = steering_row(0.05, baseline, steered, n_bootstrap=200, seed=0)
    assert row.perturbation == pytest.approx(5.0)
    assert (row.recovered, row.broken, row.net_flips, row.n_baseline_wrong) == (2, 1, 1, 3)
    assert row.recovered_ids == ["b", "e"] and row.broken_ids == ["d"]
    assert row.accuracy == pytest.approx(4 / 6) and row.delta == pytest.approx(1 / 6)
    assert row.mcnemar_p == mcnemar_exact(2, 1)
    assert row.delta_ci95[0] <= row.delta <= row.delta_ci95[1]
    assert row.accuracy_ci95[0] < row.accuracy < row.accuracy_ci95[1]
    from mechlib.results import ScaleRow, copy_fields

    stored = copy_fields(ScaleRow, row).to_json()  # the row as the metrics file holds it, and back
    assert stored["recovered_ids"] == ["b", "e"] and ScaleRow.from_json(stored) == copy_fields(ScaleRow, row)
    with pytest.raises(SteeringError, match="same questions"):
        steering_row(0.1, baseline, {"a": True}, n_bootstrap=10)


def test_correctness_reads_objects_and_dicts():
    class R:
        def __init__(self, id, correct):
            self.id, self.correct = id, correct

    assert correctness([R("x", True), R("y", False)]) == {"x": True, "y": False}
    assert correctness([{"id": 3, "correct": 1}]) == {"3": True}


def test_overlaps():
    base = {str(i): False for i in range(4)}
    rows = [
        steering_row(s, base, {**base, **{k: True for k in ks}}, n_bootstrap=10)
        for s, ks in [(0.02, "01"), (0.05, "12"), (0.1, "")]
    ]
    ov = recovered_overlaps(rows)
    assert len(ov) == 3
    assert ov[0].intersection == 1 and ov[0].shared_ids == ["1"] and ov[0].jaccard == pytest.approx(1 / 3)
    assert ov[1].jaccard == 0.0 and ov[2].n_a == 2 and ov[2].n_b == 0


def test_scale_tag():
    assert scale_tag(0.05) == "+0.05" and scale_tag(-0.05) == "-0.05" and scale_tag(0.15) == "+0.15"
    assert scale_tag(0.0025) != scale_tag(0.003) and scale_tag(0) == "+0"


def test_vector_for_layer_builds_off_peak_and_reuses_peak(tmp_path):
    from mechlib.contrast import BaselineSplit, LayerStates
    from mechlib.steering import mean_residual_norm, vector_for_layer
    from mechlib.steering_vector import SteeringVector

    g = torch.Generator().manual_seed(0)
    ids = [f"q{i}" for i in range(10)]
    ls = LayerStates(ids, torch.randn(10, 3, 8, generator=g), torch.tensor([1.0, 2.0, 3.0]), "last", "m")
    split = BaselineSplit(ids[:8], ids[8:], {i: "" for i in ids}, {i: n % 2 == 0 for n, i in enumerate(ids)}, {})
    peak_vec = torch.zeros(8)
    peak_vec[0] = 1.0
    SteeringVector(1, peak_vec, 2.0, model="m", n_correct=4, n_wrong=4).save(tmp_path / "steering_vec_L1.pt")
    vec, path = vector_for_layer(ls, split, 1, tmp_path, model="m", peak_layer=1)
    assert torch.equal(vec.unit, peak_vec) and vec.mean_norm == 2.0 and path.name == "steering_vec_L1.pt"
    vec2, path2 = vector_for_layer(ls, split, 2, tmp_path, model="m", peak_layer=1)
    h = ls.states[:8, 2]
    y = torch.tensor([n % 2 == 0 for n in range(8)])
    expected = h[y].mean(0) - h[~y].mean(0)
    torch.testing.assert_close(vec2.unit, (expected / expected.norm()).float())
    assert vec2.mean_norm == 3.0 and SteeringVector.load(path2).layer == 2 and vec2.pooling == "last"
    assert vec2.n_correct == 4 and vec2.n_wrong == 4
    assert mean_residual_norm(ls, 0) == 1.0
    with pytest.raises(SteeringError, match="out of range"):
        mean_residual_norm(ls, 3)


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_gemma4"])
def test_run_sweep_resumes_and_matches_unsteered_generation(request, arch_fixture, tmp_path, monkeypatch):
    from mechlib import generate
    from mechlib.models import LoadedModel
    from mechlib.records import run_baseline
    from mechlib.steering import run_sweep, steer_records_path
    from mechlib.steering_vector import SteeringVector
    from mechlib.tasks import arithmetic_questions

    model, tok = request.getfixturevalue(arch_fixture)
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(5, seed=0)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))
    vec = SteeringVector(1, vector, 10.0)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=4, batch_size=2, records_dir=tmp_path)
    sweep = run_sweep(loaded, questions, vector=vec, scales=[0.0, 3.0], progress=False, **kw)
    assert _hook_count(model) == 0
    assert steer_records_path(tmp_path, 1, 3.0).is_file() and steer_records_path(tmp_path, 1, 0.0).is_file()
    plain = run_baseline(loaded, questions, "gemma_manual", 4, 2, tmp_path / "plain.jsonl", progress=False)
    assert [r.generation for r in sweep[0.0]] == [r.generation for r in plain]  # a zero vector changes nothing
    assert [r.generation for r in sweep[3.0]] != [r.generation for r in plain]  # a large one does
    # scales sharing batches (per-row vectors) give what one scale at a time with the plain hook gives
    with steering_hook(decoder_layers(model)[1], vector, 3.0, 10.0):
        single = run_baseline(loaded, questions, "gemma_manual", 4, 2, tmp_path / "single.jsonl", progress=False)
    assert [r.generation for r in sweep[3.0]] == [r.generation for r in single]

    def boom(*a, **k):
        raise AssertionError("a finished sweep must not generate again")

    monkeypatch.setattr(generate, "generate_ids", boom)
    again = run_sweep(loaded, questions, vector=vec, scales=[0.0, 3.0], progress=False, **kw)
    assert [r.generation for r in again[3.0]] == [r.generation for r in sweep[3.0]]
    # a different vector invalidates the steered records instead of reusing them
    with pytest.raises(AssertionError, match="must not generate"):
        run_sweep(loaded, questions, vector=vec.with_unit(-vector), scales=[3.0], progress=False, **kw)
    assert _hook_count(model) == 0


def test_row_steering_adds_each_rows_own_vector(tiny_gemma4):
    from mechlib.hooks import add_forward_hook
    from mechlib.steering import RowSteering

    model, tok = tiny_gemma4
    layers = decoder_layers(model)
    _, clean_out, _ = _observe(model, tok)
    deltas = torch.stack([steering_delta(torch.ones(64), 0.0, 1.0), steering_delta(torch.arange(64.0), 0.2, 9.0)])
    hook = RowSteering()
    hook.set_rows(deltas, torch.device("cpu"), torch.float32)
    with add_forward_hook(layers[2], hook):
        _, out, _ = _observe(model, tok)
    for i in range(2):
        assert torch.equal(out[2][i], clean_out[2][i] + deltas[i])
    assert torch.equal(out[1], clean_out[1]) and _hook_count(model) == 0
    hook.set_rows(deltas[1:], torch.device("cpu"), torch.float32)  # one delta broadcasts over the batch
    with add_forward_hook(layers[2], hook):
        _, out, _ = _observe(model, tok)
    for i in range(2):
        assert torch.equal(out[2][i], clean_out[2][i] + deltas[1])
    three = torch.cat([deltas, deltas[:1]])  # three rows' deltas for a batch of two
    hook.set_rows(three, torch.device("cpu"), torch.float32)
    with pytest.raises(SteeringError, match="do not fit"), add_forward_hook(layers[2], hook):
        _observe(model, tok)
    assert _hook_count(model) == 0


def test_run_sweep_discards_records_made_with_other_settings(tiny_llama, tmp_path):
    from mechlib.models import LoadedModel
    from mechlib.records import read_records
    from mechlib.steering import run_sweep, steer_records_path
    from mechlib.tasks import arithmetic_questions

    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(3, seed=1)
    kw = dict(
        vector=SteeringVector(1, torch.ones(64), 10.0),
        scales=[0.5],
        prompt_format="gemma_manual",
        batch_size=4,
        records_dir=tmp_path,
        progress=False,
    )
    first = run_sweep(loaded, questions, max_new_tokens=2, **kw)[0.5]
    longer = run_sweep(loaded, questions, max_new_tokens=5, **kw)[0.5]
    assert all(r.n_new_tokens <= 2 for r in first) and any(r.n_new_tokens > 2 for r in longer)
    on_disk = read_records(steer_records_path(tmp_path, 1, 0.5))
    assert [r.generation for r in on_disk] == [r.generation for r in longer]


def test_cached_steered_records_are_rescored_and_parser_version_invalidates(tiny_llama, tmp_path, monkeypatch):
    """Every condition is scored by the current parser: a stored verdict is never trusted, and a new
    parser version (which also changes where generation stops) regenerates instead of reusing."""
    import json

    from mechlib import generate, records
    from mechlib.models import LoadedModel
    from mechlib.steering import run_sweep, steer_records_path
    from mechlib.tasks import arithmetic_questions

    model, tok = tiny_llama
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(3, seed=2)
    kw = dict(
        vector=SteeringVector(1, torch.ones(64), 10.0),
        scales=[0.5],
        prompt_format="gemma_manual",
        max_new_tokens=3,
        batch_size=4,
        records_dir=tmp_path,
        progress=False,
    )
    first = run_sweep(loaded, questions, **kw)[0.5]
    path = steer_records_path(tmp_path, 1, 0.5)
    stale = [json.loads(line) for line in path.read_text().splitlines()]
    for r in stale:  # a verdict from "another parser": flipped, and a bogus reading
        r.update(correct=not r["correct"], parsed=-1.0, parsed_by="bogus", correct_strict=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in stale))
    calls = []
    real = generate.generate_ids
    monkeypatch.setattr(generate, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_sweep(loaded, questions, **kw)[0.5]
    assert again == first and calls == [], "reused records are re-scored on load, never regenerated"

    monkeypatch.setattr(records, "PARSER_VERSION", "answers-test-changed")
    changed = run_sweep(loaded, questions, **kw)[0.5]
    assert calls, "a new parser version must regenerate, not reuse"
    assert {r.parser_version for r in changed} == {"answers-test-changed"}
    assert json.loads(records.meta_path(path).read_text())["parser"] == "answers-test-changed"


def test_card_hook_written_without_mechlib_reproduces_the_sweep(tiny_llama, tmp_path):
    """The card's recipe (bare tensor, one-line forward hook, HF generate) gives mechlib's steered answers;
    a hook with the wrong scale does not — the check can fail."""
    from mechlib.models import LoadedModel
    from mechlib.records import run_baseline
    from mechlib.steering import changed_first, check_card_hook, run_sweep
    from mechlib.tasks import arithmetic_questions

    model, tok = tiny_llama
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    questions = arithmetic_questions(4, seed=5)
    unit = torch.randn(64, generator=torch.Generator().manual_seed(7))
    unit = unit / unit.norm()
    vec = SteeringVector(1, unit, 10.0, model="tiny", n_correct=2, n_wrong=2)
    path = vec.save(tmp_path / "steering_vec_L1.pt")
    kw = dict(prompt_format="gemma_manual", max_new_tokens=6)
    steered = run_sweep(
        loaded, questions, vector=vec, scales=[0.5], batch_size=4, records_dir=tmp_path, progress=False, **kw
    )[0.5]
    base = run_baseline(loaded, questions, "gemma_manual", 6, 4, tmp_path / "b.jsonl", progress=False)
    card_vec = torch.load(path)
    for scale, expect_all_equal in [(0.5, True), (1.5, False)]:
        delta = scale * 10.0 * card_vec
        check = check_card_hook(
            loaded,
            changed_first(questions, steered, base),
            steered,
            base,
            layer=1,
            register=lambda block, d=delta: block.register_forward_hook(lambda _m, _i, out: out + d),
            **kw,
        )
        assert check.n_steering_changed > 0, "steering must change some answers, or the check has no power"
        assert (check.n_equal == check.n) is expect_all_equal
    assert _hook_count(model) == 0
