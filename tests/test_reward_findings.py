"""Chapter 08's words follow its numbers: verdicts, the reward-hacking flag, the arms' cache tag, the REPORT section."""

from __future__ import annotations

import dataclasses

import pytest

from mechlib import reward_findings as rf
from mechlib.feature_reward import FeatureRewardSpec, RewardFeature
from mechlib.grpo import Arm, ArmRun, GrpoSettings, StepLog
from mechlib.grpo_eval import AccuracyChange
from mechlib.paths import RunPaths
from mechlib.report_reward import section_feature_reward
from mechlib.stats import BootstrapCI


@pytest.fixture
def paths(tmp_path, monkeypatch) -> RunPaths:
    from mechlib import paths as paths_module

    monkeypatch.setattr(paths_module, "OUTPUTS_DIR", tmp_path)
    return RunPaths("r").make()


def _run(arm: Arm, features: list[float], paths: RunPaths) -> ArmRun:
    steps = tuple(StepLog(i + 1, 0.25, f, 0.25, 20.0, 0.0, 1.0) for i, f in enumerate(features))
    return ArmRun(arm, GrpoSettings(steps=len(features)), "tiny", "k", steps, str(paths.checkpoints / arm.slug), 3.0)


EVALUATED: tuple[list, list] = ([], [])  # before / after records: no answer changed


def _change(k_before: int, k_after: int, b: int, c: int, p: float, n: int = 50) -> AccuracyChange:
    return AccuracyChange(n, k_before, k_after, (0.1, 0.5), (0.1, 0.5), b, c, p, BootstrapCI(0.0, -0.1, 0.1, 0.95, 10))


RISING = [0.0] * 6 + [0.2] * 6  # 12 steps: enough to read a trend
FEATURE_ARM = Arm("feature", 0.0, 1.0)


def test_a_rising_feature_reward_without_accuracy_is_flagged_as_hacking(paths):
    a = rf.arm_result(_run(FEATURE_ARM, RISING, paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths)
    assert a.hacking is True
    assert a.feature_trend_rho is not None and a.feature_trend_rho > 0.8 and a.feature_trend_p < 0.01
    assert a.adapter == "checkpoints/feature" and a.records == "records/grpo_feature.jsonl"
    assert "Reward-hacking signature in feature (Spearman ρ +0.87 with the step" in rf.training_verdict([a])


def test_a_noisy_curve_whose_second_half_is_a_little_higher_is_not_hacking(paths):
    """The old rule (second half's mean above the first's) flagged this curve; its rise is not significant."""
    noisy = [0.3, 0.0, 0.2, 0.1, 0.0, 0.3, 0.1, 0.2, 0.0, 0.3, 0.2, 0.11]  # halves: 0.1500 vs 0.1517
    assert sum(noisy[6:]) > sum(noisy[:6])
    a = rf.arm_result(_run(FEATURE_ARM, noisy, paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths)
    assert a.hacking is False and a.feature_trend_p is not None and a.feature_trend_p > 0.05
    text = rf.training_verdict([a])
    assert "No arm rewarded for the features showed" in text and "feature: Spearman ρ" in text


def test_no_hacking_when_accuracy_improved_or_the_reward_fell(paths):
    improved = rf.arm_result(_run(FEATURE_ARM, RISING, paths), _change(19, 30, 11, 0, 0.001), *EVALUATED, paths)
    falling = rf.arm_result(_run(FEATURE_ARM, RISING[::-1], paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths)
    assert improved.hacking is False and falling.hacking is False
    assert "No arm rewarded for the features showed" in rf.training_verdict([improved, falling])


def test_too_few_steps_or_an_unrewarded_arm_cannot_tell(paths):
    short = rf.arm_result(_run(FEATURE_ARM, [0.0, 0.5], paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths)
    unrewarded = rf.arm_result(
        _run(Arm("correctness", 1.0, 0.0), RISING, paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths
    )
    assert short.hacking is None and unrewarded.hacking is None
    text = rf.training_verdict([short])
    assert "too short to tell a trend" in text and "Reward-hacking signature" not in text
    assert "unchanged at 19/50 (McNemar p = 1.000, 0 fixed, 0 broken)" in text


def test_verdict_words_follow_the_direction_and_significance(paths):
    up = rf.arm_result(_run(FEATURE_ARM, RISING, paths), _change(19, 30, 11, 0, 0.001), *EVALUATED, paths)
    down = rf.arm_result(_run(FEATURE_ARM, RISING, paths), _change(19, 17, 1, 3, 0.625), *EVALUATED, paths)
    assert "rose from 19/50 to 30/50 (significantly" in rf.training_verdict([up])
    assert "fell from 19/50 to 17/50 (not significantly" in rf.training_verdict([down])


def test_cache_tag_changes_with_the_reward_spec_and_the_sae(tmp_path):
    spec = FeatureRewardSpec(1, (RewardFeature(3, 0.5, 1.0), RewardFeature(4, -0.5, 1.0)), "s", "equal", 0.9, 6)
    spec_file, sae = tmp_path / "spec.json", tmp_path / "sae.pt"
    spec.save(spec_file)
    sae.write_bytes(b"sae one")
    tag = rf.arm_cache_tag("m", "float32", "base", spec_file, str(sae))
    assert tag == rf.arm_cache_tag("m", "float32", "base", spec_file, str(sae))
    dataclasses.replace(spec, features=(RewardFeature(3, 0.5, 2.0), RewardFeature(4, -0.5, 1.0))).save(spec_file)
    tag_cap = rf.arm_cache_tag("m", "float32", "base", spec_file, str(sae))
    sae.write_bytes(b"sae two")
    tag_sae = rf.arm_cache_tag("m", "float32", "base", spec_file, str(sae))
    assert len({tag, tag_cap, tag_sae, rf.arm_cache_tag("m", "float32", "policy", spec_file, str(sae))}) == 4
    assert rf.arm_cache_tag("m", "float32", "base", spec_file, "hf:o/r").endswith("|hf:o/r")


def test_report_section_states_both_answers(paths):
    from result_examples import EXAMPLES

    from mechlib import results

    example = EXAMPLES[results.FeatureRewardResult]
    assert "Chapter 08 not run" in section_feature_reward(paths, None)
    text = section_feature_reward(paths, example)
    assert "**Did the feature reward predict correctness?** Not distinguishable." in text
    assert "**Did training on it help?** No change." in text
    assert "| correctness | 1, 0 | 2/4 [0.15, 0.85] | 2/4 [0.15, 0.85] | 0 / 0 | 1.000 |" in text
    # an arm with no verdict says why: not rewarded for the features, or too few steps; a trend shows its rho and p
    arm = example.arms[0]
    unrewarded = dataclasses.replace(arm, hacking=None)
    short = dataclasses.replace(arm, arm="feature", feature_weight=1.0, hacking=None)
    tested = dataclasses.replace(arm, arm="feature", feature_weight=1.0, feature_trend_rho=0.3, feature_trend_p=0.04)
    text = section_feature_reward(paths, dataclasses.replace(example, arms=[unrewarded, short, tested]))
    assert "| — (not rewarded for the features) |" in text and "| — (too few steps) |" in text
    assert "(ρ +0.30, p 0.040) | no |" in text


def test_finding_names_both_selections_and_the_training_result(paths):
    from mechlib.readouts import ReadoutScore

    def row(name: str, auc: float) -> ReadoutScore:
        return ReadoutScore(name, 50, 19, 0.3, (0.1, 0.5), 0.01, auc, (auc - 0.1, auc + 0.1), 0.01, 100, 100, "d")

    arm = rf.arm_result(_run(FEATURE_ARM, [0.0, 0.5], paths), _change(19, 19, 0, 0, 1.0), *EVALUATED, paths)
    text = rf.reward_finding(row("SAE A", 0.7), row("SAE B", 0.9), "It predicted.", [arm], GrpoSettings(steps=2))
    assert text.startswith("Stage Gate 1: It predicted. Its Spearman ρ with correctness: 0.300.")
    assert "The other selection, SAE B, scored AUROC 0.900 [0.80, 1.00] on the same answers" in text
    typed = dataclasses.replace(row("SAE B", 0.9), p_within_type=0.001)
    text_typed = rf.reward_finding(row("SAE A", 0.7), typed, "x.", [arm], GrpoSettings(steps=2))
    assert "SAE B, scored AUROC 0.900 [0.80, 1.00] (within question types p = 0.001) on the same" in text_typed
    assert "GRPO (2 steps per arm): feature: held-out accuracy unchanged at 19/50" in text
    assert "The other selection" not in rf.reward_finding(row("A", 0.7), None, "x.", [arm], GrpoSettings(steps=2))


def test_both_selections_are_saved_and_the_gate_inputs_line_up(tmp_path):
    """Stage Gate 1 scores two selections, so both specs are saved (the trained one under the name GRPO and
    TRL users load); the gate's per-answer inputs refuse scores that do not line up with the ids."""
    import numpy as np

    from mechlib.feature_reward import Calibration

    def cal(feature: int) -> Calibration:
        return Calibration(FeatureRewardSpec(1, (RewardFeature(feature, 1.0, 2.0),), "s", "equal", 0.9, 4), ())

    trained, other = rf.save_specs({"chapter05": cal(3), "answer_tokens": cal(7)}, "answer_tokens", tmp_path)
    assert trained == tmp_path / "feature_reward.json" and other == tmp_path / "feature_reward_chapter05.json"
    assert FeatureRewardSpec.load(trained).features[0].feature == 7
    assert FeatureRewardSpec.load(other).features[0].feature == 3

    g = rf.gate_inputs(["a", "b"], np.array([True, False]), {"x": np.array([0.5, 0.25]), "y": [1, 2]}, ["p", "q"])
    assert g.correct == [True, False] and g.scores == [[0.5, 0.25], [1.0, 2.0]] and g.types == ["p", "q"]
    with pytest.raises(ValueError, match="2 ids"):
        rf.gate_inputs(["a", "b"], [True, False], {"x": [0.5]}, ["p", "q"])
    with pytest.raises(ValueError, match="1 types"):
        rf.gate_inputs(["a", "b"], [True, False], {"x": [0.5, 0.1]}, ["p"])


def test_last_samples_shows_each_arms_last_step_highest_feature_first(tmp_path):
    from mechlib.grpo_samples import Sample, write_samples
    from mechlib.results.reward import ArmResult

    write_samples(
        tmp_path,
        [Sample(1, 0, "old", 1.0, 0.9), Sample(2, 0, "low\nanswer", 0.0, 0.1), Sample(2, 0, "x" * 100, 1.0, 0.4)],
    )
    change = _change(1, 1, 0, 0, 1.0)
    kept = ArmResult("feature", 0.0, 1.0, [], 1.0, False, "a", change, "r", 0, None, samples="samples.jsonl")
    old = dataclasses.replace(kept, arm="correctness", samples=None)
    lines = rf.last_samples([kept, old], tmp_path, width=20).splitlines()
    assert lines[0] == "feature, step 2:"
    assert lines[1] == "  correct 1  feature +0.400  " + "x" * 19 + "…"
    assert lines[2] == "  correct 0  feature +0.100  low answer"
    assert lines[3].startswith("correctness: sampled completions not saved")
    # arms that sampled the same completions (same seeds, adapters not yet apart) are listed once
    twin = dataclasses.replace(kept, arm="correctness+feature")
    lines = rf.last_samples([kept, twin], tmp_path, width=20).splitlines()
    assert len(lines) == 4 and lines[:3] == rf.last_samples([kept], tmp_path, width=20).splitlines()
    assert lines[3].startswith("correctness+feature, step 2: the same completions as feature (same seeds;")


def test_selection_summary_shows_each_rankings_within_type_p_where_the_rows_have_one():
    """Both rankings' rows carry a within-type p on a task with several question types: each table gets a
    ``p type`` column and each selection a count. Rows without one (one question type) show no column."""
    from mechlib.contrast import FeatureContrast
    from mechlib.feature_reward import Calibration

    def spec(ids: list[int]) -> FeatureRewardSpec:
        feats = tuple(RewardFeature(i, 0.5 if n == 0 else -0.5, 2.0) for n, i in enumerate(ids))
        return FeatureRewardSpec(3, feats, "s", "equal", 0.99, 20)

    def row(i: int, p: float | None) -> FeatureContrast:
        return FeatureContrast(i, 1.0, 0.5, 1.0, 0.0, 0.5, 0.1, p)

    calibrated = {"chapter05": Calibration(spec([7, 9]), ()), "answer_tokens": Calibration(spec([4, 5]), ())}
    rankings = {"chapter05": [row(7, 0.004), row(9, 0.6)], "answer_tokens": [row(4, 0.01), row(5, 0.02)]}
    text = rf.selection_summary(calibrated, "chapter05", rankings).splitlines()
    assert text[1].endswith(" p type") and text[2].endswith("  0.004") and text[3].endswith("  0.600")
    assert text[5].endswith(" p type") and text[6].endswith("  0.010")  # the answer-token table
    assert text[-2:] == [
        "  chapter 05's features (last prompt token): 1 of 2 below 0.05",
        "  features ranked on the contrast answers: 2 of 2 below 0.05",
    ]
    untyped = {**rankings, "answer_tokens": [row(4, None), row(5, None)]}
    text = rf.selection_summary(calibrated, "chapter05", untyped).splitlines()
    assert not text[5].endswith("p type") and text[-1].startswith("  chapter 05's features")
    plain = rf.selection_summary(calibrated, "chapter05")  # a GSM8K run (one type) or no rankings: as before
    assert "p type" not in plain and len(plain.splitlines()) == len(text) - 3
