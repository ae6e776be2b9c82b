"""Chapter 08's tables, verdicts and finding, written from the run's numbers.

Why a module: the notebook should read as a paper section, and the sentences it prints (and
``REPORT.md`` repeats) must follow the numbers when a rerun changes them — so the rules that turn
numbers into words live here, in one place, with tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import spearmanr

from mechlib.contrast import FeatureContrast
from mechlib.feature_reward import Calibration, FeatureRewardSpec
from mechlib.grpo import ArmRun, GrpoSettings, StepLog
from mechlib.grpo_eval import AccuracyChange, EvalResult
from mechlib.grpo_samples import SAMPLES_FILE, last_step, read_samples
from mechlib.io import sha256_file
from mechlib.paths import RunPaths
from mechlib.plots_reward import ArmAccuracy
from mechlib.readouts import ReadoutScore
from mechlib.records import Record
from mechlib.results.reward import ArmResult, GateInputs, Trend
from mechlib.stats import format_p

SELECTIONS = {
    "chapter05": "chapter 05's features (last prompt token)",
    "answer_tokens": "features ranked on the contrast answers",
}
READOUT_NAMES = {"chapter05": "SAE reward (chapter 05 features)", "answer_tokens": "SAE reward (answer-token features)"}
ALPHA = 0.05
MIN_TREND_STEPS = 10  # fewer steps than this: a curve's rise cannot be told from sampling noise


def feature_table(spec: FeatureRewardSpec, p_within_type: Mapping[int, float | None] | None = None) -> str:
    """The reward's features, one line each: id, signed weight and cap; with ``p_within_type`` (feature id to
    its ranking's within-question-type p) a ``p type`` column, where a feature's contrast that the question type
    explains shows before any held-out test."""
    ps = p_within_type or {}
    typed = any(ps.get(f.feature) is not None for f in spec.features)
    lines = [f"{'feature':>8} {'weight':>8} {'cap':>8}" + (f" {'p type':>7}" if typed else "")]
    for f in spec.features:
        p = ps.get(f.feature)
        cell = f" {'—' if p is None else format_p(p):>7}" if typed else ""
        lines.append(f"{f.feature:>8} {f.weight:>+8.3f} {f.cap:>8.3f}{cell}")
    return "\n".join(lines)


def selection_summary(
    calibrated: Mapping[str, Calibration],
    trained: str,
    rankings: Mapping[str, Sequence[FeatureContrast]] | None = None,
) -> str:
    """Each selection's features after calibration, with its bound and what was dropped; marks the one GRPO uses.
    ``rankings``: the rows each selection chose from; where they carry a within-type p (both rankings do, on
    a task with several question types) its table shows it, and a last line per selection counts those below
    ALPHA."""
    out, counts = [], []
    for name, cal in calibrated.items():
        lo, hi = cal.spec.bound
        mark = "  <- GRPO trains with this one" if name == trained else ""
        out.append(f"{SELECTIONS[name]}: {len(cal.spec.features)} features, bound [{lo:+.2f}, {hi:+.2f}]{mark}")
        if cal.dropped:
            out.append(f"  dropped (never fire on the contrast answers): {list(cal.dropped)}")
        ps = {r.feature: r.p_within_type for r in (rankings or {}).get(name, ())}
        out.append("  " + feature_table(cal.spec, ps).replace("\n", "\n  "))
        tested = [p for f in cal.spec.features if (p := ps.get(f.feature)) is not None]
        if tested:
            counts.append(f"  {SELECTIONS[name]}: {sum(p < ALPHA for p in tested)} of {len(tested)} below {ALPHA:g}")
    if counts:
        out.append("p type: each feature's contrast tested with labels shuffled within question type, where its")
        out.append("  ranking measured it (in-sample; a large p says the type explains the contrast)")
        out.extend(counts)
    return "\n".join(out)


def save_specs(calibrated: Mapping[str, Calibration], trained: str, folder: Path) -> tuple[Path, Path | None]:
    """Save the selection GRPO trains with as ``feature_reward.json`` (what the arms and a TRL user load)
    and the other one as ``feature_reward_<name>.json``: Stage Gate 1 scores both, so a reader needs
    both specs to recheck its rows. Returns (trained, other); other is None with a single selection."""
    trained_file = folder / "feature_reward.json"
    calibrated[trained].spec.save(trained_file)
    other_file = None
    for name, cal in calibrated.items():
        if name != trained:
            other_file = folder / f"feature_reward_{name}.json"
            cal.spec.save(other_file)
    return trained_file, other_file


def gate_inputs(
    ids: Sequence[str], correct: ArrayLike, scores: Mapping[str, ArrayLike], types: Sequence[str]
) -> GateInputs:
    """Stage Gate 1's inputs as saved with the chapter's metrics; ``scores`` in the gate's row order."""
    labels = np.asarray(correct, dtype=bool).reshape(-1)
    columns = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores.values()]
    if labels.size != len(ids) or len(types) != len(ids) or any(c.size != len(ids) for c in columns):
        raise ValueError(
            f"gate inputs: {len(ids)} ids, {labels.size} labels, {len(types)} types, "
            f"scores of {[c.size for c in columns]}"
        )
    return GateInputs(ids=list(ids), correct=labels.tolist(), scores=[c.tolist() for c in columns], types=list(types))


def arm_cache_tag(model: str, dtype: str, hook_model: str, spec_file: Path, sae_path: str) -> str:
    """What a saved GRPO arm depends on beyond its settings and prompts (:func:`mechlib.grpo.train_arm`'s
    ``cache_tag``): the base model, the reward's features and caps, and the SAE's bytes — a change in any
    retrains the arm instead of reloading a stale adapter."""
    sae = sha256_file(sae_path) if Path(sae_path).is_file() else sae_path  # a hub SAE: its hf: address
    return f"{model}|{dtype}|{hook_model}|{sha256_file(spec_file)}|{sae}"


def feature_trend(steps: Sequence[StepLog]) -> Trend | None:
    """Spearman ρ of the feature reward with the step number and its one-sided p for a rise (scipy.stats).

    Why a test and not "the second half's mean beats the first's": each step's mean is over a few sampled
    completions of one or two questions, so over 40 steps the second half comes out ahead about half the
    time by chance alone, and a verdict of reward hacking would follow the noise. None below 3 finite
    points or for a constant curve (no ρ).
    """
    points = [(s.step, s.feature_mean) for s in steps if math.isfinite(s.feature_mean)]
    if len(points) < 3 or len({v for _, v in points}) < 2:
        return None
    result = spearmanr([x for x, _ in points], [v for _, v in points], alternative="greater")
    return Trend(float(result.statistic), float(result.pvalue))


def _improved(change: AccuracyChange) -> bool:
    return change.k_after > change.k_before and change.p_mcnemar < ALPHA


def arm_result(
    run: ArmRun, change: AccuracyChange, before: Sequence[Record], after: Sequence[Record], paths: RunPaths
) -> ArmResult:
    """The metrics row of one arm. ``hacking``: the arm was rewarded for the features, its feature reward
    rose significantly with the step (:func:`feature_trend`, one-sided p < :data:`ALPHA`), and its held-out
    accuracy did not improve significantly; ``None`` (cannot tell) with fewer than :data:`MIN_TREND_STEPS`
    steps or for an arm not rewarded for the features."""
    trend = feature_trend(run.steps)
    readable = run.arm.feature_weight > 0 and trend is not None and len(run.steps) >= MIN_TREND_STEPS
    samples_file = Path(run.adapter_dir) / SAMPLES_FILE
    return ArmResult(
        arm=run.arm.name,
        correctness_weight=run.arm.correctness_weight,
        feature_weight=run.arm.feature_weight,
        steps=list(run.steps),
        train_seconds=run.train_seconds,
        resumed=run.resumed,
        adapter=_relative(run.adapter_dir, paths),
        heldout=change,
        records=_relative(paths.records / f"grpo_{run.arm.slug}.jsonl", paths),
        n_changed=_n_changed(before, after),
        hacking=None if not readable or trend is None else bool(trend.p < ALPHA and not _improved(change)),
        feature_trend_rho=None if trend is None else trend.rho,
        feature_trend_p=None if trend is None else trend.p,
        samples=_relative(samples_file, paths) if samples_file.is_file() else None,
    )


def _n_changed(before: Sequence[Record], after: Sequence[Record]) -> int:
    """Held-out answers whose text the adapter changed (paired by question id)."""
    was = {r.id: r.generation for r in before}
    return sum(1 for r in after if was.get(r.id) != r.generation)


def _relative(path: str | Path, paths: RunPaths) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(paths.root.resolve()))
    except ValueError:
        return str(p)


def curve(arm: ArmResult) -> tuple[list[int], list[float], list[float]]:
    """(steps, sampled accuracy, mean feature reward) of an arm, for the training-curves figure."""
    return [s.step for s in arm.steps], [s.correct_mean for s in arm.steps], [s.feature_mean for s in arm.steps]


def accuracy_row(arm: ArmResult) -> ArmAccuracy:
    h = arm.heldout
    return ArmAccuracy(arm.arm, h.n, h.accuracy_before, h.ci_before, h.accuracy_after, h.ci_after)


def arm_timings(arms: Sequence[ArmResult], evaluated: Mapping[str, EvalResult]) -> str:
    """Training seconds per arm (or "reloaded" from a saved adapter) and where each arm's held-out answers came
    from — run state, not results, so not part of the checked table (a rerun reloads and reuses everything)."""
    lines = []
    for a in arms:
        e = evaluated[a.arm]
        trained = "reloaded" if a.resumed else f"trained in {a.train_seconds:.1f} s"
        lines.append(
            f"{a.arm}: {trained}; held-out answers: {e.n_verified} verified unchanged, {e.n_regenerated} generated, "
            f"{e.n_cached} from an earlier run"
        )
    return "\n".join(lines)


def last_samples(arms: Sequence[ArmResult], root: Path, width: int = 80) -> str:
    """Per arm, what its last step sampled, highest feature reward first, with both (unweighted) rewards:
    where a feature reward that rises for the wrong reason shows what it rewards (a repeated token,
    padding) before any curve can. Each completion on one line, cut at ``width`` characters."""
    lines = []
    seen: dict[tuple[str, ...], str] = {}  # an earlier arm's last-step completions, in order
    for a in arms:
        if a.samples is None:
            lines.append(f"{a.arm}: sampled completions not saved (an arm trained before they were kept)")
            continue
        last = last_step(read_samples(root / a.samples))
        same = seen.setdefault(tuple(s.completion for s in last), a.arm) if last else a.arm
        if same != a.arm:
            # every arm samples with the same seeds: until its adapter moves enough to change a sampled token
            # (an arm whose group scores all alike gets no gradient at all), it samples what the others do
            lines.append(
                f"{a.arm}, step {last[0].step}: the same completions as {same} (same seeds; neither adapter has "
                f"yet moved far enough to change a sampled token)"
            )
            continue
        lines.append(f"{a.arm}, step {last[0].step}:" if last else f"{a.arm}: no completions recorded")
        for s in last:
            text = " ".join(s.completion.split())
            text = text if len(text) <= width else text[: width - 1] + "…"
            lines.append(f"  correct {s.correct:.0f}  feature {s.feature:+.3f}  {text}")
    return "\n".join(lines)


def arm_table(arms: Sequence[ArmResult], settings: GrpoSettings) -> str:
    """Held-out accuracy before → after per arm, with the training curves' first and last steps."""
    head = (
        f"{len(arms)} arms × {settings.steps} steps × {settings.prompts_per_step} question(s) × "
        f"{settings.num_generations} samples (LoRA r {settings.lora_r}, lr {settings.learning_rate:g})\n"
    )
    lines = [
        f"{'arm':>20} {'w_ok':>5} {'w_feat':>6} {'before':>16} {'after':>16} {'b':>3} {'c':>3} {'McNemar p':>9} "
        f"{'feat 1st→last':>15} {'feat ρ (p)':>14} {'acc 1st→last':>13} {'changed':>7}"
    ]
    for a in arms:
        h = a.heldout
        first, last = a.steps[0], a.steps[-1]
        lines.append(
            f"{a.arm:>20} {a.correctness_weight:>5g} {a.feature_weight:>6g} "
            f"{_acc(h.k_before, h.n, h.ci_before):>16} {_acc(h.k_after, h.n, h.ci_after):>16} {h.b:>3} {h.c:>3} "
            f"{format_p(h.p_mcnemar):>9} {first.feature_mean:>+7.3f}→{last.feature_mean:<+7.3f} {_rho_cell(a):>14} "
            f"{first.correct_mean:>5.2f}→{last.correct_mean:<5.2f}  {a.n_changed:>6}"
        )
    return head + "\n".join(lines)


def _rho_cell(a: ArmResult) -> str:
    t = a.trend
    return "—" if t is None else f"{t.rho:+.2f} ({format_p(t.p)})"


def _acc(k: int, n: int, ci: tuple[float, float]) -> str:
    return f"{k / n:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def training_verdict(arms: Sequence[ArmResult]) -> str:
    """Whether any arm changed held-out accuracy, and whether reward hacking showed, in plain words."""
    if not arms:
        return "No GRPO arm ran."
    n_steps = len(arms[0].steps)
    parts = []
    for a in arms:
        h = a.heldout
        if h.k_after == h.k_before:  # as many fixed as broken (maybe none): McNemar still says if that is noise
            change = f"unchanged at {h.k_after}/{h.n}"
            sig = "McNemar p"
        else:
            change = f"{'rose' if h.k_after > h.k_before else 'fell'} from {h.k_before}/{h.n} to {h.k_after}/{h.n}"
            sig = f"{'significantly' if h.p_mcnemar < ALPHA else 'not significantly'}: McNemar p"
        parts.append(
            f"{a.arm}: held-out accuracy {change} ({sig} = {format_p(h.p_mcnemar)}, {h.b} fixed, {h.c} broken)"
        )
    text = "; ".join(parts) + "."
    if n_steps < MIN_TREND_STEPS:
        return text + (
            f" With {n_steps} steps per arm the curves are too short to tell a trend from sampling noise, so whether "
            "reward hacking happened cannot be read here: this is a demonstration that the loop runs, not a test of "
            "whether the feature reward helps."
        )
    hacked = [a for a in arms if a.hacking]
    if hacked:
        return text + (
            f" Reward-hacking signature in {'; '.join(f'{a.arm} ({_trend(a)})' for a in hacked)}: the feature reward "
            "rose with the training step while held-out accuracy did not improve."
        )
    rewarded = [a for a in arms if a.hacking is not None]
    trends = "; ".join(f"{a.arm}: {_trend(a)}" for a in rewarded)
    return (
        text + " No arm rewarded for the features showed the reward-hacking signature (a feature reward rising "
        f"significantly with the step while held-out accuracy does not improve){': ' + trends if trends else ''}."
    )


def _trend(a: ArmResult) -> str:
    t = a.trend
    return "no trend" if t is None else f"Spearman ρ {t.rho:+.2f} with the step, one-sided p {format_p(t.p)}"


def reward_finding(
    trained: ReadoutScore,
    other: ReadoutScore | None,
    gate_verdict: str,
    arms: Sequence[ArmResult],
    settings: GrpoSettings,
) -> str:
    """The chapter's "What this run found": Stage Gate 1 (``gate_verdict``, written by
    :func:`mechlib.readouts.stage_gate_verdict` for ``trained``, the selection GRPO trains with, and the other
    selection's AUROC for comparison), then what training on the reward did."""
    # the verdict already gives the trained selection's AUROC, interval, p and n: only ρ is added
    gate = f"Stage Gate 1: {gate_verdict} Its Spearman ρ with correctness: {_num(trained.spearman_rho)}."
    if other is not None:
        gate += (
            f" The other selection, {other.name}, scored AUROC {_num(other.auroc)} [{_ci(other.auroc_ci)}]"
            + ("" if other.p_within_type is None else f" (within question types p = {format_p(other.p_within_type)})")
            + " on the same answers (chosen on the contrast set too, so the comparison is fair; which one trains is "
            "a parameter, fixed before looking at held-out answers)."
        )
    return f"{gate} GRPO ({settings.steps} steps per arm): {training_verdict(arms)}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"{ci[0]:.2f}, {ci[1]:.2f}"
