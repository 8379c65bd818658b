"""head_confidence: the confidence of every attention head, without the S x S probability matrix.

For one query row, max_j softmax(l)_j = exp(max_j l_j - logsumexp_j l_j) = 1 / sum_j exp(l_j - max_j l_j), so a
head's confidence needs, per row, only the running max and the running sum of exponentials: memory O(B·H·S).

Registered as the torch.library custom op ``fedsparse::head_confidence`` (with a fake implementation; not
differentiable: the wrapper detaches its inputs). Implementations:
  * CUDA: the Triton forward kernel of ``fedsparse.kernels.attention`` with the value pass switched off.
  * CPU: the native kernel ``fedsparse._C.attention_row_stats`` (q k^T, row max and sum of exponentials fused
    in one pass over key blocks held in cache) or, without the native module, chunked torch.
  * other devices and dtypes: the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _common, _native, reference
from ._common import masked_mean, split_mask


def head_confidence(q: Tensor, k: Tensor, *, attn_mask: Tensor | None = None, scale: float | None = None,
                    is_causal: bool = False) -> Tensor:
    """Head confidence (Voita et al. 2019), float32 [B, H].

    q [B, H, Sq, D], k [B, Hk, Sk, D] (H % Hk == 0), any strides and float dtype. attn_mask: bool [B, Sk]
    padding mask (True = valid; when Sq == Sk padded queries are also left out of the mean), or a bool/float
    mask broadcastable to [B, H, Sq, Sk] as in torch SDPA. is_causal: key j > query i masked. A sample with no
    valid query scores 0; NaN in q or k gives NaN. Not differentiable.
    """
    _common.check_qkv(q, k)
    return torch.ops.fedsparse.head_confidence(q.detach(), k.detach(), attn_mask, bool(is_causal),
                                               _common.default_scale(q.shape[-1], scale))


@torch.library.custom_op("fedsparse::head_confidence", mutates_args=())
def _head_confidence_op(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                        scale: float) -> Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _cpu_confidence(q, k, attn_mask, is_causal, scale)
    return reference.head_confidence(q, k, attn_mask=attn_mask, scale=scale, is_causal=is_causal)


@_head_confidence_op.register_fake
def _(q, k, attn_mask, is_causal, scale):
    return q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


@_head_confidence_op.register_kernel("cuda")
def _(q, k, attn_mask, is_causal, scale):
    return triton_confidence(q, k, attn_mask, is_causal, scale)


def _cpu_confidence(q, k, attn_mask, is_causal, scale):
    from .pruned_attention import _row_stats_torch
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    if b * h == 0 or sq == 0:
        return torch.zeros(b, h, dtype=torch.float32)
    masks = split_mask(attn_mask, b, h, sq, sk)
    group = h // hk
    # [N = B*H, S, D] views without copies where the strides allow (reshape copies otherwise).
    qs = q.reshape(b * h, sq, d)
    ks = (k if group == 1 else k.repeat_interleave(group, dim=1)).reshape(b * h, sk, d)
    if masks.kv is not None:
        bias = torch.zeros(b, 1, 1, sk).masked_fill_(~masks.kv[:, None, None, :], float("-inf"))
        bias = bias.expand(b, h, 1, sk).reshape(b * h, 1, 1, sk)
    elif masks.bias is not None:
        bias = masks.bias.expand(b, h, masks.bias.shape[2], sk).reshape(b * h, 1, -1, sk)
    else:
        bias = None
    if _native.available():
        m, s = _native.row_stats(qs, ks, bias, is_causal, scale, want_sum=True)
    else:
        m, s = _row_stats_torch(qs, ks, bias, is_causal, scale, want_sum=True)
    valid = m != float("-inf")
    if masks.qv is not None:
        valid &= masks.qv.repeat_interleave(h, dim=0)
    maxp = torch.where(valid, 1.0 / s, torch.zeros_like(s))
    return masked_mean(maxp, valid).view(b, h)


def triton_confidence(q, k, attn_mask, is_causal, scale, block_m=None, block_n=None):
    """The Triton path (any device Triton runs on; the CPU only under TRITON_INTERPRET=1)."""
    from fedsparse.kernels import attention as kern
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    masks = split_mask(attn_mask, b, h, sq, sk)
    kv = masks.kv.to(device=q.device, dtype=torch.int8) if masks.kv is not None else None
    qv = masks.qv.to(device=q.device, dtype=torch.int8) if masks.qv is not None else None
    bias = masks.bias.to(q.device) if masks.bias is not None else None
    idx = torch.arange(b * h, device=q.device, dtype=torch.int32)
    pb, ph = idx // h, idx % h
    _, maxp = kern.forward(q, k, None, None, pb, ph, kv=kv, qv=qv, bias=bias, causal=is_causal, scale=scale,
                           block_m=block_m, block_n=block_n)
    return masked_mean(maxp, maxp != 0).view(b, h)
