"""``outputs/<run>/REPORT.md``: the model card's tables regenerated from the metrics JSON.

Why generated: numbers in a report typed by hand drift from the run that produced them. Every
value here is read from ``outputs/<run>/metrics/*.json``; a chapter that has not run yet shows
as "not run" instead of a stale number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechlib.device_stats import ChapterDevice, format_bytes
from mechlib.findings import CARD
from mechlib.io import atomic_write_text
from mechlib.paths import RunPaths
from mechlib.report_format import figures, findings, fmt, p_se, pct, table
from mechlib.report_reward import section_feature_reward
from mechlib.report_steering import section_steering
from mechlib.results import (
    Baseline,
    Collected,
    Evaluated,
    FeatureRewardResult,
    Layers,
    Lens,
    Steering,
    Trained,
    read,
)
from mechlib.wrong_answers import OPERATION_NAMES


def _load(paths: RunPaths, name: str) -> dict[str, Any] | None:
    """The runner's own files (``book_timings``, ``book_devices``), not a chapter's result."""
    f = paths.metrics / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _section_run(paths: RunPaths, c: Collected | None) -> str:
    """What was collected, and how long each chapter took (the runner's ``book_timings.json``)."""
    text = "## The run\n\n"
    if c is None:
        text += "Chapter 01 not run.\n"
    else:
        text += (
            f"{fmt(c.n_tokens)} training + {fmt(c.heldout_tokens)} held-out tokens of the residual"
            f" stream after layer {fmt(c.layer)} (d_model {fmt(c.d_model)}), rows of"
            f" {fmt(c.seq_len)} tokens, stored as {c.activation_dtype}; mean token norm"
            f" {fmt(c.mean_norm, 1)}, max {fmt(c.max_norm, 1)}.\n"
        )
    timings = _load(paths, "book_timings")
    if timings:
        devices = _load(paths, "book_devices") or {}  # the runner's per-chapter mechlib.device_stats snapshots
        rows = [[name, seconds] for name, seconds in timings.items()]
        rows.append(["total", round(sum(timings.values()), 2)])
        header = ["chapter", "s"]
        if devices:
            header += ["device", "peak GPU memory (max_memory_allocated)"]
            snaps = {name: ChapterDevice.from_dict(d) for name, d in devices.items()}
            graphs = any(s.graph_captures is not None for s in snaps.values())
            header += ["decode steps captured as CUDA graphs"] if graphs else []
            for row in rows:
                device = snaps.get(str(row[0]))
                row += (
                    ["—", "—"]
                    if device is None
                    else [f"{device.device} ({device.device_name})", format_bytes(device.peak_gpu_bytes)]
                )
                row += [device.graphs_note() if device else "—"] if graphs else []
        text += "\nChapter wall times, each from the chapter's latest run (seconds):\n\n" + table(header, rows)
        text += "\n"
    return text + "\n" + figures(paths, "01_") + "\n"


def _section_sae(paths: RunPaths, m: Evaluated | None) -> str:
    if m is None:
        return "## SAE training metrics\n\nChapter 03 not run.\n"
    # the card's variance explained was computed with the seed's global-variance formula: it sits on that row
    rows: list[tuple[str, float | int, float | int | None]] = [
        ("Variance explained (per-dimension, held-out)", m.var_explained, None),
        ("Variance explained (seed's global-variance formula)", m.var_explained_global, CARD.var_explained_global),
        ("PCA baseline, k components (per-dimension)", m.pca_var_explained, None),
        ("Variance explained without outlier-norm tokens", m.var_explained_excl_outliers, None),
        ("PCA baseline without outlier-norm tokens", m.pca_var_explained_excl_outliers, None),
        ("MSE", m.mse, CARD.mse),
        ("L0", m.l0, CARD.l0),
        ("Coverage (fired at least once, held-out)", m.coverage, CARD.coverage),
        ("Dead fraction", m.dead_fraction, float(CARD.dead)),
        ("Δ next-token loss (SAE spliced in)", m.delta_ce_loss, None),
        ("KL (SAE spliced in)", m.kl, None),
        ("Held-out tokens", m.n_tokens, None),
    ]
    if not m.n_outlier_tokens:  # no outlier-norm tokens held out: those rows would repeat the two above
        rows = [row for row in rows if "without outlier-norm" not in row[0]]
    return (
        "## SAE training metrics (chapters 02–03)\n\n"
        + table(["metric", "this run", "study card (Gemma 4 E4B L21)"], rows)
        + "\n\nThe card's variance explained used one global variance on training batches; ours is per-dimension on"
        " held-out tokens (both shown).\n\n"
        + figures(paths, "02_")
        + "\n"
        + figures(paths, "03_")
        + "\n"
        + _browser_link(paths)
    )


def _browser_link(paths: RunPaths) -> str:
    """A link to the run's feature browser (chapter 03 writes it; chapter 05 adds contrast scores)."""
    index = paths.root / "browser" / "data" / "index.json"
    if not index.is_file():
        return ""
    from mechlib.browser.pages import IndexData  # the browser's own reader (only when a browser exists)

    data = IndexData.from_json(json.loads(index.read_text()), str(index))
    pages = sum(bool(p) for p in data.page)
    scored = sum(c is not None for c in data.contrast)
    return (
        f"\n**Feature browser:** [browser/index.html](browser/index.html) — all {data.d_sae} "
        f"latents (firing density, mean activation{', contrastive score and rank' if scored else ''}), "
        f"{pages} with a page of top contexts, quantile examples, histogram, logit effects and similar latents. "
        "Open it from the file system; it needs no server or network.\n"
    )


def _section_baseline(paths: RunPaths, m: Baseline | None) -> str:
    if m is None:
        return "## Baseline\n\nChapter 04 not run.\n"
    lo, hi = CARD.baseline_accuracy
    rows = [
        ["this run", m.task, m.prompt_format, m.n, m.accuracy, m.ci95, pct(m.finished), pct(m.truncated)],
        ["study card (Gemma 4 E4B)", "gsm8k", "gemma_manual", CARD.n_heldout, f"{lo:.2f}–{hi:.2f}", "—", "—", "—"],
    ]
    text = (
        "## Baseline accuracy (chapter 04)\n\n"
        + table(["", "task", "prompt", "n", "accuracy", "95% CI", "ended by themselves", "cut off"], rows)
        + "\n"
    )
    if m.by_scoring_rule:
        rows = [[rule, a.n, a.n_correct, a.accuracy, a.ci95] for rule, a in m.by_scoring_rule.items()]
        text += (
            "\nBy scoring rule (strict and flexible are lm-evaluation-harness's GSM8K rules; finished leaves "
            "cut-off answers out):\n\n" + table(["rule", "n", "correct", "accuracy", "95% CI"], rows) + "\n"
        )
    if m.by_kind:
        rows = [[kind, a.n, a.n_correct, a.accuracy, a.ci95] for kind, a in m.by_kind.items()]
        text += "\nBy question type:\n\n" + table(["type", "n", "correct", "accuracy", "95% CI"], rows) + "\n"
    if m.wrong_answers:
        rows = [
            [
                w.kind,
                OPERATION_NAMES[w.needed],
                w.n_wrong,
                w.wrong_operation,
                w.others or "—",
                w.right_operation,
                w.no_calculation,
            ]
            for w in m.wrong_answers
        ]
        head = ["type", "needs", "wrong", "another operation", "which", "needed one, wrong result", "no calculation"]
        text += "\nWrong answers by the operation they write:\n\n" + table(head, rows) + "\n"
    return text + "\n" + figures(paths, "04_") + "\n"


def _section_layers(paths: RunPaths, m: Layers | None) -> str:
    if m is None:
        return "## Contrastive layers\n\nChapter 05 not run.\n"
    top = f"top-{m.top_d} |d|"
    rows = [
        [
            "this run",
            f"{m.peak_layer} of {m.n_layers}",
            m.peak_top_abs_d,
            m.null_max_q95,
            p_se(m.null_p, m.null_p_mc_se),
            p_se(m.null_p_within_type, m.null_p_within_type_mc_se),
            m.spearman_rho,
            m.spearman_p,
            "—" if m.spearman_p_within_type is None else m.spearman_p_within_type,
        ],
        [
            "study card (Gemma 4 E4B)",
            f"{CARD.peak_layer} of {CARD.n_layers}",
            CARD.peak_top_abs_d,
            "not reported",
            "not reported",
            "not reported",
            CARD.spearman_rho,
            "—",
            "not reported",
        ],
    ]
    text = (
        "## Contrastive layers (chapter 05)\n\n"
        f"Contrast set: {fmt(m.n_correct)} correct, {fmt(m.n_wrong)} wrong"
        f" ({m.pooling} prompt token pooled); {fmt(m.n_permutations)} label permutations"
        " (p ± its Monte-Carlo standard error).\n\n"
        + table(
            [
                "",
                "peak layer",
                f"{top} at peak",
                "null 95th pct (max over layers)",
                "permutation p",
                "p, shuffled within type",
                "Spearman ρ (held-out)",
                "Spearman p",
                "Spearman p, shuffled within type",
            ],
            rows,
        )
        + "\n"
    )
    if m.scoring_sensitivity:
        rows = [
            [r.rule, r.n_correct, r.n_wrong, r.peak_layer, r.top_abs_d, p_se(r.p_peak, r.p_mc_se)]
            for r in m.scoring_sensitivity
        ]
        text += (
            "\n### The peak under each scoring rule\n\n"
            + table(["rule", "correct", "wrong", "peak layer", top, "permutation p"], rows)
            + f"\n\n{m.scoring_verdict}\n"
        )
    return text + "\n" + figures(paths, "05_") + "\n"


def _section_lens(paths: RunPaths, m: Lens | None) -> str:
    if m is None:
        return "## Logit lens\n\nChapter 07 not run.\n"
    n = min(len(m.top_tokens), len(m.top_probs))
    rows = [
        [
            layer,
            m.english_fraction[layer] if layer < len(m.english_fraction) else None,
            repr(m.top_tokens[layer][-1]),
            m.top_probs[layer][-1],
        ]
        for layer in range(n)
    ]
    return (
        "## Logit lens (chapter 07)\n\n"
        f"First layer whose top tokens are English words at {m.english_threshold:.0%} or more of the positions: "
        f"**{fmt(m.english_commitment_layer)}**"
        f" of {fmt(m.n_layers)} (the card: {CARD.english_layer} of {CARD.n_layers}).\n\n"
        + (
            table(["layer", "English share of positions", "top token, last position", "probability"], rows) + "\n\n"
            if rows
            else ""
        )
        + figures(paths, "07_")
        + "\n"
    )


def render_report(run: str) -> str:
    paths = RunPaths(run)
    collected = read(paths.metrics, Collected)
    trained, evaluated = read(paths.metrics, Trained), read(paths.metrics, Evaluated)
    baseline, layers = read(paths.metrics, Baseline), read(paths.metrics, Layers)
    steering, lens = read(paths.metrics, Steering), read(paths.metrics, Lens)
    reward = read(paths.metrics, FeatureRewardResult)
    header = (
        f"# mechbook report — run `{run}`\n\n"
        f"Model: `{collected.model if collected else '—'}`, SAE layer {collected.layer if collected else '—'}."
        " Generated from `metrics/*.json`; executed notebooks in `notebooks/`.\n"
    )
    sections = [
        _section_run(paths, collected) + findings(collected),
        _section_sae(paths, evaluated) + findings(trained, evaluated),
        _section_baseline(paths, baseline) + findings(baseline),
        _section_layers(paths, layers) + findings(layers),
        section_steering(paths, steering) + findings(steering),
        _section_lens(paths, lens) + findings(lens),
        section_feature_reward(paths, reward) + findings(reward),
    ]
    return header + "\n" + "\n".join(sections)


def write_report(run: str) -> Path:
    paths = RunPaths(run)
    atomic_write_text(paths.report, render_report(run))
    return paths.report
