"""Contrastive activation addition (CAA): the steering hook, the scale sweep, and its paired statistics.

Why: the study adds ``scale × (mean residual norm) × unit(mean(h|correct) − mean(h|wrong))`` to
the residual stream after one decoder layer, at every position, during greedy generation, and
reports accuracy per scale on 50 held-out questions. With n = 50 a few flipped answers look like a
trend, so each row here also carries the exact McNemar p-value on the discordant pairs and a
paired bootstrap interval for Δ accuracy, and the recovered question sets are compared across
scales (do different scales fix the *same* questions, or is it noise?).

The hook is a context manager whose handle is removed in ``finally``: a failed generation never
leaves the model steered.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlib.hooks import add_forward_hook, layer_output_tensor, replace_layer_output
from mechlib.stats import bootstrap_ci, mcnemar_exact, wilson_ci


class SteeringError(ValueError):
    """A steering setting the book cannot use; the message names the value."""


def steering_delta(vector: Tensor, scale: float, mean_norm: float) -> Tensor:
    """``scale × mean_norm × vector / ‖vector‖`` — the exact vector the hook adds."""
    v = torch.as_tensor(vector).detach().float()
    if v.ndim != 1 or not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise SteeringError(f"the steering vector must be a finite, non-zero 1-D tensor, got shape {tuple(v.shape)}")
    if not (mean_norm > 0 and torch.isfinite(torch.tensor(mean_norm))):
        raise SteeringError(f"mean_norm must be a positive number, got {mean_norm!r}")
    return (float(scale) * float(mean_norm)) * (v / v.norm())


@contextlib.contextmanager
def steering_hook(layer_module: nn.Module, vector: Tensor, scale: float, mean_norm: float) -> Iterator[Tensor]:
    """Add ``scale × mean_norm × unit(vector)`` to ``layer_module``'s output at every position.

    Works for layers returning a Tensor (transformers 5, Gemma 4 included) or a tuple whose first
    item is the hidden state. During ``generate`` the hook fires at prefill and every decode step,
    so every position is steered once. Yields the added vector (float32); the hook is removed on
    exit, also when the body raises.
    """
    delta = steering_delta(vector, scale, mean_norm)
    cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def add(h: Tensor) -> Tensor:
        if h.shape[-1] != delta.shape[0]:
            raise SteeringError(f"steering vector has {delta.shape[0]} dims but the layer outputs {h.shape[-1]}")
        key = (h.dtype, h.device)
        if key not in cache:
            cache[key] = delta.to(device=h.device, dtype=h.dtype)
        return h + cache[key]

    def hook(_module, _inputs, out):
        return replace_layer_output(out, add(layer_output_tensor(out)))

    with add_forward_hook(layer_module, hook):
        yield delta


def mean_residual_norm(states, layer: int) -> float:
    """Mean ‖h‖₂ of the residual after ``layer`` over the contrast set's non-special prompt tokens.

    Taken from :class:`mechlib.contrast.LayerStates` (recorded in the same forward pass as the
    pooled states). Special tokens (BOS above all) are excluded: their norms are often far larger
    than ordinary tokens' and would inflate the unit in which scales are given.
    """
    norms = states.token_norm_mean
    if not 0 <= layer < len(norms):
        raise SteeringError(f"layer {layer} out of range: the states cover layers 0..{len(norms) - 1}")
    return float(norms[layer])


def vector_for_layer(states, split, layer: int, checkpoints_dir: str | os.PathLike[str], *, model: str,
                     peak_layer: int) -> tuple[dict[str, Any], Path]:
    """The steering vector for ``layer``: chapter 05's file at the peak, else built the same way.

    Off the peak, ``unit(mean(h|correct) − mean(h|wrong))`` is computed from chapter 05's cached
    contrast-set states at ``layer`` and saved as ``steering_vec_L{layer}.pt`` beside the peak's.
    """
    from mechlib.contrast import load_steering_vector, mean_difference, save_steering_vector

    path = Path(checkpoints_dir) / f"steering_vec_L{layer}.pt"
    if layer != peak_layer or not path.is_file():
        y = split.labels(split.contrast_ids)
        unit, raw = mean_difference(states.select(split.contrast_ids)[:, layer], y)
        save_steering_vector(path, unit, layer=layer, model=model, n_correct=int(y.sum()), n_wrong=int((~y).sum()),
                             mean_resid_norm=mean_residual_norm(states, layer), raw_diff_norm=raw,
                             pooling=states.pooling)
    vec = load_steering_vector(path)
    if int(vec["layer"]) != layer:
        raise SteeringError(f"{path}: holds a vector for layer {vec['layer']}, not {layer}")
    return vec, path


# --------------------------------------------------------------------------------------------
# The sweep and its table
# --------------------------------------------------------------------------------------------

def scale_tag(scale: float) -> str:
    """File-name tag of a scale: ``+0.05``, ``-0.05``, ``+0`` (6 significant digits: distinct scales, distinct files)."""
    return f"{float(scale):+g}"


def steer_records_path(records_dir: str | os.PathLike[str], layer: int, scale: float, tag: str = "") -> Path:
    """``records/steer_L{layer}{tag}_{scale}.jsonl``; ``tag`` names a sweep along another vector (``_rand0``)."""
    return Path(records_dir) / f"steer_L{layer}{tag}_{scale_tag(scale)}.jsonl"


def _sweep_files(records_dir: Path, layer: int, tag: str) -> list[Path]:
    """This sweep's records files only: ``steer_L17_+0.1.jsonl`` belongs to tag "", not to "_rand0"."""
    prefix = f"steer_L{layer}{tag}_"
    return [f for f in records_dir.glob(f"{prefix}*.jsonl")
            if re.fullmatch(r"[+-][0-9.e+-]+", f.name[len(prefix):-len(".jsonl")])]


class RowSteering:
    """A forward hook adding a vector per batch row: ``out[i] += deltas[i]``, or one ``[1, d]`` delta to every row.

    Why: a sweep can put several scales in one batch to fill it instead of running one half-empty
    pass per scale (a decode step at batch 128 costs far less than four at batch 32 on a GPU,
    ../shared/FIELD.md). The caller sets the deltas before each batch with :meth:`set_rows`; the
    values are copied *in place* into a buffer kept per shape, so a captured/compiled decode step
    keeps reading the right memory. A single row broadcasts over any batch, which lets
    :func:`mechlib.generate.generate_ids` run a shared prompt prefix once at batch 1.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}
        self._current: Tensor | None = None

    def set_rows(self, deltas: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        b = int(deltas.shape[0])
        buf = self._buffers.get(b)
        if buf is None or buf.device != device or buf.dtype != dtype or buf.shape != deltas.shape:
            buf = self._buffers[b] = torch.empty(deltas.shape, device=device, dtype=dtype)
        buf.copy_(deltas)
        self._current = buf

    def __call__(self, _module, _inputs, out):
        h = layer_output_tensor(out)
        d = self._current
        if d is None or d.shape[0] not in (1, h.shape[0]) or d.shape[1] != h.shape[-1]:
            raise SteeringError(f"row deltas of shape {None if d is None else tuple(d.shape)} do not fit the layer "
                                f"output {tuple(h.shape)}")
        return replace_layer_output(out, h + d[:, None, :])


def run_sweep(loaded, questions: Sequence[Any], *, layer: int, vector: Tensor, mean_norm: float,
              scales: Sequence[float], prompt_format: str, max_new_tokens: int, batch_size: int,
              records_dir: str | os.PathLike[str], progress: bool = True, tag: str = "",
              **generate_kwargs: Any) -> dict[float, list[Any]]:
    """Generate every held-out question at every scale with the steering hook on; records per scale.

    Each scale's questions go in batches of their own, longest prompts first, and a
    :class:`RowSteering` hook adds that scale's ``scale × mean_norm × unit(vector)`` to every row,
    at every position. Why one scale per batch: every row is then pushed alike, so the prompts'
    shared prefix (chat template, system prompt, worked example) runs once per batch instead of
    once per row (``share_prefix`` of :func:`mechlib.generate.generate_ids`) — on a CPU the
    prefill of that prefix was most of the sweep's time. Each scale's records go to
    ``records/steer_L{layer}_{scale}.jsonl`` in :mod:`mechlib.records`' format (with its
    settings sidecar), rewritten atomically after each batch, so a rerun resumes. A
    ``steer_L{layer}.meta.json`` remembers the vector and norm; if they changed, the old
    steered records are discarded, not reused. ``tag`` keeps a sweep along another vector (a
    random-direction control) in files of its own. ``generate_kwargs`` (``cache``, ``compile``) go to
    :func:`mechlib.generate.generate_ids`.
    """
    from mechlib.generate import eos_ids_of, generate_ids, pad_id_of
    from mechlib.io import atomic_write_json, read_json
    from mechlib.models import check_layer, decoder_layers
    from mechlib.prompts import build_prompt, encode_prompts
    from mechlib.records import open_records, score_generation, settings_for, write_records
    from mechlib.stopping import AnswerLineStop

    check_layer(loaded.model, layer)
    scales = list(dict.fromkeys(float(s) for s in scales))
    records_dir = Path(records_dir)
    meta = {"layer": int(layer), "mean_norm": round(float(mean_norm), 6), "model": loaded.name,
            "vector": [round(float(x), 6) for x in torch.as_tensor(vector).float().tolist()]}
    if tag and not re.fullmatch(r"_[A-Za-z0-9]+", tag):
        raise SteeringError(f"tag must be '_' and letters/digits (it goes into file names), got {tag!r}")
    sweep_meta = records_dir / f"steer_L{layer}{tag}.meta.json"
    if sweep_meta.is_file() and read_json(sweep_meta) != meta:
        for old in _sweep_files(records_dir, layer, tag):
            old.unlink()
    atomic_write_json(sweep_meta, meta)

    model, tok = loaded.model, loaded.tokenizer
    settings = settings_for(loaded, prompt_format, max_new_tokens)
    prompts = {q.id: build_prompt(tok, q.question, prompt_format) for q in questions}
    # reused records are re-scored with the current parser, exactly like the baseline's
    done = {s: open_records(steer_records_path(records_dir, layer, s, tag), settings, questions, prompts)
            for s in scales}
    todo = [(q, s) for q in questions for s in scales if q.id not in done[s]]
    if todo:
        enc = dict(zip(prompts, encode_prompts(tok, list(prompts.values()))))
        eos = eos_ids_of(model, tok)
        pad = pad_id_of(model, tok, eos)
        param = next(model.parameters())
        rows_hook = RowSteering()
        batches: list[list[tuple[Any, float]]] = []
        for s in scales:
            mine = sorted((qs for qs in todo if qs[1] == s), key=lambda qs: -len(enc[qs[0].id]))
            batches += [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        generate_kwargs.setdefault("share_prefix", True)
        with add_forward_hook(decoder_layers(model)[layer], rows_hook):
            for batch in tqdm(batches, desc=f"steer L{layer}{tag}", disable=not progress, unit="batch"):
                rows_hook.set_rows(steering_delta(vector, batch[0][1], mean_norm)[None], param.device, param.dtype)
                out = generate_ids(model, [enc[q.id] for q, _ in batch], max_new_tokens, len(batch), eos_ids=eos,
                                   pad_id=pad, sort_by_length=False, progress=False, stop_when=AnswerLineStop(tok),
                                   **generate_kwargs)
                for (q, s), row in zip(batch, out):
                    done[s][q.id] = score_generation(q, prompts[q.id], row, tok, max_new_tokens)
                for s in {s for _, s in batch}:
                    write_records(steer_records_path(records_dir, layer, s, tag),
                                  [done[s][q.id] for q in questions if q.id in done[s]])
    return {s: [done[s][q.id] for q in questions] for s in scales}


@dataclass(frozen=True)
class SteeringRow:
    """One row of the card's steering table, with the paired statistics it lacked."""

    scale: float
    perturbation: float  # % of the layer's mean residual norm (= 100 × scale)
    n: int
    accuracy: float
    accuracy_ci95: tuple[float, float]  # Wilson
    delta: float  # accuracy − baseline accuracy, same questions
    delta_ci95: tuple[float, float]  # paired percentile bootstrap
    recovered: int  # baseline-wrong → now right
    n_baseline_wrong: int
    broken: int  # baseline-right → now wrong
    net_flips: int  # recovered − broken
    mcnemar_p: float  # exact, on (recovered, broken)
    recovered_ids: list[str]
    broken_ids: list[str]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_ci95"], d["delta_ci95"] = list(self.accuracy_ci95), list(self.delta_ci95)
        return d


def correctness(records: Sequence[Any]) -> dict[str, bool]:
    """``{id: correct}`` from records (objects with ``.id``/``.correct`` or dicts)."""
    get = (lambda r, k: r[k]) if records and isinstance(records[0], Mapping) else getattr
    return {str(get(r, "id")): bool(get(r, "correct")) for r in records}


def steering_row(scale: float, baseline: Mapping[str, bool], steered: Mapping[str, bool], *,
                 n_bootstrap: int = 2000, seed: int = 0) -> SteeringRow:
    """Compare one scale's per-question correctness with the baseline on the same question ids."""
    if set(baseline) != set(steered) or not baseline:
        only_b, only_s = sorted(set(baseline) - set(steered)), sorted(set(steered) - set(baseline))
        raise SteeringError(f"baseline and steered runs must cover the same questions; only in baseline: "
                            f"{only_b[:5]}, only steered: {only_s[:5]}")
    ids = list(baseline)  # the baseline's order (the held-out set's order)
    before = [baseline[i] for i in ids]
    after = [steered[i] for i in ids]
    recovered_ids = [i for i in ids if not baseline[i] and steered[i]]
    broken_ids = [i for i in ids if baseline[i] and not steered[i]]
    k, n = sum(after), len(ids)
    ci = bootstrap_ci(before, after, n_bootstrap=n_bootstrap, seed=seed)
    return SteeringRow(
        scale=float(scale), perturbation=round(100 * float(scale), 6), n=n, accuracy=k / n,
        accuracy_ci95=wilson_ci(k, n), delta=ci.estimate, delta_ci95=(ci.low, ci.high),
        recovered=len(recovered_ids), n_baseline_wrong=n - sum(before), broken=len(broken_ids),
        net_flips=len(recovered_ids) - len(broken_ids), mcnemar_p=mcnemar_exact(len(recovered_ids), len(broken_ids)),
        recovered_ids=recovered_ids, broken_ids=broken_ids,
    )


def recovered_overlaps(rows: Sequence[SteeringRow]) -> list[dict[str, Any]]:
    """Pairwise overlap of the recovered sets: sizes, intersection, Jaccard (0 when both are empty)."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        sa, sb = set(a.recovered_ids), set(b.recovered_ids)
        union = sa | sb
        out.append({"scale_a": a.scale, "scale_b": b.scale, "n_a": len(sa), "n_b": len(sb),
                    "intersection": len(sa & sb), "shared_ids": sorted(sa & sb),
                    "jaccard": len(sa & sb) / len(union) if union else 0.0})
    return out


# --------------------------------------------------------------------------------------------
# The card's own recipe on our artifact
# --------------------------------------------------------------------------------------------

def changed_first(questions: Sequence[Any], steered: Sequence[Any], baseline: Sequence[Any]) -> list[Any]:
    """``questions`` with those whose steered answer differs from the baseline's first (order kept otherwise)."""
    base = {r.id: r.generation for r in baseline}
    changed = {r.id for r in steered if r.generation != base.get(r.id)}
    return sorted(questions, key=lambda q: q.id not in changed)


@dataclass(frozen=True)
class CardHookCheck:
    """Plain HF ``generate`` with a hook the caller wrote, against mechlib's steered answers."""

    n: int
    n_equal: int
    mismatched_ids: list[str]
    n_steering_changed: int  # of the n answers, how many differ from the unsteered baseline (the check's power)


def check_card_hook(loaded, questions: Sequence[Any], steered: Sequence[Any], baseline: Sequence[Any], *,
                    layer: int, register: Callable[[nn.Module], Any], prompt_format: str,
                    max_new_tokens: int) -> CardHookCheck:
    """Do the card's lines on our ``steering_vec_L*.pt`` steer exactly like :func:`run_sweep`?

    ``register(layer_module)`` installs the caller's own forward hook (the card's recipe, written
    without mechlib) and returns its handle; each question is generated alone (no padding) with
    HF ``generate``, greedy, and compared with mechlib's record of the same question. A record
    stopped at its final-answer line must be a prefix of the HF text (which runs on to EOS). The
    check only has power where steering changed the answer: those are counted against ``baseline``.
    """
    from transformers import GenerationConfig

    from mechlib.generate import eos_ids_of, pad_id_of
    from mechlib.models import decoder_layers
    from mechlib.prompts import build_prompt, encode_prompts

    model, tok = loaded.model, loaded.tokenizer
    eos = eos_ids_of(model, tok)
    pad = pad_id_of(model, tok, eos)
    by_id = {r.id: r for r in steered}
    mismatched = []
    handle = register(decoder_layers(model)[layer])
    try:
        for q in questions:
            ids = torch.tensor([encode_prompts(tok, [build_prompt(tok, q.question, prompt_format)])[0]],
                               device=next(model.parameters()).device)
            with torch.no_grad():  # plain greedy, as mechlib's loop (the model's own sampling defaults ignored)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad))
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            rec = by_id[q.id]
            same = text.startswith(rec.generation) if rec.stop_reason == "answer_line" else text == rec.generation
            if not same:
                mismatched.append(q.id)
    finally:
        handle.remove()
    base = {r.id: r.generation for r in baseline}
    changed = sum(by_id[q.id].generation != base.get(q.id) for q in questions)
    return CardHookCheck(len(questions), len(questions) - len(mismatched), mismatched, changed)
