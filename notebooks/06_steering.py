# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 06 — Steering along the correct-minus-wrong direction (CAA)
#
# Chapter 05 found the layer where the states of correctly and wrongly answered questions differ most, and
# saved the unit vector `v = unit(mean(h | correct) − mean(h | wrong))` there. Contrastive activation addition
# (CAA) adds `scale × ‖h‖ × v` to the residual stream after that layer, at every position, while the model
# generates greedily; `‖h‖` is the layer's mean residual norm over the non-special tokens of all chapter 04
# prompts (contrast and held-out; no label enters it), so a scale of 0.05 is a perturbation of 5 % of a
# typical residual vector. The study used +2, +5, +10 and +15 %, and −5 % as a negative control (pushing
# *towards* "wrong" should not help).
#
# Every scale is run on the **held-out** questions only — the direction was fitted on the contrast set.
# The card reports accuracy, Δ vs baseline, how many baseline-wrong questions each scale recovers, and
# net flips. With 50 questions a handful of flips is within noise, so each row here adds an **exact
# McNemar test** on the discordant pairs (recovered vs broken) and a **paired bootstrap interval** for Δ.
# A **random-direction control** (same layer, same size of push, random unit directions) then asks whether
# the contrastive direction matters at all, or whether any push of that size does the same. Steering can
# also change *how* the model answers — longer, or never reaching its `#### N` line — so every condition
# reports how many of its answers were cut off, and every row is recomputed under the alternative scoring
# rules of chapter 04, with a generated sentence saying whether its conclusion survives.
#
# What the direction is matters for what a push along it can do. Chapter 05 tests whether its held-out
# projection predicts correctness *within* question types. Where it does not (the default run), the
# direction mostly separates easy question types from hard ones. Pushing along it then asks "does making a
# question look like an easier type help?", not "does it make the model more careful?".
#
# With `placeholder_labels = f > 0` (random-weight models) the baseline labels are chapter 05's seeded
# placeholders, a steered answer identical to its baseline answer keeps that label, and a changed one gets
# a seeded coin that is "correct" with probability `f` (`mechlib.placeholder`): the statistics then run on
# real discordant pairs, but measure nothing about the model — every output below says **PLACEHOLDER**.

# %% tags=["parameters"]
run = "default"
seed = 0
model = "embedded:smollm2-135m-instruct"
model_dtype = "float32"
device = "auto"
task = "arithmetic"
gsm8k_path = ""
gsm8k_split = "test"
n_questions = 200
n_heldout = 50
prompt_format = "chat_oneshot"
max_new_tokens = 48
gen_batch_size = 32
steering_layer = None
steering_scales = [0.02, 0.05, 0.10, 0.15, -0.05]
n_bootstrap = 2000
n_random_directions = 2
random_control_scale = 0.10
placeholder_labels = 0.0

# %%
import textwrap
import time

import torch

from mechlib import contrast, findings, placeholder, plots, results, scoring, sensitivity, stats, steering
from mechlib.models import load_model
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.steering_controls import random_conditions, run_random_control
from mechlib.tasks import load_questions

P = from_namespace(globals())
paths = RunPaths(P.run).make()
t0 = time.time()

# %% [markdown]
# ## The layer, the vector and the unit of scale
#
# `steering_layer = None` takes chapter 05's peak layer and its saved vector. Another layer can be given:
# its vector is then built the same way from chapter 05's cached states and saved beside the first.

# %%
layers = results.load(paths.metrics, results.Layers)  # chapter 05's result
split = placeholder.baseline_split(paths, P.placeholder_labels, P.seed)  # chapter 04's split (labels: see above)
states = contrast.load_layer_states(paths.root / layers.states_file)
layer = layers.peak_layer if P.steering_layer is None else P.steering_layer
vec, vec_file = steering.vector_for_layer(
    states, split, layer, paths.checkpoints, model=P.model, peak_layer=layers.peak_layer
)
mean_norm = vec.mean_norm  # the unit of the scales, as the sweep applies them

# %%
# NBVAL_CHECK_OUTPUT
print(f"steering layer {layer} (chapter 05 peak: {layers.peak_layer}); mean residual norm {mean_norm:.2f}")
print("perturbation norms: " + ", ".join(f"{100 * s:+.0f}% -> {abs(s) * mean_norm:.2f}" for s in P.steering_scales))

# %% [markdown]
# ## The sweep
#
# The held-out questions are generated once per scale with the hook on (greedy, batched; the hook is a
# context manager, removed even if generation fails). Records go to `records/steer_L{layer}_{scale}.jsonl`;
# a rerun resumes. The random-direction controls of the last section are generated here too, through
# the same hook: on a CPU each condition still gets batches of its own (their shared prompt prefix then
# runs once per batch); on a GPU all conditions share full batches and one captured decode graph. The
# baseline is chapter 04's records of the same questions. Those were generated in other batches; on a
# GPU in bf16, different padding can flip a rare greedy choice. To measure that floor,
# add `0.0` to `steering_scales`: the hook then adds an exact zero vector, and its row shows how much
# changes without any steering. Cached records of every condition are re-scored with the current parser
# when they are loaded, like the baseline's.

# %%
heldout = set(split.heldout_ids)
questions = [q for q in load_questions(P.task, P.n_questions, P.seed, P.gsm8k_path, P.gsm8k_split) if q.id in heldout]
split = contrast.match_questions(questions, split)
loaded = load_model(P.model, P.model_dtype, P.device)
relabel = placeholder.steered_relabeller(split.records, P.placeholder_labels, P.seed)  # no-op unless placeholder
sweep = {
    s: relabel(records)
    for s, records in steering.run_sweep(
        loaded,
        questions,
        vector=vec,
        scales=P.steering_scales,
        prompt_format=P.prompt_format,
        max_new_tokens=P.max_new_tokens,
        batch_size=P.gen_batch_size,
        records_dir=paths.records,
        also=random_conditions(vec, P.random_control_scale, P.n_random_directions, P.seed),  # read back below
    ).items()
}
print(f"sweep done in {time.time() - t0:.1f} s")

# %%
base = {i: split.correct[i] for i in split.heldout_ids}
base_records = [split.records[i] for i in split.heldout_ids]
rows = [
    steering.steering_row(s, base, steering.correctness(sweep[s]), n_bootstrap=P.n_bootstrap, seed=P.seed)
    for s in P.steering_scales
]
cut_off = {s: scoring.truncation_rate(sweep[s]) for s in P.steering_scales}
overlaps = [results.copy_fields(results.Overlap, o) for o in steering.recovered_overlaps(rows)]
n_base_ok = sum(base.values())

# %%
# NBVAL_CHECK_OUTPUT
print(placeholder.banner_line(P.placeholder_labels), end="")
print(
    f"held-out baseline (chapter 04): {n_base_ok}/{len(base)} = {n_base_ok / len(base):.3f}; "
    f"cut off: {scoring.truncation_rate(base_records):.1%}"
)
print(
    f"{'scale':>6} {'pert%':>6} {'acc':>6} {'delta':>7} {'delta 95% CI':>17} {'recovered':>9} {'broken':>6} "
    f"{'net':>4} {'McNemar p':>9} {'cut off':>7}"
)
for r in rows:
    print(
        f"{r.scale:>6.2f} {r.perturbation:>6.1f} {r.accuracy:>6.3f} {r.delta:>+7.3f} "
        f"[{r.delta_ci95[0]:+.3f}, {r.delta_ci95[1]:+.3f}] {r.recovered:>4}/{r.n_baseline_wrong:<4} {r.broken:>6} "
        f"{r.net_flips:>+4} {stats.format_p(r.mcnemar_p):>9} {cut_off[r.scale]:>7.1%}"
    )

# %% [markdown]
# ## The card's own lines on our vector file
#
# The card loads `steering_vec_L27.pt` as a bare tensor (`torch.load(path).to("cuda").to(torch.bfloat16)`) and
# adds `scale × norm × v` to the layer's output in a forward hook. The cell below does exactly that with this
# run's file — the hook is one line, no mechlib in it — and answers a few held-out questions with plain HF
# `generate`, one at a time, at the largest scale of the sweep. They must be mechlib's steered answers at that
# scale; the check has power only on answers steering changed, so those are counted too (questions where
# steering changed the answer come first).

# %%
# NBVAL_CHECK_OUTPUT
card_scale = float(max(P.steering_scales, key=abs))
card_vec = torch.load(vec_file).to(loaded.model.dtype)  # the card's line (on this run's device)
card_delta = card_scale * mean_norm * card_vec
card_questions = steering.changed_first(questions, sweep[card_scale], base_records)[:4]
card_check = steering.check_card_hook(
    loaded,
    card_questions,
    sweep[card_scale],
    base_records,
    layer=layer,
    prompt_format=P.prompt_format,
    max_new_tokens=P.max_new_tokens,
    register=lambda block: block.register_forward_hook(lambda _m, _i, out: out + card_delta),
)
print(
    f"the card's hook at scale {card_scale:+.2f}: {card_check.n_equal} of {card_check.n} answers equal mechlib's "
    f"steered answers ({card_check.n_steering_changed} of them changed by steering)"
    + (f"; differ: {card_check.mismatched_ids}" if card_check.mismatched_ids else "")
)

# %% [markdown]
# ## Does each row survive another way of scoring?
#
# Every row again, question-paired with the baseline, under each scoring rule: primary, lm-eval *strict*,
# lm-eval *flexible*, and *finished only* (a question is left out when either its baseline or its steered
# answer was cut off, so n can shrink). An effect is "helps"/"harms" when the exact McNemar p is below 0.05.
# The sentences are generated from these numbers.

# %%
# NBVAL_CHECK_OUTPUT
by_rule = {
    s: sensitivity.rows_under_rules(s, base_records, sweep[s], n_bootstrap=P.n_bootstrap, seed=P.seed)
    for s in P.steering_scales
}
print(f"{'scale':>6} {'rule':>9} {'n':>4} {'acc':>6} {'delta':>7} {'net':>4} {'McNemar p':>9}  effect")
for s, under in by_rule.items():
    for u in under:
        r = u.row
        print(
            f"{s:>6.2f} {u.rule:>9} {r.n:>4} {r.accuracy:>6.3f} {r.delta:>+7.3f} {r.net_flips:>+4} "
            f"{stats.format_p(r.mcnemar_p):>9}  {u.effect}"
        )
print()
row_findings = {s: placeholder.mark_text(sensitivity.row_verdict(u), P.placeholder_labels) for s, u in by_rule.items()}
for text in row_findings.values():
    print(textwrap.fill(text, 110))

# %% [markdown]
# ## Which questions are recovered, and by which scales?
#
# If steering moved the model along a real "get it right" direction, larger positive scales should recover
# a growing, *nested* set of questions; if the flips are noise, the recovered sets of different scales
# barely overlap, and the negative control recovers about as many as the positive scales.

# %%
# NBVAL_CHECK_OUTPUT
for r in rows:
    print(f"scale {r.scale:+.2f}: recovered {r.recovered_ids}")
for o in overlaps:
    print(
        f"{o.scale_a:+.2f} vs {o.scale_b:+.2f}: shared {o.intersection} (of {o.n_a} and {o.n_b}), "
        f"Jaccard {o.jaccard:.2f}"
    )

# %% [markdown]
# ## Is the direction special? Random directions of the same size
#
# Any vector added to the residual stream changes what the model writes, so a loss (or gain) of accuracy
# at some scale says nothing about the *direction* on its own. The control the card lacks: push along
# `n_random_directions` random unit directions (seeded Gaussian draws; in hundreds of dimensions they are
# nearly orthogonal to the CAA vector, the cosine is printed) by the same amount, `random_control_scale`
# × the same mean norm, on the same held-out questions. Each is compared with the unsteered baseline (the
# columns above) and, paired question by question, with the CAA direction at that scale: "CAA only" and
# "random only" count the questions that just one of the two gets right, with the exact McNemar p. If the
# random directions move accuracy as much as CAA does, the effect is the size of the push, not its meaning.
# (Their answers were generated with the sweep above; this cell reads them back and compares.)

# %%
controls = run_random_control(
    loaded,
    questions,
    caa=vec,
    scale=P.random_control_scale,
    n_directions=P.n_random_directions,
    seed=P.seed,
    baseline=base,
    n_bootstrap=P.n_bootstrap,
    caa_at_scale=steering.correctness(sweep[P.random_control_scale]) if P.random_control_scale in sweep else None,
    prompt_format=P.prompt_format,
    max_new_tokens=P.max_new_tokens,
    batch_size=P.gen_batch_size,
    records_dir=paths.records,
    relabel=relabel,
)
caa_row = next((r for r in rows if r.scale == float(P.random_control_scale)), None)

# %%
# NBVAL_CHECK_OUTPUT
print(
    f"control scale {P.random_control_scale:+.2f}; CAA accuracy there: "
    + ("not in steering_scales" if caa_row is None else f"{caa_row.accuracy:.3f} (net flips {caa_row.net_flips:+d})")
)
for c in controls:
    r = c.row
    v = c.vs_caa
    vs = "" if v is None else f"   vs CAA: CAA only {v.a_only}, random only {v.b_only}, p {stats.format_p(v.mcnemar_p)}"
    print(
        f"random #{c.index} (cos with CAA {c.cos_with_caa:+.3f}): acc {r.accuracy:.3f}, delta {r.delta:+.3f} "
        f"[{r.delta_ci95[0]:+.3f}, {r.delta_ci95[1]:+.3f}], net {r.net_flips:+d}, "
        f"McNemar p {stats.format_p(r.mcnemar_p)}, cut off {c.truncated:.1%}{vs}"
    )

# %% [markdown]
# ## Dose–response
#
# Accuracy per scale with its Wilson 95 % interval; the grey band is the baseline's interval, the crosses
# are the random directions. Overlapping intervals mean the held-out set is too small to tell these scales
# apart.

# %%
base_ci = stats.wilson_ci(n_base_ok, len(base))
fig, ax = plots.plot_dose_response(rows, n_base_ok / len(base), base_ci, layer, controls=[c.row for c in controls])
_ = plots.save_figure(placeholder.mark_figure(fig, P.placeholder_labels), paths.figures / "06_dose_response.png")

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
finding = placeholder.mark_text(
    findings.steering_finding(  # the primary rule's row (under[0]) of each scale
        layer,
        [(u.row.scale, u.effect, u.row.delta, u.row.mcnemar_p) for u in (under[0] for under in by_rule.values())],
        sum(all(u.effect == under[0].effect for u in under) for under in by_rule.values()),
        [c.row.delta for c in controls],
        None if caa_row is None else caa_row.delta,
    ),
    P.placeholder_labels,
)
print(textwrap.fill(finding, 110))

# %%
_ = results.save(
    paths,
    results.Steering(
        finding=finding,
        labels=placeholder.label_kind(P.placeholder_labels),
        placeholder_labels=P.placeholder_labels,
        layer=layer,
        peak_layer=layers.peak_layer,
        model=P.model,
        mean_resid_norm=mean_norm,
        steering_vector=str(vec_file.relative_to(paths.root)),
        n_heldout=len(base),
        baseline_accuracy=n_base_ok / len(base),
        baseline_ci95=base_ci,
        n_bootstrap=P.n_bootstrap,
        baseline_truncated=scoring.truncation_rate(base_records),
        rows=[results.SteeredRow.of(r, truncated=cut_off[r.scale]) for r in rows],
        overlaps=overlaps,
        card_hook_check=results.CardHookSummary(
            card_scale, card_check.n, card_check.n_equal, card_check.n_steering_changed
        ),
        scoring_sensitivity=[
            results.ScaleVerdict(s, row_findings[s], [results.RuleRow.of(u) for u in under])
            for s, under in by_rule.items()
        ],
        random_control=results.RandomControl(
            scale=P.random_control_scale,
            seed=P.seed,
            caa_accuracy=None if caa_row is None else caa_row.accuracy,
            directions=[results.RandomDirection.of(c) for c in controls],
        ),
    ),
)
print(f"chapter 06 done in {time.time() - t0:.1f} s")
