"""Triton flash-style attention over the kept heads only, forward and backward, with head confidence.

The spec is ``fedsparse.ops.reference``. Work is laid out over *pairs*: the kept (batch, head) pairs
``(pb[n], ph[n])``; every grid is ``(blocks of rows, pairs)``, so a pruned head launches nothing and costs
nothing. Inputs are read through their strides (a [B, S, H, D] buffer viewed as [B, H, S, D] is fine);
key/value head of query head h is ``h // GROUP`` (grouped-query attention).

Masks, all optional and combinable:
  * ``KV`` key validity, int8 [B, Sk] (a padding mask); ``QV`` query validity, int8 [B, Sq];
  * ``BIAS`` float, added to the scaled logits, read through four strides (0 where broadcast);
  * ``CAUSAL``: key j is masked for query i when j > i (top-left, like torch SDPA).

Per query row the forward keeps the running max m and sum l of exp(s - m) (the flash recurrence). From them:
``lse = m + log(l)`` (saved for the backward; +inf for a row with no valid key or a masked query, which makes
every recomputed probability exp(s - lse) exactly 0, so such rows output 0 and get 0 gradient), and the row's
largest probability ``exp(m - lse) = 1 / l`` (the head confidence contribution; 0 for invalid rows). The
S x S probabilities never exist in memory.

Precision: dots accumulate in float32; probabilities are cast to the value dtype before ``p @ v`` (as every
flash kernel does). float32 inputs use ``input_precision="ieee"`` so they agree with the float32 reference
(TF32 would lose ~3 decimal digits).

Backward (FlashAttention-2): ``delta_i = rowsum(dO * O)``; one kernel per key block for dK, dV (loops over
query blocks), one per query block for dQ (loops over key blocks); no atomics. dK, dV are written either into
the full gradient at (b, h) or, with grouped-query heads, into a compact per-pair buffer that the caller
sums into the key/value heads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile(P, b, h, sb, sh, rows, cols, sr, sc, R, C):
    """The [rows, cols] block of a strided [B, H, R, C] tensor at (b, h), zeros outside it."""
    return tl.load(P + b * sb + h * sh + rows[:, None] * sr + cols[None, :] * sc,
                   mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0)


@triton.jit
def _dscores(p, do, v, delta, PREC: tl.constexpr):
    """dS = P * (dO V^T - delta): the gradient of the logits (before scaling) of a block."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p * (dp - delta[:, None])


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, Sq, Sk, scale,
            KV, stride_kvb, QV, stride_qvb, BIAS, sbb, sbh, sbm, sbn,
            HAS_KV: tl.constexpr, HAS_QV: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
            PREC: tl.constexpr):
    """Scaled, masked logits [BM, BN] (float32, -inf where masked) of a query block against a key block."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    valid = (offs_m[:, None] < Sq) & (offs_n[None, :] < Sk)
    if HAS_KV:
        kv = tl.load(KV + b * stride_kvb + offs_n, mask=offs_n < Sk, other=0)
        valid = valid & (kv[None, :] != 0)
    if HAS_QV:
        qv = tl.load(QV + b * stride_qvb + offs_m, mask=offs_m < Sq, other=0)
        valid = valid & (qv[:, None] != 0)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_BIAS:
        bias = _tile(BIAS, b, h, sbb, sbh, offs_m, offs_n, sbm, sbn, Sq, Sk)
        s = s + bias.to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, MAXP, PB, PH,
                sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                KV, stride_kvb, QV, stride_qvb, BIAS, sbb, sbh, sbm, sbn,
                Sq, Sk, D, DV, scale,
                GROUP: tl.constexpr, HAS_KV: tl.constexpr, HAS_QV: tl.constexpr, HAS_BIAS: tl.constexpr,
                CAUSAL: tl.constexpr, WITH_V: tl.constexpr, PREC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    b = tl.load(PB + n).to(tl.int64)
    h = tl.load(PH + n).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    q = _tile(Q, b, h, sqb, sqh, offs_m, offs_d, sqs, sqd, Sq, D)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    if WITH_V:
        offs_dv = tl.arange(0, BDV)
        acc = tl.zeros([BM, BDV], tl.float32)
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BM)
    for start_n in range(0, hi, BN):
        offs_n = start_n + offs_n0
        k = _tile(K, b, hk, skb, skh, offs_n, offs_d, sks, skd, Sk, D)
        s = _scores(q, k, offs_m, offs_n, b, h, Sq, Sk, scale, KV, stride_kvb, QV, stride_qvb,
                    BIAS, sbb, sbh, sbm, sbn, HAS_KV, HAS_QV, HAS_BIAS, CAUSAL, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_V:
            v = _tile(V, b, hk, svb, svh, offs_n, offs_dv, svs, svd, Sk, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # Triton's max drops NaN (on GPUs and in the interpreter), but the sum of exponentials keeps it: a row
    # whose logits hold NaN stays "valid", so NaN inputs propagate to out, lse and maxp.
    ok = ((m_i != float("-inf")) | (l_i != l_i)) & (offs_m < Sq)
    l_safe = tl.where(ok, l_i, 1.0)
    lse = tl.where(ok, m_i + tl.log(l_safe), float("inf"))
    tl.store(LSE + n * Sq + offs_m, lse, mask=offs_m < Sq)
    tl.store(MAXP + n * Sq + offs_m, tl.where(ok, 1.0 / l_safe, 0.0), mask=offs_m < Sq)
    if WITH_V:
        out = tl.where(ok[:, None], acc / l_safe[:, None], 0.0)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, PB, PH, sob, soh, sos, sod, sgb, sgh, sgs, sgd, Sq, DV,
                      BM: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    b = tl.load(PB + n).to(tl.int64)
    h = tl.load(PH + n).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BDV)
    o = _tile(O, b, h, sob, soh, offs_m, offs_d, sos, sod, Sq, DV)
    do = _tile(DO, b, h, sgb, sgh, offs_m, offs_d, sgs, sgd, Sq, DV)
    tl.store(DELTA + n * Sq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, PB, PH,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sgb, sgh, sgs, sgd,
                     dkb, dkh, dks, dkd, dvb, dvh, dvs, dvd,
                     KV, stride_kvb, QV, stride_qvb, BIAS, sbb, sbh, sbm, sbn,
                     Sq, Sk, D, DV, scale,
                     GROUP: tl.constexpr, COMPACT: tl.constexpr, HAS_KV: tl.constexpr, HAS_QV: tl.constexpr,
                     HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_n = tl.program_id(0)
    n = tl.program_id(1)
    b = tl.load(PB + n).to(tl.int64)
    h = tl.load(PH + n).to(tl.int64)
    hk = h // GROUP
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k = _tile(K, b, hk, skb, skh, offs_n, offs_d, sks, skd, Sk, D)
    v = _tile(V, b, hk, svb, svh, offs_n, offs_dv, svs, svd, Sk, DV)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BN // BM) * BM
    for start_m in range(lo, Sq, BM):
        offs_m = start_m + offs_m0
        q = _tile(Q, b, h, sqb, sqh, offs_m, offs_d, sqs, sqd, Sq, D)
        do = _tile(DO, b, h, sgb, sgh, offs_m, offs_dv, sgs, sgd, Sq, DV)
        lse = tl.load(LSE + n * Sq + offs_m, mask=offs_m < Sq, other=float("inf"))
        delta = tl.load(DELTA + n * Sq + offs_m, mask=offs_m < Sq, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, Sq, Sk, scale, KV, stride_kvb, QV, stride_qvb,
                    BIAS, sbb, sbh, sbm, sbn, HAS_KV, HAS_QV, HAS_BIAS, CAUSAL, PREC)
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        ds = _dscores(p, do, v, delta, PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    if COMPACT:
        ok_b = n
        ok_h = n * 0
    else:
        ok_b = b
        ok_h = h
    tl.store(DK + ok_b * dkb + ok_h * dkh + offs_n[:, None] * dks + offs_d[None, :] * dkd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < Sk) & (offs_d[None, :] < D))
    tl.store(DV_ + ok_b * dvb + ok_h * dvh + offs_n[:, None] * dvs + offs_dv[None, :] * dvd,
             dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < Sk) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PB, PH,
                   sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sgb, sgh, sgs, sgd,
                   dqb, dqh, dqs, dqd,
                   KV, stride_kvb, QV, stride_qvb, BIAS, sbb, sbh, sbm, sbn,
                   Sq, Sk, D, DV, scale,
                   GROUP: tl.constexpr, HAS_KV: tl.constexpr, HAS_QV: tl.constexpr, HAS_BIAS: tl.constexpr,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    b = tl.load(PB + n).to(tl.int64)
    h = tl.load(PH + n).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = _tile(Q, b, h, sqb, sqh, offs_m, offs_d, sqs, sqd, Sq, D)
    do = _tile(DO, b, h, sgb, sgh, offs_m, offs_dv, sgs, sgd, Sq, DV)
    lse = tl.load(LSE + n * Sq + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(DELTA + n * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BM)
    for start_n in range(0, hi, BN):
        offs_n = start_n + offs_n0
        k = _tile(K, b, hk, skb, skh, offs_n, offs_d, sks, skd, Sk, D)
        v = _tile(V, b, hk, svb, svh, offs_n, offs_dv, svs, svd, Sk, DV)
        s = _scores(q, k, offs_m, offs_n, b, h, Sq, Sk, scale, KV, stride_kvb, QV, stride_qvb,
                    BIAS, sbb, sbh, sbm, sbn, HAS_KV, HAS_QV, HAS_BIAS, CAUSAL, PREC)
        p = tl.exp(s - lse[:, None])
        ds = _dscores(p, do, v, delta, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + b * dqb + h * dqh + offs_m[:, None] * dqs + offs_d[None, :] * dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------- launchers

def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _blocks(sq: int, sk: int, d: int, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    if INTERPRET:
        # The interpreter costs ~1-2 ms per program instance whatever its size: few, big programs.
        bm = block_m or min(128, _pow2(sq))
        bn = block_n or min(128, _pow2(sk))
    else:
        # 64 x 64 tiles keep q, k, v, the accumulators and the [BM, BN] scores in registers up to D=128.
        bm = block_m or (128 if d <= 64 else 64)
        bn = block_n or 64
    return bm, bn


def _mask_args(kv, qv, bias, device):
    dummy = torch.empty(1, dtype=torch.int8, device=device)
    kv_t = kv if kv is not None else dummy
    qv_t = qv if qv is not None else dummy
    kv_s = kv.stride(0) if kv is not None else 0
    qv_s = qv.stride(0) if qv is not None else 0
    if bias is not None:
        # A size-1 (broadcast) dim must not advance: its stride is arbitrary.
        b_t, bs = bias, tuple(st if sz > 1 else 0 for sz, st in zip(bias.shape, bias.stride()))
    else:
        b_t, bs = torch.empty(1, dtype=torch.float32, device=device), (0, 0, 0, 0)
    return (kv_t, kv_s, qv_t, qv_s, b_t, *bs)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q, k, v, out, pb, ph, *, kv=None, qv=None, bias=None, causal=False, scale=1.0,
            block_m=None, block_n=None):
    """Attention of the kept pairs (pb[n], ph[n]), written into out[pb, ph] (other heads untouched).

    q [B, H, Sq, D]; k [B, Hk, Sk, D]; v [B, Hk, Sk, Dv] (or None: confidence only, out ignored);
    pb, ph int32 [N] on q's device; kv int8 [B, Sk], qv int8 [B, Sq]; bias float, 4-D, broadcast by strides.
    Returns (lse, maxp), float32 [N, Sq]: log-sum-exp of each row (+inf for rows with nothing to attend to)
    and each row's largest probability (0 for such rows).
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    group = H // k.shape[1]
    N = pb.numel()
    lse = torch.empty(N, Sq, dtype=torch.float32, device=q.device)
    maxp = torch.empty(N, Sq, dtype=torch.float32, device=q.device)
    if N == 0 or Sq == 0:
        return lse, maxp
    with_v = v is not None
    dv = v.shape[3] if with_v else D
    vv = v if with_v else k
    oo = out if with_v else q
    bm, bn = _blocks(Sq, Sk, D, block_m, block_n)
    grid = (triton.cdiv(Sq, bm), N)
    _fwd_kernel[grid](
        q, k, vv, oo, lse, maxp, pb, ph,
        *q.stride(), *k.stride(), *vv.stride(), *oo.stride(),
        *_mask_args(kv, qv, bias, q.device),
        Sq, Sk, D, dv, float(scale),
        GROUP=group, HAS_KV=kv is not None, HAS_QV=qv is not None, HAS_BIAS=bias is not None,
        CAUSAL=bool(causal), WITH_V=with_v, PREC=_prec(q.dtype),
        BM=bm, BN=bn, BD=_pow2(D), BDV=_pow2(dv),
    )
    return lse, maxp


def backward(do, q, k, v, out, lse, dq, dk, dv, pb, ph, *, compact_kv=False, kv=None, qv=None, bias=None,
             causal=False, scale=1.0, block_m=None, block_n=None):
    """Gradients of the kept pairs: dq[pb, ph] and dk, dv at (pb, ph) (or at row n of the compact [N, Sk, D]
    buffers dk, dv when compact_kv, for grouped-query heads). lse is forward()'s, [N, Sq]."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    DVd = v.shape[3]
    group = H // k.shape[1]
    N = pb.numel()
    if N == 0:
        return
    bm, bn = _blocks(Sq, Sk, D, block_m, block_n)
    delta = torch.empty(N, Sq, dtype=torch.float32, device=q.device)
    if Sq:
        _bwd_delta_kernel[(triton.cdiv(Sq, bm), N)](
            out, do, delta, pb, ph, *out.stride(), *do.stride(), Sq, DVd, BM=bm, BDV=_pow2(DVd))
    masks = _mask_args(kv, qv, bias, q.device)
    common = dict(GROUP=group, HAS_KV=kv is not None, HAS_QV=qv is not None, HAS_BIAS=bias is not None,
                  CAUSAL=bool(causal), PREC=_prec(q.dtype), BM=bm, BN=bn, BD=_pow2(D), BDV=_pow2(DVd))
    if Sk:
        dks = (dk.stride(0), 0, dk.stride(1), dk.stride(2)) if compact_kv else dk.stride()
        dvs = (dv.stride(0), 0, dv.stride(1), dv.stride(2)) if compact_kv else dv.stride()
        _bwd_dkdv_kernel[(triton.cdiv(Sk, bn), N)](
            q, k, v, do, lse, delta, dk, dv, pb, ph,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dks, *dvs,
            *masks, Sq, Sk, D, DVd, float(scale), COMPACT=bool(compact_kv), **common)
    if Sq:
        _bwd_dq_kernel[(triton.cdiv(Sq, bm), N)](
            q, k, v, do, lse, delta, dq, pb, ph,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            *masks, Sq, Sk, D, DVd, float(scale), **common)
