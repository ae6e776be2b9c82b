"""What a latent's decoder direction does downstream, and which latents point the same way.

Logit effects: the decoder row pushed through the model's final norm and unembedding, as the
logit lens does for a residual vector. Applying the norm *module* to the direction alone (not its
weight by hand) handles RMSNorm, Gemma's ``1 + weight`` and LayerNorm alike; the norm's scalar
rescaling and a final softcap are monotone, so the promoted/suppressed tokens do not depend on them.
A LayerNorm bias would add the same logits to every latent, so the norm of the zero vector is
subtracted. Similar latents: cosine similarity of decoder rows, computed in chunks so the
[m, m] matrix never exists.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenEffects(NamedTuple):
    promoted_ids: Tensor  # [n, top] token ids with the largest logit change
    promoted: Tensor  # [n, top] their logit change per unit activation (after the norm's scaling)
    suppressed_ids: Tensor  # [n, top]
    suppressed: Tensor  # [n, top]


class Neighbours(NamedTuple):
    ids: Tensor  # [n, top] latent ids, most similar first (the latent itself left out)
    cosine: Tensor  # [n, top]


@torch.no_grad()
def logit_effects(W_dec_rows: Tensor, model, top: int = 10, chunk: int = 256) -> TokenEffects:
    """Promoted/suppressed tokens of each decoder row in ``W_dec_rows`` [n, d] through ``model``'s unembedding."""
    from mechlib.models import final_norm, output_embedding

    norm, unembed = final_norm(model), output_embedding(model)
    weight = unembed.weight  # [vocab, d]
    assert isinstance(weight, Tensor)  # an unembedding is a Linear (or tied Embedding): nn.Module types it loosely
    dev, dtype = weight.device, weight.dtype
    zero = norm(torch.zeros(1, W_dec_rows.shape[1], device=dev, dtype=dtype))
    out: list[list[Tensor]] = [[], [], [], []]
    for s in range(0, W_dec_rows.shape[0], chunk):
        d = W_dec_rows[s : s + chunk].to(device=dev, dtype=dtype)
        logits = ((norm(d) - zero) @ weight.T).float()
        hi, lo = logits.topk(top, dim=-1), logits.topk(top, dim=-1, largest=False)
        for lst, t in zip(out, (hi.indices, hi.values, lo.indices, lo.values)):
            lst.append(t.cpu())
    return TokenEffects(*(torch.cat(t) for t in out))


@torch.no_grad()
def similar_latents(W_dec: Tensor, which: Tensor, top: int = 8, chunk: int = 1024) -> Neighbours:
    """The ``top`` latents whose decoder rows have the highest cosine with each latent in ``which``."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    top = min(top, unit.shape[0] - 1)
    ids, cos = [], []
    for s in range(0, which.numel(), chunk):
        w = which[s : s + chunk].to(unit.device)
        sim = unit[w] @ unit.T
        sim[torch.arange(w.numel(), device=unit.device), w] = -2.0  # not itself
        best = sim.topk(top, dim=-1)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
    return Neighbours(torch.cat(ids), torch.cat(cos))
