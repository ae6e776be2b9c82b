"""``REPORT.md``'s chapter 08 section: the feature reward, Stage Gate 1 and the GRPO arms.

Kept apart from :mod:`mechlib.report` (which holds chapters 01-07) so neither grows past a
readable size; it reads only :class:`mechlib.results.FeatureRewardResult`.
"""

from __future__ import annotations

from mechlib.paths import RunPaths
from mechlib.results import FeatureRewardResult


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _yes_no(flag: bool | None) -> str:
    return "— (too few steps)" if flag is None else "yes" if flag else "no"


def section_feature_reward(paths: RunPaths, m: FeatureRewardResult | None) -> str:
    """The section's Markdown; "not run" when chapter 08 has not written its metrics."""
    if m is None:
        return "## Feature reward\n\nChapter 08 not run.\n"
    gate = [
        "| readout | AUROC [95 % CI] | Spearman ρ [95 % CI] | permutation p | n (correct) |",
        "|---|---|---|---|---|",
    ]
    gate += [
        f"| {r.name} | {_f(r.auroc)} {_ci(r.auroc_ci)} | {_f(r.spearman_rho)} {_ci(r.spearman_ci)} "
        f"| {_f(r.auroc_p_perm)} | {r.n} ({r.n_correct}) |"
        for r in m.stage_gate
    ]
    arms = [
        "| arm | weights (correct, feature) | held-out before [CI] | after [CI] | fixed / broken | McNemar p "
        "| feature reward, first → last step | reward hacking |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in m.arms:
        h = a.heldout
        first, last = a.steps[0], a.steps[-1]
        arms.append(
            f"| {a.arm} | {a.correctness_weight:g}, {a.feature_weight:g} | {h.k_before}/{h.n} {_ci(h.ci_before)} "
            f"| {h.k_after}/{h.n} {_ci(h.ci_after)} | {h.b} / {h.c} | {h.p_mcnemar:.3f} "
            f"| {first.feature_mean:+.3f} → {last.feature_mean:+.3f} | {_yes_no(a.hacking)} |"
        )
    g = m.grpo
    figs = sorted(paths.figures.glob("08_*.png"))
    return (
        "## Feature reward: Stage Gate 1 and GRPO (chapter 08)\n\n"
        f"The reward reads the residual stream after layer {m.layer} ({m.hook_model} model) at every answer "
        f"position: {len(m.features)} SAE features ({m.reward_features}, {m.weighting} weights, caps at the "
        f"{m.cap_quantile:g} quantile), bounded in [{m.bound[0]:+.2f}, {m.bound[1]:+.2f}].\n\n"
        f"**Did the feature reward predict correctness?** {m.stage_gate_verdict}\n\n" + "\n".join(gate) + "\n\n"
        f"**Did training on it help?** {m.training_verdict}\n\n"
        f"GRPO: {g.steps} steps × {g.prompts_per_step} question(s) × {g.num_generations} samples per arm, LoRA "
        f"r {g.lora_r} on {', '.join(g.lora_targets)}, lr {g.learning_rate:g}, temperature {g.temperature:g}, "
        f"seed {g.seed}.\n\n"
        + "\n".join(arms)
        + "\n\n"
        + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs)
        + "\n"
    )
