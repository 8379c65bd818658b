"""pruned_attention: scaled dot-product attention in which pruned heads output zeros and cost nothing.

Registered as the torch.library custom ops ``fedsparse::pruned_attention`` (forward; returns the output, the
row log-sum-exp that the backward needs, and the head confidence) and ``fedsparse::pruned_attention_backward``,
with a fake (meta) implementation each and autograd wired between them, so the op traces under torch.compile.

Work is laid out over the kept (batch, head) pairs only, forward and backward:
  * CUDA: the Triton kernels of ``fedsparse.kernels.attention`` (grid over kept pairs only).
  * CPU, float32 with some heads pruned, on AVX-512 (eager calls; _FusedCpu): the native fused kernel of
    csrc/attention_fused.cpp, one parallel pass per direction. It reads the kept pairs of q, k, v in place
    (no gather), keeps their probabilities from the forward for the backward (six GEMMs per pair where flash
    attention needs seven) and writes the full-size output and gradients directly, pruned pairs zeroed in the
    same pass. Up to PAIR_MAX probabilities per pair and MATERIALIZE_MAX per call; without a backward
    (no_grad, inference), P lives in a per-thread buffer, one pair at a time, and no autograd node is made.
  * CPU otherwise (float16, bfloat16; no head pruned; larger calls; the registered op):
    the kept pairs are gathered (one copy of 1/10 of q, k, v at 90% pruning) and handed to ATen's CPU
    flash-attention kernels as a batch of N single-head problems; results are written into the full tensors
    with one contiguous copy per kept pair and one memset per pruned pair. The naive way (index_select, SDPA,
    torch.zeros + index_copy, and autograd's zeros + index_add for each of dq, dk, dv) writes every pruned
    byte twice and gathers through autograd. See benchmarks/bench_attention.py.
  * anything else (float64, other devices): the plain-torch reference, differentiated by autograd.

Confidence (return_confidence=True) needs each row's max logit next to the log-sum-exp: the Triton kernel
has both in registers, the fused CPU kernel each row's largest probability. Otherwise on CPU (float32, up to
MATERIALIZE_MAX probabilities of the kept pairs, eager calls) the kept pairs' probabilities are materialized:
bmm, one native softmax pass that also yields each row's largest probability, bmm; the backward reuses them
(see _materialized_forward), so scoring while training costs nothing extra. Otherwise the row max comes from
the native kernel ``fedsparse._C.attention_row_stats`` (one pass over q k^T of the kept pairs, no S x S
buffer) or, without it, from a chunked torch bmm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import _common, _pool, reference
from ._common import Masks, masked_mean, split_mask

_ATEN = torch.ops.aten
_CPU_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pruned_attention(q: Tensor, k: Tensor, v: Tensor, head_mask: Tensor, *, attn_mask: Tensor | None = None,
                     is_causal: bool = False, scale: float | None = None, return_confidence: bool = False):
    """softmax(q k^T * scale + mask) v for the kept heads; zeros for pruned heads.

    q [B, H, Sq, D]; k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] with H % Hk == 0 (grouped-query heads); any strides.
    head_mask: bool [H] or [B, H], True = kept. Keep it on the CPU when q is on a GPU: the kept-head list is
    then read without a device sync.
    attn_mask: bool [B, Sk] padding mask (True = valid; masks queries too when Sq == Sk), or a bool/float mask
    broadcastable to [B, H, Sq, Sk] as in torch SDPA (the mask gets no gradient).
    scale: default 1/sqrt(D).

    Returns out [B, H, Sq, Dv] in q's dtype; with return_confidence also float32 [B, H]: each kept head's
    confidence (mean over valid queries of the largest attention probability), 0 for pruned heads and for
    samples with no valid query. Differentiable in q, k, v (not twice); the confidence is not differentiable.
    Pruned heads' inputs are never read: their outputs and gradients are exact zeros even if they hold NaN.
    NaN in a kept head's inputs propagates to that head's output and confidence.
    """
    _common.check_qkv(q, k, v)
    b, h = q.shape[:2]
    keep = _common.check_head_mask(head_mask, b, h)
    scale = _common.default_scale(q.shape[-1], scale)
    if _eager_cpu_ok(q, k, v):
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        pairs = _fused_pairs(q, k, keep, keep_probs=grad)
        if pairs is not None and grad:
            out, conf = _FusedCpu.apply(q, k, v, pairs, attn_mask, bool(is_causal), scale, bool(return_confidence))
        elif pairs is not None:  # no backward: P lives in a per-thread buffer, one pair at a time
            out, conf, _ = _fused_forward(q, k, v, pairs, attn_mask, bool(is_causal), scale, bool(return_confidence),
                                          keep_probs=False)
        else:
            out, conf = _EagerCpu.apply(q, k, v, keep, attn_mask, bool(is_causal), scale, bool(return_confidence))
        return (out, conf) if return_confidence else out
    out, _, conf = torch.ops.fedsparse.pruned_attention(
        q, k, v, keep, attn_mask, bool(is_causal), scale, bool(return_confidence))
    return (out, conf) if return_confidence else out


def _eager_cpu_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Eager CPU calls skip the custom-op dispatcher (see _EagerCpu). Traced calls (torch.compile, export), fake
    and subclass tensors, and calls under a dispatch mode (FlopCounterMode, fedsparse.count_ops) go through the
    registered op, so tracing and counting see fedsparse::pruned_attention itself."""
    return (_EAGER_CPU and type(q) is Tensor and type(k) is Tensor and type(v) is Tensor
            and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES and k.dtype == q.dtype
            and v.dtype == q.dtype and not torch.compiler.is_compiling()
            and _python_dispatch._get_current_dispatch_mode() is None)


_EAGER_CPU = True  # tests switch it off to run the op path eagerly


# --------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fedsparse::pruned_attention", mutates_args=())
def _pruned_attention_op(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attn_mask: Optional[Tensor],
                         is_causal: bool, scale: float, with_conf: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out [B, H, Sq, Dv] q.dtype, lse [B, H, Sq] float32 (backend-private), conf [B, H] float32)."""
    if q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype:
        return _cpu_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf)
    return _reference_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf)


@_pruned_attention_op.register_fake
def _(q, k, v, keep, attn_mask, is_causal, scale, with_conf):
    b, h, sq, _ = q.shape
    return (q.new_empty(b, h, sq, v.shape[3]), q.new_empty(b, h, sq, dtype=torch.float32),
            q.new_empty(b, h, dtype=torch.float32))


@torch.library.custom_op("fedsparse::pruned_attention_backward", mutates_args=())
def _pruned_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  keep: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype:
        return _cpu_backward(grad_out, q, k, v, out, lse, keep, attn_mask, is_causal, scale)
    return _reference_backward(grad_out, q, k, v, keep, attn_mask, is_causal, scale)


@_pruned_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, keep, attn_mask, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, keep, attn_mask, is_causal, scale, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, keep, attn_mask, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad_out, _grad_lse, _grad_conf):
    q, k, v, keep, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    dq, dk, dv = torch.ops.fedsparse.pruned_attention_backward(
        grad_out, q, k, v, out, lse, keep, attn_mask, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_pruned_attention_op.register_autograd(_backward, setup_context=_setup_context)


@_pruned_attention_op.register_kernel("cuda")
def _(q, k, v, keep, attn_mask, is_causal, scale, with_conf):
    return triton_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf)


@_pruned_attention_backward_op.register_kernel("cuda")
def _(grad_out, q, k, v, out, lse, keep, attn_mask, is_causal, scale):
    return triton_backward(grad_out, q, k, v, out, lse, keep, attn_mask, is_causal, scale)


# ------------------------------------------------------------------------------------------ shared helpers

def _pairs(keep: Tensor):
    """Kept (batch, head) pairs of keep [B, H], read on the host (no device sync when keep is on the CPU)."""
    bi, hi = keep.cpu().nonzero(as_tuple=True)
    return bi, hi


def _scatter_pairs(full: Tensor, flat: Tensor, part: Tensor) -> Tensor:
    """full (contiguous [B, H, ...]) = zeros, except rows flat of its [B*H, -1] view = part [N, ...].

    Native: one parallel pass, a memcpy per kept row and a memset per pruned one. Fallback: zero_() of the
    whole tensor then index_copy_ (the kept rows written twice). index_fill_ over the pruned rows was the
    slowest way (0.17-0.7 ms per 5.2 MB here, against ~0.1 ms for a memset; 2 Xeon cores)."""
    from . import _native
    if _native.has_scatter() and full.device.type == "cpu" and full.numel():
        _native.scatter_rows(full, flat, part)
        return full
    full.zero_()
    full.view(full.shape[0] * full.shape[1], -1).index_copy_(0, flat, part.reshape(flat.numel(), -1))
    return full


def _conf_from_pairs(maxp: Tensor, bi: Tensor, hi: Tensor, b: int, h: int, device) -> Tensor:
    """[N, Sq] row max-probabilities (0 = row excluded) -> float32 [B, H] confidence (0 for pruned)."""
    conf = torch.zeros(b, h, dtype=torch.float32, device=device)
    if bi.numel():
        conf[bi.to(device), hi.to(device)] = masked_mean(maxp, maxp != 0)
    return conf


# ------------------------------------------------------------------------------------------------ CPU path

def _pair_bias(masks: Masks, bi: Tensor, hi: Tensor, b: int, h: int, sk: int, dtype) -> Tensor | None:
    """The additive mask of each kept pair, [N, 1, Sq or 1, Sk] in the kernel's dtype (ATen's CPU flash kernel
    wants the mask in the query's dtype)."""
    if masks.kv is not None:
        kv = masks.kv[bi]
        return torch.zeros(bi.numel(), 1, 1, sk, dtype=dtype).masked_fill_(~kv[:, None, None, :], float("-inf"))
    if masks.bias is not None:
        bias = masks.bias
        bias = bias.expand(b, h, bias.shape[2], sk)[bi, hi]
        return bias.unsqueeze(1).to(dtype)
    return None


@dataclass
class _CpuPlan:
    """One call's kept pairs, gathered once: what the CPU forward computes on and the eager backward reuses.

    all_kept: the caller's tensors are used as they are (no gather, no scatter). Otherwise q, k, v, bias, qv,
    o and lse hold the N kept pairs as a batch of N single-head problems ([N, 1, S, D]). probs: the kept pairs'
    attention probabilities float32 [N, Sq, Sk] when the forward materialized them (then lse is None).
    """
    b: int
    h: int
    hk: int
    sq: int
    sk: int
    bi: Tensor
    hi: Tensor
    all_kept: bool
    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    qv: Tensor | None
    o: Tensor | None = None
    lse: Tensor | None = None
    probs: Tensor | None = None


def _cpu_plan(q, k, v, keep, attn_mask) -> _CpuPlan | None:
    """None when there is nothing to compute (no kept pair, or an empty sequence)."""
    b, h, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    bi, hi = _pairs(keep)
    n = bi.numel()
    if n == 0 or sq == 0 or sk == 0:
        return None
    masks = split_mask(attn_mask, b, h, sq, sk)
    if n == b * h and hk == h:
        return _CpuPlan(b, h, hk, sq, sk, bi, hi, True, q, k, v, _full_bias(masks, b, sk, q.dtype), masks.qv)
    group = h // hk
    hkv = hi // group if group > 1 else hi
    return _CpuPlan(b, h, hk, sq, sk, bi, hi, False, _gather(q, bi, hi), _gather(k, bi, hkv), _gather(v, bi, hkv),
                    _pair_bias(masks, bi, hi, b, h, sk, q.dtype), masks.qv[bi] if masks.qv is not None else None)


def _gather(t: Tensor, bi: Tensor, hi: Tensor) -> Tensor:
    """t[bi, hi] as [N, 1, S, D]. index_select over a [B*H, S, D] view where the strides allow one: 10 us
    against 26 us for advanced indexing, for 16 of 160 heads of [8, 20, 256, 32] float32 (2 Xeon cores)."""
    b, h = t.shape[:2]
    try:
        flat_view = t.view(b * h, *t.shape[2:])
    except RuntimeError:
        return t[bi, hi].unsqueeze(1)
    return flat_view.index_select(0, bi * h + hi).unsqueeze(1)


# Kept pairs' probabilities held from the forward to the backward (the fused kernel; elsewhere, with confidence,
# _materialized_forward), at most this many elements per call (16 MB).
MATERIALIZE_MAX = 1 << 22


def _materialize_ok(p: _CpuPlan) -> bool:
    from . import _native
    return (not p.all_kept and p.q.dtype == torch.float32 and p.bi.numel() * p.sq * p.sk <= MATERIALIZE_MAX
            and _native.has_probs())


def _materialized_forward(p: _CpuPlan, is_causal: bool, scale: float, with_conf: bool):
    """The kept pairs' attention with their probabilities kept for the backward: P = softmax(q k^T * scale +
    bias) float32 [N, Sq, Sk] (one bmm, one native pass that also gives each row's largest probability, i.e.
    the confidence for free), then o = P v. The backward is then four bmm and one native pass
    (_materialized_backward) instead of ATen's flash backward. Measured on 2 Xeon cores, B=8, H=20, S=256,
    D=32, 2 of 20 heads kept, forward + backward with confidence: 3.1 ms against 3.76 ms for flash plus the
    native row-max pass; without confidence the two ways tie (3.0 ms each: the GEMMs are faster, but P makes
    nine trips through memory), so flash stays there. P stays alive until the backward (at most
    MATERIALIZE_MAX floats per call). Padded queries get P rows of 0, so their output is 0.
    -> (o [N, 1, Sq, Dv], P, largest probability per row float32 [N, Sq] or None)."""
    from . import _native
    n = p.bi.numel()
    probs = _pool.empty((n, p.sq, p.sk), torch.float32)
    torch.bmm(p.q[:, 0], p.k[:, 0].transpose(1, 2), out=probs)
    maxp = torch.empty(n, p.sq, dtype=torch.float32) if with_conf else None
    _native.softmax_(probs, scale, p.bias, is_causal, p.qv, maxp)
    return torch.bmm(probs, p.v[:, 0]).unsqueeze(1), probs, maxp


def _materialized_backward(p: _CpuPlan, go: Tensor, scale: float):
    """go [N, 1, Sq, Dv] (gathered) -> dq, dk, dv of the kept pairs, [N, 1, S, D], from p.probs:
    dv = P^T dO, dS = scale * P * (dO v^T - rowsum(dO * o)), dq = dS k, dk = dS^T q."""
    from . import _native
    g, probs = go[:, 0], p.probs
    n, sq, sk = probs.shape
    dv = torch.bmm(probs.transpose(1, 2), g)
    ds = _pool.empty((n, sq, sk), torch.float32)
    torch.bmm(g, p.v[:, 0].transpose(1, 2), out=ds)
    _native.dscores_(ds, probs, (g * p.o[:, 0]).sum(-1), scale)
    dq = torch.bmm(ds, p.k[:, 0])
    dk = torch.bmm(ds.transpose(1, 2), p.q[:, 0])
    return dq.unsqueeze(1), dk.unsqueeze(1), dv.unsqueeze(1)


def _cpu_forward_plan(p: _CpuPlan, is_causal: bool, scale: float, with_conf: bool, want_lse: bool = True,
                      materialize: bool = False):
    """-> (out [B, H, Sq, Dv], lse [B, H, Sq] (None if not want_lse), conf [B, H]); sets p.o, p.lse (compact)
    for the backward, or p.o, p.probs with materialize (then want_lse must be False)."""
    if materialize:
        p.o, p.probs, maxp = _materialized_forward(p, is_causal, scale, with_conf)
        out = _scatter_pairs(_pool.empty((p.b, p.h, p.sq, p.o.shape[-1]), p.o.dtype), p.bi * p.h + p.hi, p.o)
        if with_conf:
            return out, None, _conf_from_pairs(maxp, p.bi, p.hi, p.b, p.h, "cpu")
        return out, None, torch.zeros(p.b, p.h, dtype=torch.float32)
    conf = torch.zeros(p.b, p.h, dtype=torch.float32)
    o, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(p.q, p.k, p.v, 0.0, is_causal, attn_mask=p.bias,
                                                               scale=scale)
    if p.qv is not None:  # padded queries output zeros (the kernel gave them the valid keys' average)
        o = o * p.qv[:, None, :, None].to(o.dtype)
    p.o, p.lse = o, lse
    if p.all_kept:
        out, lse_full = o, lse
        if with_conf:
            bias = p.bias
            if bias is not None:
                bias = bias.expand(p.b, p.h, bias.shape[2], p.sk).reshape(p.b * p.h, 1, -1, p.sk)
            m = _row_max_cpu(p.q.reshape(p.b * p.h, p.sq, -1), p.k.reshape(p.b * p.h, p.sk, -1), bias,
                             is_causal, scale).view(p.b, p.h, p.sq)
            conf = _confidence(m, lse, None if p.qv is None else p.qv[:, None, :])
        return out, lse_full, conf
    n = p.bi.numel()
    flat = p.bi * p.h + p.hi
    out = _scatter_pairs(_pool.empty((p.b, p.h, p.sq, o.shape[-1]), o.dtype), flat, o)
    lse_full = _scatter_pairs(torch.empty(p.b, p.h, p.sq, dtype=torch.float32), flat, lse) if want_lse else None
    if with_conf:
        m = _row_max_cpu(p.q[:, 0], p.k[:, 0], p.bias, is_causal, scale)  # [N, Sq] float32
        conf[p.bi, p.hi] = _confidence(m, lse.reshape(n, p.sq), p.qv)
    return out, lse_full, conf


def _cpu_backward_plan(p: _CpuPlan, grad_out: Tensor, is_causal: bool, scale: float):
    go = grad_out if grad_out.dtype == p.q.dtype else grad_out.to(p.q.dtype)
    if not p.all_kept:
        go = _gather(go, p.bi, p.hi)
    if p.probs is not None:  # padded queries' P rows are 0: their grad_out reaches nothing
        gq, gk, gv = _materialized_backward(p, go, scale)
    else:
        if p.qv is not None:
            go = go * p.qv[:, None, :, None].to(go.dtype)
        gq, gk, gv = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            go, p.q, p.k, p.v, p.o, p.lse, 0.0, is_causal, attn_mask=p.bias, scale=scale)
    if p.all_kept:
        return gq, gk, gv
    b, h, hk, sq, sk = p.b, p.h, p.hk, p.sq, p.sk
    n, d, dv = p.bi.numel(), gq.shape[-1], gv.shape[-1]
    flat = p.bi * h + p.hi
    dq = _scatter_pairs(_pool.empty((b, h, sq, d), gq.dtype), flat, gq)
    if hk == h:
        dk = _scatter_pairs(_pool.empty((b, h, sk, d), gk.dtype), flat, gk)
        dv_ = _scatter_pairs(_pool.empty((b, h, sk, dv), gv.dtype), flat, gv)
    else:  # several kept query heads share a key/value head: sum their gradients
        flat_kv = p.bi * hk + p.hi // (h // hk)
        dk = torch.zeros(b, hk, sk, d, dtype=gk.dtype)
        dv_ = torch.zeros(b, hk, sk, dv, dtype=gv.dtype)
        dk.view(b * hk, -1).index_add_(0, flat_kv, gk.reshape(n, -1))
        dv_.view(b * hk, -1).index_add_(0, flat_kv, gv.reshape(n, -1))
    return dq, dk, dv_


def _cpu_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf):
    p = _cpu_plan(q, k, v, keep, attn_mask)
    if p is None:
        b, h, sq, _ = q.shape
        return (torch.zeros(b, h, sq, v.shape[3], dtype=q.dtype), torch.zeros(b, h, sq, dtype=torch.float32),
                torch.zeros(b, h, dtype=torch.float32))
    return _cpu_forward_plan(p, is_causal, scale, with_conf)


def _cpu_backward(grad_out, q, k, v, out, lse_full, keep, attn_mask, is_causal, scale):
    p = _cpu_plan(q, k, v, keep, attn_mask)
    if p is None:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if p.all_kept:
        p.o, p.lse = out, lse_full
    else:
        p.o, p.lse = out[p.bi, p.hi].unsqueeze(1), lse_full[p.bi, p.hi].unsqueeze(1)
    return _cpu_backward_plan(p, grad_out, is_causal, scale)


class _EagerCpu(torch.autograd.Function):
    """The CPU path without the custom-op dispatcher, for eager mode: the plan (kept pairs gathered once) is
    kept from forward to backward, so the backward gathers only grad_out, and only the kept pairs' q, k, v
    (1/10 of them at 90% pruning) stay alive between the passes. Same kernels and results as the op."""

    @staticmethod
    def forward(ctx, q, k, v, keep, attn_mask, is_causal, scale, with_conf):
        p = _cpu_plan(q, k, v, keep, attn_mask)
        ctx.plan, ctx.is_causal, ctx.scale = None, is_causal, scale
        ctx.shapes = (q.shape, k.shape, v.shape)
        if p is None:
            b, h, sq, _ = q.shape
            ctx.mark_non_differentiable(conf := torch.zeros(b, h, dtype=torch.float32))
            return torch.zeros(b, h, sq, v.shape[3], dtype=q.dtype), conf
        out, _, conf = _cpu_forward_plan(p, is_causal, scale, with_conf, want_lse=False,
                                         materialize=with_conf and _materialize_ok(p))
        ctx.mark_non_differentiable(conf)
        # Tensors go through save_for_backward (version checks, no reference cycle through out).
        ctx.save_for_backward(p.q, p.k, p.v, p.o, p.lse, p.bias, p.qv, p.probs)
        p.q = p.k = p.v = p.o = p.lse = p.bias = p.qv = p.probs = None
        ctx.plan = p
        return out, conf

    @staticmethod
    def backward(ctx, grad_out, _grad_conf):
        p = ctx.plan
        if p is None:  # nothing was kept: zero gradients
            (sq, sk, sv), dt = ctx.shapes, grad_out.dtype
            return (torch.zeros(sq, dtype=dt), torch.zeros(sk, dtype=dt), torch.zeros(sv, dtype=dt),
                    None, None, None, None, None)
        # A local copy: tensors stored back on ctx.plan would tie the graph to itself (q's grad_fn -> this node
        # -> ctx -> plan -> q), a cycle through C++ autograd nodes that the garbage collector cannot break.
        q, k, v, o, lse, bias, qv, probs = ctx.saved_tensors
        full = dataclasses.replace(p, q=q, k=k, v=v, o=o, lse=lse, bias=bias, qv=qv, probs=probs)
        dq, dk, dv = _cpu_backward_plan(full, grad_out, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


# The fused kernel computes a pair's Sq x Sk probabilities whole; up to this many (1 MB: Sq = Sk = 512) they stay
# in cache. Beyond, ATen's flash tiles win: Sq = Sk = 1024, B=1 H=20 D=32, 2 heads kept, fwd+bwd 5.2 against
# 4.8 ms; at 512 (B=4 H=12 D=64) the fused kernel takes 7.3 against 9.8 ms (2 Xeon cores).
PAIR_MAX = 1 << 18


def _fused_pairs(q: Tensor, k: Tensor, keep: Tensor, keep_probs: bool) -> np.ndarray | None:
    """The kept pairs (flat b * H + h, numpy int64 [N]) where the fused native kernel takes the call: float32,
    some but not all pairs kept, AVX-512 at run time, Sq * Sk <= PAIR_MAX, and with keep_probs (a backward will
    follow) N * Sq * Sk <= MATERIALIZE_MAX. None otherwise. (numpy: a few microseconds where torch ops take
    tens, right after a kernel has filled the caches.)"""
    from . import _native
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if not (q.dtype == torch.float32 and 0 < sq * sk <= PAIR_MAX and _native.has_fused()):
        return None
    pairs = np.flatnonzero(keep.cpu().numpy())
    n = len(pairs)
    return pairs if 0 < n < b * h and (not keep_probs or n * sq * sk <= MATERIALIZE_MAX) else None


def _fused_forward(q, k, v, pairs, attn_mask, is_causal: bool, scale: float, with_conf: bool, keep_probs: bool):
    """The fused kernel's forward -> (out [B, H, Sq, Dv] float32, conf float32 [B, H] or None, P float32
    [N, Sq, Sk] or None (keep_probs False))."""
    from . import _native
    b, h, sq, _ = q.shape
    sk, n = k.shape[2], len(pairs)
    bias = qv = conf = None
    if attn_mask is not None or with_conf:
        flat = torch.from_numpy(pairs)
        bi, hi = flat // h, flat % h
        masks = split_mask(attn_mask, b, h, sq, sk)
        bias = _pair_bias(masks, bi, hi, b, h, sk, torch.float32)
        qv = masks.qv[bi] if masks.qv is not None else None
    probs = _pool.empty((n, sq, sk), torch.float32) if keep_probs else None
    out = _pool.empty((b, h, sq, v.shape[3]), torch.float32)
    maxp = torch.empty(n, sq, dtype=torch.float32) if with_conf else None
    _native.fused_forward(q, k, v, pairs, bias, is_causal, scale, qv, probs, out, maxp)
    if with_conf:
        conf = _conf_from_pairs(maxp, bi, hi, b, h, "cpu")
    return out, conf, probs


class _FusedCpu(torch.autograd.Function):
    """The CPU path for float32 with some heads pruned (see _fused_pairs): one native pass per direction over
    the kept (batch, head) pairs, read in place from q, k, v (no gather), writing the full-size output or
    gradients (pruned pairs zeroed in the same pass). The kept pairs' probabilities P float32 [N, Sq, Sk] are
    kept for the backward, which is then four GEMMs per pair (flash attention's needs five: it recomputes
    q k^T); the forward yields each row's largest probability, so confidence costs nothing. Keeps q, k, v, out
    and P alive for the backward. Returns (out, conf or None). See benchmarks/bench_attention.py."""

    @staticmethod
    def forward(ctx, q, k, v, pairs, attn_mask, is_causal, scale, with_conf):
        out, conf, probs = _fused_forward(q, k, v, pairs, attn_mask, is_causal, scale, with_conf, keep_probs=True)
        if conf is not None:
            ctx.mark_non_differentiable(conf)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.pairs, ctx.scale = pairs, scale
        return out, conf

    @staticmethod
    def backward(ctx, grad_out, _grad_conf):
        from . import _native
        q, k, v, out, probs = ctx.saved_tensors
        dq, dk, dv = (_pool.empty(t.shape, torch.float32) for t in (q, k, v))
        _native.fused_backward(grad_out.float(), q, k, v, out, ctx.pairs, probs, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None


def _full_bias(masks: Masks, b: int, sk: int, dtype) -> Tensor | None:
    """The additive mask for all heads at once, 4-D broadcastable, in the kernel's dtype."""
    if masks.kv is not None:
        return torch.zeros(b, 1, 1, sk, dtype=dtype).masked_fill_(~masks.kv[:, None, None, :], float("-inf"))
    if masks.bias is not None:
        return masks.bias.to(dtype)
    return None


def _confidence(m: Tensor, lse: Tensor, qv: Tensor | None) -> Tensor:
    """Row max m and log-sum-exp lse [..., Sq] -> mean over valid rows of exp(m - lse), float32 [...]."""
    valid = m != float("-inf")
    if qv is not None:
        valid = valid & qv
    return masked_mean(torch.where(valid, torch.exp(m - lse), torch.zeros_like(m)), valid)


def _row_max_cpu(qs: Tensor, ks: Tensor, bias: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    """max_j of the masked, scaled logits of each row: qs [N, Sq, D], ks [N, Sk, D] -> float32 [N, Sq]."""
    from . import _native
    if _native.available():
        return _native.row_max(qs, ks, bias, is_causal, scale)
    return _row_stats_torch(qs, ks, bias, is_causal, scale, want_sum=False)[0]


def _row_stats_torch(qs, ks, bias, is_causal, scale, want_sum):
    """Chunked torch fallback: row max (and sum of exp(l - max)) with at most ~4M logits alive at a time."""
    n, sq, _ = qs.shape
    sk = ks.shape[1]
    m_all = torch.empty(n, sq, dtype=torch.float32)
    s_all = torch.empty(n, sq, dtype=torch.float32) if want_sum else None
    rows = max(1, (1 << 22) // max(1, sk))
    causal = torch.ones(sq, sk, dtype=torch.bool).tril() if is_causal else None
    for p0 in range(0, n, max(1, rows // max(1, sq))):
        p1 = min(n, p0 + max(1, rows // max(1, sq)))
        for r0 in range(0, sq, min(sq, rows)):
            r1 = min(sq, r0 + rows)
            lg = torch.bmm(qs[p0:p1, r0:r1].float(), ks[p0:p1].float().transpose(1, 2)).mul_(scale)
            if bias is not None:
                bb = bias[p0:p1, 0]
                lg += bb[:, r0:r1] if bb.shape[1] != 1 else bb
            if causal is not None:
                lg.masked_fill_(~causal[r0:r1], float("-inf"))
            m = lg.amax(-1)
            m_all[p0:p1, r0:r1] = m
            if want_sum:
                ms = torch.where(m == float("-inf"), torch.zeros_like(m), m)
                s_all[p0:p1, r0:r1] = lg.sub_(ms.unsqueeze(-1)).exp_().sum(-1)
    return m_all, s_all


# ------------------------------------------------------------------------------------------ reference path

def _reference_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf):
    with torch.no_grad():
        out, conf = reference.pruned_attention(q, k, v, keep, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=scale, return_confidence=True)
    b, h, sq, _ = q.shape
    if not with_conf:
        conf = torch.zeros_like(conf)
    return out, torch.zeros(b, h, sq, dtype=torch.float32, device=q.device), conf


def _reference_backward(grad_out, q, k, v, keep, attn_mask, is_causal, scale):
    """The attention backward in closed form, float32, from the reference's probabilities (autograd is not
    available inside a custom op's implementation)."""
    b, h = q.shape[:2]
    group = h // k.shape[1]
    logits, qvalid = reference._masked_logits(q, k, attn_mask, is_causal, scale, keep)
    m = reference._row_stats(logits, qvalid)
    e = torch.exp(logits - m)
    p = torch.where(qvalid.unsqueeze(-1) & keep[:, :, None, None], e / e.sum(-1, keepdim=True),
                    torch.zeros_like(e))
    vf = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
    go = torch.where(keep[:, :, None, None], grad_out.float(), torch.zeros_like(grad_out, dtype=torch.float32))
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    kf = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    if group > 1:
        dk = dk.unflatten(1, (-1, group)).sum(2)
        dv = dv.unflatten(1, (-1, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------- Triton path

def _triton_masks(masks: Masks, device):
    kv = masks.kv.to(device=device, dtype=torch.int8) if masks.kv is not None else None
    qv = masks.qv.to(device=device, dtype=torch.int8) if masks.qv is not None else None
    bias = masks.bias.to(device) if masks.bias is not None else None
    return kv, qv, bias


def triton_forward(q, k, v, keep, attn_mask, is_causal, scale, with_conf, block_m=None, block_n=None):
    """The Triton forward (any device Triton runs on; the CPU only under TRITON_INTERPRET=1)."""
    from fedsparse.kernels import attention as kern
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    bi, hi = _pairs(keep)
    out = torch.zeros(b, h, sq, v.shape[3], dtype=q.dtype, device=q.device)
    lse_full = torch.zeros(b, h, sq, dtype=torch.float32, device=q.device)
    if bi.numel() == 0:
        return out, lse_full, torch.zeros(b, h, dtype=torch.float32, device=q.device)
    kv, qv, bias = _triton_masks(split_mask(attn_mask, b, h, sq, sk), q.device)
    pb = bi.to(device=q.device, dtype=torch.int32, non_blocking=True)
    ph = hi.to(device=q.device, dtype=torch.int32, non_blocking=True)
    lse, maxp = kern.forward(q, k, v, out, pb, ph, kv=kv, qv=qv, bias=bias, causal=is_causal, scale=scale,
                             block_m=block_m, block_n=block_n)
    lse_full[pb.long(), ph.long()] = lse
    conf = _conf_from_pairs(maxp, bi, hi, b, h, q.device) if with_conf else torch.zeros(
        b, h, dtype=torch.float32, device=q.device)
    return out, lse_full, conf


def triton_backward(grad_out, q, k, v, out, lse_full, keep, attn_mask, is_causal, scale, block_m=None,
                    block_n=None):
    """The Triton backward: (dq, dk, dv), zeros for pruned heads."""
    from fedsparse.kernels import attention as kern
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = h // hk
    dq = torch.zeros(b, h, sq, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, hk, sk, d, dtype=k.dtype, device=q.device)
    dv = torch.zeros(b, hk, sk, v.shape[3], dtype=v.dtype, device=q.device)
    bi, hi = _pairs(keep)
    n = bi.numel()
    if n == 0:
        return dq, dk, dv
    kv, qv, bias = _triton_masks(split_mask(attn_mask, b, h, sq, sk), q.device)
    pb = bi.to(device=q.device, dtype=torch.int32, non_blocking=True)
    ph = hi.to(device=q.device, dtype=torch.int32, non_blocking=True)
    lse = lse_full[pb.long(), ph.long()].contiguous()
    if group == 1:
        kern.backward(grad_out, q, k, v, out, lse, dq, dk, dv, pb, ph, kv=kv, qv=qv, bias=bias,
                      causal=is_causal, scale=scale, block_m=block_m, block_n=block_n)
    else:
        dkc = torch.empty(n, sk, d, dtype=torch.float32, device=q.device)
        dvc = torch.empty(n, sk, v.shape[3], dtype=torch.float32, device=q.device)
        kern.backward(grad_out, q, k, v, out, lse, dq, dkc, dvc, pb, ph, compact_kv=True, kv=kv, qv=qv,
                      bias=bias, causal=is_causal, scale=scale, block_m=block_m, block_n=block_n)
        idx = (pb.long(), ph.long() // group)
        dk = dk.float().index_put_(idx, dkc, accumulate=True).to(k.dtype)
        dv = dv.float().index_put_(idx, dvc, accumulate=True).to(v.dtype)
    return dq, dk, dv
