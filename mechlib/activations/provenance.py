"""Provenance keys: every saved product carries the digest of exactly what it was computed from.

Why: a product reused after its inputs changed is silently wrong. Chapter 02 once resumed an SAE
trained on activations chapter 01 had since recollected with other settings (25 steps on the old
tokens, 275 on the new), and chapter 03 served ΔCE/KL cached for an earlier run. So a product —
a training state, a finished SAE, a cache, a steering record — stores a :class:`Provenance` (named
digests of its inputs) and, before reusing it, the code compares it with the provenance of the
inputs at hand; any difference means recompute, and the chapter says so in one line
(:func:`stale_line`).

The pieces are generic on purpose:

- :func:`digest` — a stable sha256 over the canonical JSON of any plain values (dicts, lists,
  numbers, strings, dataclasses, paths); the same values give the same digest on any machine.
- :class:`ActivationsFingerprint` — what a set of activations *is*: the collection settings' hash
  and the shards' checksums from its ``manifest.json`` (:func:`fingerprint_of_manifest`,
  :func:`read_activations_fingerprint`), or a digest of the tensor for in-memory stores.
- :class:`Provenance` — ``Provenance.of(activations=fp, train_config=cfg)``; ``changed(saved)``
  names the inputs that differ.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechlib.activations.shards import MANIFEST, ShardError, read_manifest

if TYPE_CHECKING:  # stores imports nothing of provenance; the Protocol is only an annotation here
    from mechlib.activations.stores import ActivationSource

PREFIX = "[mechbook]"


class ProvenanceError(ValueError):
    """A value that cannot be digested, or a saved provenance record that is malformed."""


def _plain(obj: object) -> Any:  # returns any JSON value (None, bool, number, str, list, dict)
    """``obj`` as JSON-able plain values, the same for equal values (tuples → lists, dataclasses → dicts)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ProvenanceError(f"cannot digest the non-finite number {obj!r}")
        return obj
    if hasattr(obj, "digest") and isinstance(obj.digest, str):  # a fingerprint stands for itself
        return {"digest": obj.digest}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise ProvenanceError(f"cannot digest a mapping with non-string keys: {sorted(map(repr, obj))[:5]}")
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ProvenanceError(f"cannot digest a {type(obj).__name__} ({obj!r:.80}); pass plain values or a dataclass")


def canonical_json(obj: object) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces, NaN refused."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(*parts: object) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``: equal values, equal digest, on any machine.

    Objects with a string ``.digest`` (fingerprints, :class:`Provenance`) enter as that digest.
    """
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (CPU copy): equal tensors, equal digest."""
    x = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(memoryview(x.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ for Python >= 3.12 only
    return h.hexdigest()


def stale_line(inputs: str, product: str, action: str, detail: str = "") -> str:
    """The one line a chapter prints when it will not reuse a product, e.g.
    ``[mechbook] activations changed since the saved SAE (exclude_first_positions 2 → 1): training from scratch``."""
    return f"{PREFIX} {inputs} changed since the {product}{f' ({detail})' if detail else ''}: {action}"


@dataclass(frozen=True)
class ActivationsFingerprint:
    """What a set of activations is: its collection settings and its contents.

    ``params_hash`` is the collection's settings hash (``mechlib.activations.collect``: model, layer, corpus,
    seq_len, exclusions, dtype, ...), ``shards`` the digest of every shard's sha256 in index order
    (for an in-memory store, of the tensor's bytes; empty for a stream, whose contents are a
    function of the settings). The settings themselves are kept so a change can be named.
    """

    params_hash: str
    shards: str
    n_tokens: int
    d_model: int
    model: str | None = None
    layer: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def digest(self) -> str:
        return digest("activations", self.params_hash, self.shards, self.n_tokens, self.d_model)

    @property
    def short(self) -> str:
        return self.digest[:12]

    def describe_change(self, old: ActivationsFingerprint) -> str:
        """In words, what differs from ``old`` (the settings by name when both recorded them)."""
        now, then = dict(self.settings), dict(old.settings)
        parts = [
            f"{k} {then.get(k)!r} → {now.get(k)!r}"
            for k in sorted(set(now) | set(then))
            if now.get(k) != then.get(k) and k not in ("format",)
        ]
        if self.params_hash != old.params_hash and not parts:
            parts.append("collection settings")
        if self.n_tokens != old.n_tokens:
            parts.append(f"{old.n_tokens} → {self.n_tokens} tokens")
        if self.d_model != old.d_model:
            parts.append(f"d_model {old.d_model} → {self.d_model}")
        if self.shards != old.shards and not parts:
            parts.append("shard contents (checksums) differ")
        return ", ".join(parts) or f"digest {old.short} → {self.short}"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "settings": [list(kv) for kv in self.settings]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationsFingerprint:
        try:
            return cls(
                str(d["params_hash"]),
                str(d["shards"]),
                int(d["n_tokens"]),
                int(d["d_model"]),
                d.get("model"),
                None if d.get("layer") is None else int(d["layer"]),
                tuple((str(k), v) for k, v in d.get("settings", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProvenanceError(f"not an activations fingerprint record ({exc!r}): {dict(d)!r:.200}") from None


# Manifest keys that describe *how* the tokens were chosen (named when they change).
SETTING_KEYS = (
    "model",
    "model_class",
    "layer",
    "d_model",
    "dtype",
    "seq_len",
    "rows_per_shard",
    "corpus",
    "corpus_config",
    "corpus_split",
    "corpus_text_field",
    "split",
    "heldout_every",
    "exclude_special_tokens",
    "exclude_first_positions",
)


def fingerprint_of_manifest(manifest: Mapping[str, Any]) -> ActivationsFingerprint:
    """The fingerprint of an activation manifest (``manifest.json`` of a collection, or a store's)."""
    shards = manifest.get("shards") or []
    sums = [e["sha256"] for e in sorted(shards, key=lambda e: e["index"])] if shards else []
    layer = manifest.get("layer")
    return ActivationsFingerprint(
        params_hash=str(manifest.get("params_hash", "")),
        shards=digest(sums) if sums else "",
        n_tokens=int(manifest.get("n_tokens", 0)),
        d_model=int(manifest.get("d_model", 0)),
        model=manifest.get("model"),
        layer=None if layer is None else int(layer),
        settings=tuple((k, manifest[k]) for k in SETTING_KEYS if k in manifest),
    )


def read_activations_fingerprint(directory: str | os.PathLike[str]) -> ActivationsFingerprint:
    """The fingerprint of the collection in ``directory`` (its ``manifest.json``; shards are not re-hashed:
    :class:`mechlib.activations.shards.ActivationStore` verifies each shard against the manifest when it reads it)."""
    manifest = read_manifest(Path(directory))
    if manifest is None:
        raise ShardError(
            f"{Path(directory) / MANIFEST}: no activation manifest here; run chapter 01 (collection) first"
        )
    return fingerprint_of_manifest(manifest)


def fingerprint_of_store(store: ActivationSource) -> ActivationsFingerprint:
    """The fingerprint of anything with a ``manifest`` (``ActivationStore``, ``StreamStore``, ``TensorStore``)."""
    manifest = dict(getattr(store, "manifest", None) or {})
    manifest.setdefault("n_tokens", int(store.n_tokens))
    manifest.setdefault("d_model", int(store.d_model))
    return fingerprint_of_manifest(manifest)


@dataclass(frozen=True)
class Provenance:
    """Named digests of a product's inputs, e.g. ``Provenance.of(activations=fp, train_config=cfg)``.

    Stored with the product (``as_dict``), read back with ``from_dict``; ``changed(saved)`` lists
    the inputs whose digest differs (all of them when nothing was saved).
    """

    inputs: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, **inputs: object) -> Provenance:
        return cls(tuple(sorted((name, digest(value)) for name, value in inputs.items())))

    @property
    def digest(self) -> str:
        return digest("provenance", [list(kv) for kv in self.inputs])

    def as_dict(self) -> dict[str, str]:
        return dict(self.inputs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Provenance | None:
        """``None`` for a product saved without a record (by an older mechbook)."""
        if d is None:
            return None
        if not isinstance(d, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
            raise ProvenanceError(f"not a provenance record (name → digest): {d!r:.200}")
        return cls(tuple(sorted(d.items())))

    def changed(self, saved: Provenance | None) -> tuple[str, ...]:
        """Names of the inputs that differ from ``saved`` (every name if ``saved`` is None)."""
        if saved is None:
            return tuple(name for name, _ in self.inputs)
        mine, theirs = dict(self.inputs), dict(saved.inputs)
        return tuple(sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n)))
