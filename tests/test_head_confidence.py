"""fedsparse.ops.head_confidence: native CPU kernel (AVX2 and scalar), torch fallback and Triton (interpreter)
against the reference, and the reference against the textbook definition."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsparse.ops import _native, head_confidence, reference
from fedsparse.ops.head_confidence import triton_confidence
from fedsparse.ops.pruned_attention import _row_stats_torch

needs_native = pytest.mark.skipif(not _native.available(), reason="native module not built")


def make(b=2, h=3, hk=None, sq=9, sk=None, d=16, dtype=torch.float32, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, sq, d, generator=g) * spread).to(dtype)
    k = torch.randn(b, hk or h, sk or sq, d, generator=g).to(dtype)
    return q, k, g


def make_mask(kind, b, h, sq, sk, g):
    if kind is None:
        return None
    if kind == "pad":
        m = torch.ones(b, sk, dtype=torch.bool)
        m[-1, max(1, sk // 2):] = False
        return m
    if kind == "bool4":
        return torch.rand(b, h, sq, sk, generator=g) > 0.4
    if kind == "float4":
        return torch.randn(b, 1, 1, sk, generator=g)
    raise AssertionError(kind)


def test_reference_is_the_textbook_definition():
    q, k, g = make(2, 3, sq=33, d=8, spread=2.0)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(reference.head_confidence(q, k), p.amax(-1).mean(-1), atol=1e-6, rtol=1e-6)
    am = make_mask("pad", 2, 3, 33, 33, g)
    valid = am[:, None, None, :]
    p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~valid, float("-inf")), dim=-1)
    n = am.sum(-1)[:, None]
    want = (p.amax(-1) * am[:, None, :]).sum(-1) / n  # padded queries left out of the mean
    torch.testing.assert_close(reference.head_confidence(q, k, attn_mask=am), want, atol=1e-6, rtol=1e-6)


def test_bounds_and_limits():
    q, k, g = make(1, 2, sq=16, d=8)
    c = head_confidence(torch.zeros_like(q), k)  # uniform attention: 1 / S
    torch.testing.assert_close(c, torch.full((1, 2), 1 / 16))
    c = head_confidence(q, k, scale=1e4)  # sharp attention: about 1
    assert (c > 0.95).all() and (c <= 1).all()
    c = head_confidence(q, k, is_causal=True)  # row 0 has one key: probability 1
    assert (c > 1 / 16).all() and (c <= 1).all()


CASES = [  # b, h, hk, sq, sk, d, mask, causal
    (2, 3, 3, 9, 9, 16, None, False),
    (2, 3, 3, 1, 1, 8, "pad", False),
    (2, 4, 2, 33, 33, 32, "pad", True),
    (2, 3, 3, 7, 21, 5, "bool4", False),
    (2, 3, 3, 70, 70, 64, "float4", True),
    (1, 2, 2, 130, 17, 24, None, True),
]


@pytest.mark.parametrize("b,h,hk,sq,sk,d,mask,causal", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_matches_reference(b, h, hk, sq, sk, d, mask, causal, dtype):
    q, k, g = make(b, h, hk, sq, sk, d, dtype=dtype, spread=2.0)
    am = make_mask(mask, b, h, sq, sk, g)
    got = head_confidence(q, k, attn_mask=am, is_causal=causal)
    want = reference.head_confidence(q, k, attn_mask=am, is_causal=causal)
    assert got.dtype == torch.float32 and got.shape == (b, h)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@needs_native
@pytest.mark.parametrize("n,sq,sk,d,causal,bias_rows", [(3, 7, 7, 8, False, 0), (2, 33, 70, 32, True, 1),
                                                        (2, 65, 65, 16, True, 65), (1, 1, 1, 3, False, 0),
                                                        (2, 130, 17, 64, False, 130)])
def test_native_simd_scalar_and_torch_agree(n, sq, sk, d, causal, bias_rows):
    from fedsparse import _C
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(n, sq, d, generator=g) * 2, torch.randn(n, sk, d, generator=g)
    bias = None
    if bias_rows:
        bias = torch.randn(n, 1, bias_rows, sk, generator=g)
        bias[bias > 1.5] = float("-inf")
    m_ref, s_ref = _row_stats_torch(q, k, bias, causal, 0.3, True)
    for scalar in (False, True):
        m, s = torch.empty(n, sq), torch.empty(n, sq)
        _C.attention_row_stats(q.numpy(), k.numpy(), None if bias is None else bias.reshape(n, -1, sk).numpy(),
                               bias_rows, causal, 0.3, m.numpy(), s.numpy(), True, scalar)
        torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(s, s_ref, atol=0, rtol=2e-6)


@needs_native
def test_native_rejects_bad_buffers():
    from fedsparse import _C
    q, k = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    m = torch.empty(2, 4)
    with pytest.raises(TypeError):  # float64 output would be a silent converted copy: refused
        _C.attention_row_stats(q.numpy(), k.numpy(), None, 0, False, 1.0, m.double().numpy(), m.numpy(), True)
    with pytest.raises(ValueError, match="k must be"):
        _C.attention_row_stats(q.numpy(), torch.randn(2, 5, 7).numpy(), None, 0, False, 1.0, m.numpy(),
                               m.numpy(), True)
    with pytest.raises(ValueError, match="bias_rows"):
        _C.attention_row_stats(q.numpy(), k.numpy(), torch.zeros(2, 3, 5).numpy(), 3, False, 1.0, m.numpy(),
                               m.numpy(), True)
    with pytest.raises(ValueError, match="m must be"):
        _C.attention_row_stats(q.numpy(), k.numpy(), None, 0, False, 1.0, torch.empty(2, 3).numpy(), m.numpy(),
                               True)


def test_torch_fallback_matches_reference(monkeypatch):
    monkeypatch.setattr(_native, "available", lambda: False)
    for b, h, hk, sq, sk, d, mask, causal in CASES:
        q, k, g = make(b, h, hk, sq, sk, d, spread=2.0)
        am = make_mask(mask, b, h, sq, sk, g)
        torch.testing.assert_close(head_confidence(q, k, attn_mask=am, is_causal=causal),
                                   reference.head_confidence(q, k, attn_mask=am, is_causal=causal),
                                   atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("b,h,hk,sq,sk,d,mask,causal", CASES[:5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(b, h, hk, sq, sk, d, mask, causal, dtype):
    q, k, g = make(b, h, hk, sq, sk, d, dtype=dtype, spread=2.0)
    am = make_mask(mask, b, h, sq, sk, g)
    got = triton_confidence(q, k, am, causal, 1 / math.sqrt(d), block_m=32, block_n=32)
    want = reference.head_confidence(q, k, attn_mask=am, is_causal=causal)
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_nan_policy(path):
    q, k, g = make(3, 2, sq=8, d=16)
    q[0, 1, 3] = float("nan")
    am = torch.ones(3, 8, dtype=torch.bool)
    am[2] = False  # no valid query at all: 0
    if path == "cpu":
        c = head_confidence(q, k, attn_mask=am)
    else:
        c = triton_confidence(q, k, am, False, 0.25)
    assert c[0, 1].isnan() and torch.isfinite(c[0, 0]) and torch.isfinite(c[1]).all()
    assert torch.equal(c[2], torch.zeros(2))


def test_accepts_strided_inputs_and_is_not_differentiable():
    q, k, g = make(2, 3, sq=9, d=16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    c = head_confidence(qt, k)
    assert not c.requires_grad
    torch.testing.assert_close(c, reference.head_confidence(q, k), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask", [None, "pad", "bool4"])
def test_opcheck(mask):
    q, k, g = make(2, 4, 2, 9, 9, 8)
    am = make_mask(mask, 2, 4, 9, 9, g)
    torch.library.opcheck(torch.ops.fedsparse.head_confidence.default, (q, k, am, True, 0.3))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       sq=st.integers(1, 40), sk=st.integers(1, 40), d=st.integers(1, 40), causal=st.booleans(),
       mask=st.sampled_from([None, "pad", "bool4", "float4"]), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_property(b, h, group, sq, sk, d, causal, mask, seed):
    hk = max(1, h // group)
    q, k, g = make(b, h, hk, sq, sk, d, seed=seed, spread=2.0)
    am = make_mask(mask, b, h, sq, sk, g)
    torch.testing.assert_close(head_confidence(q, k, attn_mask=am, is_causal=causal),
                               reference.head_confidence(q, k, attn_mask=am, is_causal=causal),
                               atol=3e-6, rtol=3e-6)
