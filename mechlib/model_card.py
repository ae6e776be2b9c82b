"""``outputs/<run>/MODEL_CARD.md``: a Hugging Face model card for the run's SAE, regenerated from its metrics.

Why generated: the study's card was typed once, for one model, and its numbers cannot be traced to a run.
This one is rendered from ``params.yaml`` and ``metrics/*.json`` (read through the typed readers of
:mod:`mechlib.model_card_data`), for the run's own model and layer, with that run's findings and caveats;
a chapter that has not run is named as missing instead of filled in. ``python -m mechlib.hub push``
uploads it as the repo's ``README.md`` (the file the Hub shows), with the repo id in the usage snippets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from mechlib.findings import CARD
from mechlib.io import atomic_write_text
from mechlib.model_card_data import RunResults, read_run
from mechlib.paths import RunPaths
from mechlib.report_reward import card_section
from mechlib.results import Evaluated
from mechlib.sae.interop import HF_MODEL_NAMES, HookInfo

CARD_FILE = "MODEL_CARD.md"
# The SAE is computed from the base model's activations, so it is offered under the base model's licence.
LICENSES = {"HuggingFaceTB/": "apache-2.0", "google/gemma": "gemma", "Qwen/": "apache-2.0"}
GSM8K_HUB = "openai/gsm8k"
STUDY = "the study's card (Gemma 4 E4B, layer 21)"


def base_model(model: str) -> str:
    """The Hub name of the run's model (the embedded GGUF is a quantisation of SmolLM2-135M-Instruct)."""
    return HF_MODEL_NAMES.get(model, model)


def front_matter(r: RunResults) -> dict[str, object]:
    """The card's YAML header: what the Hub indexes (licence, base model, library, tags, datasets)."""
    p = r.params
    base = base_model(p.model)
    datasets = [p.corpus[3:]] if p.corpus.startswith("hf:") else []
    if p.task == "gsm8k":
        datasets.append(GSM8K_HUB)
    return {
        "license": next((lic for prefix, lic in LICENSES.items() if base.startswith(prefix)), "other"),
        "base_model": base,
        "library_name": "saelens",
        "tags": [
            "sparse-autoencoder",
            "sae",
            "topk-sae",
            "mechanistic-interpretability",
            "saelens",
            "sparsify",
            "mechbook",
            f"layer-{p.layer}",
        ],
        "datasets": datasets,
    }


def _f(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if value != 0 and abs(value) < 10**-digits else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _not_run(chapter: str) -> str:
    return f"*Chapter {chapter} has not run for this run, so this section is empty.*\n"


def _found(text: str) -> str:
    return f"\n**What this run found.** {text}\n" if text else ""


def section_specs(r: RunResults) -> str:
    p, e = r.params, r.evaluated
    hook = HookInfo.from_params(p)
    d_model = r.collected.d_model if r.collected else None
    d_sae = e.d_sae if e and e.d_sae else p.d_sae
    k = e.k if e and e.k else p.k
    pretrained = (r.trained is not None and r.trained.sae_source == "pretrained") or p.sae_source == "pretrained"
    rows = [
        [
            "Base model",
            f"`{base_model(p.model)}`" + (f" (run as `{p.model}`)" if base_model(p.model) != p.model else ""),
        ],
        [
            "Hook",
            f"residual stream after decoder layer {p.layer}: `{hook.hook_name}` (TransformerLens), output "
            f"of `{hook.hf_hook_name}` (Hugging Face), `hidden_states[{p.layer + 1}]`",
        ],
        ["Architecture", f"TopK SAE (Gao et al. 2024), k = {k}, ReLU on the kept values"],
        ["d_model → d_sae", f"{_f(d_model)} → {d_sae}" + (f" ({d_sae / d_model:.1f}x)" if d_model else "")],
        [
            "Context size",
            f"{p.seq_len} tokens; BOS/special tokens and the first {p.exclude_first_positions} "
            f"positions of each row excluded"
            if p.exclude_special_tokens
            else f"{p.seq_len} tokens",
        ],
    ]
    if pretrained:
        rows.append(["Source", f"not trained by this run: loaded from `{p.sae_pretrained}`"])
    else:
        t = r.trained
        rows += [
            [
                "Training tokens",
                f"{_f(t.tokens) if t else p.train_tokens} ({p.collect_tokens} collected, corpus `{p.corpus}`)",
            ],
            [
                "Optimiser",
                f"Adam, lr {p.lr:g}, {p.warmup_steps} warmup steps → cosine → floor {p.lr_floor:g}; "
                f"batch {p.train_batch_size}",
            ],
            ["AuxK", f"coef {p.aux_coef:g}, k_aux {p.k_aux}; dead after {p.dead_tokens} tokens"],
            ["Decoder", f"rows renormalised to unit norm every {p.renorm_every} steps"],
        ]
    rows.append(["Precision", f"SAE fp32; model {p.model_dtype}; activations stored as {p.activation_dtype}"])
    return "## Specs\n\n" + _table(["", ""], rows)


def _eval_rows(e: Evaluated) -> list[list[str]]:
    rows = [
        ("Variance explained (per-dimension, held-out)", e.var_explained, None),
        ("Variance explained (the seed's global formula)", e.var_explained_global, CARD.var_explained_global),
        (f"PCA baseline, {e.k} components (per-dimension)", e.pca_var_explained, None),
        ("MSE (per element)", e.mse, CARD.mse),
        ("L0", e.l0, CARD.l0),
        ("Coverage (latents firing on held-out tokens)", e.coverage, CARD.coverage),
        ("Dead fraction", e.dead_fraction, float(CARD.dead)),  # a fraction: 0.000, not the count's "0"
        ("Δ next-token loss, SAE spliced in (nats)", e.delta_ce_loss, None),
        ("KL, SAE spliced in", e.kl, None),
        ("Loss recovered vs mean ablation", e.ce_loss_recovered, None),
    ]
    return [[label, _f(ours), _f(theirs)] for label, ours, theirs in rows]


def section_training(r: RunResults) -> str:
    text = "## Training metrics\n\n"
    if r.evaluated is None:
        return text + _not_run("03 (evaluate the SAE)") + _found(r.trained.finding if r.trained else "")
    e = r.evaluated
    text += (
        f"Measured by chapter 03 on {_f(e.n_tokens)} held-out tokens (never trained on); the card's column is "
        f"{STUDY}, whose variance explained used one global variance on training batches.\n\n"
    )
    text += _table(["metric", "this SAE", STUDY], _eval_rows(e))
    return text + _found(r.trained.finding if r.trained else "") + _found(e.finding)


def section_gsm8k(r: RunResults) -> str:
    p = r.params
    task = "GSM8K" if p.task == "gsm8k" else "a generated arithmetic word-problem task (GSM8K's format)"
    text = f"## The GSM8K experiments\n\nTask: {task}, prompt `{p.prompt_format}`, greedy decoding.\n\n### Baseline\n\n"
    b = r.baseline
    if b is None:
        text += _not_run("04 (baseline)")
    else:
        ci = f"[{_f(b.ci95[0])}, {_f(b.ci95[1])}]" if b.ci95 else "—"
        text += (
            f"Accuracy **{_f(b.accuracy)}** ({_f(b.n_correct)} of {_f(b.n)}, 95 % CI {ci}); "
            f"{_f(b.finished)} of the answers ended by themselves. The card: "
            f"{CARD.baseline_accuracy[0]:.2f}–{CARD.baseline_accuracy[1]:.2f} on {CARD.n_heldout} questions.\n\n"
        )
        text += _table(
            ["scoring rule", "n", "correct", "accuracy"],
            [[rule, _f(a.n), _f(a.n_correct), _f(a.accuracy)] for rule, a in sorted(b.by_scoring_rule.items())],
        ) + _found(b.finding)
    text += "\n### Contrastive layers\n\n"
    c = r.layers
    if c is None:
        text += _not_run("05 (contrastive layers)")
    else:
        p_text = _f(c.null_p) + (f" ± {c.null_p_mc_se:.3f}" if c.null_p_mc_se is not None else "")
        text += _table(
            ["", "peak layer", f"top-{c.top_d} |d| at peak", "permutation p", "Spearman ρ (held-out)"],
            [
                ["this run", f"{_f(c.peak_layer)} of {c.n_layers}", _f(c.peak_top_abs_d), p_text, _f(c.spearman_rho)],
                [
                    STUDY,
                    f"{CARD.peak_layer} of {CARD.n_layers}",
                    _f(CARD.peak_top_abs_d),
                    "not reported",
                    _f(CARD.spearman_rho),
                ],
            ],
        )
        text += (
            f"\nContrast set: {_f(c.n_correct)} correct vs {_f(c.n_wrong)} wrong questions. Files: "
            f"`{r.steering_vector or 'steering_vec_L<peak>.pt'}` (unit vector, metadata in its `.json`), "
            f"`{r.contrastive_features or 'contrastive_features_L<layer>.json'}` (SAE latents ranked by the "
            f"correct − wrong difference).\n" + _found(c.finding)
        )
    text += "\n### CAA steering\n\n"
    s = r.steering
    if s is None:
        return text + _not_run("06 (steering)")
    text += (
        f"Layer {_f(s.layer)}; scales are fractions of the mean residual norm there ({_f(s.mean_resid_norm, 1)}; "
        f"the card: {CARD.mean_resid_norm} at layer {CARD.peak_layer}). Held-out baseline {_f(s.baseline_accuracy)}"
        f" on {_f(s.n_heldout)} questions.\n\n"
    )
    rows = [
        [
            _f(x.scale, 2),
            _f(x.accuracy),
            _f(x.delta),
            f"[{_f(x.delta_ci95[0])}, {_f(x.delta_ci95[1])}]" if x.delta_ci95 else "—",
            f"{_f(x.recovered)}/{_f(x.n_baseline_wrong)}",
            _f(x.net_flips),
            _f(x.mcnemar_p),
        ]
        for x in s.rows
    ]
    return (
        text
        + _table(["scale", "accuracy", "Δ vs baseline", "Δ 95% CI", "recovered", "net flips", "McNemar p"], rows)
        + _found(s.finding)
    )


def section_lens(r: RunResults) -> str:
    text = "## Logit lens\n\n"
    if r.lens is None:
        return text + _not_run("07 (logit lens)")
    lens = r.lens
    return (
        text + f"Each layer's residual through the final norm and the unembedding: the top tokens are English "
        f"words at {lens.english_threshold:.0%} or more of the positions from layer "
        f"**{_f(lens.english_commitment_layer)}** of {_f(lens.n_layers)} (the card: "
        f"{CARD.english_layer} of {CARD.n_layers}).\n" + _found(lens.finding)
    )


def section_usage(r: RunResults, repo_id: str | None) -> str:
    p = r.params
    hook = HookInfo.from_params(p)
    get = "from huggingface_hub import snapshot_download\n" if repo_id else ""
    where = f'snapshot_download("{repo_id}")' if repo_id else f'"outputs/{p.run}/export"'
    if _has_card_checkpoint(r):  # the study's own snippet: torch.load of sae_final.pt
        load = (
            f'from huggingface_hub import hf_hub_download\nck = torch.load(hf_hub_download("{repo_id}", '
            f'"sae_final.pt"))'
            if repo_id
            else f'ck = torch.load("outputs/{p.run}/checkpoints/sae_final.pt")'
        )
        what = "`sae_final.pt`, the card's format"
    else:  # a pretrained SAE: no card-format file was written, the export holds the same tensors
        load = (
            f"from safetensors.torch import load_file\npath = {where}\n"
            f'ck = {{**load_file(f"{{path}}/sae_weights.safetensors"), "k": {r.evaluated.k if r.evaluated else p.k}}}'
        )
        load = (get + load) if repo_id else load
        what = "`sae_weights.safetensors` and k"
    skipped = f" or the first {p.exclude_first_positions} positions of a row" if p.exclude_first_positions else ""
    return f"""## Usage

SAELens (`cfg.json` + `sae_weights.safetensors`, architecture `topk`, hook `{hook.hook_name}`) and sparsify
(hookpoint folder `{hook.hookpoint}/`) both load the same files:

```python
{get}path = {where}
from sae_lens import SAE
sae = SAE.load_from_disk(path, device="cpu")
feats = sae.encode(x)          # x: residual stream after layer {p.layer}, [tokens, d_model]

from sparsify import Sae
sae = Sae.load_from_disk(f"{{path}}/{hook.hookpoint}")
acts, idx, _ = sae.encode(x)
```

Plain torch, the study card's formula ({what}: `W_enc` [d, m], `W_dec` [m, d], `b_enc`, `b_dec`, `k`):

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
{load}
tok = AutoTokenizer.from_pretrained("{base_model(p.model)}")
model = AutoModelForCausalLM.from_pretrained("{base_model(p.model)}")
out = model(**tok("The capital of France is", return_tensors="pt"), output_hidden_states=True)
x = out.hidden_states[{p.layer + 1}][0]                  # residual stream after layer {p.layer}
pre = (x - ck["b_dec"]) @ ck["W_enc"] + ck["b_enc"]
v, i = pre.topk(ck["k"], -1)
f = torch.zeros_like(pre).scatter(-1, i, v).relu()      # sparse code, k latents per token
recon = f @ ck["W_dec"] + ck["b_dec"]
```

The SAE never saw BOS/special tokens{skipped}; their codes are out of distribution.
{_browser_line(r)}"""


def _browser_line(r: RunResults) -> str:
    if not r.has_browser:
        return ""
    return (
        f"\nFeature browser: every latent's density, top contexts and logit effects in "
        f"`outputs/{r.params.run}/browser/index.html` of the run that made this SAE (static pages; open "
        f"from the file system).\n"
    )


def _has_card_checkpoint(r: RunResults) -> bool:
    return r.params.sae_source == "train"


def section_limitations(r: RunResults) -> str:
    p = r.params
    items = []
    if r.missing:
        items.append(
            f"This is a partial run: chapter(s) {', '.join(r.missing)} have not run, so their sections "
            f"are empty and nothing here rests on them."
        )
    if p.model == "embedded:smollm2-135m-instruct":
        items.append(
            "A 135 M-parameter model on small problems is a test bed for the method and its statistics, "
            "not evidence about Gemma 4 E4B: compare formulas and orders of magnitude with the study's "
            "card, not digits."
        )
    if p.model.startswith("random:"):
        items.append(
            f"`{p.model}` is a random-weight model: this run exercises the code paths, and nothing in it "
            f"describes a trained model."
        )
    if p.placeholder_labels > 0:
        items.append(
            f"Chapters 05–06 used placeholder labels (placeholder_labels = {p.placeholder_labels:g}): "
            f"'correct' there is a seeded draw, not the model's answers, so their numbers mean nothing."
        )
    if p.task != "gsm8k":
        items.append("The task is generated arithmetic in GSM8K's answer format, not GSM8K itself.")
    e = r.evaluated
    if e and e.var_explained is not None and e.pca_var_explained is not None and e.var_explained <= e.pca_var_explained:
        items.append(
            f"The SAE does not beat a {e.k}-component PCA on held-out tokens ({_f(e.var_explained)} vs "
            f"{_f(e.pca_var_explained)})."
        )
    if r.layers and r.layers.null_p is not None and r.layers.null_p >= 0.05:
        items.append(f"The peak layer is not significant against the permutation null (p = {_f(r.layers.null_p)}).")
    if r.steering and r.steering.rows and all(x.mcnemar_p is not None and x.mcnemar_p >= 0.05 for x in r.steering.rows):
        items.append(
            "No steering scale changed held-out accuracy significantly: nothing here shows that CAA along "
            "this direction improves answers."
        )
    if r.steering:
        items.append(
            f"Steering is measured on {_f(r.steering.n_heldout)} held-out questions: intervals are wide, "
            f"and the random-direction control says whether CAA beats any push of the same size."
        )
    items.append(
        "Variance explained is per-dimension on held-out tokens; the card's 0.939 used one global variance "
        "on training batches (both are reported above)."
    )
    items.append("The SAE reads one layer of one model: it is meaningless on another model, layer or hook point.")
    return "## Limitations\n\n" + "".join(f"- {i}\n" for i in items)


def render_model_card(results: RunResults, repo_id: str | None = None) -> str:
    """The card as text: YAML front matter, then the seed card's sections filled from ``results``.

    ``repo_id``: the Hub repo the card will describe (usage snippets download from it); ``None``
    points them at the run's local files.
    """
    p = results.params
    header = "---\n" + yaml.safe_dump(front_matter(results), sort_keys=False) + "---\n\n"
    title = (
        f"# TopK SAE on {base_model(p.model)}, residual stream after layer {p.layer}\n\n"
        f"Generated by mechbook from run `{p.run}` (`params.yaml` and `metrics/*.json`); "
        f"it reproduces the method of a published Gemma 4 E4B SAE study on this model. Every number below is "
        f"this run's; the study's values are shown beside them where it reports the same quantity.\n\n"
    )
    sections = [
        section_specs(results),
        section_training(results),
        section_gsm8k(results),
        section_lens(results),
        card_section(results.reward),
        section_usage(results, repo_id),
        section_limitations(results),
    ]
    return header + title + "\n".join(sections)


def write_model_card(run: str, root: Path | None = None, repo_id: str | None = None) -> Path:
    """Write ``outputs/<run>/MODEL_CARD.md`` (or ``root/MODEL_CARD.md``) atomically; return its path."""
    folder = root if root is not None else RunPaths(run).root
    path = folder / CARD_FILE
    atomic_write_text(path, render_model_card(read_run(folder), repo_id))
    return path
