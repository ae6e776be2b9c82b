# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 08 — SAE features as a reward: readable, and trainable?
#
# The study ends on a gap. Its contrastive SAE features are *readable* — on the Qwen companion a
# held-out projection correlates with correctness at Spearman ρ = 0.540 — but not *controllable*: adding
# the correct-minus-wrong direction uniformly (chapter 06) does not make the model more accurate. Its
# proposed next step is to use the features as a **dense reward** for RL fine-tuning, so the model learns
# *when* to fire them, and to gate that step on a test: does the reward predict correctness at all?
# This chapter runs both on this run's data.
#
# 1. **The reward.** A hook at the SAE's layer reads prompt + completion; at every position that
#    generates an answer token the SAE encodes the residual, and the reward is the weighted activation of
#    the *helpful* features (more active on correct answers) minus the *harmful* ones, averaged over the
#    answer. Features, weights and saturation caps are chosen on the **contrast set only**.
# 2. **Stage Gate 1.** On the **held-out** questions — chapter 04's greedy answers, never used to choose
#    anything — does the reward rank correct answers above wrong ones? Spearman ρ and AUROC with bootstrap
#    intervals and a label-permutation null, next to two simpler readouts: chapter 05's CAA projection and
#    the answer's length. If the SAE reward does no better than the answer's length, it adds nothing.
# 3. **GRPO with TRL.** Three LoRA fine-tunes of the same model with the same seeds and steps:
#    correctness only, correctness + feature reward, feature reward only. Held-out accuracy before and
#    after (Wilson intervals, exact McNemar test on the paired answers), and both rewards over training:
#    a feature reward that rises while accuracy does not is **reward hacking**. "Rises" is a test, not a
#    glance at the curve: Spearman ρ of the arm's feature reward with the step, one-sided p < 0.05, read
#    only with 10 or more steps (each step's mean is over a few samples, so a curve wobbles by chance).
#
# **Scale.** The default run is sized for 2 CPU cores: a few GRPO steps per arm on a 135 M model, a
# demonstration that the loop works end to end and a measurement of where the reward stands, not a test
# of whether GRPO helps — expect the accuracies before and after to be indistinguishable.
# `params/grpo_smollm2.yaml` runs a longer version; the study-scale settings are in `params/gemma4_e4b.yaml`.
#
# With `placeholder_labels = f > 0` (random-weight models) the labels are chapter 05's seeded placeholders
# and every table, figure and finding says **PLACEHOLDER**.

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
prompt_format = "chat_oneshot"
max_new_tokens = 48
gen_batch_size = 32
n_bootstrap = 2000
n_permutations = 1000
placeholder_labels = 0.0
reward_helpful = 8
reward_harmful = 8
reward_weighting = "equal"
reward_cap_quantile = 0.9
reward_features = "chapter05"
reward_hook_model = "base"
grpo_steps = 2
grpo_prompts_per_step = 1
grpo_generations = 4
grpo_max_completion_length = 48
grpo_learning_rate = 2e-4
grpo_lora_r = 8
grpo_temperature = 0.7
grpo_feature_weight = 0.5
grpo_gradient_checkpointing = False

# %%
import functools
import textwrap
import time

from mechlib import (
    contrast,
    feature_reward,
    grpo,
    grpo_eval,
    placeholder,
    plots,
    plots_reward,
    readouts,
    results,
    reward_findings,
)
from mechlib.models import load_model
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.sae import load_sae
from mechlib.steering_vector import SteeringVector
from mechlib.tasks import load_questions

P = from_namespace(globals())
paths = RunPaths(P.run).make()
t0 = time.time()

# %% [markdown]
# ## The reward
#
# **Where it reads.** The residual stream after layer `layer` — the SAE's layer — at every **answer
# position**: the states from which the answer's tokens are generated, i.e. the last prompt token through
# the second-to-last answer token. The first of them is exactly the state chapter 05 ranked features on.
#
# **Which features.** From chapter 05's ranking (`reward_features = "chapter05"`: mean activation on
# correct − wrong contrast questions, at the last prompt token), the `reward_helpful` strongest features
# more active on correct questions and the `reward_harmful` strongest more active on wrong ones. The
# alternative `"answer_tokens"` ranks features the same way but over the contrast set's *answers*
# (mean over answer positions), which is where the reward reads; both are scored below and the parameter
# says which one GRPO trains with. Weights are ±1 (or ±|d|), scaled to Σ|w| = 1. Where the task mixes
# question types, each ranking also tests its features with labels shuffled within each type (`p type`): a
# feature whose p is large reads which kind of question this is, and rewards that rather than a correct answer.
#
# **Why it is bounded.** Each feature's activation is divided by its **cap** — the `reward_cap_quantile`
# quantile of its activations on the contrast answers — and clipped at 1; the reward is the *mean* over
# answer positions of Σ w·min(a / cap, 1). So every completion's reward lies in [Σ negative w, Σ positive w]
# ⊆ [−1, 1]: repeating a token that fires a helpful feature cannot push it past the bound, and a longer
# answer earns no more than a short one.
#
# **Whose residual stream.** `reward_hook_model = "base"`: the frozen base model reads the completion
# (the LoRA adapter switched off, so no second copy in memory). The reward is then a fixed function of the
# text, on the distribution the SAE was trained on, and training can raise it only by writing different
# answers. `"policy"` reads the policy's own states — what "learning when to fire the features" literally
# means — but the SAE drifts off its training distribution as the adapter moves, and the policy can raise
# the reward by moving its representations rather than its answers.
#
# Everything here is chosen on the **contrast set**: its questions, chapter 04's answers to them and
# their labels. The held-out questions are used only to score.

# %%
layers = results.load(paths.metrics, results.Layers)  # chapter 05: the features, the CAA vector, its states
split = placeholder.baseline_split(paths, P.placeholder_labels, P.seed)  # chapter 04's split (labels: see above)
loaded = load_model(P.model, P.model_dtype, P.device)
sae_path = P.sae_pretrained if P.sae_source == "pretrained" else str(paths.checkpoints / "sae_final.pt")
sae = load_sae(sae_path)
records = {i: split.records[i] for i in split.contrast_ids + split.heldout_ids}
codes = dict(
    zip(
        records,
        feature_reward.completion_codes(
            loaded.model,
            loaded.tokenizer,
            sae,
            P.layer,
            [r.prompt for r in records.values()],
            [r.generation for r in records.values()],
            batch_size=P.gen_batch_size,
        ),
    )
)
contrast_codes = [codes[i] for i in split.contrast_ids]
rankings = {
    "chapter05": feature_reward.load_contrastive_features(paths.root / layers.contrastive_features),
    "answer_tokens": feature_reward.rank_answer_features(
        contrast_codes,
        list(split.labels(split.contrast_ids)),
        top_n=50,
        types=split.kinds(split.contrast_ids),
        n_permutations=P.n_permutations,
        seed=P.seed,
    ),
}
calibrated = {
    name: feature_reward.calibrate(
        feature_reward.select_features(rows, P.reward_helpful, P.reward_harmful, P.reward_weighting),
        contrast_codes,
        layer=P.layer,
        selection=reward_findings.SELECTIONS[name],
        weighting=P.reward_weighting,
        quantile=P.reward_cap_quantile,
    )
    for name, rows in rankings.items()
}
spec = calibrated[P.reward_features].spec
spec_file, other_spec_file = reward_findings.save_specs(calibrated, P.reward_features, paths.checkpoints)
print(f"codes for {len(codes)} answers in {time.time() - t0:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
print(placeholder.banner_line(P.placeholder_labels), end="")
print(reward_findings.selection_summary(calibrated, P.reward_features, rankings))

# %% [markdown]
# ## Stage Gate 1: does the reward predict correctness on held-out answers?
#
# The held-out questions' answers are chapter 04's greedy answers, the same text the reward would see in
# training. For each readout: Spearman ρ with correctness and the **AUROC** (the probability that a random
# correct answer scores above a random wrong one; 0.5 is chance), each with a percentile bootstrap interval
# over questions and a label-permutation p-value. The simpler readouts: chapter 05's **CAA projection** (the
# held-out question's last-prompt-token state on the correct-minus-wrong direction at the peak layer) and the
# **answer's length** in tokens. A readout can work with its sign reversed (length can: wrong answers that run
# on make long answers a sign of failure); the verdict compares the SAE reward with each baseline's better
# side. On the generated task, whose question types differ in difficulty, a readout that only tells the types
# apart would pass; `p_type` repeats the permutation test with labels shuffled only within each type (chapter
# 05 does the same for the CAA projection). On GSM8K there is one type and the column is empty.

# %%
held = split.heldout_ids
y_held = split.labels(held)
states = contrast.load_layer_states(paths.root / layers.states_file)
caa = SteeringVector.load(paths.root / layers.steering_vector)
readout_scores = {
    **{
        reward_findings.READOUT_NAMES[name]: feature_reward.score_codes(cal.spec, [codes[i] for i in held])
        for name, cal in calibrated.items()
    },
    "CAA projection": contrast.projection_scores(states.select(held)[:, caa.layer], caa.unit),
    "answer length (tokens)": [float(records[i].n_new_tokens) for i in held],
}
gate = readouts.stage_gate(
    readout_scores,
    y_held,
    split.kinds(held),
    candidates=[reward_findings.READOUT_NAMES[name] for name in calibrated],  # the SAE selections
    trained=reward_findings.READOUT_NAMES[P.reward_features],
    n_bootstrap=P.n_bootstrap,
    n_permutations=max(P.n_permutations, 1000),
    seed=P.seed,
)

# %%
# NBVAL_CHECK_OUTPUT
print(placeholder.banner_line(P.placeholder_labels), end="")
print(f"held-out answers: {len(held)} ({int(y_held.sum())} correct)\n{readouts.stage_gate_table(gate.rows)}\n")
print(textwrap.fill(placeholder.mark_text(gate.verdict, P.placeholder_labels), 110))

# %% [markdown]
# ## GRPO: three arms, same seeds, same steps
#
# TRL's `GRPOTrainer` samples `grpo_generations` answers per training question (temperature
# `grpo_temperature`), scores each, and pushes the LoRA adapter towards the answers that scored above their
# group's mean. The training questions are the **contrast set's** (the held-out ones stay unseen). The
# three arms differ only in the weights of the two rewards: correctness only; correctness + the feature
# reward (weight `grpo_feature_weight`); the feature reward only. Every arm computes and logs *both*
# rewards at every step, so the curves below show what each arm did to the other reward too. The adapters
# are saved under `checkpoints/grpo/`, each with every completion it sampled and both rewards of each; a rerun
# with the same settings reloads them instead of training.

# %%
settings = P.grpo_settings()  # the GRPO section of the params (mechlib.grpo.GrpoSettings)
train_ids = split.contrast_ids
# what the arms' saved adapters depend on beyond the settings and prompts: a change retrains instead of reloading
cache_tag = reward_findings.arm_cache_tag(P.model, P.model_dtype, P.reward_hook_model, spec_file, sae_path)

# a fresh copy of the base model for each arm, so every arm starts from the same weights
reload_model = functools.partial(load_model, P.model, P.model_dtype, P.device)
# the feature reward as TRL calls it, built on the arm's policy (its adapter off when reward_hook_model is base)
reward_for = functools.partial(
    feature_reward.FeatureReward, spec, sae, tokenizer=loaded.tokenizer, hook_model=P.reward_hook_model
)
runs = [
    grpo.train_arm(
        reload_model,
        arm,
        settings,
        [split.prompts[i] for i in train_ids],
        [split.records[i].gold for i in train_ids],
        reward_for,
        paths.checkpoints / "grpo",
        cache_tag=cache_tag,
    )
    for arm in grpo.standard_arms(P.grpo_feature_weight)
]

# %% [markdown]
# ## Held-out accuracy before and after
#
# Each adapter is merged into a fresh copy of the model, which then answers the held-out questions
# greedily, exactly as chapter 04 did (same prompts, same decoding, same stopping): "before" *is* chapter
# 04's answers. An answer the adapted model would reproduce token for token is recognised without
# generating it: one teacher-forced pass checks that every answer token is the adapted model's argmax
# (the verification step of speculative decoding, `mechlib.greedy_check`); only the others are generated.
# `changed` below counts the held-out answers whose text the adapter changed. The two are paired by
# question: Wilson intervals for each accuracy, an exact McNemar test on the answers that changed verdict,
# and a paired bootstrap interval for the difference.

# %%
questions = [q for q in load_questions(P.task, P.n_questions, P.seed, P.gsm8k_path, P.gsm8k_split) if q.id in held]
relabel = placeholder.steered_relabeller(split.records, P.placeholder_labels, P.seed)  # no-op unless placeholder
before = [split.records[i] for i in held]
evaluated = {
    r.arm.name: grpo_eval.evaluate_arm_verified(
        reload_model,
        r.adapter_dir,
        questions,
        split.records,
        P.prompt_format,
        P.max_new_tokens,
        P.gen_batch_size,
        paths.records / f"grpo_{r.arm.slug}.jsonl",
    )
    for r in runs
}
after = {name: relabel(e.records) for name, e in evaluated.items()}
changes = {
    name: grpo_eval.compare_accuracy(before, recs, n_bootstrap=P.n_bootstrap, seed=P.seed)
    for name, recs in after.items()
}
arm_results = [reward_findings.arm_result(r, changes[r.arm.name], before, after[r.arm.name], paths) for r in runs]
print(reward_findings.arm_timings(arm_results, evaluated))
train_verdict = reward_findings.training_verdict(arm_results)

# %%
# NBVAL_CHECK_OUTPUT
print(placeholder.banner_line(P.placeholder_labels), end="")
print(reward_findings.arm_table(arm_results, settings) + "\n")
print(textwrap.fill(placeholder.mark_text(train_verdict, P.placeholder_labels), 110))

# %% [markdown]
# ### What the last step sampled
#
# The curves are means. Here are the completions each arm sampled at its last step, highest feature reward
# first, each with both rewards before the arm's weights apply (correct 1 or 0; the feature reward within
# its bound). A feature reward that rises while correctness does not would show here as what it pays for.
# Every step's completions are in `checkpoints/grpo/<arm>/samples.jsonl`.

# %%
print(reward_findings.last_samples(arm_results, paths.root))

# %%
fig, _ = plots_reward.plot_feature_reward_summary(
    gate.rows,
    [plots_reward.CurvePoints(a.arm, *reward_findings.curve(a)) for a in arm_results],
    [reward_findings.accuracy_row(a) for a in arm_results],
)
_ = plots.save_figure(placeholder.mark_figure(fig, P.placeholder_labels), paths.figures / "08_feature_reward.png")

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.reward_findings`); saved with the chapter's metrics and repeated
# in `REPORT.md`.

# %%
finding = placeholder.mark_text(
    reward_findings.reward_finding(gate.trained, gate.other, gate.verdict, arm_results, settings),
    P.placeholder_labels,
)
print(textwrap.fill(finding, 110))

# %%
_ = results.save(
    paths,
    results.FeatureRewardResult(
        finding=finding,
        labels=placeholder.label_kind(P.placeholder_labels),
        placeholder_labels=P.placeholder_labels,
        model=P.model,
        layer=P.layer,
        hook_model=P.reward_hook_model,
        reward_features=P.reward_features,
        weighting=P.reward_weighting,
        cap_quantile=P.reward_cap_quantile,
        features=list(spec.features),
        dropped=list(calibrated[P.reward_features].dropped),
        bound=(spec.bound.lo, spec.bound.hi),
        spec_file=str(spec_file.relative_to(paths.root)),
        n_contrast=len(split.contrast_ids),
        n_heldout=len(held),
        stage_gate=gate.rows,
        stage_gate_verdict=placeholder.mark_text(gate.verdict, P.placeholder_labels),
        grpo=settings,
        arms=arm_results,
        training_verdict=placeholder.mark_text(train_verdict, P.placeholder_labels),
        gate_inputs=reward_findings.gate_inputs(held, y_held, readout_scores, split.kinds(held)),
        other_spec_file=None if other_spec_file is None else str(other_spec_file.relative_to(paths.root)),
    ),
)
print(f"chapter 08 done in {time.time() - t0:.1f} s")
