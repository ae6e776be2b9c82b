"""Evaluating an SAE on held-out tokens: reconstruction, sparsity, a PCA baseline, spliced next-token loss.

Why each choice (FIELD.md, "Traps"):
- **Variance explained, two formulas side by side.** ``var_explained`` (ours) divides the
  squared error by the variance of each dimension around *its own* mean, summed over dimensions:
  ``1 - sum_d sum_n e_nd^2 / sum_d sum_n (x_nd - mean_d)^2``. ``var_explained_global`` is the
  seed's ``1 - mse / x.var()``: one variance of all elements around one global mean, which also
  counts the spread *between* dimension means as "variance" and so inflates the score on
  residual streams (whose dimensions have very different means). Both on held-out tokens.
- **Dead features, two ways.** Training's counters (no activation in the last ``dead_tokens``
  training tokens) and never-fired on the held-out set; coverage = 1 − never-fired fraction.
- **PCA baseline** with k components fitted on *train* activations, scored on held-out with the
  per-dimension formula: an SAE with L0 = k that does not beat it has learned nothing sparse.
- **Spliced loss.** The SAE reconstruction replaces the residual after layer L (a forward hook
  on that decoder layer) at non-special positions only; next-token cross-entropy and
  KL(clean ‖ spliced) are averaged over those positions. A mean-ablation baseline (the train
  mean at the same positions) gives the fraction of loss recovered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mechlib.prompts import decode_text, token_label
from mechlib.sae import TopKSAE

if TYPE_CHECKING:  # types only: the model stack (transformers) is imported where it is used
    from mechlib.activations.shards import ActivationStore
    from mechlib.models import CausalLM, Tokenizer


@dataclass
class ReconMetrics:
    var_explained: float  # per-dimension formula (ours)
    var_explained_global: float  # the seed's 1 - mse / x.var()
    mse: float  # mean squared error per element
    l0: float  # mean number of positive latents per token
    coverage: float  # fraction of latents firing at least once on these tokens
    never_fired_fraction: float  # 1 - coverage
    n_tokens: int
    var_explained_excl_outliers: float  # per-dimension formula without "massive activation" tokens
    n_outlier_tokens: int  # tokens whose norm exceeds OUTLIER_NORM_RATIO x the median token norm


def variance_explained(x: Tensor, recon: Tensor) -> tuple[float, float]:
    """``(per-dimension, global)`` variance explained of ``recon`` for ``x`` (see module docstring)."""
    x, e = x.double(), (x - recon).double()
    sse = e.pow(2).sum()
    per_dim = 1.0 - sse / (x - x.mean(0)).pow(2).sum()
    glob = 1.0 - (sse / e.numel()) / x.var()
    return float(per_dim), float(glob)


OUTLIER_NORM_RATIO = 10.0


def inlier_mask(x: Tensor, ratio: float = OUTLIER_NORM_RATIO) -> Tensor:
    """Tokens whose norm is at most ``ratio`` x the median token norm (False = massive activation)."""
    norms = x.float().norm(dim=1)
    return norms <= ratio * norms.median()


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, x: Tensor, batch_size: int = 4096) -> tuple[ReconMetrics, Tensor]:
    """Held-out metrics and per-latent firing counts [m] (int64), in batches, fp64 accumulators.

    Why the outlier variant: a handful of tokens with "massive activations" (norms 10–100x the
    median; in SmolLM2 the first token after BOS of some rows) can hold most of the per-dimension
    variance, so reconstructing them well lifts variance explained for every other token too.
    """
    if x.shape[1] != sae.d_model:
        raise ValueError(f"activations have d_model={x.shape[1]} but the SAE expects d_model={sae.d_model}")
    dev = sae.W_enc.device
    counts = torch.zeros(sae.d_sae, dtype=torch.int64)
    n, sse, active = x.shape[0], 0.0, 0
    inlier = inlier_mask(x)
    mean, mean_in = x.double().mean(0), x[inlier].double().mean(0)
    sst, s_all, s2_all, sse_in, sst_in = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(dev, torch.float32)
        out = sae(xb)
        err = (xb - out.recon).double().pow(2).sum(1).cpu()
        sse += float(err.sum())
        xd = xb.double().cpu()
        sst += float((xd - mean).pow(2).sum())
        keep = inlier[i : i + batch_size]
        sse_in += float(err[keep].sum())
        sst_in += float((xd[keep] - mean_in).pow(2).sum())
        s_all += float(xd.sum())
        s2_all += float(xd.pow(2).sum())
        pos = out.code.values > 0
        active += int(pos.sum())
        counts += torch.bincount(out.code.indices[pos].cpu(), minlength=sae.d_sae)
    n_el = n * x.shape[1]
    var_global = (s2_all - s_all * s_all / n_el) / (n_el - 1)  # torch's x.var(): unbiased, one global mean
    mse = sse / n_el
    fired = float((counts > 0).double().mean())
    return ReconMetrics(
        var_explained=1.0 - sse / sst,
        var_explained_global=1.0 - mse / var_global,
        mse=mse,
        l0=active / n,
        coverage=fired,
        never_fired_fraction=1.0 - fired,
        n_tokens=n,
        var_explained_excl_outliers=1.0 - sse_in / sst_in,
        n_outlier_tokens=int((~inlier).sum()),
    ), counts


# ------------------------------------------------------------------------------------- PCA


@dataclass
class PCA:
    mean: Tensor  # [d]
    components: Tensor  # [k, d], orthonormal rows, largest variance first
    explained_variance: Tensor  # [k]

    def reconstruct(self, x: Tensor) -> Tensor:
        c = (x.double() - self.mean) @ self.components.t()
        return (c @ self.components + self.mean).to(x.dtype)


@torch.no_grad()
def fit_pca(batches: Iterable[Tensor], k: int) -> PCA:
    """Top-``k`` principal components from batches of activations (one pass, fp64 moments)."""
    n, s, s2 = 0, None, None
    for xb in batches:
        xb = xb.double()
        s = xb.sum(0) if s is None else s + xb.sum(0)
        s2 = xb.t() @ xb if s2 is None else s2 + xb.t() @ xb
        n += xb.shape[0]
    if not n or s is None or s2 is None:
        raise ValueError("fit_pca: no activations given")
    mean = s / n
    cov = (s2 - n * torch.outer(mean, mean)) / n
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = evals.argsort(descending=True)[:k]
    return PCA(mean, evecs[:, order].t().contiguous(), evals[order])


def pca_var_explained(pca: PCA, x: Tensor) -> float:
    """Held-out variance explained (per-dimension formula) of the PCA reconstruction."""
    return variance_explained(x, pca.reconstruct(x))[0]


# ------------------------------------------------------------------------- spliced next-token loss


@dataclass
class SplicedLoss:
    ce_clean: float
    ce_spliced: float
    ce_mean_ablation: float
    delta_ce_loss: float  # ce_spliced - ce_clean
    kl: float  # KL(clean || spliced), nats per position
    ce_loss_recovered: float | None  # (ce_mean - ce_spliced) / (ce_mean - ce_clean); 1 = splicing costs nothing
    n_tokens: int  # positions averaged over


def _replace_hook(replace, keep: Tensor):
    from mechlib.hooks import layer_output_tensor, replace_layer_output

    def hook(module, args, output):
        h = layer_output_tensor(output)
        new = replace(h.reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(h.dtype)
        return replace_layer_output(output, torch.where(keep[..., None], new, h))

    return hook


@torch.no_grad()
def spliced_loss(
    model: CausalLM,
    layer: int,
    sae: TopKSAE,
    ids: Tensor,
    keep: Tensor,
    mean_act: Tensor,
    batch_size: int = 8,
    progress: bool = False,
) -> SplicedLoss:
    """Next-token CE and KL when the SAE reconstruction replaces the residual after ``layer``.

    ``ids``/``keep`` [rows, T]: token ids and the positions that may be replaced (non-special).
    Loss positions: ``t < T - 1`` with ``keep[t]`` (the prediction of token ``t + 1`` is made from a
    replaced residual). ``mean_act`` [d] is the mean-ablation baseline's replacement.
    """
    from tqdm.auto import tqdm

    from mechlib.hooks import add_forward_hook
    from mechlib.models import check_layer, decoder_layers

    check_layer(model, layer)
    block = decoder_layers(model)[layer]
    dev = next(model.parameters()).device
    sae_dev = sae.W_enc.device
    recon = lambda h: sae(h.to(sae_dev)).recon.to(h.device)  # noqa: E731
    mean = mean_act.float().to(dev)
    ablate = lambda h: mean.expand_as(h)  # noqa: E731
    tot = {"clean": 0.0, "spliced": 0.0, "mean": 0.0, "kl": 0.0}
    n = 0
    for i in tqdm(range(0, ids.shape[0], batch_size), desc="spliced loss", disable=not progress):
        b_ids, b_keep = ids[i : i + batch_size].to(dev), keep[i : i + batch_size].to(dev)
        pos = b_keep[:, :-1]
        target = b_ids[:, 1:][pos]
        logp = {}
        for name, fn in (("clean", None), ("spliced", recon), ("mean", ablate)):
            if fn is None:
                logits = model(input_ids=b_ids, use_cache=False).logits
            else:
                with add_forward_hook(block, _replace_hook(fn, b_keep)):
                    logits = model(input_ids=b_ids, use_cache=False).logits
            logp[name] = F.log_softmax(logits[:, :-1][pos].float(), dim=-1)
            tot[name] += float(F.nll_loss(logp[name], target, reduction="sum"))
        tot["kl"] += float(F.kl_div(logp["spliced"], logp["clean"], log_target=True, reduction="sum"))
        n += int(pos.sum())
    if n == 0:
        raise ValueError("spliced_loss: no non-special positions to score (all keep-mask entries are False)")
    ce = {k: v / n for k, v in tot.items()}
    gap = ce["mean"] - ce["clean"]
    return SplicedLoss(
        ce_clean=ce["clean"],
        ce_spliced=ce["spliced"],
        ce_mean_ablation=ce["mean"],
        delta_ce_loss=ce["spliced"] - ce["clean"],
        kl=ce["kl"],
        ce_loss_recovered=(ce["mean"] - ce["spliced"]) / gap if gap > 0 else None,
        n_tokens=n,
    )


def heldout_rows(store: ActivationStore, n_tokens: int) -> tuple[Tensor, Tensor]:
    """Whole packed rows (``context_ids``, ``keep_mask``) from a store's shards until ``n_tokens``
    kept positions are covered (fewer if the store holds fewer)."""
    ids, keep, got = [], [], 0
    for i in range(len(store.entries)):
        sh = store.shard(i)
        for r in range(sh["context_ids"].shape[0]):
            if got >= n_tokens:
                break
            ids.append(sh["context_ids"][r].long())
            keep.append(sh["keep_mask"][r].bool())
            got += int(keep[-1][:-1].sum())
    if not ids:
        raise ValueError(f"{store.directory}: no token rows stored; rerun chapter 01")
    return torch.stack(ids), torch.stack(keep)


# ------------------------------------------------------------------------- feature examples


@torch.no_grad()
def top_activations(
    sae: TopKSAE, x: Tensor, features: list[int], n_examples: int = 5, batch_size: int = 4096
) -> dict[int, list[tuple[float, int]]]:
    """For each feature, its ``n_examples`` largest activations on ``x`` as ``(value, token index)``."""
    feats = torch.tensor(features, dtype=torch.long)
    best_v = torch.full((len(features), n_examples), -1.0)
    best_i = torch.full((len(features), n_examples), -1, dtype=torch.long)
    for s in range(0, x.shape[0], batch_size):
        code = sae.encode(x[s : s + batch_size].to(sae.W_enc.device, torch.float32))
        dense = torch.zeros(code.values.shape[0], sae.d_sae, device=code.values.device)
        acts = dense.scatter_(1, code.indices, code.values)[:, feats.to(dense.device)].t().cpu()  # [F, B]
        idx = torch.arange(s, s + acts.shape[1]).expand_as(acts)
        v = torch.cat([best_v, acts], 1)
        top = v.topk(n_examples, dim=1)
        best_v, best_i = top.values, torch.cat([best_i, idx], 1).gather(1, top.indices)
    return {f: [(float(v), int(i)) for v, i in zip(best_v[j], best_i[j]) if v > 0] for j, f in enumerate(features)}


def pick_features(counts: Tensor, n: int, seed: int, min_count: int = 5) -> list[int]:
    """``n`` features chosen at random (seeded) among those that fired at least ``min_count`` times."""
    alive = (counts >= min_count).nonzero().flatten()
    if alive.numel() == 0:
        alive = (counts > 0).nonzero().flatten()
    order = torch.randperm(alive.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(alive[order[:n]].tolist())


def feature_examples(
    sae: TopKSAE,
    x: Tensor,
    store: ActivationStore,
    tokenizer: Tokenizer,
    counts: Tensor,
    n_features: int,
    seed: int,
    n_examples: int = 5,
    window: int = 12,
) -> list[dict[str, Any]]:
    """Top-activating contexts of ``n_features`` randomly chosen live features (token strings).

    ``x`` must be ``store.load_all()`` (same order as ``store.token_info()``). Each example holds
    the activation, the token at the maximum and up to ``window`` tokens before it.
    """
    feats = pick_features(counts, n_features, seed)
    tops = top_activations(sae, x, feats, n_examples)
    info = store.token_info()
    out = []
    for f in feats:
        examples = []
        for value, i in tops[f]:
            ctx = store.context(int(info["row"][i]), int(info["position"][i]), window)
            examples.append(
                {
                    "activation": value,
                    "token": token_label(tokenizer, ctx[-1]),
                    "context": decode_text(tokenizer, ctx[:-1]),
                }
            )
        out.append({"feature": f, "frequency": float(counts[f]) / x.shape[0], "examples": examples})
    return out


# ------------------------------------------------------------------ the card's snippet, caching


@torch.no_grad()
def card_snippet_check(
    model: CausalLM, layer: int, checkpoint: str, sae: TopKSAE, ids: Tensor, keep: Tensor
) -> dict[str, Any] | None:
    """Run the card's usage snippet (``hidden_states[L + 1]``, ``torch.load``, top-k, scatter, ReLU)
    on one row and compare it with mechlib's encoding of the stop-after-layer activations.

    Returns ``None`` when the checkpoint is not a card-format ``.pt`` (e.g. a ``.safetensors``).
    """
    from mechlib.hooks import run_to_layer
    from mechlib.paths import resolve
    from mechlib.sae.model import _resolve_hf

    path = _resolve_hf(checkpoint) if str(checkpoint).startswith("hf:") else resolve(checkpoint)
    if path.suffix != ".pt":
        return None
    dev = next(model.parameters()).device
    row = ids[None].to(dev)
    out = model(input_ids=row, output_hidden_states=True, use_cache=False)
    x = out.hidden_states[layer + 1][0][keep.to(dev)].float().cpu()
    # --- the card's snippet, unchanged but for the path and the layer index ---
    ck = torch.load(path)
    pre = (x - ck["b_dec"]) @ ck["W_enc"] + ck["b_enc"]
    v, i = pre.topk(ck["k"], -1)
    f = torch.zeros_like(pre).scatter(-1, i, v).relu()
    recon = f @ ck["W_dec"] + ck["b_dec"]
    # --------------------------------------------------------------------------
    h = run_to_layer(model, layer, input_ids=row)[0][keep.to(dev)].float()
    code = sae.encode(h.to(sae.W_enc.device))
    mech = sae.decode(code).cpu()
    same = (i.sort(-1).values == code.indices.cpu().sort(-1).values).all(-1)
    return {
        "n_tokens": int(x.shape[0]),
        "same_topk_fraction": float(same.double().mean()),
        "max_recon_diff": float((recon - mech).abs().max()),
        "max_activation_diff": float((x - h.cpu()).abs().max()),
    }


def sae_fingerprint(state: dict[str, Any]) -> str:
    """sha256 over an SAE's tensors and k: a cache key that changes whenever the SAE does."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name]
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if isinstance(v, Tensor) else repr(v).encode())
    return h.hexdigest()
