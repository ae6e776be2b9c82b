"""Text corpora for activation collection: offline English prose, hub datasets, local files.

Why "python-stdlib-docs" for the default run: the book must run with no network, the SAE wants
natural English, and the text must be license-clean to ship results. Every Python installation
carries the Python reference documentation as English prose (``pydoc_data.topics``, ~465 k
characters, ~113 k SmolLM2 tokens, PSF license) and thousands of English docstrings in the
standard library's source. We read the docstrings with ``ast`` (never importing the modules,
so nothing runs and nothing prints), in sorted file order, so the corpus is deterministic for a
given Python version. Users with hub access stream a real pretraining corpus with ``hf:<id>``.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mechlib import paths
from mechlib.io import iter_jsonl, iter_text_lines

STDLIB_CORPUS = "python-stdlib-docs"
# Folders of the standard library whose docstrings are not prose about the library (test suites,
# the IDLE app, demo scripts, codec tables) or that are third-party (site-packages).
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "encodings",
    "__pycache__",
    "pydoc_data",
    "__phello__",
    "config-3",
}
MIN_DOCSTRING_CHARS = 80


class CorpusError(ValueError):
    """A corpus that cannot be read or holds no text; the message names it."""


def pydoc_topics() -> Iterator[str]:
    """The Python reference-manual topics shipped in ``pydoc_data.topics`` (sorted by topic name)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append(doc.strip())
    return "\n\n".join(docs)


def stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: its module, class and function docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in _SKIP_DIRS or part.startswith("config-") for part in p.relative_to(root).parts)
    )
    for path in files:
        text = _module_docstrings(path)
        if text:
            yield text


def _stdlib_docs() -> Iterator[str]:
    yield from pydoc_topics()
    yield from stdlib_docstrings()


def _hf_dataset(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for network / missing data
        raise CorpusError(
            f"could not stream the hub dataset {name!r} (config={config!r}, split={split!r}): the hub "
            f"may be unreachable from this machine; use a local .txt/.jsonl path as the corpus "
            f"instead. Original error: {str(exc)[:300]}"
        ) from None
    for row in ds:
        if text_field not in row:
            raise CorpusError(
                f"hub dataset {name!r} has no text field {text_field!r}; fields: {sorted(row)}; set corpus_text_field"
            )
        yield row[text_field]


def check_local_file(path: Path) -> None:
    """Raise :class:`CorpusError` unless ``path`` is a ``.txt`` or ``.jsonl`` file (read nothing: the runner's
    check before any chapter runs)."""
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise CorpusError(f"corpus file {path} must end in .txt (blank-line separated documents) or .jsonl")


def is_local(corpus: str) -> bool:
    """A corpus name that is a local file path (not the stdlib docs, not ``hf:<dataset>``)."""
    return corpus != STDLIB_CORPUS and not corpus.startswith("hf:")


def _local_file(path: Path, text_field: str) -> Iterator[str]:
    check_local_file(path)
    if path.suffix == ".jsonl":
        for i, row in iter_jsonl(path, CorpusError):
            if not isinstance(row, dict) or text_field not in row:
                raise CorpusError(f"{path}:{i}: no text field {text_field!r} (set corpus_text_field)")
            yield str(row[text_field])
    elif path.suffix == ".txt":
        # Documents are separated by blank lines.
        block: list[str] = []
        for _, line in iter_text_lines(path, CorpusError):  # a non-UTF-8 line is named by file:line
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


@dataclass(frozen=True)
class CorpusSpec:
    """Which texts a collection reads (the corpus quartet of the book's params, as one value).

    ``name`` is ``"python-stdlib-docs"``, ``"hf:<dataset id>"`` or a local ``.txt`` / ``.jsonl``
    path; ``config``, ``split`` and ``text_field`` apply to a dataset (``text_field`` also to
    ``.jsonl``). ``split`` is the *dataset's* split, not the book's train/heldout split.
    """

    name: str = STDLIB_CORPUS
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @classmethod
    def of(cls, corpus: CorpusSpec | str) -> CorpusSpec:
        """A spec as is, or a plain corpus name with the default config, split and text field."""
        return corpus if isinstance(corpus, CorpusSpec) else cls(corpus)

    def texts(self) -> Iterator[str]:
        return iter_texts(self.name, self.config, self.split, self.text_field)

    def identity(self) -> dict[str, str | None]:
        """The keys a collection's manifest records (and hashes) for its corpus."""
        return {
            "corpus": self.name,
            "corpus_config": self.config,
            "corpus_split": self.split,
            "corpus_text_field": self.text_field,
        }


def iter_texts(
    corpus: str, corpus_config: str | None = None, corpus_split: str = "train", corpus_text_field: str = "text"
) -> Iterator[str]:
    """Yield the documents of ``corpus`` in a deterministic order; raise :class:`CorpusError` if empty.

    ``corpus`` is ``"python-stdlib-docs"``, ``"hf:<dataset id>"`` (streamed; ``corpus_config``,
    ``corpus_split`` and ``corpus_text_field`` apply) or a local ``.txt`` / ``.jsonl`` path.
    """
    if corpus == STDLIB_CORPUS:
        source = _stdlib_docs()
    elif corpus.startswith("hf:"):
        source = _hf_dataset(corpus[3:], corpus_config, corpus_split, corpus_text_field)
    else:
        source = _local_file(paths.resolve(corpus), corpus_text_field)
    n = 0
    for text in source:
        if text and text.strip():
            n += 1
            yield text
    if n == 0:
        raise CorpusError(f"corpus {corpus!r} holds no text (no non-empty documents)")
