"""``REPORT.md``'s chapter 06 section: the CAA steering table, its scoring sensitivity, the recovered
questions and their overlap across scales, and the random-direction control.

Why its own module: it is the report's longest section, and like :mod:`mechlib.report_reward` it reads
one chapter's result class only (:class:`mechlib.results.Steering`).
"""

from __future__ import annotations

from mechlib.findings import CARD
from mechlib.paths import RunPaths
from mechlib.report_format import figures, fmt, pct, table
from mechlib.results import RandomControl, ScaleVerdict, Steering

__all__ = ["section_steering"]


def section_steering(paths: RunPaths, m: Steering | None) -> str:
    if m is None:
        return "## Steering\n\nChapter 06 not run.\n"
    rows = [
        [
            r.scale,
            f"{r.perturbation:+g} %",
            r.accuracy,
            r.delta,
            r.delta_ci95,
            f"{r.recovered}/{r.n_baseline_wrong}",
            r.net_flips,
            r.mcnemar_p,
            pct(r.truncated),
        ]
        for r in m.rows
    ]
    rows.insert(0, ["baseline", "0 %", m.baseline_accuracy, 0, "—", "—", 0, "—", pct(m.baseline_truncated)])
    text = (
        f"## CAA steering at layer {m.layer} (chapter 06)\n\n"
        f"Held-out baseline accuracy: {fmt(m.baseline_accuracy)} on {fmt(m.n_heldout)} questions; its "
        f"answers cut off: {pct(m.baseline_truncated)}. Perturbations are % of the mean residual norm at "
        f"layer {m.layer}: {fmt(m.mean_resid_norm, 2)} (the card: {CARD.mean_resid_norm} at layer "
        f"{CARD.peak_layer}, {CARD.n_heldout} held-out questions).\n\n"
        + table(
            [
                "scale",
                "perturbation",
                "accuracy",
                "Δ vs baseline",
                "Δ 95% CI (bootstrap)",
                "recovered",
                "net flips",
                "McNemar p (exact)",
                "cut off",
            ],
            rows,
        )
        + "\n"
        + _steering_sensitivity(m.scoring_sensitivity)
        + "\n### Recovered questions per scale\n\n"
    )
    for r in m.rows:
        text += f"- scale {fmt(r.scale)}: {', '.join(r.recovered_ids) or '—'}\n"
    if m.overlaps:
        rows = [
            [o.scale_a, o.scale_b, o.n_a, o.n_b, o.intersection, o.jaccard, ", ".join(o.shared_ids) or "—"]
            for o in m.overlaps
        ]
        text += (
            "\n### Overlap of recovered sets\n\n"
            + table(["scale A", "scale B", "recovered A", "recovered B", "both", "Jaccard", "shared"], rows)
            + "\n"
        )
    text += _random_control_table(m.random_control)
    return text + "\n" + figures(paths, "06_") + "\n"


def _steering_sensitivity(per_scale: list[ScaleVerdict]) -> str:
    """Each steering row under every scoring rule, then the generated verdict per scale."""
    if not per_scale:
        return ""
    rows = [
        [s.scale, r.rule, r.n, r.accuracy, r.delta, r.net_flips, r.mcnemar_p, r.effect]
        for s in per_scale
        for r in s.rules
    ]
    return (
        "\n### Each row under each scoring rule\n\n"
        + table(["scale", "rule", "n", "accuracy", "Δ vs baseline", "net flips", "McNemar p", "effect"], rows)
        + "\n\n"
        + "".join(f"- {s.verdict}\n" for s in per_scale)
    )


def _random_control_table(control: RandomControl) -> str:
    """Random directions of the same size as CAA's push: each vs the baseline and vs CAA at that scale."""
    if not control.directions:
        return ""
    rows = []
    for d in control.directions:
        vs = d.vs_caa
        rows.append(
            [
                f"random #{d.index}",
                d.cos_with_caa,
                d.accuracy,
                d.delta,
                d.delta_ci95,
                d.net_flips,
                d.mcnemar_p,
                vs and vs.a_only,
                vs and vs.b_only,
                vs and vs.mcnemar_p,
                pct(d.truncated),
            ]
        )
    return (
        f"\n### Random-direction control at scale {fmt(control.scale)}\n\n"
        f"CAA accuracy at this scale: {fmt(control.caa_accuracy)}.\n\n"
        + table(
            [
                "direction",
                "cos with CAA",
                "accuracy",
                "Δ vs baseline",
                "Δ 95% CI",
                "net flips",
                "McNemar p vs baseline",
                "CAA only right",
                "random only right",
                "McNemar p vs CAA",
                "cut off",
            ],
            rows,
        )
        + "\n"
    )
