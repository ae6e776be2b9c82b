"""Per-question generation records: generate, parse, score, cache as JSONL, resume.

Why: chapter 04 (baseline) and chapter 06 (one run per steering scale) generate hundreds of
answers; a killed run must not start over, and a rerun with the same settings must not
regenerate anything. Records are written after every batch by an atomic rewrite of the whole
JSONL (a few hundred short lines), so the file on disk is always complete and readable. Each
line is one record, nothing else (chapter 05 reads them line by line); the settings the records
were made with live in a sidecar ``<file>.meta.json``. Changing the model, prompt format,
``max_new_tokens`` or the generator discards the old records instead of mixing them in. A
record is reused only if its prompt text is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from mechlib.gsm8k import Question, answers_match, extract_answer_with_rule
from mechlib.io import atomic_write_json, atomic_write_text, read_json

GENERATOR_VERSION = "greedy-v1"  # bump when the decode loop's output could change


class RecordsError(ValueError):
    """A records file or split request the book cannot use; the message names the file/value."""


@dataclass(frozen=True)
class Record:
    """One generated answer. ``hit_limit``: generation stopped at ``max_new_tokens`` (no EOS)."""

    id: str
    prompt: str
    generation: str
    parsed: float | None
    gold: float | int
    correct: bool
    n_new_tokens: int = 0
    hit_limit: bool = False
    parsed_by: str | None = None  # which extraction rule found the answer: hashes | answer_is | last_number


@dataclass(frozen=True)
class BaselineSummary:
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]  # Wilson score interval
    truncated: float  # fraction of generations that hit max_new_tokens
    unparsed: float  # fraction with no number at all
    by_rule: dict[str, tuple[int, int]]  # extraction rule → (answers read by it, of which correct)


def settings_of(model_name: str, prompt_format: str, max_new_tokens: int) -> dict[str, Any]:
    s = {"model": model_name, "prompt_format": prompt_format, "max_new_tokens": int(max_new_tokens),
         "generator": GENERATOR_VERSION}
    s["settings_hash"] = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
    return s


def meta_path(out_path: str | os.PathLike[str]) -> Path:
    p = Path(out_path)
    return p.with_name(p.name + ".meta.json")


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """All records of a JSONL file (error names the file and line of a bad record)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise RecordsError(f"{path}:{lineno}: not a generation record ({exc})") from None
    return out


def write_records(path: str | os.PathLike[str], records: Sequence[Record]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records))


def _cached(out_path: Path, settings: dict[str, Any]) -> dict[str, Record]:
    meta = meta_path(out_path)
    if not (out_path.is_file() and meta.is_file()):
        return {}
    try:
        same = read_json(meta).get("settings_hash") == settings["settings_hash"]
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        return {}
    return {r.id: r for r in read_records(out_path)}


def score(q: Question, prompt: str, generation: str, n_new_tokens: int, hit_limit: bool) -> Record:
    parsed, rule = extract_answer_with_rule(generation)
    return Record(id=q.id, prompt=prompt, generation=generation, parsed=parsed, gold=q.answer,
                  correct=answers_match(parsed, q.answer), n_new_tokens=n_new_tokens, hit_limit=hit_limit,
                  parsed_by=rule)


def run_baseline(loaded: Any, questions: Sequence[Question], prompt_format: str, max_new_tokens: int,
                 batch_size: int, out_path: str | os.PathLike[str], *, progress: bool = True, desc: str = "",
                 **generate_kwargs: Any) -> list[Record]:
    """Greedy answers to ``questions`` as :class:`Record` s, cached in ``out_path`` (JSONL).

    Resumes: generations already in ``out_path`` with the same settings and prompt are reused
    (and re-scored with the current parser); the rest are generated in length-sorted batches, the file rewritten atomically after each batch.
    Callers that steer register their hook around this call and pass a different ``out_path``.
    ``generate_kwargs`` go to :func:`mechlib.generate.generate_ids` (``cache``, ``compile``).
    """
    from mechlib.generate import eos_ids_of, generate_ids, pad_id_of
    from mechlib.prompts import build_prompt, encode_prompts

    out_path = Path(out_path)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise RecordsError("question ids must be unique")
    model, tok = loaded.model, loaded.tokenizer
    settings = settings_of(loaded.name, prompt_format, max_new_tokens)
    prompts = {q.id: build_prompt(tok, q.question, prompt_format) for q in questions}
    cached = _cached(out_path, settings)
    if not cached and out_path.is_file():
        write_records(out_path, [])  # other settings: never let the new sidecar vouch for old records
    atomic_write_json(meta_path(out_path), settings)
    by_id = {q.id: q for q in questions}
    # cached generations are re-scored: parsing is cheap, and parser fixes then apply without regenerating
    done = {i: score(by_id[i], r.prompt, r.generation, r.n_new_tokens, r.hit_limit)
            for i, r in cached.items() if i in prompts and r.prompt == prompts[i]}
    todo = [q for q in questions if q.id not in done]
    if todo:
        eos = eos_ids_of(model, tok)
        pad = pad_id_of(model, tok, eos)
        enc = dict(zip([q.id for q in todo], encode_prompts(tok, [prompts[q.id] for q in todo])))
        todo.sort(key=lambda q: -len(enc[q.id]))  # similar lengths together: less padding
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc=desc or f"generate {out_path.name}", disable=not progress, unit="batch"):
            rows = generate_ids(model, [enc[q.id] for q in batch], max_new_tokens, batch_size, eos_ids=eos,
                                pad_id=pad, progress=False, **generate_kwargs)
            for q, row in zip(batch, rows):
                text = tok.decode(row, skip_special_tokens=True)
                done[q.id] = score(q, prompts[q.id], text, len(row), len(row) >= max_new_tokens)
            write_records(out_path, [done[i] for i in ids if i in done])
    records = [done[i] for i in ids]
    write_records(out_path, records)
    return records


def summarize(records: Sequence[Record]) -> BaselineSummary:
    """Accuracy with its Wilson 95 % interval, and how often generations were cut off or unparsable."""
    from mechlib.stats import wilson_ci

    n = len(records)
    if n == 0:
        raise RecordsError("no records to summarise")
    k = sum(r.correct for r in records)
    lo, hi = wilson_ci(k, n)
    by_rule: dict[str, tuple[int, int]] = {}
    for r in records:
        if r.parsed_by is not None:
            seen, right = by_rule.get(r.parsed_by, (0, 0))
            by_rule[r.parsed_by] = (seen + 1, right + int(r.correct))
    return BaselineSummary(n=n, n_correct=k, accuracy=k / n, ci95=(float(lo), float(hi)),
                           truncated=sum(r.hit_limit for r in records) / n,
                           unparsed=sum(r.parsed is None for r in records) / n, by_rule=by_rule)


@dataclass(frozen=True)
class GroupAccuracy:
    group: str
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]


def accuracy_by_group(records: Sequence[Record], group_of: dict[str, str]) -> list[GroupAccuracy]:
    """Accuracy with Wilson 95 % intervals per group (e.g. question source/template), groups sorted."""
    from mechlib.stats import wilson_ci

    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(group_of[r.id], []).append(r.correct)
    out = []
    for g in sorted(groups):
        k, n = sum(groups[g]), len(groups[g])
        lo, hi = wilson_ci(k, n)
        out.append(GroupAccuracy(g, n, k, k / n, (float(lo), float(hi))))
    return out


def split_contrast_heldout(records: Sequence[Any], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """A fixed-seed split of the question ids into a contrast set and a held-out set of
    ``n_heldout``. Both lists keep the records' order. Depends only on the ids and the seed."""
    ids = [str(r.id if hasattr(r, "id") else r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise RecordsError("record ids must be unique to split them")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or not 0 < n_heldout < len(ids):
        raise RecordsError(f"n_heldout must be between 1 and {len(ids) - 1} for {len(ids)} records, got {n_heldout!r}")
    held = set(random.Random(seed).sample(sorted(ids), n_heldout))
    return [i for i in ids if i not in held], [i for i in ids if i in held]
