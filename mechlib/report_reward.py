"""``REPORT.md``'s chapter 08 section: the feature reward, Stage Gate 1 and the GRPO arms.

Kept apart from :mod:`mechlib.report` (which holds chapters 01-07) so neither grows past a
readable size; it reads only :class:`mechlib.results.FeatureRewardResult`.
"""

from __future__ import annotations

from mechlib.paths import RunPaths
from mechlib.results import ArmResult, FeatureRewardResult
from mechlib.stats import format_p


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _hacking(a: ArmResult) -> str:
    """The arm's reward-hacking cell; an arm with no verdict says why (no feature weight, or too few steps)."""
    if a.hacking is None:
        return "— (not rewarded for the features)" if a.feature_weight == 0 else "— (too few steps)"
    return "yes" if a.hacking else "no"


def stage_gate_table(m: FeatureRewardResult) -> str:
    """Stage Gate 1 as a Markdown table: each readout's AUROC, Spearman ρ, permutation p (plain and within
    question types) and n."""
    rows = [
        "| readout | AUROC [95 % CI] | Spearman ρ [95 % CI] | permutation p | p, shuffled within type | n (correct) |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {r.name} | {_f(r.auroc)} {_ci(r.auroc_ci)} | {_f(r.spearman_rho)} {_ci(r.spearman_ci)} "
        f"| {format_p(r.auroc_p_perm)} | {'—' if r.p_within_type is None else format_p(r.p_within_type)} "
        f"| {r.n} ({r.n_correct}) |"
        for r in m.stage_gate
    ]
    return "\n".join(rows)


def arms_table(m: FeatureRewardResult) -> str:
    """The GRPO arms as a Markdown table: held-out accuracy before/after, McNemar p, the reward's trend."""
    rows = [
        "| arm | weights (correct, feature) | held-out before [CI] | after [CI] | fixed / broken | McNemar p "
        "| feature reward, first → last step | reward hacking |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in m.arms:
        h = a.heldout
        first, last = a.steps[0], a.steps[-1]
        rows.append(
            f"| {a.arm} | {a.correctness_weight:g}, {a.feature_weight:g} | {h.k_before}/{h.n} {_ci(h.ci_before)} "
            f"| {h.k_after}/{h.n} {_ci(h.ci_after)} | {h.b} / {h.c} | {format_p(h.p_mcnemar)} "
            f"| {first.feature_mean:+.3f} → {last.feature_mean:+.3f}{_rho(a)} | {_hacking(a)} |"
        )
    return "\n".join(rows)


def _rho(a: ArmResult) -> str:
    """The trend behind the hacking column, when there is one: ρ with the step and its one-sided p."""
    t = a.trend
    return "" if t is None else f" (ρ {t.rho:+.2f}, p {format_p(t.p)})"


def _grpo_line(m: FeatureRewardResult) -> str:
    g = m.grpo
    return (
        f"GRPO: {g.steps} steps × {g.prompts_per_step} question(s) × {g.num_generations} samples per arm, LoRA "
        f"r {g.lora_r} on {', '.join(g.lora_targets)}, lr {g.learning_rate:g}, temperature {g.temperature:g}, "
        f"seed {g.seed}."
    )


def _reward_line(m: FeatureRewardResult) -> str:
    return (
        f"The reward reads the residual stream after layer {m.layer} ({m.hook_model} model) at every answer "
        f"position: {len(m.features)} SAE features ({m.reward_features}, {m.weighting} weights, caps at the "
        f"{m.cap_quantile:g} quantile), bounded in [{m.bound[0]:+.2f}, {m.bound[1]:+.2f}]."
    )


def section_feature_reward(paths: RunPaths, m: FeatureRewardResult | None) -> str:
    """The section's Markdown; "not run" when chapter 08 has not written its metrics."""
    if m is None:
        return "## Feature reward\n\nChapter 08 not run.\n"
    figs = sorted(paths.figures.glob("08_*.png"))
    return (
        "## Feature reward: Stage Gate 1 and GRPO (chapter 08)\n\n"
        f"{_reward_line(m)}\n\n"
        f"**Did the feature reward predict correctness?** {m.stage_gate_verdict}\n\n{stage_gate_table(m)}\n\n"
        f"**Did training on it help?** {m.training_verdict}\n\n{_grpo_line(m)}\n\n{arms_table(m)}\n\n"
        + "\n".join(f"![{f.stem}](figures/{f.name})" for f in figs)
        + "\n"
    )


def card_section(m: FeatureRewardResult | None) -> str:
    """The model card's section on chapter 08: what the SAE's features are worth as a reward.

    Why on the card: a reader deciding whether to reuse this SAE learns whether its features predict
    correctness beyond simpler readouts, and whether optimising them helped, on this run's data.
    """
    head = "## The SAE's features as a reward (chapter 08)\n\n"
    if m is None:
        return head + "*Chapter 08 has not run for this run, so this section is empty.*\n"
    labels = (
        f" **Placeholder labels** ({m.placeholder_labels:g} marked correct at random): these numbers test the "
        "code path, not the model.\n\n"
        if m.labels == "placeholder"
        else "\n\n"
    )
    return (
        head
        + _reward_line(m)
        + labels
        + f"Stage Gate 1, on {m.n_heldout} held-out answers:\n\n{stage_gate_table(m)}\n\n"
        + f"{_grpo_line(m)}\n\n{arms_table(m)}\n"
        + f"\n**What this run found.** {m.finding}\n"  # the finding states both verdicts in words
    )
