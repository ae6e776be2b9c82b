# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 01 — Collecting the residual stream
#
# A sparse autoencoder is trained on the model's **residual stream after one decoder layer**: for every
# token of a text corpus, the vector the model carries forward after layer *L*. The study takes layer 21
# of Gemma 4 E4B's 42 (`out.hidden_states[22]`); the embedded default run takes layer 15 of
# SmolLM2-135M-Instruct's 30, the same relative depth, so that the whole book runs on two CPU cores.
#
# **Corpus.** The default corpus is `python-stdlib-docs`: the Python reference manual that every Python
# installation ships as English prose (`pydoc_data.topics`), followed by the English docstrings of the
# standard library, read from source with `ast` (nothing is imported or run), in sorted file order. We chose
# it because it needs no network (this machine has no access to the Hugging Face hub), it is natural
# English rather than generated text, it is deterministic for a given Python version, and it is under the
# PSF license, so activations and results derived from it can be shared. It is technical English — far
# narrower than a pretraining corpus — so features of the default SAE will lean towards programming
# vocabulary. With hub access, set `corpus: hf:<dataset>` (streamed) as `params/gemma4_e4b.yaml` does.
#
# **How.** Documents are tokenised and *packed*: concatenated with an end-of-text separator and cut into
# rows of exactly `seq_len` tokens, each starting with the beginning-of-sequence token — no padding, so no
# computed token is wasted. A forward hook on layer *L* raises an exception that ends the forward pass
# there (`mechlib.hooks.run_to_layer`): the layers above *L* and the unembedding never run. BOS, separator
# and other special tokens are **excluded** (their residual norms are far larger than ordinary tokens' and
# would dominate SAE training — see the figure below), and so are the first `exclude_first_positions` = 2
# positions of every row: the BOS, and the token right after it, which SmolLM2 now and then turns into a
# second attention sink (below). The mask is stored with the activations. Every 10th
# document goes to a **held-out** split used by chapter 03, so evaluation never sees a training document.
#
# Activations go to safetensors shards with a `manifest.json` (model, layer, dtype, token counts, sha256 per
# shard). A rerun verifies the shards' checksums and skips what is finished; an interrupted run resumes; a
# change of any collection setting recollects. The manifest's settings hash and shard checksums are the
# activations' *fingerprint*: chapters 02 and 03 compare it with the one their saved products record, so an
# SAE or a cached evaluation computed from other activations is recomputed, never reused.
# `python -m mechlib.scale collect` builds its arguments with the same function as this chapter
# (`mechlib.activations.collect_config.collect_config_from_params`), so it writes the same shards.

# %% tags=["parameters"]
run = "default"
model = "embedded:smollm2-135m-instruct"
model_dtype = "float32"
device = "auto"
layer = 15
corpus = "python-stdlib-docs"
corpus_config = None
corpus_split = "train"
corpus_text_field = "text"
seq_len = 128
collect_tokens = 100_000
heldout_tokens = 8_192
collect_batch_size = 16
shard_tokens = 65_536
exclude_special_tokens = True
exclude_first_positions = 2
collect_mode = "disk"
activation_dtype = "float32"

# %%
import textwrap
import time

import torch

from mechlib import findings, plots, results
from mechlib.activations import collect_for_book
from mechlib.hooks import run_to_layer
from mechlib.models import load_model
from mechlib.params import from_namespace
from mechlib.paths import RunPaths

P = from_namespace(globals())
paths = RunPaths(P.run).make()

t0 = time.perf_counter()
lm = load_model(P.model, P.model_dtype, P.device)
load_s = time.perf_counter() - t0
print(
    f"{lm.name}: {type(lm.model).__name__}, {lm.n_layers} layers, d_model {lm.d_model}, "
    f"{P.model_dtype} on {next(lm.model.parameters()).device}; loaded in {load_s:.1f} s"
)

# %%
result = collect_for_book(lm, P, paths)
rate = result.computed_tokens / result.seconds if result.computed_tokens else None
print(
    f"computed {result.computed_tokens} tokens in {result.seconds:.1f} s"
    + (f" ({rate:,.0f} tokens/s)" if rate else " (everything was already on disk: resumed)")
)

# %% [markdown]
# ## What was collected
#
# The manifest of each split. `tokens` counts kept (non-special) tokens; `rows` is the number of packed
# sequences of `seq_len` tokens that produced them.

# %%
# NBVAL_CHECK_OUTPUT
held = result.heldout
splits = {"train": result.train, "heldout": held} if result.train is not None else {"heldout": held}
for name, store in splits.items():
    print(store.summary().line(name))
print("excluded special token ids:", list(held.summary().special_token_ids))
if result.train is None:
    print("collect_mode = stream: no training shards on disk; chapter 02 runs the model while it trains")

# %% [markdown]
# ## Residual norms, and why special tokens are excluded
#
# Left: the distribution of residual-stream norms of the kept tokens. Right (log scale): all positions of the
# first 64 held-out rows, recomputed here because the shards never store excluded tokens. The BOS at the start
# of every row acts as an **attention sink**: its residual vector is far longer than an ordinary token's (the
# printout below gives the ratio for this run). In some rows the token right after BOS becomes a second,
# smaller sink: many times an ordinary token's norm, though well below BOS's (counted below); a few dozen such
# tokens can carry a large share of the total squared norm, which is what an SAE's reconstruction loss weighs.
# Hence both positions are excluded.

# %%
acts = (result.train or held).load_all(max_tokens=32_768)
norms = acts.norm(dim=-1)
first = held.shard(0)
ctx, keep = first["context_ids"][:64].long(), first["keep_mask"][:64]
with torch.no_grad():
    h = run_to_layer(lm.model, P.layer, input_ids=ctx.to(next(lm.model.parameters()).device)).float().cpu()
all_norms = h.norm(dim=-1)
bos_norms = all_norms[:, 0]
pos1_norms = all_norms[:, 1]
sep = ctx == held.summary().separator_token_id
sep[:, 0] = False
sep_norms = all_norms[sep]

fig, axes = plots.new_grid(10.0, 3.8, ncols=2)
axes[0, 0].hist(norms.numpy(), bins=80, color="C0")
axes[0, 0].set_xlabel(f"‖residual after layer {P.layer}‖ (kept tokens)")
axes[0, 0].set_ylabel("tokens")
axes[0, 1].hist(
    [all_norms[keep].numpy(), pos1_norms.numpy(), bos_norms.numpy()],
    bins=40,
    color=["C0", "C1", "C3"],
    log=True,
    label=["kept tokens (first 64 rows)", "position 1 (after BOS)", "BOS at row start"],
)
axes[0, 1].set_xlabel("‖residual‖")
axes[0, 1].legend(fontsize=8)
fig.tight_layout()
_ = plots.save_figure(fig, paths.figures / "01_norms.png")

# %%
# NBVAL_CHECK_OUTPUT
print(
    f"kept tokens: mean norm {norms.mean():.1f}, median {norms.median():.1f}, "
    f"99th pct {norms.quantile(0.99):.1f} (first {acts.shape[0]} tokens)"
)
print(
    f"BOS at row start: mean norm {bos_norms.mean():.1f} "
    f"({bos_norms.mean() / all_norms[keep].mean():.1f}x the kept tokens of the same rows)"
)
median = all_norms[keep].median()
print(
    f"position 1: {int((pos1_norms > 5 * median).sum())} of {len(pos1_norms)} rows above 5x the median kept norm "
    f"(max {pos1_norms.max():.0f}); kept tokens: max {all_norms[keep].max():.0f}"
)
if sep_norms.numel():
    print(f"document separators: mean norm {sep_norms.mean():.1f} ({sep_norms.numel()} in the first 64 rows)")

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
n_train = result.train.n_tokens if result.train is not None else 0
bos_ratio = float(bos_norms.mean() / all_norms[keep].mean())
finding = findings.collect_finding(n_train, held.n_tokens, P.layer, lm.d_model, float(norms.mean()), bos_ratio)
print(textwrap.fill(finding, 110))

# %%
previous = results.read(paths.metrics, results.Collected)  # a resumed run keeps the first run's timings
saved = results.save(
    paths,
    results.Collected(
        model=lm.name,
        layer=P.layer,
        d_model=lm.d_model,
        seq_len=P.seq_len,
        n_tokens=n_train,
        finding=finding,
        heldout_tokens=held.n_tokens,
        collect_mode=P.collect_mode,
        activation_dtype=P.activation_dtype,
        exclude_special_tokens=P.exclude_special_tokens,
        exclude_first_positions=P.exclude_first_positions,
        max_norm=round(float(norms.max()), 4),
        mean_norm=round(float(norms.mean()), 4),
        bos_norm_ratio=round(bos_ratio, 4),
        # timings (not checked): of this run's computed tokens
        model_load_s=round(load_s, 2),
        collect_s=round(result.seconds, 2) if rate else previous and previous.collect_s,
        tokens_per_s=round(rate, 1) if rate else previous and previous.tokens_per_s,
    ),
)
print(paths.rel(saved))
