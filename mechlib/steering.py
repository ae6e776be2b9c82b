"""Contrastive activation addition (CAA): the steering vector for a layer and the scale sweep.

Why: the study adds ``scale × (mean residual norm) × unit(mean(h|correct) − mean(h|wrong))`` to
the residual stream after one decoder layer, at every position, during greedy generation, and
reports accuracy per scale on 50 held-out questions. This module builds the vector for a layer
from chapter 05's states and generates every held-out question at every scale, resumably.

The pieces around it live beside it, and every name is re-exported here (``steering.run_sweep``,
``steering.steering_row``, ... as the chapters call them): the vector itself (layer, direction, unit
of scale, provenance; save/load; ``apply``) and the plain hook in :mod:`mechlib.steering_vector`;
the table's rows with their paired statistics (McNemar, bootstrap Δ, recovered overlaps) in
:mod:`mechlib.steering_rows`; the card's own hook checked against the sweep in
:mod:`mechlib.steering_card`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlib import generate  # generate.generate_ids by attribute: tests count its calls
from mechlib.contrast import BaselineSplit, LayerStates, mean_difference
from mechlib.generate import CacheKind, CompileOption, eos_ids_of, pad_id_of
from mechlib.gsm8k import Question
from mechlib.hooks import LayerOutput, add_forward_hook, layer_output_tensor, replace_layer_output
from mechlib.io import atomic_write_json, read_json
from mechlib.models import LoadedModel, check_layer, decoder_layers
from mechlib.prompts import build_prompt, encode_prompts
from mechlib.records import Record, open_records, score_generation, settings_for, write_records
from mechlib.steering_card import CardHookCheck, changed_first, check_card_hook
from mechlib.steering_rows import RecoveredOverlap, SteeringRow, correctness, recovered_overlaps, steering_row
from mechlib.steering_vector import SteeringError, SteeringVector, steering_delta, steering_hook
from mechlib.stopping import AnswerLineStop

__all__ = [
    "CardHookCheck",
    "RecoveredOverlap",
    "RowSteering",
    "SteeringError",
    "SteeringRow",
    "SteeringVector",
    "changed_first",
    "check_card_hook",
    "correctness",
    "mean_residual_norm",
    "recovered_overlaps",
    "run_sweep",
    "scale_tag",
    "steer_records_path",
    "steering_delta",
    "steering_hook",
    "steering_row",
    "vector_for_layer",
]


def mean_residual_norm(states: LayerStates, layer: int) -> float:
    """Mean ‖h‖₂ of the residual after ``layer`` over the contrast set's non-special prompt tokens.

    Taken from :class:`mechlib.contrast.LayerStates` (recorded in the same forward pass as the
    pooled states). Special tokens (BOS above all) are excluded: their norms are often far larger
    than ordinary tokens' and would inflate the unit in which scales are given.
    """
    norms = states.token_norm_mean
    if not 0 <= layer < len(norms):
        raise SteeringError(f"layer {layer} out of range: the states cover layers 0..{len(norms) - 1}")
    return float(norms[layer])


def vector_for_layer(
    states: LayerStates,
    split: BaselineSplit,
    layer: int,
    checkpoints_dir: str | os.PathLike[str],
    *,
    model: str,
    peak_layer: int,
) -> tuple[SteeringVector, Path]:
    """The steering vector for ``layer``: chapter 05's file at the peak, else built the same way.

    Off the peak, ``unit(mean(h|correct) − mean(h|wrong))`` is computed from chapter 05's cached
    contrast-set states at ``layer`` and saved as ``steering_vec_L{layer}.pt`` beside the peak's.
    """
    path = Path(checkpoints_dir) / f"steering_vec_L{layer}.pt"
    if layer != peak_layer or not path.is_file():
        y = split.labels(split.contrast_ids)
        unit, raw = mean_difference(states.select(split.contrast_ids)[:, layer], y)
        SteeringVector(
            layer,
            unit,
            mean_residual_norm(states, layer),
            model=model,
            n_correct=int(y.sum()),
            n_wrong=int((~y).sum()),
            raw_diff_norm=raw,
            pooling=states.pooling,
        ).save(path)
    vec = SteeringVector.load(path)
    if vec.layer != layer:
        raise SteeringError(f"{path}: holds a vector for layer {vec.layer}, not {layer}")
    return vec, path


# --------------------------------------------------------------------------------------------
# The sweep (its table: mechlib.steering_rows)
# --------------------------------------------------------------------------------------------


def scale_tag(scale: float) -> str:
    """File-name tag of a scale: ``+0.05``, ``-0.05``, ``+0``.

    6 significant digits: distinct scales, distinct files.
    """
    return f"{float(scale):+g}"


def steer_records_path(records_dir: str | os.PathLike[str], layer: int, scale: float, tag: str = "") -> Path:
    """``records/steer_L{layer}{tag}_{scale}.jsonl``; ``tag`` names a sweep along another vector (``_rand0``)."""
    return Path(records_dir) / f"steer_L{layer}{tag}_{scale_tag(scale)}.jsonl"


def _sweep_files(records_dir: Path, layer: int, tag: str) -> list[Path]:
    """This sweep's records files only: ``steer_L17_+0.1.jsonl`` belongs to tag "", not to "_rand0"."""
    prefix = f"steer_L{layer}{tag}_"
    return [
        f
        for f in records_dir.glob(f"{prefix}*.jsonl")
        if re.fullmatch(r"[+-][0-9.e+-]+", f.name[len(prefix) : -len(".jsonl")])
    ]


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
        self._allocations = 0  # buffers made so far: names the current one in graph_key
        self._serials: dict[int, int] = {}
        self._current_serial = 0

    def set_rows(self, deltas: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        b = int(deltas.shape[0])
        buf = self._buffers.get(b)
        if buf is None or buf.device != device or buf.dtype != dtype or buf.shape != deltas.shape:
            buf = self._buffers[b] = torch.empty(deltas.shape, device=device, dtype=dtype)
            self._allocations += 1
            self._serials[b] = self._allocations
        buf.copy_(deltas)
        self._current = buf
        self._current_serial = self._serials[b]

    def graph_key(self) -> int:
        """Which buffer the hook reads now (a serial never reused): :mod:`mechlib.graph_decode` keys its
        captured graphs on it, so new values in the same buffer replay the graph and another buffer re-captures."""
        return self._current_serial

    def __call__(self, _module: nn.Module, _inputs: tuple[object, ...], out: LayerOutput) -> LayerOutput:
        h = layer_output_tensor(out)
        d = self._current
        if d is None or d.shape[0] not in (1, h.shape[0]) or d.shape[1] != h.shape[-1]:
            raise SteeringError(
                f"row deltas of shape {None if d is None else tuple(d.shape)} do not fit the layer "
                f"output {tuple(h.shape)}"
            )
        return replace_layer_output(out, h + d[:, None, :])


def run_sweep(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    vector: SteeringVector,
    scales: Sequence[float],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    records_dir: str | os.PathLike[str],
    progress: bool = True,
    tag: str = "",
    cache: CacheKind = "auto",
    compile: CompileOption | None = None,
    share_prefix: bool = True,
) -> dict[float, list[Record]]:
    """Generate every held-out question at every scale with ``vector`` steering; records per scale.

    Each scale's questions go in batches of their own, longest prompts first, and a
    :class:`RowSteering` hook at ``vector.layer`` adds that scale's ``scale × mean_norm × unit`` to
    every row, at every position. Why one scale per batch: every row is then pushed alike, so the
    prompts' shared prefix (chat template, system prompt, worked example) runs once per batch
    instead of once per row (``share_prefix`` of :func:`mechlib.generate.generate_ids`) — on a CPU
    the prefill of that prefix was most of the sweep's time. Each scale's records go to
    ``records/steer_L{layer}_{scale}.jsonl`` in :mod:`mechlib.records`' format (with its
    settings sidecar), rewritten atomically after each batch, so a rerun resumes. A
    ``steer_L{layer}.meta.json`` remembers the vector and norm; if they changed, the old
    steered records are discarded, not reused. ``tag`` keeps a sweep along another vector (a
    random-direction control) in files of its own. ``cache``, ``compile`` and ``share_prefix`` go to
    :func:`mechlib.generate.generate_ids`.
    """
    check_layer(loaded.model, vector.layer)
    scales = list(dict.fromkeys(float(s) for s in scales))
    records_dir = Path(records_dir)
    _check_tag(tag)
    _discard_if_vector_changed(records_dir, vector, loaded.name, tag)
    prompts = {q.id: build_prompt(loaded.tokenizer, q.question, prompt_format) for q in questions}
    settings = settings_for(loaded, prompt_format, max_new_tokens)
    # reused records are re-scored with the current parser, exactly like the baseline's
    done = {
        s: open_records(steer_records_path(records_dir, vector.layer, s, tag), settings, questions, prompts)
        for s in scales
    }
    todo = [(q, s) for q in questions for s in scales if q.id not in done[s]]
    if todo:
        sweep = _Sweep(
            loaded, vector, prompts, max_new_tokens, {"cache": cache, "compile": compile, "share_prefix": share_prefix}
        )
        batches = sweep.batches(todo, scales, batch_size)
        with add_forward_hook(decoder_layers(loaded.model)[vector.layer], sweep.hook):
            for batch in tqdm(batches, desc=f"steer L{vector.layer}{tag}", disable=not progress, unit="batch"):
                sweep.generate(batch, done)
                for s in {s for _, s in batch}:
                    write_records(
                        steer_records_path(records_dir, vector.layer, s, tag),
                        [done[s][q.id] for q in questions if q.id in done[s]],
                    )
    return {s: [done[s][q.id] for q in questions] for s in scales}


def _check_tag(tag: str) -> None:
    if tag and not re.fullmatch(r"_[A-Za-z0-9]+", tag):
        raise SteeringError(f"tag must be '_' and letters/digits (it goes into file names), got {tag!r}")


def _discard_if_vector_changed(records_dir: Path, vector: SteeringVector, model_name: str, tag: str) -> None:
    """Delete this sweep's records when ``steer_L{layer}{tag}.meta.json`` names another vector or norm.

    Then note this one.
    """
    meta = {
        "layer": int(vector.layer),
        "mean_norm": round(float(vector.mean_norm), 6),
        "model": model_name,
        "vector": [round(float(x), 6) for x in torch.as_tensor(vector.unit).float().tolist()],
    }
    sweep_meta = records_dir / f"steer_L{vector.layer}{tag}.meta.json"
    if sweep_meta.is_file() and read_json(sweep_meta) != meta:
        for old in _sweep_files(records_dir, vector.layer, tag):
            old.unlink()
    atomic_write_json(sweep_meta, meta)


class _GenerateOptions(TypedDict):
    cache: CacheKind
    compile: CompileOption | None
    share_prefix: bool


class _Sweep:
    """The generation half of :func:`run_sweep`: batches by scale, one steered batch at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        vector: SteeringVector,
        prompts: Mapping[str, str],
        max_new_tokens: int,
        options: _GenerateOptions,
    ) -> None:
        self.loaded, self.vector, self.prompts, self.max_new_tokens = loaded, vector, prompts, max_new_tokens
        self.options = options
        tok = loaded.tokenizer
        self.enc = dict(zip(prompts, encode_prompts(tok, list(prompts.values()))))
        self.eos = eos_ids_of(loaded.model, tok)
        self.pad = pad_id_of(loaded.model, tok, self.eos)
        self.hook = RowSteering()

    def batches(
        self, todo: Sequence[tuple[Question, float]], scales: Sequence[float], batch_size: int
    ) -> list[list[tuple[Question, float]]]:
        """Each scale's missing questions in batches of their own, longest prompts first."""
        out: list[list[tuple[Question, float]]] = []
        for s in scales:
            mine = sorted((qs for qs in todo if qs[1] == s), key=lambda qs: -len(self.enc[qs[0].id]))
            out += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        return out

    def generate(self, batch: Sequence[tuple[Question, float]], done: dict[float, dict[str, Record]]) -> None:
        """Generate one batch with its scale's delta set on the hook; score each row into ``done``."""
        model, tok = self.loaded.model, self.loaded.tokenizer
        param = next(model.parameters())  # where and in which dtype the hook adds
        self.hook.set_rows(self.vector.delta(batch[0][1])[None], param.device, param.dtype)
        out = generate.generate_ids(
            model,
            [self.enc[q.id] for q, _ in batch],
            self.max_new_tokens,
            len(batch),
            eos_ids=self.eos,
            pad_id=self.pad,
            sort_by_length=False,
            progress=False,
            stop_when=AnswerLineStop(tok),
            **self.options,
        )
        for (q, s), row in zip(batch, out):
            done[s][q.id] = score_generation(q, self.prompts[q.id], row, tok, self.max_new_tokens)
