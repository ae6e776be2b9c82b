"""Tiny random-weight models of the study's architecture classes, and the real E4B config.

Why: the study's models (Gemma 4 E4B, Qwen3.5-4B) are gated or too large for CI, but the code
paths that matter — where the decoder layers live, what a layer's forward returns, Gemma 4's
final-normed last hidden state, KV-sharing layers, the logit softcap — are properties of the
*classes*, not the weights. A 4–6 layer, 64-wide model of the same class exercises them in
milliseconds on a CPU. ``gemma4_e4b_config`` rebuilds the published E4B text config so that
benchmarks measure speed at the real shape with random weights (speed does not depend on the
weight values).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import PreTrainedModel

Arch = Literal["gemma4", "qwen3_5", "llama"]
ARCHS: tuple[str, ...] = ("gemma4", "qwen3_5", "llama")
TINY_VOCAB = 512
# What every tiny architecture shares: a 512-token vocabulary, width 64, 4 query and 2 K/V heads, and the
# special ids of :func:`tiny_tokenizer`'s vocabulary (pad 0, eos 1, bos 2).
_SHARED: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def _gemma4_text_kwargs() -> dict:
    # 6 layers mixing sliding and full attention (the real model: 5 sliding : 1 full); the last 2
    # layers (one of each type) reuse K/V of earlier layers (the real model shares the last 18 of
    # 42), per-layer embeddings on, final softcap 30. Every shared type needs an unshared producer,
    # hence a full layer at index 3.
    return dict(
        _SHARED,
        vocab_size_per_layer_input=TINY_VOCAB,
        num_hidden_layers=6,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        sliding_window=8,
        layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    )


def tiny_config(arch: Arch):
    """The config of a tiny model of ``arch`` (see :func:`tiny_model`)."""
    if arch == "gemma4":
        from transformers import Gemma4Config, Gemma4TextConfig

        text = Gemma4TextConfig(**_gemma4_text_kwargs())
        # Multimodal token ids must lie inside the tiny vocabulary; no vision/audio towers.
        return Gemma4Config(
            text_config=text,
            vision_config=None,
            audio_config=None,
            boi_token_id=500,
            eoi_token_id=501,
            image_token_id=502,
            video_token_id=503,
            boa_token_id=504,
            eoa_token_index=505,
            audio_token_id=506,
        )
    if arch == "qwen3_5":
        from transformers import Qwen3_5TextConfig

        # 4 layers: 3 Gated-DeltaNet ("linear_attention") : 1 full attention, like the real model.
        return Qwen3_5TextConfig(
            **_SHARED,
            num_hidden_layers=4,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**_SHARED, num_hidden_layers=4)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_model(arch: Arch, seed: int = 0) -> PreTrainedModel:
    """A tiny random-weight model of the study's class, fp32, eval mode, deterministic for ``seed``.

    ``gemma4`` → ``Gemma4ForConditionalGeneration`` (what ``AutoModelForCausalLM`` gives for the
    real E4B), ``qwen3_5`` → ``Qwen3_5ForCausalLM``, ``llama`` → ``LlamaForCausalLM`` (SmolLM2's class).
    Weights are drawn with a larger std than the default so activations differ clearly per layer.
    """
    from transformers import Gemma4ForConditionalGeneration, LlamaForCausalLM, Qwen3_5ForCausalLM

    config = tiny_config(arch)
    cls = {"gemma4": Gemma4ForConditionalGeneration, "qwen3_5": Qwen3_5ForCausalLM, "llama": LlamaForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.float().eval()


def gemma4_e4b_config():
    """The Gemma 4 E4B *text* config as published (FIELD.md): for random-weight speed benchmarks.

    42 layers, hidden 2560, FFN 10240, 8 heads, 2 KV heads, head_dim 256 (sliding) / 512 (full),
    5 sliding : 1 full, window 512, per-layer embeddings of width 256, the last 18 layers share
    K/V, final logit softcap 30, vocab 262144. Wrapped in ``Gemma4Config`` (no vision/audio tower)
    so ``Gemma4ForConditionalGeneration`` — the class the study loads — is what gets built.
    Assumption: ``use_double_wide_mlp`` is left False (FIELD.md lists one FFN width).
    """
    from transformers import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(  # type: ignore[call-arg]  # global_head_dim is read from **kwargs, not in the signature
        vocab_size=262_144,
        vocab_size_per_layer_input=262_144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        sliding_window=512,
        final_logit_softcapping=30.0,
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
    )
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


def benchmark_gemma4(
    small: bool, device: torch.device | str, dtype: torch.dtype, pad_id: int | None = None
) -> PreTrainedModel:
    """A random-weight ``Gemma4ForConditionalGeneration`` for the speed benchmarks, built on ``device``.

    ``small``: the tiny config (a CPU smoke test); else the published E4B config. Weights are
    PyTorch's default init under seed 0, allocated directly on the device (speed does not depend on
    their values, and a 8 B-parameter CPU init would take minutes). With ``pad_id`` set, the
    generation config's eos is cleared and its pad set: HF fills an unset ``eos_token_id`` from
    there, and the generation benchmark needs fixed-length answers.
    """
    from transformers import Gemma4ForConditionalGeneration

    config = tiny_config("gemma4") if small else gemma4_e4b_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    if pad_id is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = pad_id
    return model


def tiny_tokenizer():
    """A byte-level tokenizer whose ids fit the tiny models' vocabulary (512).

    ``<pad>``=0, ``<eos>``=1, ``<bos>``=2 (the tiny configs' special ids), then the 256 byte
    symbols of GPT-2 style byte-level BPE with no merges: any text round-trips, a BOS is
    prepended like SmolLM2/Gemma tokenizers do, and ids stay < 259. Built in memory (no hub).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    vocab.update({sym: i + 3 for i, sym in enumerate(byte_symbols)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
