"""The closing paragraphs follow the numbers: wording comes from the statistics, never from one run."""

from __future__ import annotations

from mechlib import findings


def test_significance_words_follow_p():
    sig = findings.layers_finding(22, 30, 0.717, 0.003, 0.002, 0.038, 5, 0.53, 0.0001, [22, 22, 22])
    assert "p = 0.003 ± 0.002, significant at 0.05" in sig and "beyond the question type" in sig
    assert "layer 27 of 42" in sig and "p < 0.001, significant" in sig
    assert sig.endswith("Every alternative scoring rule finds the same peak layer.")
    weak = findings.layers_finding(3, 30, 0.9, 0.46, 0.016, 0.7, 5, -0.1, 0.4, [3, 5, None])
    assert "p = 0.460 ± 0.016, not significant at 0.05" in weak and "may be the question type" in weak
    assert "significant at 0.05" not in weak.replace("not significant at 0.05", "")
    # the rule with no peak (None) is not counted as moving it
    assert "1 of 3 alternative scoring rules put the peak elsewhere" in weak
    assert weak.endswith("depends on how answers are scored (1 more had too few questions on one side).")
    kept = findings.layers_finding(3, 30, 0.9, 0.46, 0.016, 0.7, 5, -0.1, 0.4, [3, None, 3])
    assert kept.endswith(
        "Every alternative scoring rule with a peak finds the same layer (1 had too few questions on one side)."
    )
    one_type = findings.layers_finding(3, 30, 0.9, 0.46, 0.016, 0.46, 1, None, None, [3])
    assert "question type" not in one_type and "Spearman" not in one_type
    # the held-out projection tested within question types (the default run: ρ 0.53, within-type p 0.22)
    by_type = findings.layers_finding(22, 30, 0.717, 0.003, 0.002, 0.038, 5, 0.53, 0.0001, [22], rho_within_p=0.224)
    assert "only within question types, p = 0.224, not significant at 0.05: inside a type it does not" in by_type
    assert "the held-out ρ may be mostly the question type" in by_type
    inside = findings.layers_finding(22, 30, 0.717, 0.003, 0.002, 0.038, 5, 0.53, 0.0001, [22], rho_within_p=0.004)
    assert "p = 0.004, significant at 0.05: the projection predicts correctness inside a type too" in inside
    assert "shuffled only within question types" not in sig  # not computed: no sentence
    # the top SAE features' within-type p (the default run: 3 of 10 below 0.05); a one-type run has none
    feats = findings.layers_finding(
        22, 30, 0.7, 0.003, 0.002, 0.038, 5, 0.53, 0.0001, [22], feature_p_within_type=[0.004, 0.3, 0.02], sae_layer=15
    )
    assert feats.endswith(
        "Of the top 3 SAE features at layer 15, 2 keep p < 0.05 with the labels shuffled within question types "
        "(in-sample: these answers chose them, so that is weak evidence); the other 1 may read the question type "
        "rather than correctness."
    )
    untyped = findings.layers_finding(3, 30, 0.9, 0.46, 0.016, 0.46, 1, None, None, [3], feature_p_within_type=[None])
    assert untyped == one_type


def test_steering_finding_says_no_effect_or_names_the_effects():
    none = findings.steering_finding(
        22,
        [(0.02, "no significant change", -0.02, 1.0), (0.1, "no significant change", 0.04, 0.6)],
        2,
        [-0.04, 0.04],
        -0.02,
    )
    assert "No steering scale at layer 22 changes held-out accuracy significantly" in none
    assert "from -0.020 to +0.040" in none and "2 of 2" in none and "within the random range" in none
    flat = findings.steering_finding(2, [(0.1, "no significant change", -0.02, 1.0)] * 2, 2, [], None)
    assert "Δ -0.020 at every scale" in flat and "random" not in flat
    some = findings.steering_finding(
        17, [(0.1, "harms", -0.2, 0.013), (-0.05, "no significant change", 0.1, 0.3)], 1, [0.1, 0.2], -0.2
    )
    assert "+10 % harms (Δ -0.200, p 0.013)" in some
    assert "CAA by -0.200: below the range of the 2 random directions — the spread of 2 draws, not a test" in some
    assert "-5 %" not in some  # only the scales that moved are named


def test_training_sae_lens_and_collect_findings():
    assert "no latent was dead" in findings.training_finding(292, 299008, 3.0, 0.219, 0, 4608)
    assert "12 of 4608 latents (0.3%)" in findings.training_finding(292, 299008, 3.0, 0.219, 12, 4608)
    assert "published SAE" in findings.training_finding(0, 0, 0.0, None, None, 4608)
    sae = findings.sae_finding(0.69, 0.87, 0.46, 32, 0.34, 0.51, 0.93, 32.0, 1.0, 16384)
    assert "beats the 32-component PCA baseline (0.460)" in sae and "recovering 93.0%" in sae
    assert "does not beat" in findings.sae_finding(0.4, 0.6, 0.46, 32, 0.34, 0.51, None, 32.0, 1.0, 16384)
    assert "and 100.0% of the latents fire" in sae and "it adds 0.340 nats of next-token loss" in sae
    # random-weight models: the splice can lower the loss, or cost more than mean ablation; said so, not "adds -x"
    odd = findings.sae_finding(0.2, 0.3, 0.1, 4, -0.276, 0.32, -0.943, 4.0, 1.0, 256)
    assert "it lowers next-token loss by 0.276 nats" in odd and "adds -" not in odd
    assert "the loss recovered against mean-ablating the layer is -94.3% (below zero, so not a share" in odd
    # 4607 of 4608 latents fired: one decimal would round that up to every latent
    assert "and 99.98% of the latents fire" in findings.sae_finding(
        0.69, 0.87, 0.46, 32, 0.34, 0.51, 0.93, 32.0, 4607 / 4608, 16384
    )
    assert "from layer 23 of 30 (77% of depth" in findings.lens_finding(23, 30, " Berlin", 0.81)
    assert findings.lens_finding(None, 30, "x", 0.1).startswith("No layer's top tokens")
    assert "English words at 60% or more of the positions from layer 23" in findings.lens_finding(23, 30, "x", 0.1, 0.6)
    assert "147x longer" in findings.collect_finding(100000, 16384, 15, 576, 170.4, 146.8)
    # a random-weight model has no attention sink: the sentence must not call a 1x BOS "longer"
    flat = findings.collect_finding(1200, 256, 3, 64, 29.0, 1.04)
    assert "no outlier here (1.0x), but it is excluded all the same" in flat and "longer" not in flat
