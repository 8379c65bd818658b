"""Thin wrappers over the native CPU attention kernels in fedsparse._C (raw buffers, no libtorch)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._backend import native


def available() -> bool:
    return native is not None and hasattr(native, "attention_row_stats")


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _bias_rows(bias: Tensor | None, n: int, sk: int):
    """bias None or [N, 1, Sq or 1, Sk] -> (float32 C-contiguous numpy [N, rows, Sk] or None, rows), as the
    kernels take it."""
    if bias is None:
        return None, 0
    bf = _f32(bias.reshape(n, -1, sk))
    return bf.numpy(), bf.shape[1]


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
    bias_np, bias_rows = _bias_rows(bias, n, sk)
    native.attention_row_stats(qf.numpy(), kf.numpy(), bias_np, bias_rows, bool(is_causal), float(scale),
                               m.numpy(), s.numpy(), bool(want_sum))
    return m, (s if want_sum else None)


def row_max(qs, ks, bias, is_causal, scale) -> Tensor:
    return row_stats(qs, ks, bias, is_causal, scale, want_sum=False)[0]


def has_scatter() -> bool:
    return native is not None and hasattr(native, "scatter_rows")


def _bytes(t: Tensor):
    """A zero-copy numpy uint8 view of a C-contiguous CPU tensor of any dtype (bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def scatter_rows(full: Tensor, rows: Tensor, part: Tensor) -> None:
    """full viewed as [R, -1]: row rows[n] = part[n], the other rows zero. full contiguous; part any layout."""
    assert full.is_contiguous() and part.dtype == full.dtype
    n = rows.numel()
    part = part.contiguous()
    row_bytes = full.numel() // (full.shape[0] * full.shape[1]) * full.element_size()
    native.scatter_rows(_bytes(full), _bytes(part) if n else torch.empty(0, dtype=torch.uint8).numpy(),
                        rows.to(torch.int64).contiguous().numpy(), row_bytes)


def has_probs() -> bool:
    return native is not None and hasattr(native, "attention_softmax")


def softmax_(s: Tensor, scale: float, bias: Tensor | None, is_causal: bool, qvalid: Tensor | None,
             maxp: Tensor | None, max_level: int = 2) -> None:
    """In place: s (float32 contiguous [N, Sq, Sk], q k^T) <- softmax(scale * s + bias) per row.

    bias None or [N, 1, Sq or 1, Sk] (any float dtype); is_causal masks key j > row i; qvalid None or bool
    [N, Sq] (False: the row is 0); maxp None or float32 contiguous [N, Sq] <- each row's largest probability
    (0 for a row with nothing to attend to, NaN for a row with a NaN logit). max_level: the widest SIMD used,
    2 = AVX-512, 1 = AVX2, 0 = scalar (tests).
    """
    bias_np, bias_rows = _bias_rows(bias, s.shape[0], s.shape[2])
    qv = qvalid.contiguous().numpy() if qvalid is not None else None
    native.attention_softmax(s.numpy(), float(scale), bias_np, bias_rows, bool(is_causal), qv,
                             maxp.numpy() if maxp is not None else None, max_level)


def dscores_(dp: Tensor, p: Tensor, delta: Tensor, scale: float, max_level: int = 2) -> None:
    """In place: dp (float32 contiguous [N, Sq, Sk], dO v^T) <- scale * p * (dp - delta[..., None]);
    p float32 contiguous [N, Sq, Sk], delta float32 [N, Sq]."""
    native.attention_dscores(dp.numpy(), p.numpy(), _f32(delta).numpy(), float(scale), max_level)


_FUSED = native is not None and hasattr(native, "attention_fused_forward") and native.simd_level() == 2


def has_fused() -> bool:
    """The fused kernel is built and fast here: it runs its GEMMs on AVX-512 (elsewhere a plain loop)."""
    return _FUSED


def _rows(t: Tensor):
    """float32 t as numpy, any strides but a contiguous last dimension (copied only if it is not)."""
    t = t.detach()
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.numpy()


def fused_forward(q: Tensor, k: Tensor, v: Tensor, pairs: np.ndarray, bias: Tensor | None, is_causal: bool,
                  scale: float, qvalid: Tensor | None, probs: Tensor | None, out: Tensor, maxp: Tensor | None,
                  max_level: int = 2) -> None:
    """Attention of the kept pairs: q [B, H, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] float32 (Hk dividing H;
    any strides); pairs numpy int64 [N] (b * H + h, distinct); bias None or [N, 1, Sq or 1, Sk]; qvalid None or
    bool [N, Sq]. Writes probs float32 contiguous [N, Sq, Sk] (None: not kept), out float32 contiguous
    [B, H, Sq, Dv] (pruned pairs 0) and maxp None or float32 [N, Sq] (each row's largest probability)."""
    bias_np, bias_rows = _bias_rows(bias, len(pairs), k.shape[2])
    native.attention_fused_forward(
        _rows(q), _rows(k), _rows(v), pairs, bias_np, bias_rows, bool(is_causal), float(scale),
        qvalid.contiguous().numpy() if qvalid is not None else None, probs.numpy() if probs is not None else None,
        out.numpy(), maxp.numpy() if maxp is not None else None, max_level)


def fused_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, pairs: np.ndarray, probs: Tensor,
                   scale: float, dq: Tensor, dk: Tensor, dv: Tensor, max_level: int = 2) -> None:
    """Gradients of fused_forward: writes dq, dk, dv (float32 contiguous, shaped like q, k, v; pruned pairs 0)
    from grad_out [B, H, Sq, Dv] (any strides) and the forward's out and probs."""
    native.attention_fused_backward(_rows(grad_out), _rows(q), _rows(k), _rows(v), out.numpy(), pairs,
                                    probs.numpy(), float(scale), dq.numpy(), dk.numpy(), dv.numpy(), max_level)
