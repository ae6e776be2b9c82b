"""``outputs/<run>/REPORT.md``: the model card's tables regenerated from the metrics JSON.

Why generated: numbers in a report typed by hand drift from the run that produced them. Every
value here is read from ``outputs/<run>/metrics/*.json``; a chapter that has not run yet shows
as "not run" instead of a stale number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechlib.device_stats import format_bytes
from mechlib.findings import CARD
from mechlib.io import atomic_write_text
from mechlib.paths import RunPaths

# The study's own numbers (public model card, see ../shared/FIELD.md), shown beside ours. The card's
# variance explained was computed with the seed's global-variance formula, so it sits on that row.
CARD_SAE_METRICS = {"var_explained_global": CARD.var_explained_global, "mse": CARD.mse, "l0": CARD.l0,
                    "coverage": CARD.coverage, "dead_fraction": float(CARD.dead)}


def _load(paths: RunPaths, name: str) -> dict[str, Any] | None:
    f = paths.metrics / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) < 1e-3 and value != 0:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")  # 32.0 → "32", 0.6962 stays
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{100 * value:.1f} %"


def _p(p: Any, se: Any) -> str:
    """A permutation p with its Monte-Carlo standard error, when known."""
    return _fmt(p) if not isinstance(se, (int, float)) else f"{_fmt(p)} ± {se:.3f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _figures(paths: RunPaths, prefix: str) -> str:
    figs = sorted(paths.figures.glob(f"{prefix}*.png"))
    return "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs)


def _findings(paths: RunPaths, *chapters: str) -> str:
    """Each chapter's "What this run found" paragraph (written by the chapter from its own numbers)."""
    text = ""
    for name in chapters:
        finding = (_load(paths, name) or {}).get("finding")
        if finding:
            text += f"\n**What this run found (chapter {name[:2]}).** {finding}\n"
    return text


def _section_run(paths: RunPaths) -> str:
    """What was collected, and how long each chapter took (the runner's ``book_timings.json``)."""
    c = _load(paths, "01_collect")
    text = "## The run\n\n"
    if c is None:
        text += "Chapter 01 not run.\n"
    else:
        text += (f"{_fmt(c.get('n_tokens'))} training + {_fmt(c.get('heldout_tokens'))} held-out tokens of the residual"
                 f" stream after layer {_fmt(c.get('layer'))} (d_model {_fmt(c.get('d_model'))}), rows of"
                 f" {_fmt(c.get('seq_len'))} tokens, stored as {c.get('activation_dtype', '—')}; mean token norm"
                 f" {_fmt(c.get('mean_norm'), 1)}, max {_fmt(c.get('max_norm'), 1)}.\n")
    timings = _load(paths, "book_timings")
    if timings:
        devices = _load(paths, "book_devices") or {}  # the runner's per-chapter mechlib.device_stats snapshots
        rows = [[name, seconds] for name, seconds in timings.items()]
        rows.append(["total", round(sum(timings.values()), 2)])
        header = ["chapter", "s"]
        if devices:
            header += ["device", "peak GPU memory (max_memory_allocated)"]
            for row in rows:
                d = devices.get(row[0])
                row += ["—", "—"] if d is None else [f"{d['device']} ({d['device_name']})",
                                                   format_bytes(d.get("peak_gpu_bytes"))]
        text += "\nChapter wall times of the last `mechlib.book` call (seconds):\n\n" + _table(header, rows)
        text += "\n"
    return text + "\n" + _figures(paths, "01_") + "\n"


def _section_sae(paths: RunPaths) -> str:
    m = _load(paths, "03_evaluate_sae")
    if m is None:
        return "## SAE training metrics\n\nChapter 03 not run.\n"
    keys = [
        ("var_explained", "Variance explained (per-dimension, held-out)"),
        ("var_explained_global", "Variance explained (seed's global-variance formula)"),
        ("pca_var_explained", "PCA baseline, k components (per-dimension)"),
        ("var_explained_excl_outliers", "Variance explained without outlier-norm tokens"),
        ("pca_var_explained_excl_outliers", "PCA baseline without outlier-norm tokens"),
        ("mse", "MSE"),
        ("l0", "L0"),
        ("coverage", "Coverage (fired at least once, held-out)"),
        ("dead_fraction", "Dead fraction"),
        ("delta_ce_loss", "Δ next-token loss (SAE spliced in)"),
        ("kl", "KL (SAE spliced in)"),
        ("n_tokens", "Held-out tokens"),
    ]
    if not m.get("n_outlier_tokens"):  # no outlier-norm tokens held out: those rows would repeat the two above
        keys = [(key, label) for key, label in keys if not key.endswith("_excl_outliers")]
    rows = [[label, m.get(key), CARD_SAE_METRICS.get(key)] for key, label in keys]
    return (
        "## SAE training metrics (chapters 02–03)\n\n"
        + _table(["metric", "this run", "study card (Gemma 4 E4B L21)"], rows)
        + "\n\nThe card's variance explained used one global variance on training batches; ours is per-dimension on"
        " held-out tokens (both shown).\n\n"
        + _figures(paths, "02_")
        + "\n"
        + _figures(paths, "03_")
        + "\n"
        + _browser_link(paths)
    )


def _browser_link(paths: RunPaths) -> str:
    """A link to the run's feature browser (chapter 03 writes it; chapter 05 adds contrast scores)."""
    index = paths.root / "browser" / "data" / "index.json"
    if not index.is_file():
        return ""
    data = json.loads(index.read_text())
    pages = sum(bool(p) for p in data.get("page", []))
    scored = sum(c is not None for c in data.get("contrast", []))
    return (f"\n**Feature browser:** [browser/index.html](browser/index.html) — all {len(data.get('density', []))} "
            f"latents (firing density, mean activation{', contrastive score and rank' if scored else ''}), "
            f"{pages} with a page of top contexts, quantile examples, histogram, logit effects and similar latents. "
            "Open it from the file system; it needs no server or network.\n")


def _section_baseline(paths: RunPaths) -> str:
    m = _load(paths, "04_gsm8k_baseline")
    if m is None:
        return "## Baseline\n\nChapter 04 not run.\n"
    lo, hi = CARD.baseline_accuracy
    rows = [["this run", m.get("task"), m.get("prompt_format"), m.get("n"), m.get("accuracy"), m.get("ci95"),
             _pct(m.get("finished")), _pct(m.get("truncated"))],
            ["study card (Gemma 4 E4B)", "gsm8k", "gemma_manual", CARD.n_heldout, f"{lo:.2f}–{hi:.2f}", "—", "—", "—"]]
    text = "## Baseline accuracy (chapter 04)\n\n" + _table(
        ["", "task", "prompt", "n", "accuracy", "95% CI", "ended by themselves", "cut off"], rows) + "\n"
    by_rule = m.get("by_scoring_rule") or {}
    if by_rule:
        rows = [[rule, v.get("n"), v.get("n_correct"), v.get("accuracy"), v.get("ci95")] for rule, v in by_rule.items()]
        text += ("\nBy scoring rule (strict and flexible are lm-evaluation-harness's GSM8K rules; finished leaves "
                 "cut-off answers out):\n\n" + _table(["rule", "n", "correct", "accuracy", "95% CI"], rows) + "\n")
    kinds = m.get("by_kind") or {}
    if kinds:
        rows = [[kind, v.get("n"), v.get("n_correct"), v.get("accuracy"), v.get("ci95")] for kind, v in kinds.items()]
        text += "\nBy question type:\n\n" + _table(["type", "n", "correct", "accuracy", "95% CI"], rows) + "\n"
    return text + "\n" + _figures(paths, "04_") + "\n"


def _section_layers(paths: RunPaths) -> str:
    m = _load(paths, "05_contrastive_layers")
    if m is None:
        return "## Contrastive layers\n\nChapter 05 not run.\n"
    top = m.get("top10_abs_d") or []
    peak = m.get("peak_layer")
    peak_value = top[peak] if isinstance(peak, int) and 0 <= peak < len(top) else None
    rows = [["this run", f"{_fmt(peak)} of {len(top)}", peak_value, m.get("null_max_q95"),
             _p(m.get("null_p"), m.get("null_p_mc_se")),
             _p(m.get("null_p_within_type"), m.get("null_p_within_type_mc_se")),
             m.get("spearman_rho"), m.get("spearman_p")],
            ["study card (Gemma 4 E4B)", f"{CARD.peak_layer} of {CARD.n_layers}", CARD.peak_top_abs_d,
             "not reported", "not reported", "not reported", CARD.spearman_rho, "—"]]
    text = (
        "## Contrastive layers (chapter 05)\n\n"
        f"Contrast set: {_fmt(m.get('n_correct'))} correct, {_fmt(m.get('n_wrong'))} wrong"
        f" ({m.get('pooling', '—')} prompt token pooled); {_fmt(m.get('n_permutations'))} label permutations"
        " (p ± its Monte-Carlo standard error).\n\n"
        + _table(["", "peak layer", "top-10 |d| at peak", "null 95th pct (max over layers)", "permutation p",
                  "p, shuffled within type", "Spearman ρ (held-out)", "Spearman p"], rows)
        + "\n"
    )
    sens = m.get("scoring_sensitivity") or []
    if sens:
        rows = [[r.get("rule"), r.get("n_correct"), r.get("n_wrong"), r.get("peak_layer"), r.get("top_abs_d"),
                 _p(r.get("p_peak"), r.get("p_mc_se"))] for r in sens]
        text += ("\n### The peak under each scoring rule\n\n"
                 + _table(["rule", "correct", "wrong", "peak layer", "top-10 |d|", "permutation p"], rows)
                 + f"\n\n{m.get('scoring_verdict', '')}\n")
    return text + "\n" + _figures(paths, "05_") + "\n"


def _section_steering(paths: RunPaths) -> str:
    m = _load(paths, "06_steering")
    if m is None:
        return "## Steering\n\nChapter 06 not run.\n"
    rows = [
        [r.get("scale"), f"{r.get('perturbation', 0):+g} %", r.get("accuracy"), r.get("delta"), r.get("delta_ci95"),
         f"{r.get('recovered')}/{r.get('n_baseline_wrong', '?')}", r.get("net_flips"), r.get("mcnemar_p"),
         _pct(r.get("truncated"))]
        for r in m.get("rows", [])
    ]
    rows.insert(0, ["baseline", "0 %", m.get("baseline_accuracy"), 0, "—", "—", 0, "—", _pct(m.get("baseline_truncated"))])
    text = (
        f"## CAA steering at layer {m.get('layer')} (chapter 06)\n\n"
        f"Held-out baseline accuracy: {_fmt(m.get('baseline_accuracy'))} on {_fmt(m.get('n_heldout'))} questions; its "
        f"answers cut off: {_pct(m.get('baseline_truncated'))}. Perturbations are % of the mean residual norm at "
        f"layer {m.get('layer')}: {_fmt(m.get('mean_resid_norm'), 2)} (the card: {CARD.mean_resid_norm} at layer "
        f"{CARD.peak_layer}, {CARD.n_heldout} held-out questions).\n\n"
        + _table(["scale", "perturbation", "accuracy", "Δ vs baseline", "Δ 95% CI (bootstrap)", "recovered",
                  "net flips", "McNemar p (exact)", "cut off"], rows)
        + "\n"
        + _steering_sensitivity(m.get("scoring_sensitivity") or [])
        + "\n### Recovered questions per scale\n\n"
    )
    for r in m.get("rows", []):
        text += f"- scale {_fmt(r.get('scale'))}: {', '.join(map(str, r.get('recovered_ids', []))) or '—'}\n"
    overlaps = m.get("overlaps")
    if overlaps:
        rows = [[o.get("scale_a"), o.get("scale_b"), o.get("n_a"), o.get("n_b"), o.get("intersection"), o.get("jaccard"),
                 ", ".join(o.get("shared_ids", [])) or "—"] for o in overlaps]
        text += ("\n### Overlap of recovered sets\n\n"
                 + _table(["scale A", "scale B", "recovered A", "recovered B", "both", "Jaccard", "shared"], rows) + "\n")
    text += _random_control_table(m.get("random_control") or {})
    return text + "\n" + _figures(paths, "06_") + "\n"


def _steering_sensitivity(per_scale: list[dict[str, Any]]) -> str:
    """Each steering row under every scoring rule, then the generated verdict per scale."""
    if not per_scale:
        return ""
    rows = [[s.get("scale"), r.get("rule"), r.get("n"), r.get("accuracy"), r.get("delta"), r.get("net_flips"),
             r.get("mcnemar_p"), r.get("effect")] for s in per_scale for r in s.get("rules", [])]
    return ("\n### Each row under each scoring rule\n\n"
            + _table(["scale", "rule", "n", "accuracy", "Δ vs baseline", "net flips", "McNemar p", "effect"], rows)
            + "\n\n" + "".join(f"- {s.get('verdict', '')}\n" for s in per_scale))


def _random_control_table(control: dict[str, Any]) -> str:
    """Random directions of the same size as CAA's push: each vs the baseline and vs CAA at that scale."""
    directions = control.get("directions") or []
    if not directions:
        return ""
    rows = []
    for d in directions:
        vs = d.get("vs_caa") or {}
        rows.append([f"random #{d.get('index')}", d.get("cos_with_caa"), d.get("accuracy"), d.get("delta"),
                     d.get("delta_ci95"), d.get("net_flips"), d.get("mcnemar_p"), vs.get("a_only"), vs.get("b_only"),
                     vs.get("mcnemar_p"), _pct(d.get("truncated"))])
    return (f"\n### Random-direction control at scale {_fmt(control.get('scale'))}\n\n"
            f"CAA accuracy at this scale: {_fmt(control.get('caa_accuracy'))}.\n\n"
            + _table(["direction", "cos with CAA", "accuracy", "Δ vs baseline", "Δ 95% CI", "net flips",
                      "McNemar p vs baseline", "CAA only right", "random only right", "McNemar p vs CAA", "cut off"],
                     rows)
            + "\n")


def _section_lens(paths: RunPaths) -> str:
    m = _load(paths, "07_logit_lens")
    if m is None:
        return "## Logit lens\n\nChapter 07 not run.\n"
    tokens, probs, english = m.get("top_tokens") or [], m.get("top_probs") or [], m.get("english_fraction") or []
    rows = [[layer, english[layer] if layer < len(english) else None, repr(tokens[layer][-1]), probs[layer][-1]]
            for layer in range(min(len(tokens), len(probs)))]
    return (
        "## Logit lens (chapter 07)\n\n"
        f"First layer whose top tokens are mostly English words: **{_fmt(m.get('english_commitment_layer'))}**"
        f" of {_fmt(m.get('n_layers'))} (the card: {CARD.english_layer} of {CARD.n_layers}).\n\n"
        + (_table(["layer", "English share of positions", "top token, last position", "probability"], rows) + "\n\n"
           if rows else "")
        + _figures(paths, "07_") + "\n"
    )


def render_report(run: str) -> str:
    paths = RunPaths(run)
    collect = _load(paths, "01_collect") or {}
    header = (
        f"# mechbook report — run `{run}`\n\n"
        f"Model: `{collect.get('model', '—')}`, SAE layer {collect.get('layer', '—')}. Generated from"
        " `metrics/*.json`; executed notebooks in `notebooks/`.\n"
    )
    sections = [
        _section_run(paths) + _findings(paths, "01_collect"),
        _section_sae(paths) + _findings(paths, "02_train_sae", "03_evaluate_sae"),
        _section_baseline(paths) + _findings(paths, "04_gsm8k_baseline"),
        _section_layers(paths) + _findings(paths, "05_contrastive_layers"),
        _section_steering(paths) + _findings(paths, "06_steering"),
        _section_lens(paths) + _findings(paths, "07_logit_lens"),
    ]
    return header + "\n" + "\n".join(sections)


def write_report(run: str) -> Path:
    paths = RunPaths(run)
    atomic_write_text(paths.report, render_report(run))
    return paths.report
