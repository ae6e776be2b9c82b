"""Hand-made minimal chapter results (one per :mod:`mechlib.results` class), and a helper that completes a
partial metrics dict with them, for tests that care about a few keys only."""

from __future__ import annotations

from typing import Any

from mechlib import results
from mechlib.feature_reward import RewardFeature
from mechlib.grpo import GrpoSettings, StepLog
from mechlib.grpo_eval import AccuracyChange
from mechlib.readouts import ReadoutScore
from mechlib.sensitivity import PeakUnderRule
from mechlib.stats import BootstrapCI
from mechlib.wrong_answers import WrongAnswers


def _scale_row(cls: type, scale: float, **extra: Any) -> Any:
    return cls(
        scale=scale,
        perturbation=100 * scale,
        n=4,
        accuracy=0.5,
        accuracy_ci95=(0.15, 0.85),
        delta=0.25,
        delta_ci95=(-0.25, 0.75),
        recovered=1,
        n_baseline_wrong=3,
        broken=0,
        net_flips=1,
        mcnemar_p=1.0,
        recovered_ids=["q2"],
        broken_ids=[],
        **extra,
    )


EXAMPLES: dict[type, results.ChapterResult] = {
    results.Collected: results.Collected(
        model="tiny",
        layer=1,
        d_model=8,
        seq_len=16,
        n_tokens=640,
        finding="Collected.",
        heldout_tokens=64,
        collect_mode="disk",
        activation_dtype="float32",
        exclude_special_tokens=True,
        exclude_first_positions=2,
        max_norm=9.5,
        mean_norm=3.25,
        bos_norm_ratio=40.0,
        model_load_s=0.5,
        collect_s=None,
        tokens_per_s=None,
    ),
    results.Trained: results.Trained(
        sae_source="train",
        d_model=8,
        d_sae=32,
        k=4,
        step_path="reference",
        finding="Trained.",
        n_steps=3,
        final_batch_fvu=0.5,
        n_dead_last_step=0,
        checkpoint="outputs/r/checkpoints/sae_final.pt",
        export="outputs/r/export",
        train_config={"lr": 0.001, "adam_betas": [0.9, 0.999], "init_b_dec": "zeros"},
        steps=3,
        tokens=96,
        seconds=0.25,
        resumed_from=0,
        final_fvu=0.5,
        dead_fraction_at_end=0.0,
    ),
    results.Evaluated: results.Evaluated(
        var_explained=0.7,
        var_explained_global=0.85,
        pca_var_explained=0.45,
        mse=6.5,
        l0=4.0,
        coverage=1.0,
        dead_fraction=0.0,
        delta_ce_loss=0.35,
        kl=0.5,
        finding="Evaluated.",
        n_tokens=64,
        never_fired_fraction=0.0,
        var_explained_excl_outliers=0.7,
        n_outlier_tokens=0,
        outlier_norm_ratio=10.0,
        pca_var_explained_excl_outliers=0.45,
        dead_fraction_training_counters=None,
        dead_fraction_source="never fired on held-out",
        sae_beats_pca=True,
        pca_fit_on="train activations",
        k=4,
        d_sae=32,
        layer=1,
        sae_source="pretrained",
        formulas={"var_explained": "1 - sse / sst"},
        ce_clean=3.0,
        ce_spliced=3.5,
        ce_mean_ablation=8.0,
        ce_loss_recovered=None,
        ce_n_tokens=60,
        card_snippet=results.CardSnippet(12, 1.0, 1.5e-05, 0.0),
        feature_examples=[results.FeatureExamples(3, 0.25, [results.Example(2.5, " the", "in")])],
    ),
    results.Baseline: results.Baseline(
        finding="Baseline.",
        task="arithmetic",
        prompt_format="chat_oneshot",
        model="tiny",
        max_new_tokens=16,
        n=8,
        n_correct=3,
        accuracy=0.375,
        ci95=(0.14, 0.69),
        truncated=0.125,
        finished=0.875,
        stop_reasons={"eos": 7, "answer_line": 0, "limit": 1},
        unparsed=0.0,
        parser_version="answers-v2",
        by_scoring_rule={
            "primary": results.Accuracy(8, 3, 0.375, (0.14, 0.69)),
            "finished": results.Accuracy(0, 0, None, (0.0, 1.0)),
        },
        by_rule={"hashes": results.RuleCount(8, 3)},
        by_kind={"plus": results.Accuracy(8, 3, 0.375, (0.14, 0.69))},
        contrast_ids=["q0", "q1", "q3", "q4"],
        heldout_ids=["q2", "q5", "q6", "q7"],
        generation_seconds=1.5,
        placeholder_labels=0.0,
        wrong_answers=[WrongAnswers("plus", "+", 5, 2, 2, 1, {"-": 2})],
    ),
    results.Layers: results.Layers(
        finding="Layers.",
        labels="parser",
        placeholder_labels=0.0,
        model="tiny",
        pooling="last",
        top_d=3,
        n_permutations=1000,
        n_correct=2,
        n_wrong=2,
        n_heldout=4,
        peak_layer=1,
        top_abs_d=[0.25, 0.75],
        null_p=0.02,
        null_p_mc_se=0.004,
        null_p_layer=[0.5, 0.01],
        null_q50=[0.2, 0.2],
        null_q95=[0.4, 0.4],
        null_max_q50=0.3,
        null_max_q95=0.5,
        n_question_types=1,
        null_p_within_type=0.02,
        null_p_within_type_mc_se=0.004,
        n_permutations_within_type=1000,
        scoring_sensitivity=[
            PeakUnderRule("primary", 2, 2, 1, 0.75, 0.02, 0.004, 1000),
            PeakUnderRule("strict", 1, 3, None, None, None, None, 0),
        ],
        scoring_verdict="Under the primary rule the peak is layer 1.",
        null_max_q95_within_type=0.5,
        spearman_rho=None,
        spearman_p=None,
        spearman_n=4,
        spearman_p_within_type=0.31,
        mean_resid_norm=[3.0, 5.0],
        steering_vector="checkpoints/steering_vec_L1.pt",
        states_file="activations/contrast_states_last.pt",
        sae_layer=1,
        contrastive_features="metrics/contrastive_features_L1.json",
    ),
    results.Steering: results.Steering(
        finding="Steering.",
        labels="parser",
        placeholder_labels=0.0,
        layer=1,
        peak_layer=1,
        model="tiny",
        mean_resid_norm=5.0,
        steering_vector="checkpoints/steering_vec_L1.pt",
        n_heldout=4,
        baseline_accuracy=0.25,
        baseline_ci95=(0.05, 0.7),
        n_bootstrap=200,
        baseline_truncated=0.0,
        rows=[
            _scale_row(results.SteeredRow, 0.1, truncated=0.0),
            _scale_row(results.SteeredRow, -0.05, truncated=0.25),
        ],
        overlaps=[results.Overlap(0.1, -0.05, 1, 1, 1, ["q2"], 1.0)],
        card_hook_check=results.CardHookSummary(0.1, 2, 2, 1),
        scoring_sensitivity=[
            results.ScaleVerdict(
                0.1,
                "+10 %: no significant change.",
                [_scale_row(results.RuleRow, 0.1, rule="primary", effect="no significant change")],
            )
        ],
        random_control=results.RandomControl(
            0.1,
            0,
            0.5,
            [
                _scale_row(
                    results.RandomDirection,
                    0.1,
                    index=0,
                    cos_with_caa=0.05,
                    truncated=0.0,
                    vs_caa=results.PairedCounts(1, 1, 1.0),
                ),
                _scale_row(results.RandomDirection, 0.1, index=1, cos_with_caa=-0.05, truncated=0.0, vs_caa=None),
            ],
        ),
    ),
    results.Lens: results.Lens(
        model="tiny",
        finding="Lens.",
        prompt="The capital of France is",
        input_tokens=["The", " capital"],
        n_layers=2,
        english_threshold=0.5,
        english_commitment_layer=None,
        english_fraction=[0.0, 0.5],
        top_tokens=[[",", "."], ["a", " Paris"]],
        top_ids=[[1, 2], [3, 4]],
        top_probs=[[0.1, 0.2], [0.3, 0.9]],
        softcap=None,
    ),
    results.FeatureRewardResult: results.FeatureRewardResult(
        finding="Feature reward.",
        labels="parser",
        placeholder_labels=0.0,
        model="tiny",
        layer=1,
        hook_model="base",
        reward_features="chapter05",
        weighting="equal",
        cap_quantile=0.9,
        features=[RewardFeature(3, 0.5, 1.5), RewardFeature(7, -0.5, 2.0)],
        dropped=[],
        bound=(-0.5, 0.5),
        spec_file="checkpoints/feature_reward.json",
        n_contrast=6,
        n_heldout=4,
        stage_gate=[
            ReadoutScore("SAE reward", 4, 2, 0.4, (-0.5, 1.0), 0.6, 0.75, (0.25, 1.0), 0.6, 100, 100, "higher: correct")
        ],
        stage_gate_verdict="Not distinguishable.",
        grpo=GrpoSettings(steps=1),
        arms=[
            results.ArmResult(
                arm="correctness",
                correctness_weight=1.0,
                feature_weight=0.0,
                steps=[StepLog(1, 0.25, 0.1, 0.25, 20.0, 0.0, 3.0)],
                train_seconds=3.0,
                resumed=False,
                adapter="checkpoints/grpo/correctness",
                heldout=AccuracyChange(
                    4, 2, 2, (0.15, 0.85), (0.15, 0.85), 0, 0, 1.0, BootstrapCI(0.0, 0.0, 0.0, 0.95, 10)
                ),
                records="records/grpo_correctness.jsonl",
                n_changed=0,
                hacking=False,
            )
        ],
        training_verdict="No change.",
        gate_inputs=results.GateInputs(
            ids=["q1", "q2", "q3", "q4"], correct=[True, False, True, False], scores=[[0.3, 0.1, 0.2, 0.0]]
        ),
        other_spec_file="checkpoints/feature_reward_answer_tokens.json",
    ),
}


def complete(partial: Any, template: Any) -> Any:
    """``partial`` with every key it lacks taken from ``template`` (a JSON value), recursively; the items of
    a list of objects are completed from the template list's first item."""
    if isinstance(partial, dict) and isinstance(template, dict):
        return {**template, **{k: complete(v, template.get(k)) for k, v in partial.items()}}
    if isinstance(partial, list) and isinstance(template, list) and template and isinstance(template[0], dict):
        return [complete(item, template[0]) for item in partial]
    return partial


def full_metrics(cls: type, partial: dict[str, Any]) -> dict[str, Any]:
    """A complete metrics dict of ``cls``'s chapter: ``partial`` over the minimal example."""
    return complete(partial, EXAMPLES[cls].to_json())
