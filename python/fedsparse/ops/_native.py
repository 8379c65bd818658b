"""Thin wrappers over the native CPU attention kernels in fedsparse._C (raw buffers, no libtorch)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._backend import native


def available() -> bool:
    return native is not None and hasattr(native, "attention_row_stats")


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def row_stats(qs: Tensor, ks: Tensor, bias: Tensor | None, is_causal: bool, scale: float, want_sum: bool):
    """Row max m and (want_sum) sum_j exp(l_j - m) of the scaled, masked logits l = qs ks^T * scale + bias.

    qs [N, Sq, D], ks [N, Sk, D]; bias None or [N, 1, Sq or 1, Sk]. Returns float32 [N, Sq] (m; -inf for a
    row with nothing to attend to) and float32 [N, Sq] (the sum) or None.
    """
    n, sq, d = qs.shape
    sk = ks.shape[1]
    qf, kf = _f32(qs), _f32(ks)
    m = torch.empty(n, sq, dtype=torch.float32)
    s = torch.empty(n, sq, dtype=torch.float32) if want_sum else m
    if bias is not None:
        bf = _f32(bias.reshape(n, -1, sk))
        bias_rows = bf.shape[1]
        bias_np = bf.numpy()
    else:
        bias_rows, bias_np = 0, None
    native.attention_row_stats(qf.numpy(), kf.numpy(), bias_np, bias_rows, bool(is_causal), float(scale),
                               m.numpy(), s.numpy(), bool(want_sum))
    return m, (s if want_sum else None)


def row_max(qs, ks, bias, is_causal, scale) -> Tensor:
    return row_stats(qs, ks, bias, is_causal, scale, want_sum=False)[0]
