"""The export folder loads in SAELens and sparsify (the real libraries, from the `interop` extra) with the
same encodings as the book's TopKSAE, and ``load_sae`` reads it back bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechlib.sae import SAEError, TopKSAE, load_sae, save_card_checkpoint
from mechlib.sae.interop import HookInfo, encode_dense, export_sae

D, M, K, LAYER = 24, 96, 6, 15
HOOK = HookInfo("embedded:smollm2-135m-instruct", LAYER, 128, 2, True)


def _sae() -> TopKSAE:
    sae = TopKSAE(D, M, K, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero biases and an encoder that is not the decoder's transpose
        sae.W_enc.add_(0.1 * torch.randn(D, M, generator=gen))
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=gen))
        sae.b_dec.copy_(torch.randn(D, generator=gen))
    return sae


def _x(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(5)) * 2


@pytest.fixture
def exported(tmp_path: Path) -> tuple[TopKSAE, Path]:
    sae = _sae()
    out = export_sae(sae, tmp_path / "export", HOOK)
    assert out.sparsify_folder == tmp_path / "export" / "layers.15"
    return sae, out.folder


def test_export_files_follow_the_libraries_formats(exported: tuple[TopKSAE, Path]) -> None:
    sae, folder = exported
    sl = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in sl.items()} == {
        "W_enc": (D, M),
        "W_dec": (M, D),
        "b_enc": (M,),
        "b_dec": (D,),
    }
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", D, M, K)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    md = cfg["metadata"]
    assert md["hook_name"] == "blocks.15.hook_resid_post" and md["hf_hook_name"] == "model.layers.15"
    assert md["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and md["context_size"] == 128
    assert md["exclude_first_positions"] == 2 and md["exclude_special_tokens"] is True
    sp = load_file(str(folder / "layers.15" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in sp.items()} == {
        "encoder.weight": (M, D),
        "encoder.bias": (M,),
        "W_dec": (M, D),
        "b_dec": (D,),
    }
    assert torch.equal(sp["encoder.weight"], sae.W_enc.detach().t())
    spc = json.loads((folder / "layers.15" / "cfg.json").read_text())
    assert (spc["d_in"], spc["num_latents"], spc["k"], spc["activation"]) == (D, M, K, "topk")


def test_saelens_loads_the_export_with_identical_encodings(exported: tuple[TopKSAE, Path]) -> None:
    pytest.importorskip("sae_lens", reason="the interop extra (make setup) installs sae-lens")
    from sae_lens import SAE

    sae, folder = exported
    theirs = SAE.load_from_disk(str(folder), device="cpu")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == K
    x = _x()
    with torch.no_grad():
        feats = theirs.encode(x)
        torch.testing.assert_close(feats, encode_dense(sae, x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs.decode(feats), sae(x).recon, rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.15.hook_resid_post"


def test_sparsify_loads_the_export_with_identical_encodings(
    exported: tuple[TopKSAE, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sparsify", reason="the interop extra (make setup) installs eai-sparsify")
    import sparsify.sparse_coder
    from sparsify import SparseCoder
    from sparsify.utils import eager_decode

    # sparsify decodes with a Triton kernel whenever triton is importable (it is here, for the CPU
    # interpreter tests) and that kernel needs a GPU; on a CPU users set SPARSIFY_DISABLE_TRITON=1, i.e. this
    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)

    sae, folder = exported
    many = SparseCoder.load_many(str(folder), local=True)
    assert list(many) == ["layers.15"]
    theirs = SparseCoder.load_from_disk(folder / "layers.15")
    assert (theirs.d_in, theirs.num_latents, theirs.cfg.k) == (D, M, K)
    x = _x()
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        dense = torch.zeros(x.shape[0], M).scatter_(-1, idx, acts)
        torch.testing.assert_close(dense, encode_dense(sae, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts, idx), sae(x).recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "where",
    [
        "export",
        "export/sae_weights.safetensors",
        "export/layers.15",
        "export/layers.15/sae.safetensors",
        "sparsify_root",
    ],
)
def test_load_sae_reads_the_export_back_identically(tmp_path: Path, where: str) -> None:
    sae = _sae()
    export_sae(sae, tmp_path / "export", HOOK)
    if where == "sparsify_root":  # sparsify's own layout: hookpoint folders only, no SAELens files
        export_sae(sae, tmp_path / "sp", HOOK)
        for name in ("cfg.json", "sae_weights.safetensors"):
            (tmp_path / "sp" / name).unlink()
        where = "sp"
    back = load_sae(tmp_path / where)
    assert back.meta["layer"] == LAYER
    x = _x()
    ours, theirs = sae.encode(x), back.encode(x)
    assert torch.equal(ours.values, theirs.values) and torch.equal(ours.indices, theirs.indices)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(back, name))


def test_card_checkpoint_still_loads(tmp_path: Path) -> None:
    sae = _sae()
    save_card_checkpoint(sae, tmp_path / "sae_final.pt")
    back = load_sae(tmp_path)
    assert torch.equal(back.W_dec, sae.W_dec) and back.k == K


def test_sparsify_root_with_two_hookpoints_asks_for_one(tmp_path: Path) -> None:
    export_sae(_sae(), tmp_path / "sp", HOOK)
    export_sae(_sae(), tmp_path / "sp", HookInfo("m", 3, 128, 0, False))
    for name in ("cfg.json", "sae_weights.safetensors"):
        (tmp_path / "sp" / name).unlink()
    with pytest.raises(SAEError, match=r"2 hookpoints.*layers.15"):
        load_sae(tmp_path / "sp")


def test_unsupported_saelens_architecture_is_refused(exported: tuple[TopKSAE, Path]) -> None:
    _, folder = exported
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEError, match=r"cfg.json: architecture is 'jumprelu'"):
        load_sae(folder)


def test_saelens_without_b_dec_on_input_is_folded_into_b_enc(tmp_path: Path) -> None:
    sae = _sae()
    export_sae(sae, tmp_path / "e", HOOK)
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    # the same function written SAELens's other way: pre = x @ W_enc + (b_enc - b_dec @ W_enc)
    t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    save_file(t, str(tmp_path / "e" / "sae_weights.safetensors"))
    (tmp_path / "e" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    x = _x()
    torch.testing.assert_close(encode_dense(load_sae(tmp_path / "e"), x), encode_dense(sae, x), rtol=1e-5, atol=1e-5)
