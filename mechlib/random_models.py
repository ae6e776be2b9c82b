"""Random-weight models of the study's architectures, as a documented ``model:`` value.

Why: the book's CUDA and architecture-specific paths (Gemma 4's ``language_model`` layers, per-layer
inputs, KV-shared layers, the final softcap; Qwen 3.5's hybrid Gated-DeltaNet layers) must run
inside the book where the real weights cannot be had — in CI (no hub, no GPU) and on a GPU machine
without hub access. Speed and every code path depend on the architecture, not on the weight values,
so a seeded random-weight model of the same class exercises them; it answers nothing correctly,
which is why such runs need ``placeholder_labels`` (see :mod:`mechlib.placeholder`).

``model: random:<arch>`` or ``random:<arch>:<seed>`` (seed 0 when omitted). The seed is part of the
name, so every cache keyed by the model name (records, states) tells two seeds apart.

| arch | class built | tokenizer |
|---|---|---|
| ``tiny-gemma4`` | :func:`mechlib.tiny.tiny_model` ``("gemma4")``: 6 layers, 64 wide, 2 KV-shared | :func:`mechlib.tiny.tiny_tokenizer` (ids < 259 ≤ vocab 512) |
| ``tiny-qwen3.5`` | ``tiny_model("qwen3_5")``: 4 layers, 3 linear-attention : 1 full | the same |
| ``tiny-llama`` | ``tiny_model("llama")`` (SmolLM2's class) | the same |
| ``gemma-4-e4b`` | the published E4B text config (:func:`mechlib.tiny.gemma4_e4b_config`, numbers from FIELD.md: 42 layers, d 2560, vocab 262144, softcap 30, last 18 layers KV-shared) | the same byte-level tokenizer (ids < 259 ≤ 262144) |

Why the byte-level tokenizer for the full-size model too: it is built in memory, so the run needs
nothing that a GPU machine without the hub lacks (SmolLM2's tokenizer, whose 49152 ids would also
fit, comes inside a ~90 MB package and a GGUF conversion). Its cost: about one token per byte, so
prompts and corpus rows hold ~4x fewer words than with Gemma's tokenizer at the same token counts —
the shapes (``seq_len``, prompt + ``max_new_tokens``) are what a run measures, and those are exact.

No ``qwen3.5-4b``: its published config could not be checked offline, and a made-up "4B" would
claim a shape it does not have. A random model has no chat template of its own except what its
tokenizer brings: the tiny tokenizer has none (use ``prompt_format: gemma_manual``); SmolLM2's has.
"""  # noqa: E501 (the table's rows cannot wrap)

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

# transformers and mechlib.tiny (which imports transformers) are imported on use: heavy imports
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from mechlib.tiny import Arch

PREFIX = "random:"
_NAME = re.compile(r"random:(?P<arch>[a-z0-9.\-]+)(?::(?P<seed>[0-9]+))?")


@dataclass(frozen=True)
class RandomArch:
    """One buildable random-weight architecture: how to build its config, and which tokenizer fits."""

    name: str
    config: Callable[[], PretrainedConfig]  # the transformers config (no weights)
    tiny: Arch | None  # mechlib.tiny arch for the tiny ones (built with tiny_model's seeded weights)
    tokenizer: str  # "tiny" (mechlib.tiny.tiny_tokenizer) | "smollm2" (the embedded model's)


def _tiny_config(arch: Arch) -> Callable[[], PretrainedConfig]:
    def build() -> PretrainedConfig:
        from mechlib.tiny import tiny_config

        return tiny_config(arch)

    return build


def _e4b_config() -> PretrainedConfig:
    from mechlib.tiny import gemma4_e4b_config

    return gemma4_e4b_config()


ARCHS: dict[str, RandomArch] = {
    "tiny-gemma4": RandomArch("tiny-gemma4", _tiny_config("gemma4"), "gemma4", "tiny"),
    "tiny-qwen3.5": RandomArch("tiny-qwen3.5", _tiny_config("qwen3_5"), "qwen3_5", "tiny"),
    "tiny-llama": RandomArch("tiny-llama", _tiny_config("llama"), "llama", "tiny"),
    "gemma-4-e4b": RandomArch("gemma-4-e4b", _e4b_config, None, "tiny"),
}


class RandomModelError(ValueError):
    """A ``random:`` model name the book does not know; the message lists the known ones."""


@dataclass(frozen=True)
class RandomSpec:
    arch: RandomArch
    seed: int


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> RandomSpec:
    """``random:<arch>[:<seed>]`` → the architecture and seed; a clear error for anything else."""
    m = _NAME.fullmatch(name)
    if m is None or m["arch"] not in ARCHS:
        raise RandomModelError(
            f"unknown random-weight model {name!r}; use random:<arch> or random:<arch>:<seed> "
            f"with <arch> one of {', '.join(ARCHS)}"
        )
    return RandomSpec(ARCHS[m["arch"]], int(m["seed"] or 0))


def _text(config: PretrainedConfig) -> PretrainedConfig:
    # not mechlib.models.config_text: models imports this module
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shape(name: str) -> tuple[int, int]:
    """``(n_layers, d_model)`` from the config alone (no weights)."""
    text = _text(parse(name).arch.config())
    return int(text.num_hidden_layers), int(text.hidden_size)


def tokenizer_for(spec: RandomSpec) -> PreTrainedTokenizerBase:
    """A tokenizer whose ids all fit the architecture's vocabulary (checked)."""
    if spec.arch.tokenizer == "tiny":
        from mechlib.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        from mechlib.models import embedded_smollm2_dir

        tok = AutoTokenizer.from_pretrained(embedded_smollm2_dir())
    vocab = int(_text(spec.arch.config()).vocab_size)
    if len(tok) > vocab:
        raise RandomModelError(f"{spec.arch.name}: tokenizer has {len(tok)} ids, more than the vocabulary ({vocab})")
    return tok


def build(name: str, dtype: torch.dtype, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The seeded random-weight model (eval, no grad) on ``device`` in ``dtype``, and its tokenizer.

    Tiny ones: :func:`mechlib.tiny.tiny_model`'s seeded weights (drawn on the CPU, so identical on every
    machine). The full-size one: transformers' own init under ``torch.manual_seed(seed)``, allocated
    directly on ``device`` (an 8 B-parameter init on the CPU would take minutes); same seed and device
    type → same weights. The generation config's special ids are the tokenizer's, so generation stops
    at the tokenizer's EOS.
    """
    spec = parse(name)
    tok = tokenizer_for(spec)
    if spec.arch.tiny is not None:
        from mechlib.tiny import tiny_model

        model = tiny_model(spec.arch.tiny, seed=spec.seed).to(device=device, dtype=dtype)  # type: ignore[call-arg]  # transformers' decorated .to() loses its signature
    else:
        from transformers import AutoModelForCausalLM

        config = spec.arch.config()
        text = _text(config)
        for attr, token in (
            ("pad_token_id", tok.pad_token_id),
            ("eos_token_id", tok.eos_token_id),
            ("bos_token_id", tok.bos_token_id),
        ):
            if token is not None:
                setattr(text, attr, token)
        torch.manual_seed(spec.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    model.eval().requires_grad_(False)
    return model, tok
