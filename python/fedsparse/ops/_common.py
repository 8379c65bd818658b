"""Argument checks and mask normalization shared by the attention ops' CPU and GPU paths."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import check_qkv, default_scale, expand_head_mask  # noqa: F401  (re-exported)


@dataclass
class Masks:
    """attn_mask split into the forms the kernels read.

    kv: bool [B, Sk] valid keys, or None.  qv: bool [B, Sq] valid queries, or None.
    bias: float32 4-D, broadcastable to [B, H, Sq, Sk] (size-1 dims broadcast), added to the scaled logits
    (-inf where a bool 4-D mask is False), or None.
    """
    kv: Tensor | None = None
    qv: Tensor | None = None
    bias: Tensor | None = None


def split_mask(attn_mask: Tensor | None, b: int, h: int, sq: int, sk: int) -> Masks:
    if attn_mask is None:
        return Masks()
    if attn_mask.dtype == torch.bool and attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (b, sk):
            raise ValueError(f"a 2-D attn_mask must be bool [B, Sk]=({b}, {sk}), got {tuple(attn_mask.shape)}")
        return Masks(kv=attn_mask, qv=attn_mask if sq == sk else None)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got {tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for got, want in zip(m.shape, (b, h, sq, sk)):
        if got not in (1, want):
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H, Sq, Sk]="
                             f"{(b, h, sq, sk)}")
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    elif m.is_floating_point():
        bias = m.float()
    else:
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    return Masks(bias=bias)


def check_head_mask(head_mask: Tensor, b: int, h: int) -> Tensor:
    """bool [B, H] (a view where head_mask was [H])."""
    if not isinstance(head_mask, Tensor):
        head_mask = torch.as_tensor(head_mask)
    return expand_head_mask(head_mask, b, h)


def masked_mean(maxp: Tensor, valid: Tensor) -> Tensor:
    """mean of maxp [..., S] over valid [..., S] (0 where no row is valid), float32."""
    n = valid.sum(-1)
    tot = torch.where(valid, maxp, torch.zeros_like(maxp)).sum(-1)
    return torch.where(n > 0, tot / n.clamp_min(1), torch.zeros_like(tot))
