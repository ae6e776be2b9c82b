"""Chapter 08's GRPO arms on a tiny Llama: TRL runs, both rewards are logged in every arm, a weight-0
reward does not steer training, saved arms are reloaded, and evaluation caches per adapter."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

import mechlib.generate
import mechlib.grpo
from mechlib.grpo import (
    ADAPTER_FILE,
    ARMS,
    Arm,
    ArmRun,
    GrpoError,
    GrpoSettings,
    StepLog,
    correctness_reward,
    load_saved_arm,
    run_key,
    step_logs_from_history,
    train_arm,
)
from mechlib.grpo_eval import GrpoEvalError, adapter_hash, compare_accuracy, evaluate_arm
from mechlib.grpo_samples import SAMPLES_FILE, SampleRecorder, SamplesError, read_samples
from mechlib.gsm8k import Question
from mechlib.io import read_json
from mechlib.models import LoadedModel
from mechlib.records import Record, meta_path
from mechlib.tiny import tiny_model, tiny_tokenizer

SETTINGS = GrpoSettings(steps=2, prompts_per_step=1, num_generations=4, max_completion_length=6, seed=0)
PROMPTS = ["Q: 1+1?\nA:", "Q: 2+3?\nA:", "Q: 4+4?\nA:"]
GOLDS = [2, 5, 8]


def tiny_loaded() -> LoadedModel:
    """A fresh tiny Llama as the chapter's loaded_factory would give (eval mode, gradients off)."""
    model = tiny_model("llama", seed=0)
    model.requires_grad_(False)
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama", 4, 64)


def length_feature(policy):
    """A stand-in feature reward: longer text scores higher (varies within a group)."""

    def sae_features(prompts, completions, **kwargs):
        return [len(c) / 10 for c in completions]

    return sae_features


def other_feature(policy):
    """A second, unrelated stand-in feature reward (same name, different values)."""

    def sae_features(prompts, completions, **kwargs):
        return [float(sum(map(ord, c)) % 7) for c in completions]

    return sae_features


def parity_correct(prompts, completions, gold, **kwargs):
    """A stand-in correctness that varies within a group (the tiny model never answers right)."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


parity_correct.__name__ = "correct"  # logged under the real reward's name


def adapter_tensors(run: ArmRun) -> dict:
    return load_file(str(Path(run.adapter_dir) / ADAPTER_FILE))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, ArmRun]]:
    """The three arms, plus the correctness arm again with another (weight-0) feature reward: 4 short runs
    shared by the tests, under a correctness that varies within a group so its weight matters."""
    out = tmp_path_factory.mktemp("grpo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mechlib.grpo, "correctness_reward", parity_correct)
        runs: dict[str, ArmRun] = {
            a.name: train_arm(tiny_loaded, a, SETTINGS, PROMPTS, GOLDS, length_feature, out, False) for a in ARMS
        }
        runs["other feature"] = train_arm(
            tiny_loaded, ARMS[0], SETTINGS, PROMPTS, GOLDS, other_feature, out / "other", False
        )
    return out, runs


def test_every_arm_logs_both_rewards_and_trl_weights_them(trained):
    _, runs = trained
    for arm in ARMS:
        run = runs[arm.name]
        assert not run.resumed
        assert [s.step for s in run.steps] == [1, 2]
        for s in run.steps:
            assert s.feature_mean > 0  # logged even in the correctness-only arm, where its weight is 0
            assert 0 < s.correct_mean < 1  # parity_correct: a group with something to learn
            expected = arm.correctness_weight * s.correct_mean + arm.feature_weight * s.feature_mean
            assert s.reward_mean == pytest.approx(expected, abs=1e-6)
            assert 0 < s.completion_length <= SETTINGS.max_completion_length
            assert s.seconds > 0
    # the same seed: every arm's first group is sampled from the same init, so the first logs agree
    firsts = {runs[a.name].steps[0].feature_mean for a in ARMS}
    assert len(firsts) == 1


def test_a_weight_zero_reward_does_not_steer_training(trained):
    _, runs = trained
    a, b, mixed = runs["correctness"], runs["other feature"], runs["correctness+feature"]
    assert [s.reward_mean for s in a.steps] == [s.reward_mean for s in b.steps]
    assert [s.feature_mean for s in a.steps] != [s.feature_mean for s in b.steps]  # logged, yet ignored
    assert same_tensors(adapter_tensors(a), adapter_tensors(b))
    assert not same_tensors(adapter_tensors(a), adapter_tensors(mixed))  # weighted, the same reward does steer


def test_every_sampled_completion_is_saved_with_both_rewards(trained):
    """samples.jsonl beside each adapter: every step's completions, paired with both rewards; their means are
    exactly what TRL logged for that step, so the recorder paired the two rewards' calls right."""
    _, runs = trained
    n = SETTINGS.prompts_per_step * SETTINGS.num_generations
    for arm in ARMS:
        run = runs[arm.name]
        samples = read_samples(Path(run.adapter_dir) / SAMPLES_FILE)
        assert [s.step for s in samples] == [1] * n + [2] * n
        assert all(0 <= s.prompt < len(PROMPTS) for s in samples)
        assert all(s.feature == pytest.approx(len(s.completion) / 10) for s in samples)  # length_feature's value
        for log in run.steps:
            at = [s for s in samples if s.step == log.step]
            assert sum(s.correct for s in at) / n == pytest.approx(log.correct_mean, abs=1e-6)
            assert sum(s.feature for s in at) / n == pytest.approx(log.feature_mean, abs=1e-6)


def test_the_recorder_refuses_rewards_that_scored_different_completions(tmp_path):
    rec = SampleRecorder(["p"])
    ok = rec.wrap(lambda **kw: [1.0, 0.0], "correct")
    feat = rec.wrap(lambda **kw: [0.5, 0.25], "feature")
    assert ok(prompts=["p", "p"], completions=["a", "b"]) == [1.0, 0.0]
    feat(prompts=["p", "p"], completions=["a", "c"])
    with pytest.raises(SamplesError, match="different completions"):
        rec.samples()
    bad = tmp_path / SAMPLES_FILE
    bad.write_text('{"step": 1}\n')
    with pytest.raises(SamplesError, match=":1: not a sample"):
        read_samples(bad)


def test_a_saved_arm_is_reloaded_not_retrained(trained):
    out, runs = trained

    def no_model() -> LoadedModel:
        raise AssertionError("a saved arm must not load a model")

    arm = ARMS[1]
    again = train_arm(no_model, arm, SETTINGS, PROMPTS, GOLDS, length_feature, out, False)
    assert again.resumed
    assert again == runs[arm.name]  # same arm, settings, key, curves (resumed is not compared)
    arm_dir = Path(runs[arm.name].adapter_dir)
    assert load_saved_arm(arm_dir, run_key(replace(SETTINGS, steps=3), arm, PROMPTS, GOLDS)) is None
    assert load_saved_arm(arm_dir, run_key(SETTINGS, arm, PROMPTS, [2, 5, 9])) is None
    assert load_saved_arm(arm_dir, run_key(SETTINGS, arm, PROMPTS, GOLDS, cache_tag="sae:other")) is None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_evaluate_arm_regenerates_only_for_another_adapter(trained, tmp_path, monkeypatch):
    _, runs = trained
    calls = []
    real = mechlib.generate.generate_ids

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mechlib.generate, "generate_ids", counting)
    questions = [Question(f"q{i}", f"What is {i} + {i}?", 2 * i, "test") for i in range(3)]
    out = tmp_path / "after.jsonl"
    first = runs["correctness"].adapter_dir
    second = runs["feature"].adapter_dir
    assert adapter_hash(first) != adapter_hash(second)

    recs = evaluate_arm(tiny_loaded, first, questions, "gemma_manual", 4, 3, out, progress=False)
    assert [r.id for r in recs] == ["q0", "q1", "q2"] and len(calls) == 1
    assert read_json(meta_path(out))["model"] == f"tiny-llama+lora:{adapter_hash(first)}"
    evaluate_arm(tiny_loaded, first, questions, "gemma_manual", 4, 3, out, progress=False)
    assert len(calls) == 1  # same adapter: the cached records
    evaluate_arm(tiny_loaded, second, questions, "gemma_manual", 4, 3, out, progress=False)
    assert len(calls) == 2  # another adapter: generated again
    assert read_json(meta_path(out))["model"] == f"tiny-llama+lora:{adapter_hash(second)}"


def record(qid: str, correct: bool) -> Record:
    return Record(qid, "p", "g", 1.0 if correct else 0.0, 1, correct, 3, "eos", "hashes", None, False, None, False, "t")


def test_compare_accuracy_pairs_by_id():
    before = [record(f"q{i}", c) for i, c in enumerate([1, 1, 1, 0, 0, 0, 0, 0])]
    after = [record(f"q{i}", c) for i, c in enumerate([1, 0, 1, 1, 1, 1, 1, 1])][::-1]  # another order
    result = compare_accuracy(before, after)
    assert (result.n, result.k_before, result.k_after, result.b, result.c) == (8, 3, 7, 5, 1)
    assert result.p_mcnemar == pytest.approx(2 * 7 / 64)  # two-sided exact: 2·P(X <= 1), X ~ Bin(6, 1/2)
    assert result.change.estimate == pytest.approx(0.5)
    assert result.ci_before[0] < 3 / 8 < result.ci_before[1]
    with pytest.raises(GrpoEvalError, match="q7"):
        compare_accuracy(before, after[1:])


def test_bad_input_is_named():
    with pytest.raises(GrpoError, match="num_generations"):
        GrpoSettings(num_generations=1)
    with pytest.raises(GrpoError, match="both 0"):
        Arm("feature", 0.0, 0.0)
    with pytest.raises(GrpoError, match="rewards/sae_features/mean"):
        step_logs_from_history([{"step": 1, "reward": 0.0, "rewards/correct/mean": 0.0}])
    with pytest.raises(GrpoEvalError, match=ADAPTER_FILE):
        adapter_hash("/nonexistent")
    assert correctness_reward(["p", "p"], ["so #### 4", "#### 5"], [4, 4]) == [1.0, 0.0]
    assert correctness_reward.__name__ == "correct"


def test_arm_run_summary_round_trips_and_a_bad_one_is_named():
    """The saved arm file is read through the results codec: equal back, a wrong field named with its file."""
    run = ArmRun(
        Arm("feature", 0.0, 1.0),
        GrpoSettings(steps=1),
        "tiny",
        "k",
        (StepLog(1, 0.1, 0.2, 0.3, 9.0, 0.0, 1.5),),
        "/a",
        2.0,
    )
    obj = json.loads(json.dumps(run.summary()))
    back = ArmRun.from_summary(obj, "/b")
    assert back == ArmRun(run.arm, run.settings, "tiny", "k", run.steps, "/b", 2.0) and back.resumed
    with pytest.raises(GrpoError, match=r"/b/arm_run\.json: steps\[0\]\.feature_mean: expected float"):
        ArmRun.from_summary({**obj, "steps": [{**obj["steps"][0], "feature_mean": "high"}]}, "/b")
