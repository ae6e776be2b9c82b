"""The SAE-feature reward: equals a hand computation, batch-invariant, bounded, base vs policy, selection;
the shared prompt prefix gives the codes of whole sequences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechlib import feature_codes
from mechlib.contrast import FeatureContrast, features_json
from mechlib.feature_codes import shareable_prefix_len
from mechlib.feature_reward import (
    CompletionCode,
    FeatureReward,
    FeatureRewardError,
    FeatureRewardSpec,
    RewardFeature,
    calibrate,
    completion_codes,
    load_contrastive_features,
    rank_answer_features,
    score_codes,
    select_features,
)
from mechlib.kv_cache import MIN_SHARED_PREFIX, shared_prefix_len
from mechlib.models import d_model, decoder_layers
from mechlib.prompts import build_prompt, encode_prompts
from mechlib.sae import SAEError, TopKCode, TopKSAE, dense_code
from mechlib.tiny import tiny_config

LAYER, D_SAE, K = 1, 96, 4
PROMPTS = ["Q: 2+3?\nA:", "Q: what is 7 times 6?\nA:", "Q: 1?\nA:", "Q: ten minus four, please?\nA:"]
COMPLETIONS = [" 5", " 7 * 6 = 42\n#### 42", " one one one", ""]


def make_sae(d_model: int = 64, layer: int = LAYER) -> TopKSAE:
    return TopKSAE(d_model, D_SAE, K, seed=1, meta={"layer": layer})


def spec_of(pairs: list[tuple[int, float, float]], layer: int = LAYER) -> FeatureRewardSpec:
    feats = tuple(RewardFeature(j, w, c) for j, w, c in pairs)
    return FeatureRewardSpec(layer, feats, "test", "equal", 0.9, 0)


def fired_features(model, tok, sae) -> list[int]:
    """Features that fire at the answer positions of the test completions, most frequent first."""
    codes = completion_codes(model, tok, sae, LAYER, PROMPTS, COMPLETIONS)
    idx = torch.cat([c.indices[c.values > 0] for c in codes])
    counts = torch.bincount(idx, minlength=D_SAE)
    return [int(j) for j in torch.argsort(counts, descending=True, stable=True) if counts[j] > 0]


def hand_reward(model, tok, sae, spec, prompt: str, completion: str) -> float:
    """The reward written out: full forward with hidden states, dense SAE code, the formula in numpy."""
    head = encode_prompts(tok, [prompt])[0]
    tail = tok(completion, add_special_tokens=False)["input_ids"]
    if not tail:
        return 0.0
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        states = hs[len(head) - 1 : len(head) + len(tail) - 1]  # the states that generate each answer token
        acts = dense_code(sae.encode(states), D_SAE).double().numpy()
    per_pos = [sum(f.weight * min(acts[t, f.feature] / f.cap, 1.0) for f in spec.features) for t in range(len(tail))]
    return float(np.mean(per_pos))


@pytest.fixture
def setup(tiny_llama):
    model, tok = tiny_llama
    sae = make_sae()
    fired = fired_features(model, tok, sae)
    # caps around typical activations: some positions saturate, some do not
    spec = spec_of([(fired[0], 0.4, 0.5), (fired[1], 0.3, 2.0), (fired[2], -0.3, 0.7)])
    return model, tok, sae, spec


def test_reward_equals_hand_computation(setup):
    model, tok, sae, spec = setup
    reward = FeatureReward(spec, sae, model, tok, batch_size=2)
    got = reward(PROMPTS, COMPLETIONS)
    want = [hand_reward(model, tok, sae, spec, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got[3] == 0.0  # empty completion: no positions
    assert len({round(g, 6) for g in got[:3]}) == 3  # the features discriminate: not a constant reward
    assert reward.__name__ == "sae_features"


def test_first_position_is_the_last_prompt_token_state(setup):
    model, tok, sae, _ = setup
    code = completion_codes(model, tok, sae, LAYER, PROMPTS[:1], ["5"])[0]  # one byte: one token
    assert code.n_positions == 1  # one answer token, one position
    ids = torch.tensor(encode_prompts(tok, PROMPTS[:1]))
    with torch.no_grad():
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, -1]
        expected = sae.encode(last[None])
    torch.testing.assert_close(code.values, expected.values, atol=1e-5, rtol=0)
    assert torch.equal(code.indices, expected.indices)


def test_invariant_to_batch_composition_and_padding(setup):
    model, tok, sae, spec = setup
    reward = FeatureReward(spec, sae, model, tok, batch_size=16)
    target_p, target_c = PROMPTS[1], COMPLETIONS[1]
    alone = reward([target_p], [target_c])[0]
    # among longer and shorter neighbours, first, middle and last in the batch
    others_p, others_c = ["Q: a much longer question that pads everything else?\nA:", "Q?"], [" x" * 30, " 1"]
    for pos in range(3):
        ps, cs = list(others_p), list(others_c)
        ps.insert(pos, target_p)
        cs.insert(pos, target_c)
        assert reward(ps, cs)[pos] == pytest.approx(alone, abs=1e-5)
    # given ids (what TRL passes) read the same tokens as the text
    ids = [tok(target_c, add_special_tokens=False)["input_ids"]]
    assert reward([target_p], [target_c], completion_ids=ids)[0] == pytest.approx(alone, abs=1e-6)
    # TRL's ids end with the EOS (and padding): dropped, so GRPO scores exactly what Stage Gate 1 scores from text
    with_eos = [ids[0] + [tok.eos_token_id, tok.pad_token_id]]
    assert reward([target_p], [target_c], completion_ids=with_eos)[0] == pytest.approx(alone, abs=1e-6)
    # batch size 1 vs one big batch
    small = FeatureReward(spec, sae, model, tok, batch_size=1)
    np.testing.assert_allclose(small(PROMPTS, COMPLETIONS), reward(PROMPTS, COMPLETIONS), atol=1e-5, rtol=0)


def test_bound_saturation_on_synthetic_codes():
    spec = spec_of([(3, 0.5, 1.0), (4, 0.25, 2.0), (9, -0.25, 1.0)])
    assert spec.bound == (-0.25, 0.75)

    def code(rows: list[tuple[list[int], list[float]]]) -> CompletionCode:
        return CompletionCode(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))

    saturated = ([3, 4, 0], [5.0, 2.0, 1.0])  # both helpful at/above cap, harmful absent
    half = ([3, 4, 0], [0.5, 2.0, 1.0])  # feature 3 at half its cap
    harmful = ([3, 4, 9], [5.0, 2.0, 0.5])
    for k in range(1, 51):  # repeating a fully saturated position any number of times: exactly the bound
        assert score_codes(spec, [code([saturated] * k)])[0] == pytest.approx(0.75)
    got = score_codes(spec, [code([saturated, half]), code([harmful]), code([([9, 1, 2], [3.0, 0.0, 0.0])])])
    np.testing.assert_allclose(got, [(0.75 + 0.5) / 2, 0.75 - 0.125, -0.25])


def all_saturated(spec: FeatureRewardSpec, code: CompletionCode) -> bool:
    """Every helpful feature at or above its cap and no harmful feature firing, at every position."""
    acts = dense_code(as_topk(code), D_SAE)
    return all(
        bool((acts[:, f.feature] >= f.cap).all()) if f.weight > 0 else bool((acts[:, f.feature] == 0).all())
        for f in spec.features
    )


def test_repeating_a_helpful_token_cannot_exceed_the_bound(tiny_llama):
    model, tok = tiny_llama
    sae = make_sae()
    prompt, token = "Q: 4+4?\nA:", " 8"
    completions = [token * k for k in range(1, 51)]
    codes = completion_codes(model, tok, sae, LAYER, [prompt] * 50, completions)
    # the helpful features: what fires most on the repeated token; a harmful one that fires elsewhere
    counts = torch.bincount(torch.cat([c.indices[c.values > 0] for c in codes]), minlength=D_SAE)
    top = [int(j) for j in counts.argsort(descending=True)[:3]]
    other = next(j for j in fired_features(model, tok, sae) if j not in top)
    calibrated = calibrate([(top[0], 0.4), (top[1], 0.3), (top[2], 0.1), (other, -0.2)], codes, layer=LAYER,
                           selection="repeat", weighting="equal", quantile=0.5).spec  # fmt: skip
    # caps at the smallest firing of the most frequent feature: a completion saturates where it fires throughout
    silent = next(j for j in range(D_SAE) if counts[j] == 0)
    low_cap = float(min(c.values[(c.indices == top[0]) & (c.values > 0)].min() for c in codes if c.n_positions))
    reachable = spec_of([(top[0], 0.6, low_cap), (silent, -0.4, 1.0)])
    for spec in (calibrated, reachable):
        rewards = FeatureReward(spec, sae, model, tok, batch_size=8)([prompt] * 50, completions)
        assert max(rewards) <= spec.bound.hi + 1e-9
        at_bound = [r >= spec.bound.hi - 1e-9 for r in rewards]
        assert at_bound == [all_saturated(spec, c) for c in codes]
    assert 0 < sum(at_bound) < 50  # the last spec: some completions reach the bound, some do not


def as_topk(c: CompletionCode) -> TopKCode:
    """The code in the SAE's own type, for :func:`mechlib.sae.dense_code`."""
    return TopKCode(c.values, c.indices)


def test_base_vs_policy_with_peft_lora(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    sae = make_sae()
    fired = fired_features(model, tok, sae)
    spec = spec_of([(fired[0], 0.3, 0.5), (fired[1], 0.3, 1.0), (fired[3], -0.4, 0.5)])
    base_reward = FeatureReward(spec, sae, model, tok)(PROMPTS, COMPLETIONS)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(model, lora)  # wraps the same modules: adapters with random, non-zero B
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    policy.train()
    hooks_before = [len(b._forward_hooks) for b in decoder_layers(policy)]
    as_base = FeatureReward(spec, sae, policy, tok, hook_model="base")(PROMPTS, COMPLETIONS)
    as_policy = FeatureReward(spec, sae, policy, tok, hook_model="policy")(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(as_base, base_reward, atol=1e-6, rtol=0)
    assert not np.allclose(as_policy, base_reward, atol=1e-4)
    assert policy.training  # the trainer's mode is restored, and the adapters are back on
    assert [len(b._forward_hooks) for b in decoder_layers(policy)] == hooks_before
    assert FeatureReward(spec, sae, policy, tok, hook_model="policy")(PROMPTS, COMPLETIONS) == as_policy


def test_selection_signs_and_normalisation():
    rows = [
        FeatureContrast(10, 1.5, 0.6, 0, 0, 0, 0),
        FeatureContrast(11, -1.2, -0.3, 0, 0, 0, 0),
        FeatureContrast(12, 0.9, 0.2, 0, 0, 0, 0),
        FeatureContrast(13, -0.5, -0.1, 0, 0, 0, 0),
        FeatureContrast(14, 2.0, 0.2, 0, 0, 0, 0),  # out of order: ranked by |score| anyway
    ]
    eq = dict(select_features(rows, 2, 1, "equal"))
    assert set(eq) == {14, 10, 11}
    assert eq[14] == eq[10] == pytest.approx(1 / 3) and eq[11] == pytest.approx(-1 / 3)
    by_d = dict(select_features(rows, 3, 5, "d"))
    assert sum(abs(w) for w in by_d.values()) == pytest.approx(1.0)
    assert by_d[10] / by_d[14] == pytest.approx(3.0) and by_d[13] / by_d[11] == pytest.approx(1 / 3)
    assert all((w > 0) == (j in (10, 12, 14)) for j, w in by_d.items())
    with pytest.raises(FeatureRewardError, match="no helpful"):
        select_features([r for r in rows if r.score < 0], 1, 1)
    with pytest.raises(FeatureRewardError, match="n_helpful and n_harmful must be >= 1, got 0"):
        select_features(rows, 0, 1)
    with pytest.raises(FeatureRewardError, match="weighting"):
        select_features(rows, 1, 1, "median")  # type: ignore[arg-type]


def test_spec_roundtrip_and_contrast_file(tmp_path):
    spec = spec_of([(3, 0.6, 1.5), (7, -0.4, 0.25)])
    spec.save(tmp_path / "spec.json")
    assert FeatureRewardSpec.load(tmp_path / "spec.json") == spec
    assert spec.bound == (-0.4, 0.6)
    rows = [FeatureContrast(5, 0.5, 0.2, 1.0, 0.5, 0.4, 0.2), FeatureContrast(9, -0.3, -0.1, 0.1, 0.4, 0.1, 0.3)]
    path = tmp_path / "contrastive_features_L1.json"
    path.write_text(json.dumps(features_json(rows, layer=1)))
    assert load_contrastive_features(path) == rows
    with pytest.raises(FeatureRewardError, match="not found"):
        load_contrastive_features(tmp_path / "missing.json")
    with pytest.raises(FeatureRewardError, match="cap must be finite and > 0"):
        RewardFeature(1, 0.5, 0.0)
    with pytest.raises(FeatureRewardError, match="distinct"):
        spec_of([(3, 0.5, 1.0), (3, -0.5, 1.0)])


def test_calibrate_caps_drops_silent_features_and_ranks_answers():
    codes = [
        CompletionCode(torch.tensor([[1, 2], [1, 3]]), torch.tensor([[1.0, 0.5], [3.0, 0.0]])),
        CompletionCode(torch.tensor([[1, 4], [2, 5], [4, 1]]), torch.tensor([[2.0, 1.0], [1.5, 0.5], [2.0, 4.0]])),
        CompletionCode(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)),
    ]
    cal = calibrate([(1, 0.5), (3, 0.25), (4, -0.25)], codes, layer=2, selection="s", weighting="equal", quantile=0.5)
    # feature 3 only ever has activation 0 (in the top-k but not firing): dropped, weights renormalised
    assert cal.dropped == (3,)
    assert {f.feature: (f.weight, f.cap) for f in cal.spec.features} == {
        1: (pytest.approx(2 / 3), pytest.approx(np.median([1.0, 3.0, 2.0, 4.0]))),
        4: (pytest.approx(-1 / 3), pytest.approx(1.5)),
    }
    assert cal.spec.n_contrast == 3 and cal.spec.layer == 2
    with pytest.raises(FeatureRewardError, match="none of the 1 selected features fires"):
        calibrate([(3, 1.0)], codes, layer=2, selection="s", weighting="equal")

    # feature 1 fires more on the "correct" completions: ranked first with a positive score
    fires = CompletionCode(torch.tensor([[1, 2]]), torch.tensor([[2.0, 1.0]]))
    quiet = CompletionCode(torch.tensor([[2, 3], [2, 3]]), torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    ranked = rank_answer_features([fires, fires, quiet, quiet, codes[2]], [True, True, False, False, True], top_n=2)
    assert ranked[0].feature == 1 and ranked[0].score == pytest.approx(2.0) and ranked[0].fire_rate_wrong == 0.0
    assert {r.feature for r in ranked} == {1, 3} and ranked[1].score == pytest.approx(-0.5)


def test_answer_features_get_a_within_type_p():
    """Feature 1 fires on every answer of the easy type (mostly correct) and on none of the hard type: it
    ranks first on the plain difference, and its within-type p is large. Feature 2 fires exactly on the
    correct answers of both types: its within-type p is small. One type: no p. Empty answers are dropped
    with their types; a type list of the wrong length is refused."""
    rng = np.random.default_rng(0)
    kinds = ["easy"] * 40 + ["hard"] * 40
    y = np.r_[rng.random(40) < 0.8, rng.random(40) < 0.2]

    def code(kind: str, ok: bool) -> CompletionCode:
        fired = {3: 0.1, 1: 5.0 if kind == "easy" else 0.0, 2: 1.0 if ok else 0.0}  # 3: weakly everywhere
        ids, vals = zip(*((j, v) for j, v in fired.items() if v > 0), strict=True)
        return CompletionCode(torch.tensor([list(ids)]), torch.tensor([list(vals)]))

    codes = [code(k, bool(c)) for k, c in zip(kinds, y, strict=True)]
    empty = CompletionCode(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    ranked = rank_answer_features(
        [*codes, empty], [*y, True], top_n=3, types=[*kinds, "easy"], n_permutations=999, seed=1
    )
    by_id = {r.feature: r for r in ranked}
    assert ranked[0].feature == 1 and by_id[1].p_within_type > 0.2
    assert by_id[2].p_within_type == pytest.approx(1 / 1000)
    assert rank_answer_features(codes, y, top_n=3)[0].p_within_type is None  # no types given
    assert all(r.p_within_type is None for r in rank_answer_features(codes, y, top_n=3, types=["x"] * 80))
    with pytest.raises(FeatureRewardError, match="79 types"):
        rank_answer_features(codes, y, types=kinds[:-1])


def test_bad_pairings_fail_clearly(tiny_llama):
    model, tok = tiny_llama
    spec = spec_of([(3, 1.0, 1.0)], layer=2)
    with pytest.raises(SAEError, match="trained on layer 1 but the run uses layer 2"):
        FeatureReward(spec, make_sae(layer=1), model, tok)
    with pytest.raises(SAEError, match="d_model=32"):
        FeatureReward(spec, make_sae(d_model=32, layer=2), model, tok)
    with pytest.raises(FeatureRewardError, match=r"features \[200\] do not exist"):
        FeatureReward(spec_of([(200, 1.0, 1.0)]), make_sae(), model, tok)
    with pytest.raises(FeatureRewardError, match="hook_model"):
        FeatureReward(spec_of([(3, 1.0, 1.0)]), make_sae(), model, tok, hook_model="both")  # type: ignore[arg-type]
    with pytest.raises(FeatureRewardError, match="got 2 prompts, 1 completions"):
        completion_codes(model, tok, make_sae(), LAYER, PROMPTS[:2], COMPLETIONS[:1])


# --------------------------------------------------------------------------------------------
# The prompts' common prefix runs once (mechlib.feature_codes)
# --------------------------------------------------------------------------------------------

QUESTIONS = ["What is 2+3?", "Tom has 7 pens and buys 6 more. How many pens?", "What is 1?", "Ten minus four?"]
ANSWERS = [" 5\n#### 5", " 7 + 6 = 13\n#### 13", " 1", " 10 - 4 = 6 so six six six\n#### 6"]


def shared_prompts(tok, questions: list[str] = QUESTIONS) -> list[str]:
    """The book's layout: a long common template (here the manual Gemma format), then the question."""
    return [build_prompt(tok, q, "gemma_manual") for q in questions]


def assert_same_codes(got: list[CompletionCode], want: list[CompletionCode], rtol: float = 1e-4) -> None:
    assert [c.n_positions for c in got] == [c.n_positions for c in want]
    for a, b in zip(got, want):
        assert torch.equal(a.indices, b.indices)
        scale = max([1.0, *b.values.abs().flatten().tolist()])  # relative to the code's largest activation
        torch.testing.assert_close(a.values, b.values, rtol=rtol, atol=rtol * scale)


def spy_prefix(monkeypatch) -> list[int]:
    """Record the length of each prefix run once (0: the sequences ran whole)."""
    lengths: list[int] = []
    real = feature_codes.run_shared_prefix

    def spy(model, layer, prefix):
        lengths.append(len(prefix))
        return real(model, layer, prefix)

    monkeypatch.setattr(feature_codes, "run_shared_prefix", spy)
    return lengths


def test_shared_prefix_gives_the_codes_of_whole_sequences(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    sae, prompts = make_sae(), shared_prompts(tok)
    whole = completion_codes(model, tok, sae, LAYER, prompts, ANSWERS, batch_size=3, share_prefix=False)
    lengths = spy_prefix(monkeypatch)
    shared = completion_codes(model, tok, sae, LAYER, prompts, ANSWERS, batch_size=3)
    heads = encode_prompts(tok, prompts)
    assert lengths == [shared_prefix_len(heads)] and lengths[0] >= MIN_SHARED_PREFIX  # the template ran once
    assert_same_codes(shared, whole)
    # GRPO: completions of ONE prompt share all of it but its last token (the first answer position)
    same = [prompts[1]] * 4
    whole = completion_codes(model, tok, sae, LAYER, same, ANSWERS, batch_size=2, share_prefix=False)
    shared = completion_codes(model, tok, sae, LAYER, same, ANSWERS, batch_size=2)
    assert lengths[-1] == len(heads[1]) - 1
    assert_same_codes(shared, whole)
    # a prompt that is a prefix of another: sharing stops before the shorter one's last token
    nested = [prompts[2], prompts[2] + " Say it twice."]
    whole = completion_codes(model, tok, sae, LAYER, nested, ANSWERS[:2], share_prefix=False)
    assert_same_codes(completion_codes(model, tok, sae, LAYER, nested, ANSWERS[:2]), whole)
    assert lengths[-1] == len(heads[2]) - 1


@pytest.mark.parametrize("arch", ["gemma4", "qwen3_5"])
def test_shared_prefix_where_caches_differ(arch, tiny_gemma4, tiny_qwen35, monkeypatch):
    """Sliding windows and KV sharing (Gemma 4) share only where exact; linear attention (Qwen 3.5) never."""
    model, tok = tiny_gemma4 if arch == "gemma4" else tiny_qwen35
    sae = make_sae(d_model(model))
    prompts = shared_prompts(tok)
    whole = completion_codes(model, tok, sae, LAYER, prompts, ANSWERS, batch_size=2, share_prefix=False)
    lengths = spy_prefix(monkeypatch)
    assert_same_codes(completion_codes(model, tok, sae, LAYER, prompts, ANSWERS, batch_size=2), whole)
    assert lengths == [0]  # Gemma 4's tiny window (8) is shorter than the sequences: whole, as before


def test_shared_prefix_on_gemma4_with_a_wide_window(tiny_tok, monkeypatch):
    """A prefix run only up to the SAE layer serves it, below (1) and above (4) Gemma 4's first
    full-attention layer (3), whose cache HF reads to size the full layers' masks."""
    from transformers import Gemma4ForConditionalGeneration

    config = tiny_config("gemma4")
    config.text_config.sliding_window = 1024
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config).eval()
    prompts = shared_prompts(tiny_tok)
    for layer in (LAYER, 4):  # below and above the first full layer
        sae = make_sae(d_model(model), layer)
        whole = completion_codes(model, tiny_tok, sae, layer, prompts, ANSWERS, batch_size=2, share_prefix=False)
        lengths = spy_prefix(monkeypatch)
        assert_same_codes(completion_codes(model, tiny_tok, sae, layer, prompts, ANSWERS, batch_size=2), whole)
        assert lengths[0] >= MIN_SHARED_PREFIX


def test_shared_prefix_on_smollm2(smollm2):
    """The book's model and prompt format (chat template + system prompt + worked example)."""
    model, tok = smollm2.model, smollm2.tokenizer
    layer = 3
    sae = TopKSAE(smollm2.d_model, 256, 8, seed=1, meta={"layer": layer})
    prompts = [build_prompt(tok, q, "chat_oneshot") for q in QUESTIONS[:3]]
    whole = completion_codes(model, tok, sae, layer, prompts, ANSWERS[:3], share_prefix=False)
    assert_same_codes(completion_codes(model, tok, sae, layer, prompts, ANSWERS[:3]), whole)
    assert shareable_prefix_len(model, encode_prompts(tok, prompts), encode_prompts(tok, prompts)) > 60
