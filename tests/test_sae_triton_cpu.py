"""The fast SAE step's Triton kernels without a GPU: under ``TRITON_INTERPRET=1`` against their torch
twins (every kernel, every launch configuration of the seg kernels, whole steps for every
``Backend.bwd``), and compiled for sm_90 (H100/H200) with the default configurations free of
register spills. Each check runs in a subprocess so the interpreter flag cannot leak.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sae_fast import PARAMS, assert_grads_close, dead_mask, grads, make_sae, make_x

from mechlib.sae import reference_step
from mechlib.sae.fast import BWDS, Backend, fast_step, latent_order, select_topk

# ------------------------------------------------------------- Triton kernels under the interpreter


def _interpreter_checks() -> None:
    """Run each kernel under TRITON_INTERPRET=1 against its torch twin, then whole steps."""
    from mechlib.sae import triton_kernels as tk
    from mechlib.sae import triton_seg
    from mechlib.sae.fast import decode_residual_torch, pass_a_torch, pass_b_torch, value_grads_torch

    torch.manual_seed(0)
    n, m, d, k = 37, 300, 70, 9
    pre = torch.randn(n, m) * 2
    pre[:, 7] = 5.0  # one latent in every row: a long segment spanning several BLOCK_S chunks
    s = select_topk(pre, k)
    raw = s.raw.bfloat16()
    for wdt in (torch.float32, torch.bfloat16):
        x, b, W = torch.randn(n, d), torch.randn(d), torch.randn(m, d).to(wdt)
        vals = raw.float().clamp_min(0)
        e1 = tk.decode_residual(x, b, vals, s.idx.int(), W)
        assert torch.allclose(e1, decode_residual_torch(x, b, vals, s.idx, W), atol=1e-4), "decode"
        gv = torch.randn(n, d).to(wdt)
        dv_want = value_grads_torch(gv, W, s.idx)
        assert dv_want.abs().sum() > 0 and dv_want.shape == (n, k)
        assert torch.allclose(tk.value_grads(gv, W, s.idx), dv_want, atol=1e-4), "value_grads"
        o = latent_order(s.idx, m)
        g, xc, vs = torch.randn(n, d).to(wdt), torch.randn(n, d).to(wdt), vals.reshape(-1)[o.perm]
        dp = torch.randn(o.tok.numel()).to(wdt).float()  # bf16-exact, as the seg kernel's dot sees it
        offs, lat, tok = o.offsets.int(), o.lat.int(), o.tok.int()
        dw2, dv2 = pass_a_torch(o, vs, g, W)
        de2, db2 = pass_b_torch(o, dp, xc, m)
        assert dw2.abs().sum() > 0 and de2.abs().sum() > 0 and dv2.abs().sum() > 0
        for name, (dw1, dv1), (de1, db1) in (
            ("pass", tk.pass_a(offs, tok, vs, g, W), tk.pass_b(offs, tok, dp, xc, m)),
            ("seg", triton_seg.seg_pass_a(offs, lat, tok, vs, g, W), triton_seg.seg_pass_b(offs, lat, tok, dp, xc, m)),
        ):
            assert torch.allclose(dw1, dw2, atol=1e-4) and torch.allclose(dv1, dv2, atol=1e-4), f"{name}_a {wdt}"
            assert torch.allclose(de1, de2, atol=1e-4) and torch.allclose(db1, db2, atol=1e-4), f"{name}_b {wdt}"
    # every launch configuration of the seg kernels (the GPU times them and keeps one), bf16 operands
    o = latent_order(s.idx, m)
    offs, lat, tok, vs = o.offsets.int(), o.lat.int(), o.tok.int(), raw.float().clamp_min(0).reshape(-1)[o.perm]
    g, xc, W = torch.randn(n, d).bfloat16(), torch.randn(n, d).bfloat16(), torch.randn(m, d).bfloat16()
    dp = torch.randn(o.tok.numel()).bfloat16().float()
    (dw2, dv2), (de2, db2) = pass_a_torch(o, vs, g, W), pass_b_torch(o, dp, xc, m)
    tk.CHOSEN.clear()
    for cfg in triton_seg.SEG_CONFIGS:
        tk.CHOSEN[("seg_pass_a", m, d, k, g.dtype)] = tk.CHOSEN[("seg_pass_b", m, d, k, xc.dtype)] = cfg
        dw1, dv1 = triton_seg.seg_pass_a(offs, lat, tok, vs, g, W)
        de1, db1 = triton_seg.seg_pass_b(offs, lat, tok, dp, xc, m)
        assert torch.allclose(dw1, dw2, atol=1e-4) and torch.allclose(dv1, dv2, atol=1e-4), f"seg_a {cfg}"
        assert torch.allclose(de1, de2, atol=1e-4) and torch.allclose(db1, db2, atol=1e-4), f"seg_b {cfg}"
        assert len(tk.CHOSEN) == 2, "the kernels must run the configuration set above"
    tk.CHOSEN.clear()
    # whole steps, every backward, AuxK live and not: fp32 compute vs the fp32 reference (exact up to
    # summation order), bf16 compute (the CUDA recipe) within 1 % FVU and 0.97 gradient cosine
    for bwd in BWDS:
        for n_dead in (0, 30):
            sae = make_sae(40, 160, 8, dtype=torch.float32)
            xs, dmask = make_x(48, 40, dtype=torch.float32), dead_mask(160, n_dead)
            a, bb, c = copy.deepcopy(sae), copy.deepcopy(sae), copy.deepcopy(sae)
            sr = reference_step(c, xs, dmask, 16, 0.125)
            st = fast_step(a, xs, dmask, 16, 0.125, backend=Backend("triton", torch.float32, bwd))
            assert torch.allclose(st.loss, sr.loss, rtol=1e-5), f"{bwd} fp32 loss"
            assert (st.aux_loss > 0) == (n_dead > 0), f"{bwd} aux"
            assert_grads_close(grads(c), grads(a), 1e-4)
            sb = fast_step(bb, xs, dmask, 16, 0.125, backend=Backend("triton", torch.bfloat16, bwd))
            assert abs(float(sb.fvu - sr.fvu)) < 0.01 * float(sr.fvu), f"{bwd} bf16 fvu"
            for name in PARAMS:
                cos = torch.nn.functional.cosine_similarity(
                    getattr(bb, name).grad.flatten(), getattr(c, name).grad.flatten(), dim=0
                )
                assert cos > 0.97, f"{bwd} bf16 {name}: cosine {float(cos):.4f}"
    sae = make_sae(40, 160, 8, dtype=torch.float32)  # two-stage top-k: same step as one topk
    xs, dmask = make_x(48, 40, dtype=torch.float32), dead_mask(160, 30)
    a, c = copy.deepcopy(sae), copy.deepcopy(sae)
    st = fast_step(a, xs, dmask, 16, 0.125, backend=Backend("triton", torch.float32, "seg", topk_chunk=32))
    sr = reference_step(c, xs, dmask, 16, 0.125)
    assert torch.allclose(st.loss, sr.loss, rtol=1e-5), "topk_chunk loss"
    assert_grads_close(grads(c), grads(a), 1e-4)
    print("TRITON_INTERPRET checks passed")


def _compile_checks() -> None:
    """Compile every kernel and launch configuration for sm_90 (H100/H200) — no GPU needed — and,
    where triton ships ptxas, check the default configurations do not spill registers."""
    import glob
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mechlib.sae import triton_kernels as tk
    from mechlib.sae import triton_seg

    ptr = {"f32": "*fp32", "bf16": "*bf16", "i32": "*i32", "u8": "*u8"}
    decode = dict(
        x_ptr=ptr["f32"],
        b_ptr=ptr["f32"],
        val_ptr=ptr["f32"],
        idx_ptr=ptr["i32"],
        w_ptr=ptr["bf16"],
        e_ptr=ptr["f32"],
        N="i32",
        D="i32",
        K="i32",
        N_TBLK="i32",
    )
    pass_a = dict(
        off_ptr=ptr["i32"],
        tok_ptr=ptr["i32"],
        val_ptr=ptr["f32"],
        g_ptr=ptr["bf16"],
        w_ptr=ptr["bf16"],
        dw_ptr=ptr["f32"],
        dvp_ptr=ptr["f32"],
        M="i32",
        D="i32",
        E="i32",
        N_MBLK="i32",
    )
    pass_b = dict(
        off_ptr=ptr["i32"],
        tok_ptr=ptr["i32"],
        dp_ptr=ptr["f32"],
        xc_ptr=ptr["bf16"],
        dw_ptr=ptr["f32"],
        db_ptr=ptr["f32"],
        M="i32",
        D="i32",
        stride_d="i32",
        stride_m="i32",
        N_MBLK="i32",
    )
    seg_a = dict(pass_a, lat_ptr=ptr["i32"])
    seg_b = dict(pass_b, lat_ptr=ptr["i32"])
    seg_a = {n: seg_a[n] for n in ("off_ptr", "lat_ptr", "tok_ptr", "val_ptr", "g_ptr", "w_ptr", "dw_ptr", "dvp_ptr")}
    seg_a |= dict(M="i32", D="i32", E="i32", N_MBLK="i32")
    seg_b = {n: seg_b[n] for n in ("off_ptr", "lat_ptr", "tok_ptr", "dp_ptr", "xc_ptr", "dw_ptr", "db_ptr")}
    seg_b |= dict(M="i32", D="i32", stride_d="i32", stride_m="i32", N_MBLK="i32")
    jobs = [
        (fn, sig, {**{n: c[n] for n in ("BLOCK_M", "BLOCK_S", "BLOCK_D")}, "DOT_F32": False}, c, True)
        for fn, sig in ((triton_seg._seg_pass_a_kernel, seg_a), (triton_seg._seg_pass_b_kernel, seg_b))
        for c in triton_seg.SEG_CONFIGS
    ]
    value_grad = dict(
        g_ptr=ptr["bf16"], idx_ptr=ptr["i32"], w_ptr=ptr["bf16"], dvp_ptr=ptr["f32"], N="i32", D="i32", K="i32"
    )
    value_grad |= dict(N_TBLK="i32")
    jobs += [
        (tk._value_grad_kernel, value_grad, {n: c[n] for n in ("BLOCK_N", "BLOCK_D")}, c, i == 0)
        for i, c in enumerate(tk.DECODE_CONFIGS)
    ]
    jobs += [
        (tk._decode_kernel, decode, {n: c[n] for n in ("BLOCK_N", "BLOCK_D")}, c, i == 0)
        for i, c in enumerate(tk.DECODE_CONFIGS)
    ]
    jobs += [
        (fn, sig, {n: c[n] for n in ("BLOCK_M", "BLOCK_S", "BLOCK_D")}, c, i == 0)
        for fn, sig in ((tk._pass_a_kernel, pass_a), (tk._pass_b_kernel, pass_b))
        for i, c in enumerate(tk.PASS_CONFIGS)
    ]
    ptxas = sorted(glob.glob(str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas*")), reverse=True)
    spilled: list[str] = []
    for fn, sig, consts, cfg, is_default in jobs:
        sig = {**sig, **{name: "constexpr" for name in consts}}
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)},
        )
        assert kernel.asm.get("cubin"), f"{fn.__name__} {consts}: no cubin"
        if is_default and ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
                fh.write(kernel.asm["ptx"])
            info = subprocess.run(
                [ptxas[0], "-v", "--gpu-name", "sm_90a", fh.name, "-o", os.devnull], capture_output=True, text=True
            ).stderr
            spills = re.findall(r"(\d+) bytes spill stores", info)
            assert spills, f"{fn.__name__} {consts}: ptxas printed no spill line: {info}"
            if any(v != "0" for v in spills):
                spilled.append(f"{fn.__name__} {consts}: {max(map(int, spills))} bytes spilled")
    print(f"compiled {len(jobs)} kernel configurations for sm_90")
    # Triton 3.6 (the H200 image's) spills 24-40 bytes in pass A of three of the seven seg configs, where
    # 3.9 spills nothing: slower candidates, which _tuned times like the others, not wrong ones. So spills
    # fail the check only on the Triton that CI pins.
    if spilled and _triton_version() >= (3, 9):
        raise AssertionError("register spills: " + "; ".join(spilled))
    for line in spilled:
        print("spill (tolerated before triton 3.9):", line)


def _run_self(flag: str, env_extra: dict[str, str]) -> str:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        env_extra,
        TRITON_DEFAULT_FP_FUSION="1",
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    out = subprocess.run(
        [sys.executable, str(Path(__file__)), flag], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _triton_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2] if p.isdigit())


needs_triton = pytest.mark.skipif(
    not _triton_version(), reason="triton not installed (pip install triton==3.9.0 runs these on CPU)"
)


@pytest.mark.skipif(
    _triton_version() < (3, 9),
    reason="needs triton >= 3.9 (older interpreters trip on NumPy 2 "
    "scalars; the compiled kernels are checked by test_triton_kernels_compile_for_sm90)",
)
def test_triton_kernels_match_twins_under_interpreter():
    assert "TRITON_INTERPRET checks passed" in _run_self("--triton-interpret", {"TRITON_INTERPRET": "1"})


@needs_triton
def test_triton_kernels_compile_for_sm90():
    assert "kernel configurations for sm_90" in _run_self("--triton-compile", {})


if __name__ == "__main__" and sys.argv[1:] == ["--triton-interpret"]:
    _interpreter_checks()
if __name__ == "__main__" and sys.argv[1:] == ["--triton-compile"]:
    _compile_checks()
