"""Hooks on the study's classes: always removed, stop after layer L, exact layer outputs."""

from __future__ import annotations

import pytest
import torch

from mechlib.hooks import StopForward, add_forward_hook, layer_output_tensor, run_to_layer
from mechlib.models import LayerError, decoder_layers


def _ids(n: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_hook_removed_on_success_and_on_error(tiny_gemma4):
    layer = decoder_layers(tiny_gemma4[0])[2]
    with add_forward_hook(layer, lambda m, a, o: None):
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"), add_forward_hook(layer, lambda m, a, o: None):
        raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_run_to_layer_equals_hidden_states(tiny_any):
    model, _, arch = tiny_any
    ids = _ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    assert len(hs) == n + 1
    before = [len(b._forward_hooks) for b in decoder_layers(model)]  # transformers may keep its own
    for layer in range(n - 1):
        got = run_to_layer(model, layer, input_ids=ids)
        torch.testing.assert_close(got, hs[layer + 1], rtol=0, atol=0, msg=f"{arch} layer {layer}")
    # The last entry of hidden_states is final-normed (Gemma 4 and transformers 5): not the raw layer output.
    assert not torch.allclose(run_to_layer(model, n - 1, input_ids=ids), hs[n])
    assert [len(b._forward_hooks) for b in decoder_layers(model)] == before


def test_run_to_layer_stops_the_forward(tiny_gemma4):
    model = tiny_gemma4[0]
    layers = decoder_layers(model)
    calls = []
    with (
        add_forward_hook(layers[3], lambda m, a, o: calls.append("layer3")),
        add_forward_hook(model.lm_head, lambda m, a, o: calls.append("lm_head")),
    ):
        out = run_to_layer(model, 2, input_ids=_ids())
    assert calls == [] and out.shape == (2, 24, 64)


def test_hooks_receive_tensors_and_can_edit_the_stream(tiny_gemma4, tiny_qwen35):
    """On Gemma4ForConditionalGeneration and Qwen3.5 a layer hook sees a Tensor; returning an edit steers."""
    for model, _ in (tiny_gemma4, tiny_qwen35):
        layers = decoder_layers(model)
        seen = []
        ids = _ids(seed=1)
        with torch.no_grad():
            base = model(input_ids=ids).logits
            with add_forward_hook(layers[1], lambda m, a, o, seen=seen: seen.append(type(o)) or o + 1.0):
                steered = model(input_ids=ids).logits
            again = model(input_ids=ids).logits
        assert seen == [torch.Tensor]
        assert not torch.allclose(base, steered)
        torch.testing.assert_close(base, again, rtol=0, atol=0)  # the hook is gone


def test_layer_out_of_range(tiny_qwen35):
    with pytest.raises(LayerError, match=r"valid layers are 0\.\.3"):
        run_to_layer(tiny_qwen35[0], 4, input_ids=_ids())


def test_layer_output_tensor_handles_tuples():
    x = torch.ones(2)
    assert layer_output_tensor(x) is x and layer_output_tensor((x, None)) is x
    with pytest.raises(TypeError):
        layer_output_tensor({"a": x})
    assert StopForward(x).output is x
