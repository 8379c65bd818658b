"""pruned_attention: placeholder that runs the reference until the fused kernels land."""
from __future__ import annotations

from . import reference


def pruned_attention(q, k, v, head_mask, *, attn_mask=None, is_causal=False, scale=None, return_confidence=False):
    return reference.pruned_attention(q, k, v, head_mask, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                      return_confidence=return_confidence)
