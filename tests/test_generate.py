"""mechlib's greedy decode loop gives exactly HF ``generate``'s greedy tokens (tiny Gemma 4, Qwen 3.5,
Llama; hook on and off; left padding; EOS mid-batch; static cache; compiled step with hooks)."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig

import mechlib.generate as gen
from mechlib.generate import (
    GenerationError,
    free_generation_cache,
    generate_greedy,
    generate_ids,
    greedy_batch,
    left_pad,
)
from mechlib.kv_cache import STATIC_CACHES
from mechlib.models import decoder_layers
from mechlib.tiny import tiny_config

TEXTS = ["Hello there, how", "A", "The quick brown fox jumps", "12 + 5 ="]  # different lengths → left padding
MAX_NEW = 8
PAD = 0


def _hf(model, ids, eos, max_new=MAX_NEW, cache=None):
    inp, mask = left_pad(ids, PAD, torch.device("cpu"))
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=PAD,
        cache_implementation=cache,
        disable_compile=True,
    )
    with torch.no_grad():
        rows = model.generate(input_ids=inp, attention_mask=mask, generation_config=gc)[:, inp.shape[1] :].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def _eos_mid_batch(model, ids):
    """An EOS id that the model emits early in some rows but never in another: exercises per-row stopping."""
    free = _hf(model, ids, eos=1)
    for row in free:
        for cand in row[1:-1]:
            if any(cand not in other for other in free):
                return cand
    pytest.fail(f"no token separates the rows of {free}")


def _add_vector_hook(layer, seed=0, scale=1.0, width=64):
    """A steering-like hook: add a fixed random vector to the layer output (tiny models: d_model 64)."""
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed)) * scale
    return layer.register_forward_hook(lambda _m, _i, out: out + v)


def _prompt_ids(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("hook", [False, True], ids=["no_hook", "hook"])
def test_equals_hf_generate(tiny_any, hook):
    model, tok, _arch = tiny_any
    ids = _prompt_ids(tok)
    handle = _add_vector_hook(decoder_layers(model)[1]) if hook else None
    try:
        eos = _eos_mid_batch(model, ids)
        ref = _hf(model, ids, eos)
        got = generate_ids(model, ids, MAX_NEW, 8, eos_ids=[eos], pad_id=PAD, cache="dynamic", progress=False)
    finally:
        if handle:
            handle.remove()
    assert got == ref
    assert any(len(r) < MAX_NEW for r in ref) and any(len(r) == MAX_NEW for r in ref), "EOS must stop some rows only"
    if hook:  # the hook really changed the generation (else the test could not catch a skipped hook)
        assert got != _hf(model, ids, eos)


@pytest.mark.parametrize("layer", [4, 5], ids=["kv_shared_sliding", "kv_shared_full"])
def test_gemma4_kv_shared_layers_see_what_they_see_in_hf_generate(tiny_gemma4, layer):
    """At prefill, HF (5.23) passes logits_to_keep=1 and Gemma 4's KV-shared layers then see only the last
    position; 5.17 passes them every position. Either way a hook there must see the same shapes as in HF's
    generate, and steering there give the same tokens."""
    model, tok = tiny_gemma4
    assert model.config.text_config.num_kv_shared_layers == 2  # layers 4 and 5 share K/V
    ids = _prompt_ids(tok)
    seen: list[tuple[int, ...]] = []
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3

    def hook(_m, _i, out):
        seen.append(tuple(out.shape))
        return out + v

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        ref = _hf(model, ids, eos=1)
        hf_shapes, seen[:] = list(seen), []
        got = generate_ids(model, ids, MAX_NEW, 8, eos_ids=[1], pad_id=PAD, cache="dynamic", progress=False)
        ours = list(seen)
    finally:
        handle.remove()
    assert got == ref
    assert ours == hf_shapes
    if Version(transformers.__version__) >= Version("5.23"):  # 5.17 (the H200 image's) prefills every position
        assert ours[0][1] == 1, "prefill reaches the shared layer with only the last position (logits_to_keep=1)"


def test_hook_fires_at_prefill_and_every_decode_step(tiny_llama):
    model, tok = tiny_llama
    ids = _prompt_ids(tok)
    calls = []
    handle = decoder_layers(model)[2].register_forward_hook(lambda _m, _i, out: calls.append(out.shape[1]))
    try:
        inp, mask = left_pad(ids, PAD, torch.device("cpu"))
        out = greedy_batch(model, inp, mask, 6, eos_ids=[], pad_id=PAD)
    finally:
        handle.remove()
    assert out.shape == (len(ids), 6)
    assert calls == [inp.shape[1]] + [1] * 5


@pytest.mark.parametrize("arch", ["llama", "gemma4", "qwen3_5"])
def test_static_cache_equals_hf_static_cache(arch, tiny_tok, request):
    model, tok = request.getfixturevalue(
        {"llama": "tiny_llama", "gemma4": "tiny_gemma4", "qwen3_5": "tiny_qwen35"}[arch]
    )
    ids = _prompt_ids(tok)
    handle = _add_vector_hook(decoder_layers(model)[-1], seed=2)
    try:
        ref = _hf(model, ids, eos=1, cache="static")
        got = generate_ids(
            model, ids, MAX_NEW, 8, eos_ids=[1], pad_id=PAD, cache="static", compile=False, progress=False
        )
    finally:
        handle.remove()
    assert got == ref


def _gemma4_wide_window():
    """Tiny Gemma 4 whose sliding window (64) holds prompt + answer: the static path then swaps the
    sliding cache layers for plain static ones (the compile-safe layout)."""
    from transformers import Gemma4ForConditionalGeneration

    cfg = tiny_config("gemma4")
    cfg.text_config.sliding_window = 64
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(cfg).eval()


def test_static_cache_with_sliding_layers_swapped_equals_hf(tiny_tok):
    from mechlib.kv_cache import static_cache as _static_cache

    model = _gemma4_wide_window()
    cache, safe = _static_cache(model, 40)
    assert safe and not any(type(layer).__name__ == "StaticSlidingWindowLayer" for layer in cache.layers)
    ids = _prompt_ids(tiny_tok)
    ref = _hf(model, ids, eos=1)
    got = generate_ids(model, ids, MAX_NEW, 8, eos_ids=[1], pad_id=PAD, cache="static", compile=False, progress=False)
    assert got == ref


def test_compiled_step_honours_hooks_added_after_compiling(tiny_llama):
    """torch.compile does not guard on module hooks by default: a steering hook registered after
    the first compiled call would be silently ignored. The compiled path must see the change.
    (dynamo's "eager" backend: the same tracing and guards as on CUDA, without inductor's build time.)"""
    model, tok = tiny_llama
    ids = _prompt_ids(tok)[:2]
    layer = decoder_layers(model)[3]
    for seed in (None, 3):
        handle = _add_vector_hook(layer, seed=seed) if seed is not None else None
        try:
            ref = _hf(model, ids, eos=1, max_new=6)
            got = generate_ids(
                model, ids, 6, 8, eos_ids=[1], pad_id=PAD, cache="static", compile={"backend": "eager"}, progress=False
            )
        finally:
            if handle:
                handle.remove()
        assert got == ref, f"hook seed {seed}"
    held = STATIC_CACHES.held(model)
    assert held is not None and held.max_len % 256 == 0, "compiled path rounds the cache length up to a bucket"
    assert not any(name.startswith("_mechlib") for name in vars(model)), "no state hung on the model"
    generate_ids(
        model, ids, 6, 8, eos_ids=[1], pad_id=PAD, cache="static", compile={"backend": "eager"}, progress=False
    )
    again = STATIC_CACHES.held(model)
    assert again is not None and again.cache is held.cache, "same shapes: the cache is reset and reused"
    free_generation_cache(model)
    assert STATIC_CACHES.held(model) is None


def test_generate_greedy_decodes_in_input_order(tiny_llama):
    model, tok = tiny_llama
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = PAD
    texts = generate_greedy(model, tok, TEXTS, MAX_NEW, batch_size=4, progress=False)  # sorted by length inside
    assert texts == [tok.decode(r, skip_special_tokens=True) for r in _hf(model, _prompt_ids(tok), eos=1)]


def test_fixed_length_ignores_eos(tiny_llama):
    model, tok = tiny_llama
    ids = _prompt_ids(tok)
    eos = _eos_mid_batch(model, ids)
    rows = generate_ids(model, ids, MAX_NEW, 8, eos_ids=[eos], pad_id=PAD, ignore_eos=True, progress=False)
    assert all(len(r) == MAX_NEW for r in rows)


def test_bad_settings_raise(tiny_llama):
    model, _tok = tiny_llama
    with pytest.raises(GenerationError, match="at least one token"):
        generate_ids(model, [[]], 4, 1, eos_ids=[1], pad_id=0, progress=False)
    with pytest.raises(GenerationError, match="batch_size"):
        generate_ids(model, [[2, 5]], 4, 0, eos_ids=[1], pad_id=0, progress=False)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate_ids(model, [[2, 5]], 0, 1, eos_ids=[1], pad_id=0, progress=False)


def test_bf16_cpu_unembedding_gets_a_contiguous_input_and_the_hook_is_removed(tiny_llama):
    """bf16 on CPU: a strided lm_head input makes the matmul copy the whole weight per row (slow);
    mechlib hands it a contiguous view during generation only. Values are the same, so greedy
    tokens still equal HF's here."""
    model, tok = tiny_llama
    model = model.to(torch.bfloat16)
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        ids = _prompt_ids(tok)
        got = generate_ids(model, ids, 4, 8, eos_ids=[1], pad_id=PAD, progress=False)
        assert got == _hf(model, ids, eos=1, max_new=4)
    finally:
        probe.remove()
    assert len(head._forward_pre_hooks) == 0, "the contiguity hook must be removed after generation"
    assert all(seen[:4]), "mechlib's calls saw a contiguous unembedding input"


SHARED = "System: you are a careful assistant who answers briefly. Example: 2 + 2 = 4. Question: "
SHARED_TEXTS = [SHARED + t for t in TEXTS]


@pytest.mark.parametrize("hook", [False, True], ids=["no_hook", "hook"])
def test_shared_prefix_equals_hf_generate(tiny_any, hook):
    """``share_prefix``: the common prompt prefix runs once at batch 1 and its cache is repeated;
    the tokens are still HF ``generate``'s (left padding now sits between prefix and suffix)."""
    model, tok, arch = tiny_any
    ids = [tok(t)["input_ids"] for t in SHARED_TEXTS]
    assert gen.shared_prefix_len(ids) >= gen.MIN_SHARED_PREFIX
    total = max(map(len, ids)) + MAX_NEW
    # the tiny Gemma 4's window (8) is shorter than the prompts and Qwen 3.5 has linear-attention
    # layers: both take the left-padded path; the Llama shares (and Gemma 4 with a wide window, below)
    assert gen.prefix_sharing_exact(model, total) == (arch == "llama")
    handle = _add_vector_hook(decoder_layers(model)[1]) if hook else None
    try:
        eos = _eos_mid_batch(model, ids)
        ref = _hf(model, ids, eos)
        got = generate_ids(
            model, ids, MAX_NEW, 8, eos_ids=[eos], pad_id=PAD, cache="dynamic", progress=False, share_prefix=True
        )
    finally:
        if handle:
            handle.remove()
    assert got == ref


def test_shared_prefix_runs_the_prefix_once(tiny_llama):
    """The point of sharing: the prefix's tokens go through the model once, not once per row."""
    model, tok = tiny_llama
    ids = [tok(t)["input_ids"] for t in SHARED_TEXTS]
    n_shared = gen.shared_prefix_len(ids)
    widths: list[tuple[int, int]] = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda _m, _i, out: widths.append(tuple(out.shape[:2])))
    try:
        generate_ids(model, ids, 2, 8, eos_ids=[], pad_id=PAD, cache="dynamic", progress=False, share_prefix=True)
    finally:
        handle.remove()
    assert widths[0] == (1, n_shared)
    assert widths[1] == (len(ids), max(len(r) for r in ids) - n_shared)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[1, 2, 3, 4], [1, 2, 3, 5]], 3),
        ([[1, 2, 3], [1, 2, 3, 4]], 2),  # the shorter row keeps its last token as its own suffix
        ([[7], [7]], 0),
        ([[1, 2], [3, 4]], 0),
        ([[5, 6, 7]], 2),
    ],
)
def test_shared_prefix_len(rows, expected):
    assert gen.shared_prefix_len(rows) == expected


def test_shared_prefix_needs_the_dynamic_cache(tiny_llama):
    model, _tok = tiny_llama
    inp, mask = left_pad([[3, 4], [5]], PAD, torch.device("cpu"))
    with pytest.raises(GenerationError, match="dynamic"):
        greedy_batch(model, inp, mask, 2, eos_ids=[], pad_id=PAD, cache="static", prefix=torch.tensor([1, 2]))


def test_shared_prefix_on_gemma4_with_a_window_wider_than_the_prompt(tiny_tok):
    """Per-layer inputs and KV-shared layers with a shared prefix (the real E4B's window is 512)."""
    from mechlib.tiny import tiny_model

    narrow = tiny_model("gemma4", seed=0)
    narrow.config.text_config.sliding_window = 512
    model = type(narrow)(narrow.config).eval()  # rebuilt so every layer reads the wider window
    model.load_state_dict(narrow.state_dict())
    ids = [tiny_tok(t)["input_ids"] for t in SHARED_TEXTS]
    assert gen.prefix_sharing_exact(model, max(map(len, ids)) + MAX_NEW)
    handle = _add_vector_hook(decoder_layers(model)[4])  # a KV-shared layer
    try:
        ref = _hf(model, ids, eos=1)
        got = generate_ids(
            model, ids, MAX_NEW, 8, eos_ids=[1], pad_id=PAD, cache="dynamic", progress=False, share_prefix=True
        )
    finally:
        handle.remove()
    assert got == ref


def test_shared_prefix_is_used_when_the_padded_sequence_just_fits_the_window(tiny_tok, monkeypatch):
    """The padded sequence is the longest row (prefix included) plus the new tokens; counting the shared
    prefix twice would refuse sharing here, where the window holds the whole sequence exactly."""
    from mechlib.tiny import tiny_model

    ids = [tiny_tok(t)["input_ids"] for t in SHARED_TEXTS]
    total = max(map(len, ids)) + MAX_NEW
    narrow = tiny_model("gemma4", seed=0)
    narrow.config.text_config.sliding_window = total
    model = type(narrow)(narrow.config).eval()  # rebuilt so every layer reads the window
    model.load_state_dict(narrow.state_dict())
    assert not gen.prefix_sharing_exact(model, total + gen.shared_prefix_len(ids)), "the old count would refuse"
    prefixes: list[int] = []
    real = gen.prefix_cache
    monkeypatch.setattr(
        gen, "prefix_cache", lambda m, prefix, *a: prefixes.append(prefix.numel()) or real(m, prefix, *a)
    )
    got = generate_ids(
        model, ids, MAX_NEW, 8, eos_ids=[1], pad_id=PAD, cache="dynamic", progress=False, share_prefix=True
    )
    assert prefixes == [gen.shared_prefix_len(ids)], "the prefix ran once, shared"
    assert got == _hf(model, ids, eos=1)


def test_decode_settings_cut_before_eos_then_after_the_stop_rule():
    from mechlib.generate import DecodeSettings

    rule = DecodeSettings(8, (1,), 0, stop_when=lambda ids: 7 in ids)
    assert rule.cut([5, 7, 9, 1, 4]) == [5, 7], "the shortest prefix meeting the rule"
    assert rule.cut([5, 9, 1, 7]) == [5, 9], "EOS first"
    assert DecodeSettings(8, (1,), 0, ignore_eos=True, stop_when=rule.stop_when).cut([5, 1, 7, 4]) == [5, 1, 7, 4]
    with pytest.raises(GenerationError, match="max_new_tokens"):
        DecodeSettings(0, (1,), 0).check()


def test_static_cache_holder_keeps_nothing_on_the_model_and_forgets_dropped_models():
    import gc
    import weakref

    from mechlib.kv_cache import StaticCacheHolder
    from mechlib.tiny import tiny_model

    model = tiny_model("llama")  # not a fixture: pytest would keep it alive
    holder = StaticCacheHolder()
    cache, _safe = holder.get(model, 2, 32)
    assert holder.held(model).cache is cache and holder.get(model, 2, 32)[0] is cache
    assert holder.get(model, 2, 64)[0] is not cache, "another shape: a new cache, the old one dropped"
    assert not any(name.startswith("_mechlib") for name in vars(model))
    ref = weakref.ref(model)
    del model, cache
    gc.collect()
    assert ref() is None and len(holder._held) == 0, "a dropped model frees its cache"
