"""A complete tiny run on disk for the scale/fault/bad-input tests: a saved tiny Llama, a corpus
file, and a params file whose sizes keep every collection and training to a second or two.

Why a saved model folder: subprocesses (torchrun, the killed runs) load the model the way users
do — ``model: <local folder>`` — so the whole path from params file to checkpoint is exercised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:  # mechlib.tiny imports transformers: loaded where a model is built
    from mechlib.tiny import Arch

WORDS = "the cat sat on a mat while seven small dogs ran past the old red barn in the rain".split()

SIZES: dict[str, Any] = dict(
    device="cpu",
    layer=1,
    seq_len=32,
    collect_tokens=1200,
    heldout_tokens=256,
    collect_batch_size=4,
    shard_tokens=128,
    d_sae=64,
    k=4,
    k_aux=16,
    lr=3e-3,
    lr_floor=3e-4,
    warmup_steps=3,
    train_batch_size=64,
    train_tokens=64 * 30,
    renorm_every=5,
    dead_tokens=256,
    checkpoint_every=5,
)


def corpus_file(folder: Path, n_docs: int = 120) -> Path:
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 13)) for i in range(n_docs)]
    path = folder / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def model_folder(folder: Path, arch: Arch = "llama") -> Path:
    from mechlib.tiny import tiny_model, tiny_tokenizer

    out = folder / f"tiny-{arch}"
    if not (out / "config.json").is_file():
        tiny_model(arch, seed=0).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
    return out


def write_params(folder: Path, name: str, n_docs: int = 120, **overrides: Any) -> Path:
    """``folder/<name>.yaml`` for a tiny run (model and corpus created in ``folder`` once)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "docs.txt"
    if not corpus.is_file():
        corpus_file(folder, n_docs)
    values = {"model": str(model_folder(folder)), "corpus": str(corpus), **SIZES, **overrides}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (restored after).

    Why: on a loaded 2-core machine OpenMP's spinning threads make these tiny steps 10-20x slower
    with 2 threads than with 1 (measured: 100 SAE steps 14 s vs 0.8 s). Subprocesses get
    ``OMP_NUM_THREADS=1`` for the same reason; results on CPU are the same either way here.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
