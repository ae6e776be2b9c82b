"""The CUDA generation path (static cache, decode step compiled with CUDA graphs): same tokens as
the uncompiled static path, and steering hooks changed between calls are honoured. Skips without
a GPU; not yet run on one at the time of writing (no GPU was lent to its author)."""

from __future__ import annotations

import pytest
import torch

from mechlib.generate import generate_ids
from mechlib.models import decoder_layers

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _wide_gemma4():
    from transformers import Gemma4ForConditionalGeneration

    from mechlib.tiny import tiny_config

    cfg = tiny_config("gemma4")
    cfg.text_config.sliding_window = 512  # prompt + answer fit: the compile-safe cache layout
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(cfg).eval().cuda()


@pytest.mark.parametrize("arch", ["gemma4", "llama"])
def test_compiled_cuda_path_equals_uncompiled_and_follows_hooks(arch):
    from mechlib.tiny import tiny_model

    model = _wide_gemma4() if arch == "gemma4" else tiny_model("llama").cuda()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (12, 5, 9, 7)]
    layer = decoder_layers(model)[2]
    outs = []
    for seed in (None, 1, 2, None):
        handle = None
        if seed is not None:
            v = (torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 2).cuda()
            handle = layer.register_forward_hook(lambda _m, _i, out, v=v: out + v)
        try:
            fast = generate_ids(model, ids, 12, 4, eos_ids=[1], pad_id=0, cache="static", compile=None, progress=False)
            plain = generate_ids(
                model, ids, 12, 4, eos_ids=[1], pad_id=0, cache="static", compile=False, progress=False
            )
        finally:
            if handle:
                handle.remove()
        assert fast == plain, f"hook seed {seed}"
        outs.append(fast)
    assert outs[0] == outs[3] and outs[1] != outs[0] and outs[2] != outs[1]


def test_mixed_steering_sweep_on_cuda_replays_one_graph_and_matches_one_condition_per_batch(tmp_path):
    """Chapter 06 on a GPU: the CAA scales and the random controls share full batches (per-row deltas) and
    one captured graph; their answers equal the same batches decoded without the graph (fp32; the CPU tests
    show mixed batches answer as one condition per batch does, which on a GPU near-ties may not keep)."""
    from mechlib.graph_decode import GRAPHS
    from mechlib.models import LoadedModel
    from mechlib.steering import SteeringVector, SweepCondition, run_conditions
    from mechlib.steering_controls import random_conditions
    from mechlib.tasks import arithmetic_questions
    from mechlib.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama").cuda(), tiny_tokenizer()
    loaded = LoadedModel(model, tok, "tiny", len(decoder_layers(model)), 64)
    caa = SteeringVector(1, torch.randn(64, generator=torch.Generator().manual_seed(3)), 10.0)
    conditions = [SweepCondition(caa, s) for s in (0.0, 0.4, -0.3)] + random_conditions(caa, 0.4, 2, seed=5)
    questions = arithmetic_questions(5, seed=0)
    kw = dict(prompt_format="gemma_manual", max_new_tokens=6, batch_size=4, progress=False)
    builds, errors = GRAPHS.builds, len(GRAPHS.errors)
    graphed = run_conditions(loaded, questions, conditions, records_dir=tmp_path / "g", mix=True, **kw)
    assert GRAPHS.errors[errors:] == [] and GRAPHS.builds == builds + 1, "one graph for all 7 batches"
    plain = run_conditions(loaded, questions, conditions, records_dir=tmp_path / "p", mix=True, compile=False, **kw)
    GRAPHS.free(model)
    for g, p in zip(graphed, plain):
        assert [r.generation for r in g] == [r.generation for r in p]
