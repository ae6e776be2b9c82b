"""Sparse backward passes for the TopK SAE (exact math, any device, used by the CPU reference step).

Why: with plain autograd a TopK SAE pays for dense [N, m] gradients it does not need — the
encoder gradient ``xc.T @ grad_pre`` is an N·d·m product although only N·k entries of
``grad_pre`` are non-zero, and ``embedding_bag``'s backward sorts and scatters slowly on CPU.
Here each backward touches only the selected (row, latent) pairs, so the work is ∝ N·k·d
(Gao et al. 2024 do the same in Triton). The forward values are the ones plain autograd sees;
tests check the gradients against dense autograd in float64.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def scatter_rows(indices: Tensor, weights: Tensor, dense: Tensor, m: int) -> Tensor:
    """``out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * dense[n]`` → [m, d]."""
    n, j = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(j)
    st = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]), weights.reshape(-1), (m, n), check_invariants=False
    )
    return torch.sparse.mm(st, dense)


def gather_dots(indices: Tensor, a: Tensor, B: Tensor) -> Tensor:
    """``out[n, j] = a[n] · B[indices[n, j]]`` → [N, j] (a sampled dense-dense product).

    Uses ``sampled_addmm`` on a CSR pattern (columns sorted within each row, as CSR wants) on CPU;
    elsewhere a batched gather, which every backend has.
    """
    n, j = indices.shape
    if a.device.type != "cpu":
        return torch.bmm(B[indices], a.unsqueeze(-1)).squeeze(-1)
    cols, perm = indices.sort(dim=1)
    crow = torch.arange(0, n * j + 1, j, device=indices.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, cols.reshape(-1), torch.ones(n * j, dtype=a.dtype), (n, B.shape[0]), check_invariants=False
        )
    vals = torch.sparse.sampled_addmm(pattern, a, B.t(), beta=0.0).values().view(n, j)
    return torch.empty_like(vals).scatter_(1, perm, vals)


class SparseDecode(torch.autograd.Function):
    """``out[n] = sum_j values[n, j] * W_dec[indices[n, j]]`` (no bias); backward ∝ N·k·d."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_values = gather_dots(indices, g, W_dec) if ctx.needs_input_grad[0] else None
        g_W = scatter_rows(indices, values, g, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return g_values, None, g_W


class TopKValues(torch.autograd.Function):
    """``ReLU(pre[n, indices[n, j]])`` with ``pre = (x - b_dec) @ W_enc + b_enc``, given the
    already-computed selected pre-activations; backward only through the selected entries.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, indices: Tensor, selected: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, indices, selected > 0)
        return selected.relu()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W_enc, b_dec, indices, positive = ctx.saved_tensors
        g = g * positive
        m = W_enc.shape[1]
        g_b_enc = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1))
        g_W_enc = scatter_rows(indices, g, x - b_dec, m).t().contiguous() if ctx.needs_input_grad[1] else None
        # d pre[n, i] / d b_dec = -W_enc[:, i], so the bias gradient is -W_enc @ (column sums of g).
        g_b_dec = -(W_enc @ g_b_enc) if ctx.needs_input_grad[3] else None
        return None, g_W_enc, g_b_enc if ctx.needs_input_grad[2] else None, g_b_dec, None, None
