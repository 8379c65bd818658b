"""Plain-torch reference for the attention ops: readable, differentiable by autograd, and the spec that the
CPU path and the Triton kernels are tested against.

Shapes: q [B, H, Sq, D]; k, v [B, Hkv, Sk, D] with H % Hkv == 0 (grouped-query attention: query head h reads
key/value head h // (H // Hkv)); v may have its own last dimension Dv. Every computation runs in float32;
outputs come back in q's dtype, confidences are always float32.

Masks (attn_mask):
  * bool [B, Sk], True = valid token: a key/query padding mask. Padded keys get no attention; when Sq == Sk the
    padded queries are also masked: their output rows are zero (and get zero gradient) and they are left out of
    the confidence mean.
  * bool, broadcastable to [B, H, Sq, Sk], True = may attend (torch SDPA's convention).
  * float, broadcastable to [B, H, Sq, Sk]: added to the scaled logits (torch SDPA's convention). It gets no
    gradient.
is_causal masks key j > query i (top-left aligned, as torch SDPA does).

A query row with no key left to attend to (every logit -inf) outputs zeros, has zero gradient, and is not a
valid query for the confidence; torch SDPA's CPU kernels also output zeros there.

Head confidence (Voita et al. 2019) of head h in sample b: the mean, over the valid query rows i, of
max_j softmax(l_i)_j = exp(max_j l_ij - logsumexp_j l_ij). It is 0 for a sample with no valid query and for a
pruned head: never NaN unless the inputs hold NaN (NaN and inf in q, k, v propagate as they do in SDPA).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def expand_head_mask(head_mask: Tensor, b: int, h: int) -> Tensor:
    """bool [H] or [B, H] (any dtype: nonzero = kept) -> bool [B, H]."""
    if head_mask.dtype != torch.bool:
        head_mask = head_mask != 0
    if head_mask.dim() == 1 and head_mask.shape[0] == h:
        return head_mask.unsqueeze(0).expand(b, h)
    if head_mask.dim() == 2 and tuple(head_mask.shape) == (b, h):
        return head_mask
    raise ValueError(f"head_mask must be bool [H]={h} or [B, H]=({b}, {h}), got {tuple(head_mask.shape)}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (k heads must divide q heads)")
    if v is not None and (v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3])):
        raise ValueError(f"v {tuple(v.shape)} does not fit k {tuple(k.shape)}")


def _masked_logits(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
                   keep: Tensor | None = None):
    """float32 logits [B, H, Sq, Sk] with -inf where masked, and the bool [B, H, Sq] valid-query mask.
    Heads where keep [B, H] is False read zeros instead of q and k."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    qf, kf = q.float(), k.float()
    if k.shape[1] != h:
        kf = kf.repeat_interleave(h // k.shape[1], dim=1)
    if keep is not None:
        qf = torch.where(keep[:, :, None, None], qf, torch.zeros_like(qf))
        kf = torch.where(keep[:, :, None, None], kf, torch.zeros_like(kf))
    logits = (qf @ kf.transpose(-1, -2)) * default_scale(d, scale)
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    qvalid = torch.ones(b, 1, sq, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool and attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (b, sk):
                raise ValueError(f"a 2-D attn_mask must be bool [B, Sk]=({b}, {sk}), got {tuple(attn_mask.shape)}")
            allowed = allowed & attn_mask[:, None, None, :]
            if sq == sk:
                qvalid = qvalid & attn_mask[:, None, :]
        elif attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            logits = logits + attn_mask.float()
    logits = logits.masked_fill(~allowed, float("-inf"))
    qvalid = qvalid & (logits.amax(-1) > float("-inf"))
    return logits, qvalid.expand(b, h, sq)


def _row_stats(logits: Tensor, qvalid: Tensor):
    m = logits.amax(-1, keepdim=True)
    m = torch.where(qvalid.unsqueeze(-1), m, torch.zeros_like(m))
    return m


def head_confidence(q: Tensor, k: Tensor, *, attn_mask: Tensor | None = None, scale: float | None = None,
                    is_causal: bool = False) -> Tensor:
    """Head confidence, float32 [B, H]: per head, the mean over valid queries of the largest attention prob."""
    check_qkv(q, k)
    logits, qvalid = _masked_logits(q, k, attn_mask, is_causal, scale)
    m = _row_stats(logits, qvalid)
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(-1))
    maxp = torch.where(qvalid, torch.exp(m.squeeze(-1) - lse), torch.zeros_like(lse))
    n = qvalid.sum(-1)
    return torch.where(n > 0, maxp.sum(-1) / n.clamp_min(1), torch.zeros_like(maxp[..., 0]))


def pruned_attention(q: Tensor, k: Tensor, v: Tensor, head_mask: Tensor, *, attn_mask: Tensor | None = None,
                     is_causal: bool = False, scale: float | None = None, return_confidence: bool = False):
    """softmax(q k^T * scale + mask) v per head; heads with head_mask False output zeros (confidence 0).

    Returns out [B, H, Sq, Dv] in q's dtype, and with return_confidence also float32 confidence [B, H].
    """
    check_qkv(q, k, v)
    b, h = q.shape[:2]
    keep = expand_head_mask(head_mask, b, h).to(q.device)
    logits, qvalid = _masked_logits(q, k, attn_mask, is_causal, scale, keep)
    m = _row_stats(logits, qvalid)
    e = torch.exp(logits - m)
    den = e.sum(-1, keepdim=True)
    p = torch.where(qvalid.unsqueeze(-1), e / den, torch.zeros_like(e))
    vf = v.float()
    if v.shape[1] != h:
        vf = vf.repeat_interleave(h // v.shape[1], dim=1)
    # A pruned head is never read: its output and gradients are exact zeros even if its inputs hold NaN.
    p = torch.where(keep[:, :, None, None], p, torch.zeros_like(p))
    vf = torch.where(keep[:, :, None, None], vf, torch.zeros_like(vf))
    out = p @ vf
    out = torch.where(keep[:, :, None, None], out, torch.zeros_like(out)).to(q.dtype)
    if not return_confidence:
        return out
    with torch.no_grad():
        maxp = torch.where(qvalid, 1.0 / den.squeeze(-1), torch.zeros_like(den.squeeze(-1)))
        n = qvalid.sum(-1)
        conf = torch.where(n > 0, maxp.sum(-1) / n.clamp_min(1), torch.zeros_like(maxp[..., 0]))
        conf = torch.where(keep, conf, torch.zeros_like(conf))
    return out, conf
