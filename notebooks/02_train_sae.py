# ---
# jupyter:
#   kernelspec: {display_name: Python 3 (ipykernel), language: python, name: python3}
# ---

# %% [markdown]
# # 02 — Training a TopK sparse autoencoder on the residual stream
#
# Chapter 01 stored the residual stream after decoder layer *L* for ordinary (non-special) tokens. Here we
# train a **TopK sparse autoencoder** on it (Gao et al. 2024, the study's architecture): every token's
# activation **x** is encoded as
#
# `pre = (x − b_dec) · W_enc + b_enc`, keep the *k* largest entries of `pre`, ReLU them,
#
# and decoded as the sum of those *k* decoder rows weighted by their values, plus `b_dec`. Sparsity is
# exact by construction (at most *k* latents per token), so there is no L1 penalty to tune; the loss is the
# fraction of variance unexplained (FVU) of each training batch.
#
# **What can go wrong, and the study's remedies (each a parameter here):**
# latents that stop firing ("dead") are revived by the **AuxK** loss, which asks the `k_aux` largest
# *dead* pre-activations to reconstruct what the live code missed (`aux_coef` = 0.125); decoder rows are
# renormalised to unit length every `renorm_every` steps so that a latent's scale lives in its activation;
# Adam with a linear warmup, a cosine decay and a floor. A latent is *dead* after `dead_tokens` training
# tokens without a positive activation. The exact formulas are recorded in `checkpoints/cfg.json`.
#
# **Scale.** The study trains d_sae = 32768 latents (12.8×) with k = 128 on 1 B tokens of Gemma 4 E4B.
# The default run here trains an 8× SAE (4608 latents, k = 32) on a few hundred thousand tokens of
# SmolLM2-135M so that the whole book runs on a laptop CPU; `params/gemma4_e4b.yaml` has the study's
# settings. On a CUDA GPU the training step uses the fast sparse path (`mechlib.sae.fast`); on a CPU,
# the exact reference step, whose backward pass also touches only the k selected latents per token.
#
# Instead of training, `sae_source: pretrained` loads a published SAE in the card's format, or a SAELens or
# sparsify folder (`sae_pretrained`: a local `sae_final.pt` or folder, or
# `hf:<owner>/<repo>[@<revision>][/<path>]` such as the study's
# `hf:caiovicentino1/Gemma-4-E4B-SAE-L21-topk/sae_final.pt`), and chapter 03 evaluates that one.
#
# A rerun resumes: the full training state (weights, Adam moments, step, data position, dead counters)
# is checkpointed atomically every `checkpoint_every` steps, and a finished run is simply reloaded. Each
# checkpoint records what it was computed from — the activations' fingerprint (chapter 01's settings hash
# and shard checksums) and every training knob — and is resumed only if both are unchanged; otherwise the
# SAE is trained from scratch and one line says what changed. Every checkpoint file has a `.sha256`
# checksum beside it that is verified on load: a damaged `train_state.pt` falls back to the checkpoint
# before it (or to a fresh start), a damaged `sae_final.pt` stops chapter 03 with the file's name.

# %% tags=["parameters"]
run = "default"
seed = 0
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
sae_source = "train"
sae_pretrained = ""
d_sae = 4608
k = 32
k_aux = 256
aux_coef = 0.125
lr = 1e-3
lr_floor = 1e-4
warmup_steps = 50
train_batch_size = 1024
train_tokens = 300_000
renorm_every = 10
dead_tokens = 100_000
checkpoint_every = 100

# %%
import textwrap
import time

from mechlib import findings, plots, results
from mechlib.activations import open_store, open_train_store
from mechlib.params import from_namespace
from mechlib.paths import RunPaths
from mechlib.sae import HISTORY_FILE, HookInfo, export_sae, run_sae
from mechlib.sae.history import read_history

P = from_namespace(globals())
paths = RunPaths(P.run).make()

# %% [markdown]
# ## The activations
#
# In `collect_mode: disk` the SAE reads chapter 01's shards, shuffled across all of them, epoch after
# epoch (`train_tokens` / `collect_tokens` passes). In `collect_mode: stream` the model runs inside the
# training loop and nothing is written to disk.

# %%
if P.sae_source == "pretrained":  # only checked against the activations' width and layer
    store = open_store(P, paths, "heldout")
else:  # chapter 01's shards, or (stream) the model packed with chapter 01's exact settings
    store = open_train_store(P, paths, P.device)
cfg = P.train_config()
print(f"activations: d_model {store.d_model}, layer {store.manifest.get('layer')}, model {store.manifest.get('model')}")
if P.sae_source == "train":
    epochs = cfg.total_steps * cfg.train_batch_size / store.n_tokens
    print(
        f"{store.n_tokens} training tokens per epoch; {cfg.total_steps} steps of {cfg.train_batch_size} tokens "
        f"= {epochs:.1f} epochs"
    )

# %% [markdown]
# ## Training
#
# The progress bar shows the batch FVU and the number of dead latents. The line after it says which
# training step ran (`reference` on a CPU, `fast` on a GPU) and whether the run resumed.

# %%
t0 = time.time()
trained = run_sae(P, store, paths.checkpoints, device=P.device)
sae = trained.sae
print(
    f"SAE: d_model {sae.d_model}, d_sae {sae.d_sae}, k {sae.k}; {trained.start}; "
    f"training step: {trained.step_path}; {time.time() - t0:.1f} s in this run"
)

# %% [markdown]
# ## Training curves
#
# Top left: the loss and the batch FVU (log scale) — they coincide while no latent is dead. Top right:
# the AuxK term, non-zero only once some latents have been silent for `dead_tokens` tokens. Bottom: the
# number of dead latents and the learning-rate schedule. FVU here is measured on *training* batches;
# chapter 03 measures everything on held-out tokens.

# %%
history = read_history(paths.checkpoints / HISTORY_FILE) if P.sae_source == "train" else []
if history:
    fig, _ = plots.plot_training_curves(history, sae.d_sae)
    _ = plots.save_figure(fig, paths.figures / "02_training_curves.png")
else:
    print("pretrained SAE: no training curves")

# %%
# NBVAL_CHECK_OUTPUT
if history:
    first, last = history[0], history[-1]
    print(f"steps: {len(history)}")
    print(f"batch FVU: first {first.fvu:.2f}, last {last.fvu:.3f}")
    print(f"dead latents at the last step: {last.n_dead} of {sae.d_sae}")
else:
    print(f"pretrained: {P.sae_pretrained}")

# %% [markdown]
# ## Using the SAE elsewhere
#
# The SAE is also written to `outputs/<run>/export/` in the ecosystem's formats (`mechlib.sae.interop`):
# SAELens's `cfg.json` + `sae_weights.safetensors` (architecture `topk`, with the model, hook
# `blocks.L.hook_resid_post` / `model.layers.L`, context size and excluded positions in its metadata) and
# sparsify's hookpoint folder `layers.L/`. `SAE.load_from_disk(folder)` (SAELens) and
# `SparseCoder.load_from_disk(folder / "layers.L")` (sparsify) both load it and encode exactly as this book
# does; `sae_source: pretrained` with `sae_pretrained` set to such a folder loads it back.

# %%
exported = export_sae(sae, paths.root / "export", HookInfo.from_params(P))
print(f"SAELens: {paths.rel(exported.folder)}\nsparsify: {paths.rel(exported.sparsify_folder)}")

# %% [markdown]
# ## What this run found
#
# Written from this run's numbers (`mechlib.findings`), with the study's card alongside where it reports the
# same quantity; saved with the chapter's metrics and repeated in `REPORT.md`.

# %%
finding = findings.training_finding(
    len(history),
    len(history) * cfg.train_batch_size,
    len(history) * cfg.train_batch_size / store.n_tokens,
    history[-1].fvu if history else None,
    history[-1].n_dead if history else None,
    sae.d_sae,
)
print(textwrap.fill(finding, 110))

# %%
_ = results.save(
    paths,
    results.Trained(
        **trained.summary(),
        finding=finding,
        n_steps=len(history),
        final_batch_fvu=history[-1].fvu if history else None,
        n_dead_last_step=history[-1].n_dead if history else None,
        checkpoint=paths.rel(paths.checkpoints / "sae_final.pt") if P.sae_source == "train" else P.sae_pretrained,
        export=paths.rel(exported.folder),
        train_config=cfg.as_dict(),
    ),
)
