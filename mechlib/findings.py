""" "What this run found": each chapter's closing paragraph, written from that run's numbers.

Why: a chapter that ends on bare printouts leaves the reading to the reader, and a paragraph
written once for one run is wrong for the next. Each function here turns one chapter's results
into a few sentences — the result with its uncertainty, how it stands against the study's card,
the caveat that matters — and picks its words from the statistics: nothing is called
significant unless its p-value is below :data:`ALPHA`. The chapters print the paragraph and
save it in their metrics; ``REPORT.md`` repeats it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mechlib.scoring import ALTERNATIVES, RULE_LABELS, RuleAccuracy
from mechlib.sensitivity import ALPHA  # one significance level for verdicts and findings
from mechlib.stats import format_p
from mechlib.wrong_answers import OPERATION_NAMES, WrongAnswers


@dataclass(frozen=True)
class Card:
    """The study's published numbers (Gemma 4 E4B, layer-21 SAE), for the side-by-side sentences."""

    var_explained_global: float = 0.939
    mse: float = 0.181
    l0: int = 128
    coverage: float = 0.62
    dead: int = 0
    baseline_accuracy: tuple[float, float] = (0.45, 0.50)
    peak_layer: int = 27
    peak_top_abs_d: float = 0.896
    mean_resid_norm: float = 95.3  # at the peak layer: the unit of the steering scales
    n_heldout: int = 50
    n_layers: int = 42
    spearman_rho: float = 0.540
    english_layer: int = 30


CARD = Card()


def _percent(x: float) -> str:
    """``x`` as a percentage to one decimal, or to as many more as it takes not to round a part to 0 % or 100 %.

    Why: 4607 of 4608 latents firing is 99.98 %, and "100.0 %" would say every latent fired.
    """
    text = f"{x:.1%}"
    for digits in range(2, 7):
        if x in (0.0, 1.0) or float(text[:-1]) not in (0.0, 100.0):
            break
        text = f"{x:.{digits}%}"
    return text


def _significance(p: float, se: float | None = None) -> str:
    value = (
        "p < 0.001" if p < 0.001 and se is None else f"p = {format_p(p)}" + (f" ± {se:.3f}" if se is not None else "")
    )
    return f"{value}, significant at {ALPHA}" if p < ALPHA else f"{value}, not significant at {ALPHA}"


def baseline_finding(
    n: int,
    n_correct: int,
    ci95: tuple[float, float],
    finished: float,
    by_rule: Sequence[RuleAccuracy],
    max_new_tokens: int,
    wrong: Sequence[WrongAnswers] = (),
) -> str:
    """Chapter 04's result in words, from this run's numbers: accuracy, how many answers finished,
    whether the alternative scoring rules tell the same story, and (generated task) how the wrong
    answers went wrong (:func:`mechlib.wrong_answers.wrong_answers_by_kind`)."""
    acc = {a.rule: a for a in by_rule}
    spread = [a.accuracy for a in by_rule if a.n]
    text = (
        f"The model answers {n_correct} of {n} questions correctly ({n_correct / n:.3f}, 95 % CI "
        f"[{ci95[0]:.3f}, {ci95[1]:.3f}]); {_percent(finished)} of its answers end by themselves (EOS or a "
        f"'#### N' line) within {max_new_tokens} new tokens. "
    )
    text += (
        "Under the alternative rules: "
        + ", ".join(
            f"{RULE_LABELS[r]} {acc[r].accuracy:.3f}" + (f" (on {acc[r].n})" if acc[r].n != n else "")
            for r in ALTERNATIVES
            if acc[r].n
        )
        + ". "
    )
    gap = max(spread) - min(spread)
    text += (
        f"The rules agree within {100 * gap:.1f} percentage points, so accuracy here does not hinge on the parser."
        if gap <= 0.05
        else f"The rules differ by up to {100 * gap:.1f} percentage points: accuracy depends on how answers are "
        f"read, and the later chapters report each result under every rule."
    )
    if finished < 0.9:
        text += (
            " Fewer than 90 % of the answers finished: part of what is scored as wrong is length, not "
            "arithmetic (the 'finished only' rule leaves those answers out)."
        )
    text += _wrong_answers_sentence(wrong)
    lo, hi = CARD.baseline_accuracy
    return text + f" (The card: {lo:.0%}–{hi:.0%} for Gemma 4 E4B on GSM8K.)"


def _wrong_answers_sentence(rows: Sequence[WrongAnswers]) -> str:
    """ " Of the N wrong answers, …" over all question types; "" without wrong generated answers."""
    n = sum(r.n_wrong for r in rows)
    if not n:
        return ""
    other = sum((Counter(r.by_operation) for r in rows), Counter[str]())
    which = ", ".join(f"{OPERATION_NAMES[op]} in {k}" for op, k in sorted(other.items(), key=lambda ok: -ok[1]))
    return (
        f" Of the {n} wrong answers, {sum(r.wrong_operation for r in rows)} write an operation the question "
        f"does not need" + (f" ({which})" if which else "") + f", {sum(r.right_operation for r in rows)} write "
        f"the needed one and get the number wrong, and {sum(r.no_calculation for r in rows)} write no "
        f"calculation: 'wrong' mixes choosing the operation with carrying it out."
    )


BOS_SINK_RATIO = 3.0  # a BOS this many times the mean token norm is called an outlier (SmolLM2's: ~150x)


def collect_finding(
    n_tokens: int, heldout_tokens: int, layer: int, d_model: int, mean_norm: float, bos_ratio: float
) -> str:
    text = (
        f"Collected {n_tokens} training and {heldout_tokens} held-out tokens of the {d_model}-dimensional "
        f"residual stream after layer {layer}. Kept tokens have a mean norm of {mean_norm:.1f}; "
    )
    if bos_ratio >= BOS_SINK_RATIO:
        return text + (
            f"the BOS at the start of a row is {bos_ratio:.0f}x longer, which is why it (and the position after "
            f"it) is excluded: a handful of such tokens would otherwise dominate the SAE's reconstruction loss."
        )
    return text + (  # e.g. random weights: no attention sink has formed
        f"the BOS at the start of a row is no outlier here ({bos_ratio:.1f}x), but it is excluded all the same: in "
        f"a trained model it is an attention sink whose norm would dominate the SAE's reconstruction loss."
    )


def training_finding(
    steps: int, tokens: int, epochs: float, final_fvu: float | None, n_dead: int | None, d_sae: int
) -> str:
    if final_fvu is None:
        return "A published SAE was loaded, not trained: chapter 03 measures it on this run's held-out tokens."
    dead = (
        "no latent was dead at the end (the card also reports 0)"
        if not n_dead
        else f"{n_dead} of {d_sae} latents ({n_dead / d_sae:.1%}) were dead at the end (the card reports 0)"
    )
    return (
        f"Trained for {steps} steps on {tokens} tokens ({epochs:.1f} epochs of the collected activations); the "
        f"last training batch's FVU is {final_fvu:.3f}, and {dead}. Training-batch FVU flatters the SAE: chapter "
        f"03 measures it on held-out tokens."
    )


def sae_finding(
    var_explained: float,
    var_explained_global: float,
    pca_var_explained: float,
    k: int,
    delta_ce: float,
    kl: float,
    ce_recovered: float | None,
    l0: float,
    coverage: float,
    n_tokens: int,
) -> str:
    beats = "beats" if var_explained > pca_var_explained else "does not beat"
    text = (
        f"On {n_tokens} held-out tokens the SAE explains {var_explained:.3f} of the variance per dimension "
        f"({var_explained_global:.3f} by the seed's global formula, the one behind the card's "
        f"{CARD.var_explained_global}), and it {beats} the {k}-component PCA baseline ({pca_var_explained:.3f}). "
    )
    if delta_ce >= 0:
        text += f"Spliced into the model it adds {delta_ce:.3f} nats of next-token loss (KL {kl:.3f})"
    else:  # seen on random-weight models, whose clean predictions are noise too
        text += f"Spliced into the model it lowers next-token loss by {-delta_ce:.3f} nats (KL {kl:.3f})"
    if ce_recovered is None:
        text += ". "
    elif ce_recovered >= 0:
        text += f", recovering {ce_recovered:.1%} of the loss that mean-ablating the layer costs. "
    else:  # (CE_mean − CE_SAE) / (CE_mean − CE_clean) < 0: the SAE is worse than the ablation, or the ablation helps
        text += (
            f", and the loss recovered against mean-ablating the layer is {ce_recovered:.1%} (below zero, so not "
            f"a share of that loss). "
        )
    text += (
        f"L0 is {l0:.0f} and {_percent(coverage)} of the latents fire on held-out tokens (card: coverage "
        f"{CARD.coverage}). The card's values come from a 12.8x SAE with k = 128 on Gemma 4 E4B after 1 B "
        f"tokens: compare formulas and orders of magnitude, not digits."
    )
    return text


def layers_finding(
    peak: int,
    n_layers: int,
    top_abs_d: float,
    p: float,
    p_se: float,
    within_p: float | None,
    n_types: int,
    rho: float | None,
    rho_p: float | None,
    peak_layers_by_rule: Sequence[int | None],
    rho_within_p: float | None = None,
    feature_p_within_type: Sequence[float | None] = (),
    sae_layer: int | None = None,
) -> str:
    """``peak_layers_by_rule``: the peak layer under each alternative scoring rule (None: no peak).
    ``rho_within_p``: the held-out projection's association tested with labels shuffled within question
    type (None: one type, or not computed). ``feature_p_within_type``: the same test for each of the top
    SAE features at ``sae_layer``, in rank order (None: one type)."""
    text = (
        f"Correct and wrong questions differ most after layer {peak} of {n_layers} (mean top-10 |d| "
        f"{top_abs_d:.3f}; against the max-over-layers permutation null {_significance(p, p_se)}). The card "
        f"found layer {CARD.peak_layer} of {CARD.n_layers} (|d| {CARD.peak_top_abs_d}) without a null. "
    )
    if within_p is not None and n_types > 1:
        text += (
            f"Shuffling labels only within each of the {n_types} question types gives {_significance(within_p)}: "
            + (
                "the states predict correctness beyond the question type. "
                if within_p < ALPHA
                else "part of the contrast may be the question type rather than correctness. "
            )
        )
    if rho is not None and rho_p is not None:
        text += (
            f"On the held-out questions, projecting onto the steering direction gives Spearman ρ = {rho:.3f} "
            f"({_significance(rho_p)}; the card's companion model: {CARD.spearman_rho}). "
        )
        if rho_within_p is not None:
            text += f"With the labels shuffled only within question types, {_significance(rho_within_p)}: " + (
                "the projection predicts correctness inside a type too. "
                if rho_within_p < ALPHA
                else "inside a type it does not predict correctness detectably, so the held-out ρ may be mostly "
                "the question type. "
            )
    # None: too few questions on one side under that rule, so no peak: neither the same layer nor another
    moved = [layer for layer in peak_layers_by_rule if layer is not None and layer != peak]
    n_none = sum(layer is None for layer in peak_layers_by_rule)
    if moved:
        text += (
            f"{len(moved)} of {len(peak_layers_by_rule)} alternative scoring rules put the peak elsewhere: the "
            f"choice of layer depends on how answers are scored"
        )
        text += f" ({n_none} more had too few questions on one side)." if n_none else "."
    elif n_none:
        text += (
            f"Every alternative scoring rule with a peak finds the same layer ({n_none} had too few questions on "
            f"one side)."
        )
    else:
        text += "Every alternative scoring rule finds the same peak layer."
    return text + _features_within_type(feature_p_within_type, sae_layer)


def _features_within_type(ps: Sequence[float | None], layer: int | None) -> str:
    """How many top SAE features keep their contrast with labels shuffled within question type: those that
    do not may read the type. The p-values are in-sample (the features were chosen on these answers)."""
    tested = [p for p in ps if p is not None]
    if not tested:
        return ""
    kept = sum(p < ALPHA for p in tested)
    where = "" if layer is None else f" at layer {layer}"
    return (
        f" Of the top {len(tested)} SAE features{where}, {kept} keep p < {ALPHA:g} with the labels shuffled "
        f"within question types (in-sample: these answers chose them, so that is weak evidence); the other "
        f"{len(tested) - kept} may read the question type rather than correctness."
    )


def steering_finding(
    layer: int,
    effects: Sequence[tuple[float, str, float, float]],
    survives: int,
    random_deltas: Sequence[float],
    caa_delta_at_control: float | None,
) -> str:
    """``effects``: (scale, effect, delta, McNemar p) per scale under the primary rule; ``survives``:
    how many of those conclusions hold under every scoring rule."""
    moved = [(s, e, d, p) for s, e, d, p in effects if e != "no significant change"]
    if not moved:
        lo, hi = min(d for _, _, d, _ in effects), max(d for _, _, d, _ in effects)
        spread = f"Δ {lo:+.3f} at every scale" if lo == hi else f"Δ from {lo:+.3f} to {hi:+.3f}"
        text = (
            f"No steering scale at layer {layer} changes held-out accuracy significantly (exact McNemar, "
            f"p ≥ {ALPHA} for all {len(effects)} scales; {spread}). "
        )
    else:
        text = (
            f"At layer {layer}: "
            + "; ".join(f"{100 * s:+g} % {e} (Δ {d:+.3f}, p {format_p(p)})" for s, e, d, p in moved)
            + ". "
        )
    text += f"{survives} of {len(effects)} of these conclusions hold under every scoring rule. "
    if random_deltas and caa_delta_at_control is not None:
        lo, hi = min(random_deltas), max(random_deltas)
        text += (
            f"Random directions pushed as hard moved accuracy by {lo:+.3f} to {hi:+.3f}, CAA by "
            f"{caa_delta_at_control:+.3f}: "
        )
        if lo <= caa_delta_at_control <= hi:
            text += (
                "within the random range, so this run cannot tell the contrastive direction from any push of that size."
            )
        else:
            text += (
                f"{'above' if caa_delta_at_control > hi else 'below'} the range of the {len(random_deltas)} random "
                f"direction{'s' if len(random_deltas) > 1 else ''} — the spread of {len(random_deltas)} draws, not a "
                f"test; chapter 06 compares CAA with each of them by McNemar."
            )
    return text


def lens_finding(commit: int | None, n_layers: int, last_token: str, last_prob: float, threshold: float = 0.5) -> str:
    """Chapter 07's sentence. ``threshold`` is the English share a layer must reach (``>=``), named in the
    text because a layer exactly at it (6 of 12 positions at 0.5) counts."""
    depth = CARD.english_layer / CARD.n_layers
    card = f"the card's first English layer: {CARD.english_layer} of {CARD.n_layers} ({depth:.0%} of depth)"
    share = f"English words at {threshold:.0%} or more of the positions"
    if commit is None:
        head = f"No layer's top tokens are {share} ({card}). "
    else:
        head = (
            f"The lens's top tokens are {share} from layer {commit} of {n_layers} "
            f"({commit / n_layers:.0%} of depth; {card}). "
        )
    return head + f"At the last position the final layer predicts {last_token!r} (p = {last_prob:.2f})."
