"""Torch ops for head pruning: head confidence scoring and attention with pruned heads.

    head_confidence(q, k, *, attn_mask=None, scale=None, is_causal=False) -> float32 [B, H]
    pruned_attention(q, k, v, head_mask, *, attn_mask=None, is_causal=False, scale=None,
                     return_confidence=False) -> out [B, H, Sq, Dv] (, float32 confidence [B, H])

Semantics (masks, NaN policy, grouped-query heads) are spelled out in fedsparse.ops.reference, the spec.
"""
from .head_confidence import head_confidence
from .pruned_attention import pruned_attention

__all__ = ["head_confidence", "pruned_attention"]
