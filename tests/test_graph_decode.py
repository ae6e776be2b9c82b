"""mechlib.graph_decode: the static-buffer decode step a CUDA graph captures gives exactly HF ``generate``'s
greedy tokens (run eagerly on CPU: the same buffer logic a replay runs), re-keys on hook changes and not on
steering-scale changes; CUDA-only tests compare capture/replay with the eager static loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_generate import _eos_mid_batch, _hf  # HF generate's greedy tokens, and an EOS that stops some rows

import mechlib.graph_decode as gd
from mechlib.generate import DecodeSettings, GenerationError, generate_ids, greedy_batch, left_pad
from mechlib.graph_decode import GRAPHS, GraphHolder, GraphRequest, graph_greedy, hook_set_key
from mechlib.models import decoder_layers
from mechlib.steering import RowSteering, steering_delta, steering_hook
from mechlib.tiny import Arch

TEXTS = ["Hello there, how", "A", "The quick brown fox jumps", "12 + 5 ="]  # different lengths: left padding
MAX_NEW = 8
PAD = 0
REPO_ROOT = Path(__file__).resolve().parents[1]


def _model(arch: Arch):
    """Tiny models whose static cache is graph-safe: Llama, Qwen 3.5 (linear attention + full), and Gemma 4
    with a sliding window wider than the cache (the tiny default, 8, is not graph-safe: see the fallback test)."""
    from mechlib.tiny import tiny_model

    model = tiny_model(arch, seed=0)
    if arch == "gemma4":
        model.config.text_config.sliding_window = 512
        wide = type(model)(model.config).eval()
        wide.load_state_dict(model.state_dict())
        model = wide
    return model


@pytest.fixture(params=["llama", "qwen3_5", "gemma4"])
def graph_model(request):
    model = _model(request.param)
    yield model
    GRAPHS.free(model)


def _ids(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def _graph(model, ids, eos, **kw):
    return generate_ids(
        model, ids, MAX_NEW, 8, eos_ids=[eos], pad_id=PAD, cache="static", compile="graph", progress=False, **kw
    )


def _delta(seed=0, scale=3.0):
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("hook", ["none", "steering_hook", "row_steering"])
def test_graph_path_equals_hf_generate(graph_model, tiny_tok, hook):
    model = graph_model
    ids = _ids(tiny_tok)
    layer = decoder_layers(model)[1]
    builds = GRAPHS.builds
    if hook == "steering_hook":
        ctx = steering_hook(layer, _delta(), scale=1.0, mean_norm=3.0)
    elif hook == "row_steering":
        rs = RowSteering()
        rs.set_rows(steering_delta(_delta(), 1.0, 3.0)[None], torch.device("cpu"), torch.float32)
        ctx = torch.nn.Module.register_forward_hook(layer, rs)
    else:
        ctx = None
    try:
        if hook == "steering_hook":
            ctx.__enter__()
        eos = _eos_mid_batch(model, ids)
        ref = _hf(model, ids, eos)
        got = _graph(model, ids, eos)
    finally:
        if hook == "steering_hook":
            ctx.__exit__(None, None, None)
        elif ctx is not None:
            ctx.remove()
    assert got == ref
    assert GRAPHS.builds == builds + 1 and GRAPHS.held(model), "the graph path ran (not the fallback)"
    assert any(len(r) < MAX_NEW for r in ref) and any(len(r) == MAX_NEW for r in ref), "EOS must stop some rows only"
    if hook != "none":
        assert got != _hf(model, ids, eos), "the hook changed the tokens (a skipped hook would be caught)"


def test_sliding_window_narrower_than_the_cache_falls_back(tiny_gemma4):
    model, tok = tiny_gemma4  # window 8: its static layers track length in a Python int
    ids = _ids(tok)
    builds = GRAPHS.builds
    got = _graph(model, ids, 1)
    assert got == _hf(model, ids, 1)
    assert GRAPHS.builds == builds and not GRAPHS.held(model), "not graph-safe: the plain static loop ran"


def _record_masks(model):
    seen: list[torch.Tensor] = []

    def pre(_m, _args, kwargs):
        am = kwargs.get("attention_mask")
        if kwargs["input_ids"].shape[1] == 1:  # decode steps only
            m = am["full_attention"] if isinstance(am, dict) else am
            seen.append(m.clone())

    return seen, model.register_forward_pre_hook(pre, with_kwargs=True)


def test_in_step_mask_update_equals_make_masks(graph_model, tiny_tok):
    """The step sets the attended column of the slot it writes; the plain static loop builds each step's
    mask with make_masks. Same columns, and nothing attended beyond them in the longer (bucketed) cache."""
    model = graph_model
    ids = _ids(tiny_tok)
    seen, handle = _record_masks(model)
    try:
        kw = dict(eos_ids=[], pad_id=PAD, cache="static", progress=False)
        plain = generate_ids(model, ids, MAX_NEW, len(ids), compile=False, **kw)
        ref, seen[:] = list(seen), []
        got = generate_ids(model, ids, MAX_NEW, len(ids), compile="graph", **kw)
    finally:
        handle.remove()
    assert got == plain
    assert len(seen) == len(ref) == MAX_NEW - 1
    width = ref[0].shape[-1]
    assert seen[0].shape[-1] == 256 > width, "graph path: cache length bucketed"
    for a, b in zip(seen, ref):
        assert torch.equal(a[..., :width], b)
        assert not a[..., width:].any()


@pytest.mark.parametrize("sync_every", [1, 3])
def test_stop_rule_and_sync_every_match_the_plain_loop(graph_model, tiny_tok, sync_every):
    model = graph_model
    inp, mask = left_pad(_ids(tiny_tok), PAD, torch.device("cpu"))
    plain = greedy_batch(model, inp, mask, MAX_NEW, eos_ids=[], pad_id=PAD, cache="dynamic")
    stop_tok = plain[0, 2].item()
    rule = lambda row: stop_tok in row  # noqa: E731
    kw = dict(eos_ids=[plain[1, 3].item()], pad_id=PAD, sync_every=sync_every, stop_when=rule, cache="static")
    ref = greedy_batch(model, inp, mask, MAX_NEW, compile=False, **kw)
    got = greedy_batch(model, inp, mask, MAX_NEW, compile="graph", **kw)
    assert GRAPHS.held(model)
    assert torch.equal(got, ref)


# ops that read device values on the host (a sync: illegal while a CUDA graph is captured) or whose
# output size depends on values (torch.isin may call unique on CUDA)
_SYNCING = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "isin.Tensor_Tensor",
    "repeat_interleave.Tensor",  # with a tensor of repeats (the int overload, self_int, does not sync)
    "repeat_interleave.self_Tensor",
    "bincount",
}


def test_buffer_step_has_no_host_sync(graph_model, tiny_tok):
    """What a CUDA graph captures must not read device values on the host. On CPU: run one buffer step
    (EOS on, a steering hook on) under a dispatch mode that lists every op, and look for syncing ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            self.seen.add(name if func._overloadname == "default" else f"{name}.{func._overloadname}")
            return func(*args, **(kwargs or {}))

    model = graph_model
    inp, mask = left_pad(_ids(tiny_tok), PAD, torch.device("cpu"))
    ops = Ops()
    real = gd.buffer_step

    def probed(*a, **k):
        with ops:
            real(*a, **k)

    with steering_hook(decoder_layers(model)[1], _delta(), scale=1.0, mean_norm=3.0):
        gd.buffer_step = probed
        try:
            graph_greedy(model, inp, mask, GraphRequest(3, (1, 7), PAD), GraphHolder())
        finally:
            gd.buffer_step = real
    assert "index_fill_.int_Scalar" in ops.seen and "argmax" in ops.seen, "the probe saw the step"
    assert not ops.seen & _SYNCING, sorted(ops.seen & _SYNCING)


def test_row_steering_scale_change_reuses_the_graph_and_a_new_hook_rebuilds(tiny_tok):
    model = _model("llama")
    ids = _ids(tiny_tok)
    layer = decoder_layers(model)[2]
    rs = RowSteering()
    outs, keys = [], []
    handle = layer.register_forward_hook(rs)
    try:
        builds = GRAPHS.builds
        for scale in (0.0, 2.0, 4.0):
            rs.set_rows(_delta(1, scale)[None], torch.device("cpu"), torch.float32)
            keys.append(hook_set_key(model))
            outs.append(_graph(model, ids, 1))
            assert outs[-1] == _hf(model, ids, 1), f"scale {scale}"  # HF generate with the same hook
        assert keys[0] == keys[1] == keys[2], "a scale change keeps the hook-set key"
        assert GRAPHS.builds == builds + 1, "a scale change reuses the held graph"
        rs.set_rows(torch.stack([_delta(1, 1.0)] * len(ids)), torch.device("cpu"), torch.float32)
        assert hook_set_key(model) != keys[0], "per-row deltas live in another buffer: another key"
        rs.set_rows(_delta(1, 4.0)[None], torch.device("cpu"), torch.float32)
        extra = decoder_layers(model)[0].register_forward_hook(lambda _m, _i, out: out + 1.0)
        try:
            assert hook_set_key(model) != keys[0]
            got = _graph(model, ids, 1)
            assert got == _hf(model, ids, 1)
        finally:
            extra.remove()
        assert GRAPHS.builds == builds + 2, "a hook added later forces a rebuild"
        assert hook_set_key(model) == keys[0]
    finally:
        handle.remove()
        GRAPHS.free(model)
    assert outs[0] != outs[2] and got != outs[2], "the scales and the extra hook change the tokens"
    assert not any(name.startswith("_mechlib") for name in vars(model)), "no state hung on the model"


def test_hook_set_key_sees_every_kind_of_hook_and_patched_forwards():
    model = _model("llama")
    base = hook_set_key(model)
    mlp = decoder_layers(model)[0].mlp
    changes = [
        lambda: mlp.register_forward_pre_hook(lambda _m, args: args),
        lambda: mlp.register_forward_hook(lambda _m, _a, _kw, out: out, with_kwargs=True),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda _m, _i, out: out),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda _m, args: args),
    ]
    for make in changes:
        handle = make()
        try:
            assert hook_set_key(model) != base
        finally:
            handle.remove()
        assert hook_set_key(model) == base, "removed: the key is back"
    mlp.forward = mlp.forward  # an instance-level forward (as accelerate/peft patch it)
    try:
        assert hook_set_key(model) != base
    finally:
        del mlp.forward
    assert hook_set_key(model) == base


def test_inductor_mode_path_honours_hooks_added_later(tiny_tok, monkeypatch):
    """The compiled variant (dynamo's eager backend here: the same tracing and guards, no inductor build):
    a hook added after the first call is seen."""
    monkeypatch.setitem(gd.GRAPH_COMPILE_KWARGS, "graph-inductor", {"backend": "eager", "dynamic": False})
    model = _model("llama")
    ids = _ids(tiny_tok)[:2]
    layer = decoder_layers(model)[3]
    try:
        for seed in (None, 3):
            d = _delta(seed or 0)
            handle = layer.register_forward_hook(lambda _m, _i, out, d=d: out + d) if seed else None
            try:
                got = generate_ids(
                    model, ids, 6, 8, eos_ids=[1], pad_id=PAD, cache="static", compile="graph-inductor", progress=False
                )
                ref = _hf(model, ids, 1, max_new=6)
            finally:
                if handle:
                    handle.remove()
            assert got == ref, f"hook seed {seed}"
    finally:
        GRAPHS.free(model)


def test_holder_keeps_a_few_graphs_per_model_and_forgets_dropped_models(tiny_tok):
    import gc
    import weakref

    holder = GraphHolder()
    model = _model("llama")
    inp, mask = left_pad(_ids(tiny_tok), PAD, torch.device("cpu"))
    req = GraphRequest(4, (1,), PAD)
    for rows in (4, 3, 2, 3):
        graph_greedy(model, inp[:rows], mask[:rows], req, holder)
    assert [h.key.batch for h in holder.held(model)] == [2, 3][-gd.MAX_GRAPHS_PER_MODEL :]
    assert holder.builds == 3, "batch 3 was still held the second time"
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and len(holder._held) == 0


def test_a_key_whose_capture_failed_goes_to_the_compiled_path_next_time(tiny_tok):
    """After a failed capture (CUDA only; simulated here) the batch finished eagerly; the next batch with the
    same key gets None, so mechlib.generate takes the compiled path instead of the slow eager buffer step."""
    model = _model("llama")
    holder = GraphHolder()
    inp, mask = left_pad(_ids(tiny_tok), PAD, torch.device("cpu"))
    req = GraphRequest(MAX_NEW, (), PAD, ignore_eos=True)
    first = graph_greedy(model, inp, mask, req, holder)
    assert first is not None
    (held,) = holder.held(model)
    held.capture_failed = True
    assert graph_greedy(model, inp, mask, req, holder) is None
    from dataclasses import replace

    again = graph_greedy(model, inp, mask, replace(req, capture=False), holder)
    assert again is not None and torch.equal(again, first), "capture=False still runs the buffer step"


def test_generate_ids_warns_once_per_graph_note(tiny_tok, monkeypatch):
    """A batch the graph path declined (a probe hook, a failed capture) still gets its tokens; the user is told why."""
    import mechlib.generate as gen

    model = _model("llama")

    def declines(*_args, **_kwargs):
        GRAPHS.errors.append("not captured, hooks without graph_key(): forward hook on model.layers.1: probe")
        return None

    monkeypatch.setattr(gen, "graph_greedy", declines)
    ids = _ids(tiny_tok)
    with pytest.warns(UserWarning, match="not captured, hooks without graph_key") as caught:
        rows = generate_ids(model, ids, MAX_NEW, 2, eos_ids=[], pad_id=PAD, cache="static", compile="graph")
    assert len([w for w in caught if "mechlib.graph_decode" in str(w.message)]) == 1, "one warning per note"
    assert rows == generate_ids(model, ids, MAX_NEW, 2, eos_ids=[], pad_id=PAD, cache="static", compile=False)


def test_bad_graph_mode_raises():
    with pytest.raises(GenerationError, match="compile must be"):
        DecodeSettings(4, (1,), 0, cache="static", compile="graph-fast").check()  # type: ignore[arg-type]


def test_benchmark_smoke_runs_the_graph_methods(tmp_path):
    """benchmarks/generate.py --device cpu --small: the new methods run, agree with the eager loop, and are saved."""
    spec = importlib.util.spec_from_file_location("bench_generate", REPO_ROOT / "benchmarks" / "generate.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    only = "mechlib_eager_static_b128,mechlib_b128,mechlib_graph_b128,mechlib_graph_inductor_b256,hf_dynamic_b64"
    builds = GRAPHS.builds
    assert bench.main(["--device", "cpu", "--small", "--only", only, "--results", str(tmp_path)]) == 0
    assert GRAPHS.builds >= builds + 2, "the graph methods ran the graph path (not the fallback)"
    (saved,) = tmp_path.glob("generate_*.json")
    results = json.loads(saved.read_text())["results"]
    assert set(results) == set(only.split(","))
    for name in ("mechlib_graph_b128", "mechlib_graph_inductor_b256"):
        r = results[name]
        assert "error" not in r, r
        assert r["rows_identical_to_eager"] == r["rows_compared_eager"] == 8, "CPU fp32: identical to the eager loop"
        assert r["wall_ms_per_step"] is not None and r["steps_timed"] > 0


# --------------------------------------------------------------------------------------------
# CUDA: capture and replay
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(
    "arch, mode",
    [
        ("llama", "graph"),
        ("gemma4", "graph"),
        ("qwen3_5", "graph"),
        ("llama", "graph-inductor"),
    ],
)  # inductor: each hook set / EOS setting compiles anew (tens of seconds each), so one architecture here; the
# generate benchmark runs graph-inductor on the random E4B (Gemma 4) and reports its agreement with the eager loop
def test_cuda_replay_equals_the_eager_buffer_loop_and_captures_once(arch, mode):
    """Replayed graph == the same buffer step run eagerly on the GPU (same kernels, same cache length), over
    three steering scales with one capture; a hook added later re-captures; EOS + sync_every too."""
    from dataclasses import replace

    model = _model(arch).cuda()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (12, 5, 9, 7)]
    inp, mask = left_pad(ids, PAD, torch.device("cuda"))
    holder = GraphHolder()
    rs = RowSteering()
    handle = decoder_layers(model)[1].register_forward_hook(rs)
    try:
        outs = []
        req = GraphRequest(24, (), PAD, mode, ignore_eos=True)  # no early stop: the capture happens
        for scale in (0.0, 2.0, 0.0):
            rs.set_rows(_delta(2, scale)[None], torch.device("cuda"), torch.float32)
            fast = graph_greedy(model, inp, mask, req, holder)
            eager = graph_greedy(model, inp, mask, replace(req, capture=False), holder)
            assert fast is not None and eager is not None
            assert torch.equal(fast, eager), f"scale {scale}"
            outs.append(fast)
        assert not holder.errors, holder.errors
        assert holder.captures == 1 and holder.builds == 1, "one capture serves every scale"
        assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
        eos = int(outs[1][0, 5])  # a token row 0 emits: EOS stops some rows mid-answer
        req_eos = GraphRequest(24, (eos,), PAD, mode, sync_every=8)
        assert torch.equal(
            graph_greedy(model, inp, mask, req_eos, holder),
            graph_greedy(model, inp, mask, replace(req_eos, capture=False), holder),
        )
        extra = decoder_layers(model)[0].register_forward_hook(_Scale(1.5))
        try:
            fast = graph_greedy(model, inp, mask, req, holder)
            eager = graph_greedy(model, inp, mask, replace(req, capture=False), holder)
        finally:
            extra.remove()
        assert torch.equal(fast, eager) and not torch.equal(fast, outs[2])
        assert holder.captures == 3, "the EOS settings and the added hook each captured anew"
        seen: list[int] = []
        probe = decoder_layers(model)[0].register_forward_hook(lambda _m, _i, out: seen.append(1))
        try:
            assert graph_greedy(model, inp, mask, req, holder) is None, "a probe hook is never captured"
        finally:
            probe.remove()
        assert holder.captures == 3 and "hooks without graph_key()" in holder.errors[-1]
    finally:
        handle.remove()


class _Scale:
    """A graph-safe test hook: multiplies a layer's output by a constant."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def graph_key(self) -> tuple[str, float]:
        return ("scale", self.factor)

    def __call__(self, _m, _i, out):
        return out * self.factor


def test_only_hooks_that_declare_graph_safety_are_captured():
    """Steering hooks declare themselves safe (graph_key); any other hook (a probe) is named, so a CUDA batch
    takes the compiled path that runs it every step instead of a replay that would skip its Python body."""
    model = _model("llama")
    layer = decoder_layers(model)[1]
    assert gd.hooks_not_graph_safe(model) == []
    rs = RowSteering()
    with steering_hook(layer, torch.ones(model.config.hidden_size), 0.1, 1.0):
        handle = layer.register_forward_hook(rs)
        try:
            assert gd.hooks_not_graph_safe(model) == []
            probe = layer.register_forward_hook(lambda _m, _i, out: None)
            pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda _m, args: args)
            try:
                unsafe = gd.hooks_not_graph_safe(model)
            finally:
                probe.remove()
                pre.remove()
        finally:
            handle.remove()
    assert len(unsafe) == 2 and unsafe[0].startswith("global forward pre-hook: ")
    assert unsafe[1].startswith("forward hook on model.layers.1: ") and "<lambda>" in unsafe[1]
