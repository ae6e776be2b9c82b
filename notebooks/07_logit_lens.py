# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 07 — Logit lens: when does the residual stream start to read as English?
#
# The logit lens reads an intermediate layer as if it were the last one: take the residual stream after
# decoder layer *L*, apply the model's **final norm**, its **unembedding** (`lm_head`) and, when the config
# has one, the **final-logit softcap** `tanh(x / c) · c` (Gemma 4: c = 30), and look at the most likely
# next token. The study reports that Gemma 4 E4B's top tokens become English words first at layer 30 of 42.
#
# Two details decide whether the lens is right. First, we hook each decoder layer's *raw output* rather
# than reading `output_hidden_states`, whose last entry is already final-normed on Gemma 4 (and in
# transformers 5 generally) while the others are not; applied to that entry, the lens would norm twice.
# Hooking all layers the same way makes the lens at the last layer reproduce the model's own logits exactly
# (a test checks this within 1e-4 on tiny Gemma 4 and Qwen 3.5 models). Second, the softcap never changes
# which token is on top, but it does change the probabilities the heat map shows.
#
# **What counts as English.** A top token is an *English word token* when its decoded text, after
# stripping the leading space / word-boundary marker, consists of ASCII letters only and is at least two
# letters long (`mechlib.lens.is_english_word`): `" Paris"`, `" the"` and the piece `"ing"` count; `","`,
# `"\n"`, `"a"`, `"1"`, `"é"` and special tokens do not. The **English commitment layer** is the first
# layer at which at least `english_threshold` of the prompt positions (special-token positions such as
# BOS are not counted) have an English word token on top.
#
# **How tokens are shown.** A token that is only part of a character (one byte of `日`) decodes to `�`,
# and an id past the tokenizer's vocabulary to nothing; the tables then show its bytes (`<0xE6>`) or its
# id (`<id 300>`) instead (`mechlib.prompts.token_label`). Neither counts as an English word.

# %% tags=["parameters"]
run = "default"
model = "embedded:smollm2-135m-instruct"
model_dtype = "float32"
device = "auto"
lens_prompt = "The capital of France is Paris. The capital of Germany is"
english_threshold = 0.5

# %%
import textwrap

from mechlib import findings, plots, results
from mechlib.lens import english_commitment_layer, logit_lens
from mechlib.models import load_model
from mechlib.params import from_namespace
from mechlib.paths import RunPaths

P = from_namespace(globals())
paths = RunPaths(P.run).make()
lm = load_model(P.model, P.model_dtype, P.device)
result = logit_lens(lm.model, lm.tokenizer, P.lens_prompt)
commit = english_commitment_layer(result, P.english_threshold)

# %% [markdown]
# ## Top token per layer
#
# For each decoder layer: the share of prompt positions whose top token is an English word, and the top
# token (with its probability) at the last position — the model's prediction of what follows the prompt.

# %%
# NBVAL_CHECK_OUTPUT
print(f"prompt tokens: {[t for t in result.input_tokens]}")
for layer in range(result.n_layers):
    tok, p = result.top_tokens[layer][-1], result.top_probs[layer][-1]
    print(f"layer {layer:2d}  English {result.english_fraction[layer]:.2f}  last position → {tok!r} ({p:.2f})")
print(f"English commitment layer (threshold {P.english_threshold}): {commit} of {result.n_layers}")

# %% [markdown]
# ## The heat map
#
# Rows are decoder layers (bottom: layer 0), columns prompt positions; each cell shows the top token the
# lens reads there (bold: an English word token) and its colour the token's probability. The dashed line
# marks the English commitment layer. Reading a column upwards shows a position's prediction forming; in
# small models the early layers mostly echo punctuation and frequent function words.

# %%
fig, ax = plots.plot_logit_lens(result, commit)
ax.set_title(f"Logit lens — {lm.name}")
_ = plots.save_figure(fig, paths.figures / "07_logit_lens.png")

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
finding = findings.lens_finding(
    commit, result.n_layers, result.top_tokens[-1][-1], result.top_probs[-1][-1], P.english_threshold
)
print(textwrap.fill(finding, 110))

# %%
saved = results.save(
    paths,
    results.Lens(
        model=lm.name,
        finding=finding,
        prompt=P.lens_prompt,
        input_tokens=result.input_tokens,
        n_layers=result.n_layers,
        english_threshold=P.english_threshold,
        english_commitment_layer=commit,
        english_fraction=[round(f, 4) for f in result.english_fraction],
        top_tokens=result.top_tokens,
        top_ids=result.top_ids,
        top_probs=[[round(p, 4) for p in row] for row in result.top_probs],
        softcap=result.softcap,
    ),
)
print(paths.rel(saved))
