# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 05 — Where do right and wrong answers part ways? Contrastive layers
#
# Chapter 04 split the questions, with a fixed seed, into a **contrast set** and a **held-out set**,
# and recorded which ones the model answered correctly. Here we ask, for every decoder layer, how
# differently the model's residual stream looks *before it starts answering* on questions it will get
# right versus questions it will get wrong.
#
# For each layer we compute, per residual dimension, Cohen's d of correct − wrong
# (`mechlib.stats.cohens_d`: mean difference over the pooled standard deviation), and summarise the layer
# by the mean of its 10 largest |d| — the study's statistic (its peak: layer 27 of Gemma 4 E4B,
# |d| = 0.896). That statistic is biased upward: the top 10 of hundreds or thousands of noisy |d| values
# is large even when the labels carry no information, and more so with few questions. So every layer is
# also scored under **at least `n_permutations` random relabellings** of the same questions (a
# label-permutation null; more are drawn while the p-value lies within two Monte-Carlo standard errors of
# 0.05, so "significant or not" is not decided by the sampling), and the peak is compared with the null of
# the *maximum over layers* — the honest reference once the peak was chosen by looking at all layers.
#
# "Correct" is the parser's verdict on free text. The section before the findings recomputes the peak under
# the alternative scoring rules of chapter 04 (lm-eval strict, lm-eval flexible, finished answers only) and
# says whether the choice of layer survives.
#
# With `placeholder_labels = f > 0` (for random-weight models, which answer nothing correctly) "correct"
# is instead a seeded draw marking a fraction `f` of the questions correct (`mechlib.placeholder`); every
# table, figure, finding and metrics file of this chapter then says **PLACEHOLDER**.

# %% tags=["parameters"]
run = "default"
seed = 0
model = "embedded:smollm2-135m-instruct"
model_dtype = "float32"
device = "auto"
layer = 15
sae_source = "train"
sae_pretrained = ""
task = "arithmetic"
gsm8k_path = ""
gsm8k_split = "test"
n_questions = 200
n_heldout = 50
n_permutations = 1000
top_d = 10
contrast_pooling = "last"
gen_batch_size = 32
placeholder_labels = 0.0

# %%
import functools
import textwrap
import time

import numpy as np

from mechlib import browser, contrast, findings, placeholder, plots, results, scoring, sensitivity, stats
from mechlib.io import atomic_write_json
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.sae import check_compatible, load_sae
from mechlib.steering_vector import SteeringVector
from mechlib.tasks import load_questions

P = from_namespace(globals())
paths = RunPaths(P.run).make()
t0 = time.time()

# %% [markdown]
# ## Which states
#
# We take the **output of each decoder layer** (the residual stream after layer *i*, the convention of
# the SAE's `layer` and of the steering hook in chapter 06), captured by forward hooks in one forward pass
# per batch that stops after the last layer. We do not use `output_hidden_states`: its last entry is the
# *final-normed* stream (on Gemma 4 and in transformers 5 generally), on a different scale from the rest.
#
# **Pooling: the last prompt token** (`contrast_pooling = "last"`). That position's state is the one from
# which the first answer token is generated, and the only one that has read the whole question; it is also
# the position a steering vector acts on first. Averaging over the prompt (`"mean"`) mixes in the
# instruction and template tokens, identical across questions, which dilutes question-specific signal.
# Prompts are tokenised exactly as chapter 04 generated from them. States of all questions are cached
# under `activations/`, so a rerun skips the forward passes.

# %%
split = placeholder.baseline_split(paths, P.placeholder_labels, P.seed)  # chapter 04's split (labels: see above)
ids = split.contrast_ids + split.heldout_ids
prompts = [split.prompts[i] for i in ids]
states_file = paths.activations / f"contrast_states_{P.contrast_pooling}.pt"
states = contrast.cached_layer_states(
    states_file,
    model_name=P.model,
    pooling=P.contrast_pooling,
    ids=ids,
    prompts=prompts,
    settings=contrast.run_settings(P.model_dtype, P.device),
    collect=functools.partial(
        contrast.collect_with_model,
        P.model,
        P.model_dtype,
        P.device,
        prompts,
        ids,
        pooling=P.contrast_pooling,
        batch_size=P.gen_batch_size,
    ),
)
h_contrast = states.select(split.contrast_ids)  # [n, layers, d_model]
y = split.labels(split.contrast_ids)
print(f"states collected/loaded in {time.time() - t0:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
print(placeholder.banner_line(P.placeholder_labels), end="")
print(f"contrast set: {int(y.sum())} correct, {int((~y).sum())} wrong; held-out: {len(split.heldout_ids)} questions")
print(f"{states.n_layers} layers, d_model {h_contrast.shape[-1]}, pooling: {states.pooling}")
caution = contrast.small_group_warning(int(y.sum()), int((~y).sum()))
if caution:
    print(caution)

# %% [markdown]
# ## Layers ranked by top-10 |d|, against the permutation null
#
# The figure shows the observed statistic per layer (blue), the null's median-to-95th-percentile band per
# layer (grey), and the 95th percentile of the max-over-layers null (dashed). A peak above the dashed line
# is unlikely under "correctness is unrelated to the states"; a peak inside the band is what random labels
# give. The permutation p-value of the peak is `(1 + #{null max ≥ observed peak}) / (1 + permutations)`, printed
# with its Monte-Carlo standard error `sqrt(p (1 − p) / permutations)`.
# Neighbouring layers are strongly correlated (each adds a little to the same residual stream), so a
# chance excursion in one layer shows up in its neighbours too: count bumps, not layers.
#
# **A confound, and a second null.** The generated default task mixes one-step question types of different
# difficulty (bare sums, word-problem sums, products — chapter 04's table gives this run's accuracy per type).
# Then "correct vs wrong" is partly "easy type vs hard type", and the question type is visible in the states
# from the first layer on — a direction that merely reads the type can pass the plain null. The second null
# shuffles the labels only *within* each question type (the `source` of each question), so it asks whether the
# states predict correctness beyond the type (dotted line). On GSM8K every question has the same source and
# the two nulls coincide. Within a type, "wrong" still mixes two failures: answers that chose another
# operation (most of them subtract, as the one-shot example does) and answers that wrote the right operation
# with a wrong result (and a few answers with no calculation at all). Chapter 04 counts each. The states read
# here are at the last prompt token, before any answer token, so a direction found in them predicts a failure
# before it is written; it does not say which of the two it is.

# %%
res = contrast.contrast_layers(h_contrast, y, top_n=P.top_d, n_permutations=P.n_permutations, seed=P.seed)
null = res.null
null_q50, null_q95 = null.null_quantile(0.5), null.null_quantile(0.95)
null_max_q95 = float(np.quantile(null.null_max, 0.95))
questions = load_questions(P.task, P.n_questions, P.seed, P.gsm8k_path, P.gsm8k_split)
split = contrast.match_questions(questions, split)  # each record's question type, from its question
strata = split.kinds(split.contrast_ids)
within = stats.adaptive_permutation_null(
    h_contrast, y, min_permutations=P.n_permutations, seed=P.seed, top_n=P.top_d, strata=strata
)
within_max_q95 = float(np.quantile(within.null_max, 0.95))
fig, ax = plots.plot_layer_contrast(
    res.top_abs_d,
    null_q50,
    null_q95,
    null_max_q95,
    res.peak_layer,
    P.top_d,
    strata_max_q95=within_max_q95 if len(set(strata)) > 1 else None,
)
_ = plots.save_figure(placeholder.mark_figure(fig, P.placeholder_labels), paths.figures / "05_contrastive_layers.png")

# %%
# NBVAL_CHECK_OUTPUT
peak = res.peak_layer
print(f"peak layer {peak}: mean top-{P.top_d} |d| = {res.top_abs_d[peak]:.3f}")
print(f"max-over-layers null: median {np.median(null.null_max):.3f}, 95th pct {null_max_q95:.3f}")
print(
    f"permutation p (peak vs max-over-layers null, {null.n_permutations} permutations) = {null.p_peak:.3f} "
    f"± {null.p_peak_mc_se:.3f}"
)
print(f"peak layer against its own layer's null only: p = {null.p_layer[peak]:.3f} (ignores the choice of peak)")
print(
    f"within-type null ({len(set(strata))} question types, {within.n_permutations} permutations): max-over-layers "
    f"95th pct {within_max_q95:.3f}, p = {within.p_peak:.3f} ± {within.p_peak_mc_se:.3f}"
)

# %% [markdown]
# ## The steering direction and the card's "readable" test
#
# The CAA vector is `mean(h | correct) − mean(h | wrong)` at the peak layer over the contrast set,
# unit-normalised, saved as `checkpoints/steering_vec_L{peak}.pt` with its provenance and the layer's mean
# residual norm (mean ‖h‖ over the non-special tokens of all chapter 04 prompts, contrast and held-out: no
# label enters it — the unit in which chapter 06 gives its scales). Is the direction *readable*? We project
# each **held-out** question's state on it and ask whether a higher projection goes with a correct answer
# (Spearman ρ with its p-value). The held-out questions played no part in finding the direction, so this is
# a fair test; the study's companion model reports ρ = 0.540. The confound above applies here too: on a
# mixed-difficulty task a direction that reads the question type also "predicts" correctness. So the same
# association is tested once more with the labels shuffled only within each question type
# (`stats.rank_association_within_strata`): it asks whether the projection orders correct before wrong
# answers *inside* a type. On GSM8K there is one type and this second test is skipped.

# %%
unit, raw_norm = contrast.mean_difference(h_contrast[:, peak], y)
mean_norm = float(states.token_norm_mean[peak])
vec_path = SteeringVector(
    peak,
    unit,
    mean_norm,
    model=P.model,
    n_correct=res.n_correct,
    n_wrong=res.n_wrong,
    raw_diff_norm=raw_norm,
    pooling=P.contrast_pooling,
).save(paths.checkpoints / f"steering_vec_L{peak}.pt")
readable = contrast.projection_test(
    states.select(split.heldout_ids)[:, peak],
    unit,
    split.labels(split.heldout_ids),
    split.kinds(split.heldout_ids),
    n_permutations=P.n_permutations,
    seed=P.seed,
)

# %%
# NBVAL_CHECK_OUTPUT
print(f"‖mean difference‖ at layer {peak} = {raw_norm:.3f}; mean residual norm = {mean_norm:.2f}")
print(readable.lines())

# %% [markdown]
# ## SAE features ranked by contrast
#
# The chapter-02 SAE (or the published one, with `sae_source = "pretrained"`) reads the residual after
# layer `layer`. We encode the contrast set's pooled states at
# that layer and rank features by the difference of their mean activation on correct versus wrong
# questions (Cohen's d and firing rates alongside: a feature firing on two questions can have a large d
# from a tiny variance). The top 50 go to `metrics/contrastive_features_L{layer}.json` — the second file
# the card announced and never shipped. Where the task mixes question types, `p type` asks of each feature
# what the within-type test asked of the direction: with the labels shuffled only inside each type, does
# its activation still order correct before wrong answers? These answers chose the features from
# thousands, so the p is in-sample: a large one says the type explains the feature's contrast (it reads
# which kind of question this is, not whether the answer will be right); a small one is not, by itself,
# evidence of a correctness feature.

# %%
sae_path = P.sae_pretrained if P.sae_source == "pretrained" else str(paths.checkpoints / "sae_final.pt")
sae = load_sae(sae_path)
check_compatible(sae, h_contrast.shape[-1], P.layer, source=sae_path)
features = contrast.rank_sae_features(
    sae, h_contrast[:, P.layer], y, top_n=50, types=strata, n_permutations=P.n_permutations, seed=P.seed
)
features_file = paths.metrics / f"contrastive_features_L{P.layer}.json"
atomic_write_json(
    features_file,
    {
        **contrast.features_json(
            features,
            layer=P.layer,
            model=P.model,
            pooling=P.contrast_pooling,
            sae=P.sae_pretrained if P.sae_source == "pretrained" else "checkpoints/sae_final.pt",
            n_correct=res.n_correct,
            n_wrong=res.n_wrong,
        ),
        **placeholder.metrics(P.placeholder_labels),
    },
)

# %%
# NBVAL_CHECK_OUTPUT
print(contrast.features_table(features))

# %% [markdown]
# ### The top contrastive feature in the feature browser
#
# Chapter 03's browser gave pages to a random sample of latents, since nothing had been ranked yet. Here it is
# rebuilt with this chapter's top features first (with chapter 03's caps; a build that already has them is
# kept), and their scores and ranks join its index: sort its table by *contrast rank*. Below, the feature
# most active on correctly answered questions, as the browser shows it: the held-out corpus contexts where
# it fires most, and the tokens its decoder direction promotes and suppresses through the unembedding.

# %%
browser.contrast_view(P, paths, sae, [(f.feature, f.score) for f in features])

# %% [markdown]
# ## Does the peak depend on how answers are scored?
#
# The same states, relabelled by each alternative rule of chapter 04: lm-evaluation-harness's *strict*
# (`#### N` only) and *flexible* (last number) readings, and *finished only* (the primary reading with
# cut-off answers left out). Each gets its own permutation null. The paragraph after the table is generated
# from these numbers.

# %%
# NBVAL_CHECK_OUTPUT
peaks = [sensitivity.PeakUnderRule.from_null("primary", null, res.n_correct, res.n_wrong)]
peaks += sensitivity.peak_under_rules(
    h_contrast,
    split.contrast_ids,
    split.records,
    top_n=P.top_d,
    seed=P.seed,
    min_permutations=P.n_permutations,
    rules=scoring.ALTERNATIVES,
)
print(f"{'rule':>42} {'correct':>7} {'wrong':>5} {'peak':>4} {'top-|d|':>7} {'p':>6} {'± MC':>6}")
for r in peaks:
    if r.peak_layer is None:
        print(f"{scoring.RULE_LABELS[r.rule]:>42} {r.n_correct:>7} {r.n_wrong:>5}  (too few on one side)")
    else:
        print(
            f"{scoring.RULE_LABELS[r.rule]:>42} {r.n_correct:>7} {r.n_wrong:>5} {r.peak_layer:>4} "
            f"{r.top_abs_d:>7.3f} {r.p_peak:>6.3f} {r.p_mc_se:>6.3f}"
        )
print()
peak_finding = placeholder.mark_text(sensitivity.peak_verdict(peaks), P.placeholder_labels)
print(textwrap.fill(peak_finding, 110))

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
finding = findings.layers_finding(
    peak,
    states.n_layers,
    float(res.top_abs_d[peak]),
    null.p_peak,
    null.p_peak_mc_se,
    within.p_peak,
    len(set(strata)),
    stats.finite_or_none(readable.rho.rho),
    stats.finite_or_none(readable.rho.p),
    [r.peak_layer for r in peaks[1:]],
    rho_within_p=None if readable.within_type is None else readable.within_type.p,
    feature_p_within_type=[f.p_within_type for f in features[:10]],
    sae_layer=P.layer,
)
finding = placeholder.mark_text(finding, P.placeholder_labels)
print(textwrap.fill(finding, 110))

# %%
_ = results.save(
    paths,
    results.Layers(
        finding=finding,
        labels=placeholder.label_kind(P.placeholder_labels),
        placeholder_labels=P.placeholder_labels,
        model=P.model,
        pooling=P.contrast_pooling,
        top_d=P.top_d,
        n_permutations=null.n_permutations,
        n_correct=res.n_correct,
        n_wrong=res.n_wrong,
        n_heldout=len(split.heldout_ids),
        peak_layer=peak,
        top_abs_d=[float(v) for v in res.top_abs_d],
        null_p=null.p_peak,
        null_p_mc_se=null.p_peak_mc_se,
        null_p_layer=[float(v) for v in null.p_layer],
        null_q50=[float(v) for v in null_q50],
        null_q95=[float(v) for v in null_q95],
        null_max_q50=float(np.median(null.null_max)),
        null_max_q95=null_max_q95,
        n_question_types=len(set(strata)),
        null_p_within_type=within.p_peak,
        null_p_within_type_mc_se=within.p_peak_mc_se,
        n_permutations_within_type=within.n_permutations,
        scoring_sensitivity=peaks,
        scoring_verdict=peak_finding,
        null_max_q95_within_type=within_max_q95,
        spearman_rho=stats.finite_or_none(readable.rho.rho),
        spearman_p=stats.finite_or_none(readable.rho.p),
        spearman_n=readable.rho.n,
        spearman_p_within_type=None if readable.within_type is None else readable.within_type.p,
        mean_resid_norm=[float(v) for v in states.token_norm_mean],
        steering_vector=str(vec_path.relative_to(paths.root)),
        states_file=str(states_file.relative_to(paths.root)),
        sae_layer=P.layer,
        contrastive_features=str(features_file.relative_to(paths.root)),
    ),
)
print(f"chapter 05 done in {time.time() - t0:.1f} s")
