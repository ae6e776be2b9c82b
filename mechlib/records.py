"""Per-question generation records: generate, parse, score, cache as JSONL, resume.

Why: chapter 04 (baseline) and chapter 06 (one run per steering scale) generate hundreds of
answers; a killed run must not start over, and a rerun with the same settings must not
regenerate anything. Records are written after every batch by an atomic rewrite of the whole
JSONL (a few hundred short lines), so the file on disk is always complete and readable. Each
line is one record, nothing else (chapter 05 reads them line by line); the settings the records
were made with live in a sidecar ``<file>.meta.json``. Changing the model, prompt format,
``max_new_tokens``, the generator, the stop rule or the parser discards the old records instead of
mixing them in (the parser is in the key because the stop rule reads final-answer lines). A
record is reused only if its prompt text is unchanged, and every reused record — baseline,
steered or control — is re-scored by :func:`rescore` with the current parser on load, so no
condition is ever scored by another rule than the rest.

Each record carries three readings of its answer (ours, lm-evaluation-harness's strict and
flexible, see :mod:`mechlib.answers`) and why generation stopped (:mod:`mechlib.stopping`), so
every accuracy can be recomputed under each scoring rule (:mod:`mechlib.scoring`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mechlib import generate  # generate.generate_ids by attribute: tests count its calls
from mechlib.answers import PARSER_VERSION, answers_match, read_all
from mechlib.generate import CacheKind, CompileOption, eos_ids_of, pad_id_of
from mechlib.gsm8k import Question, kind_of
from mechlib.io import atomic_write_json, atomic_write_text, read_json
from mechlib.models import LoadedModel, Tokenizer
from mechlib.prompts import build_prompt, decode_text, encode_prompts
from mechlib.stats import wilson_ci
from mechlib.stopping import STOP_REASONS, STOP_RULE_VERSION, AnswerLineStop, StopReason, stop_reason_of

GENERATOR_VERSION = "greedy-v1"  # bump when the decode loop's output could change


class RecordsError(ValueError):
    """A records file or split request the book cannot use; the message names the file/value."""


@dataclass(frozen=True)
class Record:
    """One generated answer, scored. ``stop_reason``: ``eos`` | ``answer_line`` | ``limit`` (truncated).

    ``parsed``/``correct`` are the book's primary reading (``parsed_by`` names the rule that found
    it); ``strict``/``flexible`` are lm-evaluation-harness's two GSM8K readings of the same text.
    ``source`` is the question's (``gsm8k``, ``arithmetic:<template>``), so a records file can be
    grouped by question type without regenerating the questions; records written before it existed
    read as ``""`` and get it back when a chapter re-scores them against their question.
    """

    id: str
    prompt: str
    generation: str
    parsed: float | None
    gold: float | int
    correct: bool
    n_new_tokens: int
    stop_reason: StopReason
    parsed_by: str | None  # which extraction rule found the answer: hashes | answer_is | last_number
    strict: float | None
    correct_strict: bool
    flexible: float | None
    correct_flexible: bool
    parser_version: str
    source: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.source)

    @property
    def truncated(self) -> bool:
        """Cut off at ``max_new_tokens``: neither EOS nor a complete final-answer line."""
        return self.stop_reason == "limit"


@dataclass(frozen=True)
class BaselineSummary:
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]  # Wilson score interval
    truncated: float  # fraction of generations cut off at max_new_tokens
    finished: float  # fraction that ended by themselves (EOS or a final-answer line)
    stop_reasons: dict[str, int]  # stop reason → count
    unparsed: float  # fraction with no number at all
    by_rule: dict[str, tuple[int, int]]  # extraction rule → (answers read by it, of which correct)


def settings_of(
    model_name: str, prompt_format: str, max_new_tokens: int, *, dtype: str = "", device: str = ""
) -> dict[str, Any]:
    """Everything the generated tokens depend on, and its hash (the cache key of a records file)."""
    s = {
        "model": model_name,
        "dtype": dtype,
        "device": device,
        "prompt_format": prompt_format,
        "max_new_tokens": int(max_new_tokens),
        "generator": GENERATOR_VERSION,
        "stop_rule": STOP_RULE_VERSION,
        "parser": PARSER_VERSION,
    }
    s["settings_hash"] = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
    return s


def settings_for(loaded: LoadedModel, prompt_format: str, max_new_tokens: int) -> dict[str, Any]:
    """:func:`settings_of` a loaded model: its name, and the dtype and device type it runs in (greedy
    tokens can differ between float32 and bfloat16, or between CPU and GPU kernels)."""
    param = next(loaded.model.parameters())
    return settings_of(
        loaded.name,
        prompt_format,
        max_new_tokens,
        dtype=str(param.dtype).replace("torch.", ""),
        device=param.device.type,
    )


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
                raise RecordsError(
                    f"{path}:{lineno}: not a generation record of this mechbook version ({exc}); "
                    f"delete the file and rerun the chapter that made it"
                ) from None
    return out


def write_records(path: str | os.PathLike[str], records: Sequence[Record]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records))


def _scored(
    qid: str, source: str, gold: float | int, prompt: str, generation: str, n_new_tokens: int, stop_reason: StopReason
) -> Record:
    r = read_all(generation)
    return Record(
        id=qid,
        source=source,
        prompt=prompt,
        generation=generation,
        parsed=r.primary,
        gold=gold,
        correct=answers_match(r.primary, gold),
        n_new_tokens=n_new_tokens,
        stop_reason=stop_reason,
        parsed_by=r.primary_rule,
        strict=r.strict,
        correct_strict=answers_match(r.strict, gold),
        flexible=r.flexible,
        correct_flexible=answers_match(r.flexible, gold),
        parser_version=PARSER_VERSION,
    )


def score(q: Question, prompt: str, generation: str, n_new_tokens: int, stop_reason: StopReason) -> Record:
    """A scored record: every reading of ``generation`` compared with the gold answer."""
    return _scored(q.id, q.source, q.answer, prompt, generation, n_new_tokens, stop_reason)


def rescore(record: Record, q: Question | None = None) -> Record:
    """``record`` scored again with the current parser, against ``q``'s gold and source (else the stored ones)."""
    gold, source = (record.gold, record.source) if q is None else (q.answer, q.source)
    return _scored(record.id, source, gold, record.prompt, record.generation, record.n_new_tokens, record.stop_reason)


def load_records(path: str | os.PathLike[str]) -> list[Record]:
    """The records of a finished run, re-scored with the current parser (what chapters 05–07 read)."""
    return [rescore(r) for r in read_records(path)]


def score_generation(q: Question, prompt: str, ids: Sequence[int], tokenizer: Tokenizer, max_new_tokens: int) -> Record:
    """Decode one generated row and score it, with the reason it stopped."""
    text = decode_text(tokenizer, list(ids), skip_special_tokens=True)
    return score(q, prompt, text, len(ids), stop_reason_of(text, len(ids), max_new_tokens))


def open_records(
    out_path: str | os.PathLike[str],
    settings: Mapping[str, object],
    questions: Sequence[Question],
    prompts: Mapping[str, str],
) -> dict[str, Record]:
    """The reusable records of ``out_path`` (same settings, same prompt), re-scored; prepares the file.

    Records made with other settings are deleted *before* the new sidecar is written, so a run
    killed in between can never pass old records off as new ones.
    """
    out_path = Path(out_path)
    meta = meta_path(out_path)
    same = False
    if out_path.is_file() and meta.is_file():
        try:
            same = read_json(meta).get("settings_hash") == settings["settings_hash"]
        except (OSError, ValueError, AttributeError):
            same = False
    cached = {r.id: r for r in read_records(out_path)} if same else {}
    if not same and out_path.is_file():
        write_records(out_path, [])
    atomic_write_json(meta, dict(settings))
    by_id = {q.id: q for q in questions}
    return {i: rescore(r, by_id[i]) for i, r in cached.items() if i in prompts and r.prompt == prompts[i]}


def run_baseline(
    loaded: LoadedModel,
    questions: Sequence[Question],
    prompt_format: str,
    max_new_tokens: int,
    batch_size: int,
    out_path: str | os.PathLike[str],
    *,
    progress: bool = True,
    desc: str = "",
    cache: CacheKind = "auto",
    compile: CompileOption | None = None,
    share_prefix: bool = True,
) -> list[Record]:
    """Greedy answers to ``questions`` as :class:`Record` s, cached in ``out_path`` (JSONL).

    Resumes: generations already in ``out_path`` with the same settings and prompt are reused
    (and re-scored with the current parser); the rest are generated in length-sorted batches, the
    file rewritten atomically after each batch. Each row stops at EOS or after its first complete
    final-answer line (:class:`mechlib.stopping.AnswerLineStop`).
    Callers that steer register their hook around this call and pass a different ``out_path``.
    ``cache``, ``compile`` and ``share_prefix`` go to :func:`mechlib.generate.generate_ids`.
    ``share_prefix`` is on by default: the prompts' common prefix (chat
    template, system prompt, worked example) is prefilled once per batch, not once per question —
    most of a CPU run's generation time otherwise; a hook must then push every row alike.
    """
    out_path = Path(out_path)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise RecordsError("question ids must be unique")
    model, tok = loaded.model, loaded.tokenizer
    settings = settings_for(loaded, prompt_format, max_new_tokens)
    prompts = {q.id: build_prompt(tok, q.question, prompt_format) for q in questions}
    done = open_records(out_path, settings, questions, prompts)
    todo = [q for q in questions if q.id not in done]
    if todo:
        eos = eos_ids_of(model, tok)
        pad = pad_id_of(model, tok, eos)
        enc = dict(zip([q.id for q in todo], encode_prompts(tok, [prompts[q.id] for q in todo])))
        todo.sort(key=lambda q: -len(enc[q.id]))  # similar lengths together: less padding
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc=desc or f"generate {out_path.name}", disable=not progress, unit="batch"):
            rows = generate.generate_ids(
                model,
                [enc[q.id] for q in batch],
                max_new_tokens,
                batch_size,
                eos_ids=eos,
                pad_id=pad,
                progress=False,
                stop_when=AnswerLineStop(tok),
                cache=cache,
                compile=compile,
                share_prefix=share_prefix,
            )
            for q, row in zip(batch, rows):
                done[q.id] = score_generation(q, prompts[q.id], row, tok, max_new_tokens)
            write_records(out_path, [done[i] for i in ids if i in done])
    records = [done[i] for i in ids]
    write_records(out_path, records)
    return records


def summarize(records: Sequence[Record]) -> BaselineSummary:
    """Accuracy with its Wilson 95 % interval, why generations stopped, and how often they were unparsable."""
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
    reasons: dict[str, int] = {reason: sum(r.stop_reason == reason for r in records) for reason in STOP_REASONS}
    return BaselineSummary(
        n=n,
        n_correct=k,
        accuracy=k / n,
        ci95=(float(lo), float(hi)),
        truncated=reasons["limit"] / n,
        finished=(n - reasons["limit"]) / n,
        stop_reasons=reasons,
        unparsed=sum(r.parsed is None for r in records) / n,
        by_rule=by_rule,
    )


@dataclass(frozen=True)
class GroupAccuracy:
    group: str
    n: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]


def accuracy_by_kind(records: Sequence[Record]) -> list[GroupAccuracy]:
    """Accuracy with Wilson 95 % intervals per question type (:attr:`Record.kind`), types sorted."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(r.kind, []).append(r.correct)
    out = []
    for g in sorted(groups):
        k, n = sum(groups[g]), len(groups[g])
        lo, hi = wilson_ci(k, n)
        out.append(GroupAccuracy(g, n, k, k / n, (float(lo), float(hi))))
    return out


def split_contrast_heldout(
    records: Sequence[Record] | Sequence[Mapping[str, object]], n_heldout: int, seed: int
) -> tuple[list[str], list[str]]:
    """A fixed-seed split of the question ids into a contrast set and a held-out set of
    ``n_heldout``. Both lists keep the records' order. Depends only on the ids and the seed."""
    ids = [str(r["id"] if isinstance(r, Mapping) else r.id) for r in records]
    if len(set(ids)) != len(ids):
        raise RecordsError("record ids must be unique to split them")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or not 0 < n_heldout < len(ids):
        raise RecordsError(f"n_heldout must be between 1 and {len(ids) - 1} for {len(ids)} records, got {n_heldout!r}")
    held = set(random.Random(seed).sample(sorted(ids), n_heldout))
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def examples(records: Sequence[Record], questions: Sequence[Question], n: int = 2, chars: int = 300) -> str:
    """The first ``n`` correct and first ``n`` wrong answers in question order, each with its question,
    what the parser read and why generation stopped: chapter 04's look at the raw text behind the scores."""
    by_id = {q.id: q for q in questions}
    shown = [r for r in records if r.correct][:n] + [r for r in records if not r.correct][:n]
    return "\n".join(
        f"--- {r.id} [{'correct' if r.correct else 'wrong'}] gold {r.gold}, parsed {r.parsed} "
        f"(strict {r.strict}, flexible {r.flexible}; stopped: {r.stop_reason})\n"
        f"Q: {by_id[r.id].question}\n"
        f"A: {r.generation.strip()[:chars]}"
        for r in shown
    )
