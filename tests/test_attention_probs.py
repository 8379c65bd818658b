"""The native passes of attention with materialized probabilities (csrc/attention_probs.cpp) against torch:
softmax with scale, bias, causal mask, padded queries and the rows' largest probability; and dS."""
from __future__ import annotations

import pytest
import torch

from fedsparse.ops import _native

pytestmark = pytest.mark.skipif(not _native.has_probs(), reason="native extension not built")


def softmax_torch(s, scale, bias, causal, qvalid):
    """-> (P, largest probability per row) by the policies of the kernel, in float64."""
    n, sq, sk = s.shape
    x = s.double() * scale
    if bias is not None:
        x = x + bias.double().reshape(n, -1, sk)
    if causal:
        x = x.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(), float("-inf"))
    m = x.amax(-1, keepdim=True) if sk else torch.full((n, sq, 1), float("-inf"), dtype=x.dtype)
    empty = m == float("-inf")
    e = torch.exp(x - torch.where(empty, torch.zeros_like(m), m))
    den = e.sum(-1, keepdim=True)
    p = torch.where(empty, torch.zeros_like(e), e / den)
    top = torch.where(empty[..., 0], torch.zeros_like(den[..., 0]), 1 / den[..., 0])
    if qvalid is not None:
        p = p * qvalid[..., None]
        top = top * qvalid
    return p, top


@pytest.mark.parametrize("max_level", [2, 1, 0])
@pytest.mark.parametrize("n,sq,sk,bias_rows,causal,pad", [
    (1, 1, 1, 0, False, False),
    (2, 7, 13, 1, False, True),     # tails shorter than a vector
    (3, 33, 33, 33, True, True),
    (2, 5, 9, 0, True, False),      # causal with Sk > Sq
    (4, 64, 256, 1, False, False),  # enough rows for the parallel loop
    (1, 3, 0, 0, False, False),     # no keys
])
def test_softmax_matches_torch(n, sq, sk, bias_rows, causal, pad, max_level):
    g = torch.Generator().manual_seed(n * 100 + sq + sk)
    s = torch.randn(n, sq, sk, generator=g) * 4
    bias = None
    if bias_rows:
        bias = torch.randn(n, 1, bias_rows, sk, generator=g)
        bias[bias > 1.2] = float("-inf")
        if sk:
            bias[0, 0, 0] = float("-inf")  # row 0 of pair 0: nothing to attend to
    qvalid = torch.rand(n, sq, generator=g) > 0.3 if pad else None
    p, top = s.clone(), torch.full((n, sq), -1.0)
    _native.softmax_(p, 0.37, bias, causal, qvalid, top, max_level=max_level)
    p_ref, top_ref = softmax_torch(s, 0.37, bias, causal, qvalid)
    torch.testing.assert_close(p.double(), p_ref, atol=2e-7, rtol=2e-6)
    torch.testing.assert_close(top.double(), top_ref, atol=2e-7, rtol=2e-6)
    if bias_rows and sk and (qvalid is None or qvalid[0, 0]):
        assert torch.equal(p[0, 0], torch.zeros(sk)) and top[0, 0] == 0  # empty row: zeros, not NaN


@pytest.mark.parametrize("max_level", [2, 1, 0])
def test_softmax_nan_and_inf_rows(max_level):
    s = torch.randn(2, 4, 19)
    s[0, 1, 17] = float("nan")  # in the scalar tail of a vector row
    s[0, 2, 3] = float("nan")
    s[1, 3, 5] = float("inf")
    s[1, 0] = float("-inf")  # a NaN among -inf only: the row's maximum is -inf, yet the row is NaN
    s[1, 0, 4] = float("nan")
    p, top = s.clone(), torch.empty(2, 4)
    _native.softmax_(p, 1.0, None, False, None, top, max_level=max_level)
    for n, i in ((0, 1), (0, 2), (1, 3), (1, 0)):
        assert p[n, i].isnan().all() and top[n, i].isnan()
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, 1] = others[0, 2] = others[1, 3] = others[1, 0] = False
    assert torch.isfinite(p[others]).all() and torch.isfinite(top[others]).all()
    torch.testing.assert_close(p[others], torch.softmax(s[others], -1))


@pytest.mark.parametrize("max_level", [2, 1, 0])
@pytest.mark.parametrize("n,sq,sk", [(1, 1, 1), (2, 7, 13), (4, 64, 256)])
def test_dscores_matches_torch(n, sq, sk, max_level):
    g = torch.Generator().manual_seed(sk)
    dp, delta = torch.randn(n, sq, sk, generator=g), torch.randn(n, sq, generator=g)
    p = torch.softmax(torch.randn(n, sq, sk, generator=g), -1)
    got = dp.clone()
    _native.dscores_(got, p, delta, 0.25, max_level=max_level)
    torch.testing.assert_close(got, 0.25 * p * (dp - delta[..., None]))


def test_rejects_bad_buffers():
    from fedsparse._backend import native
    s = torch.randn(2, 3, 5)
    with pytest.raises(TypeError):  # float64 would be converted to a copy: the result would be lost
        native.attention_softmax(s.double().numpy(), 1.0, None, 0, False, None, None)
    with pytest.raises(ValueError, match="bias"):
        native.attention_softmax(s.numpy(), 1.0, torch.zeros(2, 2, 5).numpy(), 2, False, None, None)
    with pytest.raises(ValueError, match="maxp"):
        native.attention_softmax(s.numpy(), 1.0, None, 0, False, None, torch.empty(2, 2).numpy())
    with pytest.raises(ValueError, match="qvalid"):
        native.attention_softmax(s.numpy(), 1.0, None, 0, False, torch.ones(3, 3, dtype=torch.bool).numpy(), None)
    with pytest.raises(ValueError, match="p must"):
        native.attention_dscores(s.numpy(), torch.randn(2, 3, 4).numpy(), torch.randn(2, 3).numpy(), 1.0)
    with pytest.raises(ValueError, match="delta"):
        native.attention_dscores(s.numpy(), s.numpy(), torch.randn(2, 2).numpy(), 1.0)
