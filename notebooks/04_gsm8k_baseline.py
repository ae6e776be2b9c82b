# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 04 — The baseline: which questions does the model get right?
#
# The rest of the book contrasts the model's hidden states on questions it answers **correctly** with
# those it answers **wrongly** (chapter 05), and then tries to push wrong answers towards right ones by
# steering (chapter 06). Both need a baseline: one greedy answer per question, scored, and a fixed split
# of the questions into a **contrast set** (where the direction is fitted) and a **held-out set** (where
# steering is judged — never seen when fitting). The study used GSM8K, 50 held-out questions, and got
# ~45–50 % right with Gemma 4 E4B.
#
# **Questions.** `task = "gsm8k"` takes a seeded sample of GSM8K (from the hub, or from a local JSONL copy via
# `gsm8k_path`). The embedded SmolLM2-135M solves almost no GSM8K problem, which would leave nothing to
# contrast, so the default `task = "arithmetic"` generates short one-step problems of five kinds — bare sums
# ("What is 13 plus 4?", "What is the sum of 13 and 4?"), word problems with a sum or a product, and "has a,
# buys b more" — drawn from a fixed seed, so that the small model gets some questions right and some wrong.
# Kinds differ widely in difficulty (the table below: some kinds are hardly ever answered right), so part of
# any correct-vs-wrong difference in chapter 05 can be a difference between kinds — as it can be between easy
# and hard GSM8K problems in the study; chapter 05 tests for that with a second, within-kind null. The table
# below shows where this run landed.
#
# **Prompt.** `prompt_format = "gemma_manual"` is the card's manual Gemma chat format, verbatim (each line
# ends in a newline, the last one too; `{q}` is the question):
#
# ```text
# <start_of_turn>user
# Solve step by step and give final answer as '#### N'.
#
# {q}<end_of_turn>
# <start_of_turn>model
# ```
#
# `"chat_template"` sends the same instruction through the model's own chat template, which is what a
# non-Gemma model like SmolLM2 was trained on. `"chat_oneshot"` (the default run's) puts one worked example
# — a subtraction, an operation none of the generated kinds uses — before the question in that template.
# Zero-shot, SmolLM2-135M explains at length and most answers run into the token limit before any final
# line; with one example it answers in a line and ends with `#### N`, so the answers can be read.
#
# **Scoring.** Answers are read by `mechlib.answers` (primary rule): the number after the first `####`
# — the *result* when that line is an expression (`#### N = 3 + 5 = 8` reads 8) — else the last
# "answer is N", else the last number in the text. Numbers may carry `$`, thousands commas (`1,200` is
# 1200 — the study's seed parser mis-read such numbers), decimals and fractions (`1/2`); a minus is a
# sign only when it touches the number (`10 - 4` ends in 4, a bullet `- 24` is 24). An answer is correct
# when it equals the gold number. The same text is also read by lm-evaluation-harness's two GSM8K rules —
# *strict* (only `#### N`) and *flexible* (the last number-like string) — so our numbers compare with
# published ones; a fourth rule, *finished only*, leaves out answers that were cut off. Chapter 05
# recomputes its peak layer, and chapter 06 every steering row, under all four rules.
#
# **Generation.** Greedy, batched, left-padded, at most `max_new_tokens` new tokens. A row stops at the
# model's end-of-turn token or right after its first complete `#### …` line (what a grader would read;
# a small model often repeats that line or starts another problem after it), and each record says which
# (`stop_reason`: `eos`, `answer_line`, or `limit` — the only *cut-off* answers). Up to the stop, the tokens
# are the ones HF `generate` would produce (tested), from a leaner loop (`mechlib.generate`). Records are
# cached per question in `records/baseline.jsonl`, keyed by the model, prompt format, token limit, stop
# rule and parser version: a rerun with the same settings generates nothing, an interrupted one continues
# where it stopped, and cached answers are re-scored with the current parser on load.
#
# **Placeholder labels.** A random-weight model (`model = "random:…"`, used to run every code path at the
# study's shapes without the real weights) answers nothing correctly. With `placeholder_labels = f`
# (0 = off) this chapter still reports the parser's accuracy, but chapters 05–06 replace "correct" by a
# seeded draw marking a fraction `f` of the questions correct (`mechlib.placeholder`), and every output of
# theirs says so.

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
placeholder_labels = 0.0

# %%
import textwrap
import time
from collections import Counter

from mechlib import findings, placeholder, plots, results, scoring, wrong_answers
from mechlib.models import load_model
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.prompts import build_prompt
from mechlib.records import accuracy_by_kind, examples, run_baseline, split_contrast_heldout, summarize
from mechlib.tasks import load_questions

P = from_namespace(globals())
paths = RunPaths(P.run).make()
t0 = time.time()

questions = load_questions(P.task, P.n_questions, P.seed, gsm8k_path=P.gsm8k_path, gsm8k_split=P.gsm8k_split)
kinds = Counter(q.kind for q in questions)

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(questions)} questions from task {P.task!r}; kinds: " + ", ".join(f"{k} {kinds[k]}" for k in sorted(kinds)))
print(f"example: {questions[0].question!r} -> gold {questions[0].answer}")

# %% [markdown]
# ## The prompt the model sees
#
# One full prompt, exactly as it is tokenised (special tokens included).

# %%
loaded = load_model(P.model, dtype=P.model_dtype, device=P.device)
print(build_prompt(loaded.tokenizer, questions[0].question, P.prompt_format))

# %% [markdown]
# ## Generating and scoring
#
# The timing below is wall-clock for the questions generated in *this* execution (zero when every record
# was already cached).

# %%
t_gen = time.time()
records = run_baseline(
    loaded,
    questions,
    P.prompt_format,
    P.max_new_tokens,
    P.gen_batch_size,
    paths.records / "baseline.jsonl",
    desc="baseline",
)
gen_seconds = time.time() - t_gen
print(
    f"generation: {gen_seconds:.1f} s on {loaded.model.device} ({len(records)} records in {paths.rel(paths.records)})"
)

# %% [markdown]
# ## Accuracy
#
# The interval is the Wilson 95 % score interval for a binomial proportion. "Ended by themselves" counts
# answers that stopped at the end-of-turn token or after a complete `#### N` line; the rest were cut off at
# `max_new_tokens` and are scored on what was written so far. Then accuracy under each scoring rule, per
# question kind, and which extraction rule read each answer (answers read from a trailing number are weaker
# evidence than a `####` line).

# %%
# NBVAL_CHECK_OUTPUT
summary = summarize(records)
groups = accuracy_by_kind(records)
by_rule = scoring.accuracy_under_rules(records)
print(
    f"accuracy {summary.accuracy:.3f} ({summary.n_correct}/{summary.n}), "
    f"95% CI [{summary.ci95[0]:.3f}, {summary.ci95[1]:.3f}]"
)
print(
    f"ended by themselves: {summary.finished:.1%} (EOS {summary.stop_reasons['eos']}, "
    f"'####' line {summary.stop_reasons['answer_line']}); cut off at max_new_tokens={P.max_new_tokens}: "
    f"{summary.truncated:.1%}; no number at all: {summary.unparsed:.1%}"
)
for a in by_rule:
    print(
        f"  {scoring.RULE_LABELS[a.rule]:>42}: {a.accuracy:.3f} ({a.n_correct}/{a.n})  "
        f"CI [{a.ci95[0]:.3f}, {a.ci95[1]:.3f}]"
    )
for g in groups:
    print(f"  {g.group:>14}: {g.accuracy:.2f} ({g.n_correct}/{g.n})  CI [{g.ci95[0]:.2f}, {g.ci95[1]:.2f}]")
for rule, (n_read, n_right) in sorted(summary.by_rule.items()):
    print(f"  read by rule {rule!r}: {n_read} answers, {n_right} correct")

# %%
fig, _ = plots.plot_baseline(
    groups,
    [r.n_new_tokens for r in records if r.correct],
    [r.n_new_tokens for r in records if not r.correct],
    P.max_new_tokens,
    summary.accuracy,
    summary.ci95,
)
_ = plots.save_figure(fig, paths.figures / "04_baseline.png")

# %% [markdown]
# ## What the answers look like
#
# Two correct and two wrong answers (the first of each in question order), with what the parser read.

# %%
# NBVAL_CHECK_OUTPUT
print(examples(records, questions))

# %% [markdown]
# ## How the wrong answers go wrong
#
# Each generated question needs one operation: addition, or multiplication for `boxes`. Sorting the wrong
# answers by the operators they write between two numbers (`mechlib.wrong_answers`) separates two failures,
# and a third group of answers that write no calculation at all. One failure is choosing another operation.
# Subtraction is the one-shot example's operation and no question's, so an answer that subtracts has most
# likely copied the example's operation rather than read the question's. The other is writing the right
# operation and getting the result wrong. Chapter 05 contrasts correct answers with both failures together.
# Its within-type null controls for the question type, not for which failure a wrong answer is. GSM8K answers
# take several steps and are not sorted.

# %%
# NBVAL_CHECK_OUTPUT
wrong = wrong_answers.wrong_answers_by_kind(records)
print(wrong_answers.table(wrong, P.task))

# %% [markdown]
# ## The contrast / held-out split
#
# A fixed-seed random split of the question ids: `n_heldout` questions are held out for steering
# (chapter 06), the rest form the contrast set for chapter 05. The split depends only on the ids and the
# seed, so it is the same on every rerun; both lists are saved in `metrics/04_gsm8k_baseline.json`.

# %%
# NBVAL_CHECK_OUTPUT
contrast_ids, heldout_ids = split_contrast_heldout(records, P.n_heldout, P.seed)
correct = {r.id: r.correct for r in records}
n_c, n_h = sum(correct[i] for i in contrast_ids), sum(correct[i] for i in heldout_ids)
print(f"contrast set: {len(contrast_ids)} questions ({n_c} correct, {len(contrast_ids) - n_c} wrong)")
print(
    f"held-out set: {len(heldout_ids)} questions ({n_h} correct, {len(heldout_ids) - n_h} wrong "
    f"— the pool steering can recover)"
)

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
# NBVAL_CHECK_OUTPUT
finding = findings.baseline_finding(
    summary.n, summary.n_correct, summary.ci95, summary.finished, by_rule, P.max_new_tokens, wrong
)
print(textwrap.fill(finding, 110))
if placeholder.is_on(P.placeholder_labels):
    print(textwrap.fill("Chapters 05-06 will not use these verdicts: " + placeholder.banner(P.placeholder_labels), 110))

# %%
saved = results.save(
    paths,
    results.Baseline(
        finding=finding,
        task=P.task,
        prompt_format=P.prompt_format,
        model=P.model,
        max_new_tokens=P.max_new_tokens,
        n=summary.n,
        n_correct=summary.n_correct,
        accuracy=summary.accuracy,
        ci95=summary.ci95,
        truncated=summary.truncated,
        finished=summary.finished,
        stop_reasons=summary.stop_reasons,
        unparsed=summary.unparsed,
        parser_version=records[0].parser_version,
        by_scoring_rule={a.rule: results.Accuracy.of(a) for a in by_rule},
        by_rule={k: results.RuleCount(n, n_correct) for k, (n, n_correct) in summary.by_rule.items()},
        by_kind={g.group: results.Accuracy.of(g) for g in groups},
        wrong_answers=wrong,
        contrast_ids=contrast_ids,
        heldout_ids=heldout_ids,
        generation_seconds=round(gen_seconds, 2),
        placeholder_labels=P.placeholder_labels,  # > 0: chapters 05-06 use seeded placeholder labels
    ),
)
print(f"chapter 04 done in {time.time() - t0:.1f} s; metrics in {paths.rel(saved)}")
