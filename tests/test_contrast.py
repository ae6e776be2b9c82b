"""Contrast pipeline: layer states equal the model's own, a planted difference is found at its layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mechlib.contrast import (
    ContrastError,
    cached_layer_states,
    collect_layer_states,
    contrast_layers,
    features_table,
    mean_difference,
    projection_scores,
    projection_test,
    rank_sae_features,
)
from mechlib.models import decoder_layers
from mechlib.stats import spearman

WORDS = "apple river seven blue market stone quick lamp orange nine table forest cloud paper".split()


def encode_left(tokenizer, prompts):
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) + f" #{i}" for i in range(n)]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_states_equal_unpadded_layer_outputs(tiny_any, pooling):
    model, tok, arch = tiny_any
    prompts = make_prompts(5)
    ls = collect_layer_states(
        model,
        tok,
        prompts,
        [f"q{i}" for i in range(5)],
        pooling=pooling,
        batch_size=3,
        encode=encode_left,
        model_name=arch,
        progress=False,
    )
    n_layers = len(decoder_layers(model))
    assert ls.states.shape == (5, n_layers, 64) and ls.ids[0] == "q0"
    special = set(tok.all_special_ids)
    norm_sum, count = torch.zeros(n_layers, dtype=torch.float64), 0
    for j, prompt in enumerate(prompts):
        enc = tok(prompt, return_tensors="pt")
        outs = {}
        handles = [
            layer.register_forward_hook(lambda m, a, o, i=i, outs=outs: outs.__setitem__(i, o))
            for i, layer in enumerate(decoder_layers(model))
        ]
        try:
            with torch.no_grad():
                hs = model(**enc, output_hidden_states=True).hidden_states
        finally:
            for h in handles:
                h.remove()
        keep = torch.tensor([t not in special for t in enc["input_ids"][0].tolist()])
        count += int(keep.sum())
        for i in range(n_layers):
            ref = outs[i][0]
            if i < n_layers - 1:  # hidden_states[i + 1] is layer i's output except for the final-normed last
                torch.testing.assert_close(ref, hs[i + 1][0])
            pooled = ref[-1] if pooling == "last" else ref[keep].mean(0)
            torch.testing.assert_close(ls.states[j, i], pooled, atol=2e-4, rtol=1e-4)  # left padding vs none
            norm_sum[i] += ref[keep].norm(dim=-1).sum().double()
    torch.testing.assert_close(ls.token_norm_mean, (norm_sum / count).float(), atol=1e-4, rtol=1e-4)


SHARED_PREFIX = "You are a careful assistant. Example: two plus two is four. Now answer this one: "


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_shared_prefix_states_equal_whole_prompt_states(tiny_llama, pooling):
    """The default encoding runs the prompts' common prefix once (its cache copied per batch); states,
    pooled states and token norms equal those of running every prompt whole (an explicit encoder)."""
    import mechlib.contrast as contrast_mod
    from mechlib.kv_cache import MIN_SHARED_PREFIX, shared_prefix_len
    from mechlib.prompts import encode_prompts

    model, tok = tiny_llama
    prompts = [SHARED_PREFIX + p for p in make_prompts(7)]
    assert shared_prefix_len(encode_prompts(tok, prompts)) >= MIN_SHARED_PREFIX  # the shared path is taken
    ids = [f"q{i}" for i in range(7)]
    widths: list[int] = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    try:
        shared = collect_layer_states(model, tok, prompts, ids, pooling=pooling, batch_size=3, progress=False)
    finally:
        handle.remove()
    whole = collect_layer_states(
        model, tok, prompts, ids, pooling=pooling, batch_size=3, progress=False, encode=contrast_mod.encode_for_states
    )
    assert widths[0] == shared_prefix_len(encode_prompts(tok, prompts)) and max(widths[1:]) < widths[0]
    torch.testing.assert_close(shared.states, whole.states, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(shared.token_norm_mean, whole.token_norm_mean, atol=1e-4, rtol=1e-5)


def _collect_with_plant(model, tok, prompts, labels, layer, delta):
    """Collect states while a hook adds ``delta`` to layer ``layer``'s output for label-True prompts and
    the next layer's output takes it away again, so the difference lives at ``layer`` only."""
    layers = decoder_layers(model)
    is_true = {p: bool(y) for p, y in zip(prompts, labels)}
    rows: dict[str, torch.Tensor] = {}

    def encode(tokenizer, batch):
        rows["mask"] = torch.tensor([is_true[p] for p in batch], dtype=torch.float32)[:, None, None]
        return encode_left(tokenizer, batch)

    add = layers[layer].register_forward_hook(lambda m, a, out: out + rows["mask"] * delta)
    sub = layers[layer + 1].register_forward_hook(lambda m, a, out: out - rows["mask"] * delta)
    try:
        return collect_layer_states(
            model, tok, prompts, [str(i) for i in range(len(prompts))], batch_size=8, encode=encode, progress=False
        )
    finally:
        add.remove()
        sub.remove()


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_gemma4"])
def test_planted_difference_found_at_its_layer(request, arch_fixture):
    model, tok = request.getfixturevalue(arch_fixture)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2 - 1
    prompts = make_prompts(48, seed=1)
    labels = np.arange(48) % 2 == 0
    dims = [5, 17, 40]
    clean = collect_layer_states(
        model, tok, prompts, [str(i) for i in range(48)], batch_size=8, encode=encode_left, progress=False
    )
    delta = torch.zeros(64)  # 3 within-group standard deviations in three dimensions
    delta[dims] = 3.0 * clean.states[:, layer, dims].std(0) * torch.tensor([1.0, -1.0, 1.0])
    ls = _collect_with_plant(model, tok, prompts, labels, layer, delta)
    torch.testing.assert_close(ls.states[:, :layer], clean.states[:, :layer])  # nothing upstream moved

    res = contrast_layers(ls.states[:40], labels[:40], top_n=3, n_permutations=99, seed=0)
    assert res.peak_layer == layer
    assert res.null.p_peak == pytest.approx(1 / 100)
    assert sorted(np.argsort(-np.abs(res.d[layer]))[:3].tolist()) == dims
    for i in range(layer):  # before the plant: no more than chance
        assert res.top_abs_d[i] < 0.5 * res.top_abs_d[layer]
    unit, raw = mean_difference(ls.states[:40, layer], labels[:40])
    assert float(unit.norm()) == pytest.approx(1.0, abs=1e-6) and raw > 0
    # 20 vs 20 samples leave ~0.3 sd of noise in each of the other 61 dims' mean difference, so the
    # expected cosine is ~0.8–0.9; a random direction in 64 dims would give ~0.12.
    assert float(unit @ (delta / delta.norm())) > 0.6
    # the held-out 8 questions: projection on the direction separates the labels (the "readable" test)
    proj = projection_scores(ls.states[40:, layer], unit)
    assert spearman(proj, labels[40:]).rho > 0.8


def test_rank_sae_features_finds_the_planted_feature():
    from mechlib.sae import TopKSAE

    sae = TopKSAE(16, 64, 4, seed=0)
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=rng) * 0.3
    y = np.arange(30) < 12
    x[torch.as_tensor(y)] += 3.0 * sae.W_dec[7].detach()  # encoder = decoderᵀ at init: feature 7 lights up
    ranked = rank_sae_features(sae, x, y, top_n=5)
    assert ranked[0].feature == 7 and ranked[0].score > 0 and ranked[0].d > 1
    assert ranked[0].fire_rate_correct == 1.0 and ranked[0].mean_correct > ranked[0].mean_wrong
    assert len(ranked) <= 5 and all(abs(a.score) >= abs(b.score) for a, b in itertools.pairwise(ranked))


def test_rank_sae_features_tells_a_type_reader_from_a_correctness_feature():
    """Feature 3 reads the question type (easy types are mostly right), feature 9 the answer inside each
    type: both rank high on the plain contrast, only feature 9 keeps a small p with labels shuffled within type."""
    from mechlib.sae import TopKSAE

    sae = TopKSAE(16, 64, 4, seed=0)
    rng = np.random.default_rng(1)
    types = ["easy"] * 40 + ["hard"] * 40
    y = np.r_[rng.random(40) < 0.8, rng.random(40) < 0.2]
    x = torch.from_numpy(rng.normal(0, 0.05, (80, 16))).float()
    w = sae.W_dec.detach()  # encoder = decoderᵀ at init: a planted decoder row lights its feature
    w9 = w[9] - (w[9] @ w[3]) / (w[3] @ w[3]) * w[3]  # orthogonal to feature 3: feature 3 sees only the type
    x[:40] += 3.0 * w[3]
    x[torch.as_tensor(y)] += 1.5 * w9
    ranked = rank_sae_features(sae, x, y, top_n=20, types=types, n_permutations=500, seed=0)
    by_id = {f.feature: f for f in ranked}
    assert 3 in by_id and 9 in by_id and by_id[3].score > 0 and by_id[9].score > 0
    assert by_id[3].p_within_type is not None and by_id[3].p_within_type > 0.05
    assert by_id[9].p_within_type is not None and by_id[9].p_within_type < 0.01
    table = features_table(ranked, n=3).splitlines()
    assert table[0].endswith("p type") and len(table) == 4
    plain = rank_sae_features(sae, x, y, top_n=20)  # no types: no column, and the same ranking
    assert all(f.p_within_type is None for f in plain) and [f.feature for f in plain] == list(by_id)
    assert not features_table(plain).splitlines()[0].endswith("p type")


def test_mean_difference_refuses_one_group():
    with pytest.raises(ContrastError, match="both correct and wrong"):
        mean_difference(torch.randn(4, 3), [True] * 4)


def test_cached_states_resume_and_invalidate(tiny_llama, tmp_path, capsys):
    model, tok = tiny_llama
    prompts, ids = make_prompts(4), ["a", "b", "c", "d"]
    calls = []

    def collect(ps=prompts):
        calls.append(1)
        return collect_layer_states(model, tok, ps, ids, encode=encode_left, model_name="tiny", progress=False)

    path = tmp_path / "states.pt"
    first = cached_layer_states(path, model_name="tiny", pooling="last", ids=ids, prompts=prompts, collect=collect)
    again = cached_layer_states(path, model_name="tiny", pooling="last", ids=ids, prompts=prompts, collect=collect)
    assert len(calls) == 1 and torch.equal(first.states, again.states)
    other = [p + "!" for p in prompts]
    cached_layer_states(path, model_name="tiny", pooling="last", ids=ids, prompts=other, collect=lambda: collect(other))
    assert len(calls) == 2
    # the same prompts, but the model ran in another dtype: the cache is stale, and the chapter says so
    import dataclasses

    from mechlib.contrast import run_settings

    bf16 = run_settings("bfloat16", "cpu")
    got = cached_layer_states(
        path,
        model_name="tiny",
        pooling="last",
        ids=ids,
        prompts=other,
        collect=lambda: dataclasses.replace(collect(other), settings=bf16),
        settings=bf16,
    )
    assert len(calls) == 3 and got.settings == bf16
    assert "model settings changed" in capsys.readouterr().out
    cached_layer_states(path, model_name="tiny", pooling="last", ids=ids, prompts=other, collect=collect, settings=bf16)
    assert len(calls) == 3
    assert first.select(["c", "a"]).shape == (2, 4, 64)
    with pytest.raises(ContrastError, match="no collected states"):
        first.select(["zz"])


def test_default_encoding_matches_generation_tokenisation(tiny_gemma4):
    from mechlib.prompts import encode_prompts

    model, tok = tiny_gemma4
    prompts = make_prompts(3, seed=4)
    default = collect_layer_states(model, tok, prompts, ["a", "b", "c"], progress=False)
    manual = collect_layer_states(model, tok, prompts, ["a", "b", "c"], encode=encode_left, progress=False)
    torch.testing.assert_close(default.states, manual.states)
    assert encode_prompts(tok, prompts[:1])[0] == tok(prompts[0])["input_ids"]


def test_load_baseline_split(tmp_path):
    import json
    from dataclasses import replace

    from mechlib.contrast import load_baseline_split
    from mechlib.gsm8k import Question
    from mechlib.records import score, write_records

    # even ids answered right, odd ones wrong; the stored verdicts are stale (flipped): loading re-scores
    recs = [
        score(Question(f"q{i}", f"Q{i}", i, "x"), f"p{i}", f"#### {i if i % 2 == 0 else i + 1}\n", 3, "answer_line")
        for i in range(4)
    ]
    write_records(tmp_path / "baseline.jsonl", [replace(r, correct=not r.correct) for r in recs])
    metrics = tmp_path / "04.json"
    with pytest.raises(ContrastError, match="run chapter 04"):
        load_baseline_split(metrics, tmp_path / "baseline.jsonl")
    metrics.write_text(json.dumps({"contrast_ids": ["q0", "q1", "q3"]}))
    with pytest.raises(ContrastError, match="heldout_ids"):
        load_baseline_split(metrics, tmp_path / "baseline.jsonl")
    metrics.write_text(json.dumps({"contrast_ids": ["q0", "q1", "q3"], "heldout_ids": ["q2"]}))
    split = load_baseline_split(metrics, tmp_path / "baseline.jsonl")
    assert split.prompts["q3"] == "p3" and split.labels(split.contrast_ids).tolist() == [True, False, False]
    assert split.records["q0"] == recs[0] and split.kinds(["q3", "q0"]) == ["x", "x"]
    metrics.write_text(json.dumps({"contrast_ids": ["q0", "q9"], "heldout_ids": ["q2"]}))
    with pytest.raises(ContrastError, match="q9"):
        load_baseline_split(metrics, tmp_path / "baseline.jsonl")


def test_match_questions_checks_the_text_and_gives_records_their_question_type():
    """A question whose text changed since chapter 04 is an error; a record written without a
    ``source`` gets its question's, so ``kinds`` groups it; labels (placeholder or not) are kept."""
    from dataclasses import replace

    from mechlib.contrast import BaselineSplit, match_questions
    from mechlib.gsm8k import Question
    from mechlib.records import score

    rec = score(Question("a", "What is 1 plus 2?", 3, "arithmetic:sum"), "p", "#### 3\n", 3, "answer_line")
    old = replace(rec, source="", correct=False)  # a pre-source record, relabelled
    split = BaselineSplit(
        ["a"],
        ["b"],
        {"a": "<user> What is 1 plus 2? <model>", "b": "<user> Q2 <model>"},
        {"a": False, "b": False},
        {"a": old},
    )
    assert split.kinds(["a"]) == [""]
    matched = match_questions(
        [Question("a", "What is 1 plus 2?", 3, "arithmetic:sum"), Question("b", "Q2", 1, "arithmetic:boxes")], split
    )
    assert matched.kinds(["a"]) == ["sum"] and matched.records["a"] == replace(old, source="arithmetic:sum")
    assert matched.labels(["a"]).tolist() == [False] and matched.records["a"].correct is False
    assert split.kinds(["a"]) == [""]  # the input split is not changed
    with pytest.raises(ContrastError, match="rerun chapter 04"):
        match_questions([Question("a", "What is 5 plus 2?", 7, "x")], split)


def test_small_group_warning_names_the_small_side():
    from mechlib.contrast import small_group_warning

    assert small_group_warning(53, 97) is None
    assert "only 3 correct question(s)" in small_group_warning(3, 77)
    assert "only 4 wrong question(s)" in small_group_warning(60, 4)
    assert small_group_warning(10, 10) is None and small_group_warning(9, 100, minimum=5) is None


def test_projection_test_separates_reading_the_type_from_reading_correctness():
    """The default run's direction: held-out ρ 0.53, yet within question types nothing detectable."""
    rng = np.random.default_rng(0)
    types = ["easy"] * 30 + ["hard"] * 30
    correct = np.r_[rng.random(30) < 0.8, rng.random(30) < 0.2]
    unit = torch.tensor([1.0, 0.0])
    states = torch.stack([torch.tensor([5.0 if t == "easy" else 0.0, 0.0]) for t in types])
    states[:, 0] += torch.from_numpy(rng.normal(0, 0.1, 60)).float()  # the type, and noise: no answer in it
    test = projection_test(states, unit, correct, types, n_permutations=500, seed=0)
    assert test.rho.p < 0.001 and test.within_type is not None and test.within_type.p > 0.05
    lines = test.lines().splitlines()
    assert lines[0].startswith("held-out projection vs correctness: Spearman rho = ")
    assert lines[1].startswith("  labels shuffled within question type (2 types, 500 permutations): p = ")
    one_type = projection_test(states, unit, correct, ["gsm8k"] * 60, n_permutations=500, seed=0)
    assert one_type.within_type is None and len(one_type.lines().splitlines()) == 1
