"""The steering sweep: every held-out question under every steering condition, resumably, in few batches.

A *condition* is a vector pushed at its layer by one scale (:class:`SweepCondition`): the CAA
direction at each of the study's scales, or a random direction at the control's scale (its ``tag``,
``_rand0``, keeps its records in files of their own). :func:`run_conditions` generates all of them
with **one** :class:`RowSteering` hook on the layer, which adds each batch row's own delta, so:

* on a CPU (``mix=False``, the default there) each condition gets batches of its own, and every row of
  a batch is pushed alike; the prompts' shared prefix (chat template, worked example) then runs once
  per batch instead of once per row, which was most of a CPU sweep's time;
* on a GPU (``mix=True``, the default there) conditions share batches, filled to ``batch_size``: a
  decode step at batch 128 costs about what one at batch 40 does (it is bound by reading the weights,
  ../shared/FIELD.md), so 8 conditions × 40 questions take 3 batches instead of 8. Every batch then has
  one shape, and the one hook reads one buffer per shape, so :mod:`mechlib.graph_decode` captures one
  CUDA graph per cache length and replays it for every scale and every control.

:func:`run_sweep` is the one-vector form the chapters call (``steering.run_sweep``), with ``also``:
further conditions generated in the same batches, e.g. chapter 06's random-direction controls, which
:func:`mechlib.steering_controls.run_random_control` later reads back from their files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Required, TypedDict, Unpack

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechlib import generate  # generate.generate_ids by attribute: tests count its calls
from mechlib.generate import CacheKind, CompileOption, eos_ids_of, pad_id_of
from mechlib.gsm8k import Question
from mechlib.hooks import LayerOutput, add_forward_hook, layer_output_tensor, replace_layer_output
from mechlib.io import atomic_write_json, read_json
from mechlib.models import LoadedModel, check_layer, decoder_layers, model_device
from mechlib.prompts import build_prompt, encode_prompts
from mechlib.records import Record, open_records, score_generation, settings_for, write_records
from mechlib.steering_vector import SteeringError, SteeringVector
from mechlib.stopping import AnswerLineStop

__all__ = [
    "RowSteering",
    "SweepCondition",
    "SweepOptions",
    "run_conditions",
    "run_sweep",
    "scale_tag",
    "steer_records_path",
]


def scale_tag(scale: float) -> str:
    """File-name tag of a scale: ``+0.05``, ``-0.05``, ``+0``.

    6 significant digits: distinct scales, distinct files.
    """
    return f"{float(scale):+g}"


def steer_records_path(records_dir: str | os.PathLike[str], layer: int, scale: float, tag: str = "") -> Path:
    """``records/steer_L{layer}{tag}_{scale}.jsonl``; ``tag`` names a sweep along another vector (``_rand0``)."""
    return Path(records_dir) / f"steer_L{layer}{tag}_{scale_tag(scale)}.jsonl"


class SweepCondition(NamedTuple):
    """One steered condition: ``vector`` pushed by ``scale × vector.mean_norm`` at ``vector.layer``.

    ``tag`` ("" for the CAA direction, ``_rand0`` … for controls) names the vector in file names;
    conditions with the same tag must share the vector (one ``steer_L{layer}{tag}.meta.json`` each).
    """

    vector: SteeringVector
    scale: float
    tag: str = ""

    def records_path(self, records_dir: str | os.PathLike[str]) -> Path:
        return steer_records_path(records_dir, self.vector.layer, self.scale, self.tag)


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

    Why: a sweep can put several conditions in one batch to fill it instead of running one half-empty
    pass per condition (a decode step at batch 128 costs far less than four at batch 32 on a GPU,
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


class SweepOptions(TypedDict, total=False):
    """How :func:`run_conditions` generates and where it writes: its keywords, which :func:`run_sweep` and
    :func:`mechlib.steering_controls.run_random_control` pass on unchanged (so a new option reaches both).

    The four without a default are required; the defaults of the others are :func:`run_conditions`'.
    """

    prompt_format: Required[str]
    max_new_tokens: Required[int]
    batch_size: Required[int]
    records_dir: Required[str | os.PathLike[str]]
    progress: bool
    cache: CacheKind
    compile: CompileOption | None
    share_prefix: bool
    mix: bool | None


def run_sweep(
    loaded: LoadedModel,
    questions: Sequence[Question],
    *,
    vector: SteeringVector,
    scales: Sequence[float],
    tag: str = "",
    also: Sequence[SweepCondition] = (),
    **options: Unpack[SweepOptions],
) -> dict[float, list[Record]]:
    """Generate every held-out question at every scale with ``vector`` steering; records per scale.

    :func:`run_conditions` over ``(vector, scale, tag)`` for each scale, plus the conditions in
    ``also`` (same layer), which share its batches and are written to their own files but not
    returned. Each scale's records go to ``records/steer_L{layer}{tag}_{scale}.jsonl``. ``options``
    (:class:`SweepOptions`) go to :func:`run_conditions` unchanged.
    """
    scales = list(dict.fromkeys(float(s) for s in scales))
    mine = [SweepCondition(vector, s, tag) for s in scales]
    records = run_conditions(loaded, questions, [*mine, *also], **options)
    return dict(zip(scales, records[: len(mine)]))


def run_conditions(
    loaded: LoadedModel,
    questions: Sequence[Question],
    asked: Sequence[SweepCondition],
    *,
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    records_dir: str | os.PathLike[str],
    progress: bool = True,
    cache: CacheKind = "auto",
    compile: CompileOption | None = None,
    share_prefix: bool = True,
    mix: bool | None = None,
) -> list[list[Record]]:
    """Generate every question under every condition in ``asked`` (all at one layer); records per condition.

    Records go to each condition's :meth:`SweepCondition.records_path` in :mod:`mechlib.records`'
    format (with its settings sidecar), rewritten atomically after each batch, so a rerun resumes
    and generates only what is missing; cached records are re-scored with the current parser. A
    ``steer_L{layer}{tag}.meta.json`` per tag remembers the vector and norm; if they changed, that
    tag's old records are discarded, not reused. ``mix`` (default: on CUDA only) lets conditions
    share batches, see the module docstring; ``cache``, ``compile`` and ``share_prefix`` go to
    :func:`mechlib.generate.generate_ids` (mixed batches never share their prefix: rows differ).
    """
    vectors = _vector_per_tag(asked)
    conditions = _unique(asked)
    if not conditions:
        return []
    layer = conditions[0].vector.layer
    if any(c.vector.layer != layer for c in conditions):
        raise SteeringError(f"one sweep steers one layer: got layers {sorted({c.vector.layer for c in conditions})}")
    check_layer(loaded.model, layer)
    records_dir = Path(records_dir)
    for tag, vector in vectors.items():
        _check_tag(tag)
        _discard_if_vector_changed(records_dir, vector, loaded.name, tag)
    prompts = {q.id: build_prompt(loaded.tokenizer, q.question, prompt_format) for q in questions}
    settings = settings_for(loaded, prompt_format, max_new_tokens)
    # reused records are re-scored with the current parser, exactly like the baseline's
    done = [open_records(c.records_path(records_dir), settings, questions, prompts) for c in conditions]
    todo = [(q, i) for i in range(len(conditions)) for q in questions if q.id not in done[i]]
    if todo:
        mixed = model_device(loaded.model).type == "cuda" if mix is None else mix
        sweep = _Sweep(
            loaded,
            conditions,
            prompts,
            max_new_tokens,
            {"cache": cache, "compile": compile, "share_prefix": share_prefix},
        )
        batches = sweep.mixed_batches(todo, batch_size) if mixed else sweep.batches(todo, batch_size)
        with add_forward_hook(decoder_layers(loaded.model)[layer], sweep.hook):
            for batch in tqdm(batches, desc=f"steer L{layer}", disable=not progress, unit="batch"):
                sweep.generate(batch, done, mixed=mixed, batch_size=batch_size)
                for i in dict.fromkeys(i for _, i in batch):
                    write_records(
                        conditions[i].records_path(records_dir), [done[i][q.id] for q in questions if q.id in done[i]]
                    )
    by_condition = {(c.tag, c.scale): [d[q.id] for q in questions] for c, d in zip(conditions, done)}
    return [by_condition[(c.tag, float(c.scale))] for c in asked]


def _unique(conditions: Sequence[SweepCondition]) -> list[SweepCondition]:
    """The conditions in order, each (tag, scale) once: a repeated one would share its records file."""
    seen: dict[tuple[str, float], SweepCondition] = {}
    for c in conditions:
        seen.setdefault((c.tag, float(c.scale)), SweepCondition(c.vector, float(c.scale), c.tag))
    return list(seen.values())


def _vector_per_tag(conditions: Sequence[SweepCondition]) -> dict[str, SteeringVector]:
    """Each tag's one vector; two vectors under one tag would write into each other's files."""
    out: dict[str, SteeringVector] = {}
    for c in conditions:
        first = out.setdefault(c.tag, c.vector)
        if first is not c.vector and not (
            torch.equal(torch.as_tensor(first.unit), torch.as_tensor(c.vector.unit))
            and first.mean_norm == c.vector.mean_norm
        ):
            raise SteeringError(f"tag {c.tag!r} names two different vectors in one sweep; give each its own tag")
    return out


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


_Batch = list[tuple[Question, int]]  # (question, index of its condition)


class _Sweep:
    """The generation half of :func:`run_conditions`: batches, and one steered batch at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        conditions: Sequence[SweepCondition],
        prompts: Mapping[str, str],
        max_new_tokens: int,
        options: _GenerateOptions,
    ) -> None:
        self.loaded, self.prompts, self.max_new_tokens = loaded, prompts, max_new_tokens
        self.options = options
        self.deltas = torch.stack([c.vector.delta(c.scale) for c in conditions])  # [n_conditions, d] float32
        tok = loaded.tokenizer
        self.enc = dict(zip(prompts, encode_prompts(tok, list(prompts.values()))))
        self.eos = eos_ids_of(loaded.model, tok)
        self.pad = pad_id_of(loaded.model, tok, self.eos)
        self.hook = RowSteering()

    def _longest_first(self, todo: Sequence[tuple[Question, int]]) -> _Batch:
        return sorted(todo, key=lambda qi: (-len(self.enc[qi[0].id]), qi[0].id, qi[1]))

    def batches(self, todo: Sequence[tuple[Question, int]], batch_size: int) -> list[_Batch]:
        """Each condition's missing questions in batches of their own, longest prompts first."""
        out: list[_Batch] = []
        for i in dict.fromkeys(i for _, i in todo):
            mine = self._longest_first([qi for qi in todo if qi[1] == i])
            out += [mine[j : j + batch_size] for j in range(0, len(mine), batch_size)]
        return out

    def mixed_batches(self, todo: Sequence[tuple[Question, int]], batch_size: int) -> list[_Batch]:
        """All missing (question, condition) pairs in full batches, longest prompts first (a question's
        conditions sit side by side: same length, no padding between them)."""
        rows = self._longest_first(todo)
        return [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]

    def generate(self, batch: _Batch, done: list[dict[str, Record]], *, mixed: bool, batch_size: int) -> None:
        """Generate one batch with each row's delta on the hook; score each row into ``done``.

        Unmixed, a batch is one condition: its one ``[1, d]`` delta broadcasts, so its prompts' shared
        prefix can run once. Mixed, every batch sets ``[batch_size, d]`` per-row deltas (even one that
        happens to hold one condition), and a short last batch is filled with copies of its last row
        (results dropped): every batch then reads one buffer of one shape and replays the same graph.
        """
        model, tok = self.loaded.model, self.loaded.tokenizer
        param = next(model.parameters())  # where and in which dtype the hook adds
        rows = [*batch, *[batch[-1]] * (batch_size - len(batch))] if mixed else list(batch)
        kinds = [i for _, i in rows]
        self.hook.set_rows(self.deltas[kinds] if mixed else self.deltas[kinds[:1]], param.device, param.dtype)
        out = generate.generate_ids(
            model,
            [self.enc[q.id] for q, _ in rows],
            self.max_new_tokens,
            len(rows),
            eos_ids=self.eos,
            pad_id=self.pad,
            sort_by_length=False,
            progress=False,
            stop_when=AnswerLineStop(tok),
            cache=self.options["cache"],
            compile=self.options["compile"],
            share_prefix=self.options["share_prefix"] and not mixed,
        )
        for (q, i), row in zip(batch, out):
            done[i][q.id] = score_generation(q, self.prompts[q.id], row, tok, self.max_new_tokens)
