"""Atomic file writes and checksums.

Why: every file the book writes (shards, checkpoints, metrics, reports) must never be seen
half-written, even if the process is killed mid-write. Each writer goes to a temporary
file in the same directory, fsyncs it, then ``os.replace``s it over the target — an atomic
rename on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. The file gets the
    mode a plain ``open()`` would give (0666 minus the umask, 0644 under umask 022), not mkstemp's 0600,
    so outputs can be shared and served like any other file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get what open() would give
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process umask (read by setting and restoring it: ``os`` has no plain getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` as pretty, key-sorted JSON (NaN is rejected: metrics must be real numbers)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def iter_text_lines(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line of a UTF-8 text file (``\r\n`` read as ``\n``).

    Why bytes first: a text-mode file decodes in 8 KiB chunks, so invalid UTF-8 surfaces as a bare
    ``UnicodeDecodeError`` naming neither file nor line. Decoding line by line lets the message
    say ``error("<path>:<line>: not UTF-8 text (...)")`` in the caller's own error type.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason}); "
                    f"save the file as UTF-8"
                ) from None
            yield lineno, line[:-2] + "\n" if line.endswith("\r\n") else line


def iter_jsonl(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line of a JSONL file.

    A line that is not JSON raises ``error("<path>:<line>: not valid JSON (...)")``, and one that
    is not UTF-8 ``error("<path>:<line>: not UTF-8 text (...)")``, so the user's message names the
    file and line whichever reader (corpus, GSM8K) found it.
    """
    for lineno, line in iter_text_lines(path, error):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- checksum sidecars (<file>.sha256)
# Why: a checkpoint with one flipped bit loads without complaint and yields nonsense numbers with
# exit code 0. Each checkpoint gets a ``sha256sum``-format sidecar, and loaders verify it. The
# sidecar is updated in a crash-safe order: it lists the new *and* the still-current hash before
# the file is renamed into place, so whenever a kill lands, the file on disk matches its sidecar.

CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """``<path>.sha256``: the sidecar holding ``path``'s sha256 (``sha256sum -c`` format)."""
    p = Path(path)
    return p.with_name(p.name + CHECKSUM_SUFFIX)


def read_checksums(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The hashes ``path``'s sidecar accepts (``None``: no sidecar; ``()``: an unreadable one)."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    try:
        lines = side.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return ()
    hashes = tuple(line.split()[0].lower() for line in lines if line.strip())
    return tuple(h for h in hashes if len(h) == 64 and all(c in "0123456789abcdef" for c in h))


def verify_sha256(path: str | os.PathLike[str]) -> bool | None:
    """``True``: ``path`` matches its sidecar; ``False``: it differs (corrupt, truncated, replaced);
    ``None``: no sidecar, nothing to verify (e.g. a pretrained file from elsewhere)."""
    accepted = read_checksums(path)
    if accepted is None:
        return None
    return Path(path).is_file() and sha256_file(path) in accepted


def _write_sidecar(path: Path, hashes: tuple[str, ...]) -> None:
    unique = tuple(dict.fromkeys(hashes))
    atomic_write_text(checksum_path(path), "".join(f"{h}  {path.name}\n" for h in unique))


def atomic_write_checksummed(
    path: str | os.PathLike[str], write: Callable[[Path], None], keep_previous: str | os.PathLike[str] | None = None
) -> str:
    """Write ``path`` atomically via ``write(tmp_path)`` with a ``.sha256`` sidecar; return the hash.

    ``keep_previous``: move the current file (and its accepted hashes) there first, so a loader
    can fall back to it if the new one is later damaged. Order: tmp written and hashed → previous
    moved aside → sidecar accepts new + current → rename → sidecar = new only.
    """
    target = Path(path)
    with atomic_path(target) as tmp:
        write(tmp)
        new = sha256_file(tmp)
        current = read_checksums(target) or ()
        if keep_previous is not None and target.is_file():
            prev = Path(keep_previous)
            _write_sidecar(prev, current + (read_checksums(prev) or ()))
            os.replace(target, prev)
            _write_sidecar(prev, current)
        _write_sidecar(target, (new, *current))
    _write_sidecar(target, (new,))
    return new


def atomic_torch_save_checksummed(
    obj: object, path: str | os.PathLike[str], keep_previous: str | os.PathLike[str] | None = None
) -> str:
    """:func:`atomic_torch_save` with a ``.sha256`` sidecar (see :func:`atomic_write_checksummed`)."""
    return atomic_write_checksummed(path, lambda tmp: torch.save(obj, tmp), keep_previous)


def atomic_save_safetensors_checksummed(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> str:
    """:func:`atomic_save_safetensors` with a ``.sha256`` sidecar (see :func:`atomic_write_checksummed`)."""
    from safetensors.torch import save_file

    return atomic_write_checksummed(
        path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    )
