"""The fused native CPU attention kernel (csrc/attention_fused.cpp) against the plain-torch reference.

Called directly at every instruction-set level (2 = AVX-512 micro-kernels, 1 and 0 = the plain GEMM loop), over
odd shapes that exercise the kernels' row and column tails, strided inputs, every mask form, and NaN; then
through pruned_attention, where float32 calls with some heads pruned take it.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fedsparse.ops import _native, _pool, pruned_attention, reference

pa_module = importlib.import_module("fedsparse.ops.pruned_attention")
native = pytest.importorskip("fedsparse._C")
pytestmark = pytest.mark.skipif(not hasattr(native, "attention_fused_forward"), reason="native kernel not built")

LEVELS = [lvl for lvl in (2, 1, 0) if lvl <= native.simd_level()]


def run_fused(q, k, v, go, keep, *, bias=None, causal=False, qvalid=None, scale=0.3, level=2):
    """The kernel's forward and backward into buffers pre-filled with NaN (every element must be written)."""
    b, h, sq, _ = q.shape
    sk, dv = k.shape[2], v.shape[3]
    pairs = keep.reshape(-1).nonzero().reshape(-1)
    n = pairs.numel()
    pairs_np = pairs.numpy()
    probs = torch.full((n, sq, sk), float("nan"))
    out = torch.full((b, h, sq, dv), float("nan"))
    maxp = torch.full((n, sq), float("nan"))
    _native.fused_forward(q, k, v, pairs_np, bias, causal, scale, qvalid, probs, out, maxp, level)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    _native.fused_backward(go, q, k, v, out, pairs_np, probs, scale, *grads, level)
    return out, maxp, grads, pairs


def reference_grads(q, k, v, go, keep, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, conf = reference.pruned_attention(qq, kk, vv, keep, return_confidence=True, **kw)
    return out.detach(), conf, torch.autograd.grad(out, (qq, kk, vv), go)


def close(got, want, what, atol=5e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"{what}: {m}")


SHAPES = [
    # b, h, hk, sq, sk, d, dv: tails of the 6-row / 12-row blocks, of the 16-float vectors, narrow and wide C;
    # grouped-query heads (hk < h: kept heads of a group add into one dk, dv)
    (2, 3, 3, 7, 7, 16, 16),
    (1, 2, 2, 1, 1, 8, 8),
    (2, 2, 2, 33, 17, 24, 40),
    (1, 3, 3, 13, 70, 64, 20),
    (2, 2, 2, 5, 257, 33, 1),
    (2, 6, 2, 19, 23, 16, 16),
    (3, 8, 1, 9, 9, 32, 8),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("b,h,hk,sq,sk,d,dv", SHAPES)
def test_kernel_matches_reference(b, h, hk, sq, sk, d, dv, level):
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q, go = (torch.randn(b, h, sq, e, generator=g) for e in (d, dv))
    k, v = (torch.randn(b, hk, sk, e, generator=g) for e in (d, dv))
    keep = torch.rand(b, h, generator=g) > 0.4
    keep[0, 0] = keep[0, 1] = True  # with groups, two kept heads sharing a key/value head
    out, maxp, grads, pairs = run_fused(q, k, v, go, keep, level=level)
    r_out, _, r_grads = reference_grads(q, k, v, go, keep, scale=0.3)
    close(out, r_out, "out")
    for name, a, r in zip("qkv", grads, r_grads):
        close(a, r, f"d{name}")
    kk = k.repeat_interleave(h // hk, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q, kk).reshape(b * h, sq, sk)[pairs] * 0.3
    close(maxp, logits.softmax(-1).amax(-1), "largest probability")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mask", ["pad", "bias_rows", "bias_one_row", "causal"])
def test_kernel_masks(mask, level):
    b, h, s, d = 3, 2, 19, 16
    g = torch.Generator().manual_seed(1)
    q, k, v, go = (torch.randn(b, h, s, d, generator=g) for _ in range(4))
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    pairs = keep.reshape(-1).nonzero().reshape(-1)
    bi, hi = pairs // h, pairs % h
    kw, causal, qvalid, bias = {}, False, None, None
    if mask == "pad":  # sample 2 padded to 4 tokens: its padded queries output 0
        am = torch.ones(b, s, dtype=torch.bool)
        am[2, 4:] = False
        kw["attn_mask"] = am
        bias = torch.zeros(b, 1, 1, s).masked_fill_(~am[:, None, None, :], float("-inf"))[bi].unsqueeze(1)
        qvalid = am[bi]
    elif mask == "bias_rows":
        full = torch.randn(b, h, s, s, generator=g)
        kw["attn_mask"], bias = full, full[bi, hi].unsqueeze(1)
    elif mask == "bias_one_row":
        full = torch.randn(b, 1, 1, s, generator=g)
        kw["attn_mask"], bias = full, full[bi].unsqueeze(1)
    else:
        kw["is_causal"] = causal = True
    out, maxp, grads, _ = run_fused(q, k, v, go, keep, bias=bias, causal=causal, qvalid=qvalid, level=level)
    r_out, r_conf, r_grads = reference_grads(q, k, v, go, keep, scale=0.3, **kw)
    close(out, r_out, "out")
    for name, a, r in zip("qkv", grads, r_grads):
        close(a, r, f"d{name}")
    conf = torch.zeros(b, h).index_put_((bi, hi), (maxp * (maxp != 0)).sum(-1) / (maxp != 0).sum(-1))
    close(conf, r_conf, "confidence")


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_reads_strided_inputs_and_never_pruned_ones(level):
    """q, k, v, dO as views of [B, S, H, D] projections; NaN in pruned heads must not leak."""
    b, h, s, d = 2, 4, 21, 16
    g = torch.Generator().manual_seed(2)
    q, k, v, go = (torch.randn(b, s, h, d, generator=g).transpose(1, 2) for _ in range(4))
    keep = torch.tensor([[True, False, False, True], [False, False, True, False]])
    for t in (q, k, v, go):
        t[~keep] = float("nan")
    out, _, grads, _ = run_fused(q, k, v, go, keep, level=level)
    r_out, _, r_grads = reference_grads(q, k, v, go, keep, scale=0.3)
    close(out, r_out, "out")
    for name, a, r in zip("qkv", grads, r_grads):
        close(a, r, f"d{name}")
        assert not a[~keep].any()


def test_kernel_nan_and_empty_rows():
    """A NaN logit makes its row NaN (and only what it feeds); a row with nothing to attend to gives 0."""
    b, h, s, d = 1, 2, 8, 16
    g = torch.Generator().manual_seed(3)
    q, k, v, go = (torch.randn(b, h, s, d, generator=g) for _ in range(4))
    q[0, 0, 3, 0] = float("nan")
    bias = torch.zeros(2, 1, s, s)
    bias[1, 0, 5] = float("-inf")  # pair 1, row 5: every key masked
    out, maxp, _, _ = run_fused(q, k, v, go, torch.ones(b, h, dtype=torch.bool), bias=bias)
    assert out[0, 0, 3].isnan().all() and maxp[0, 3].isnan()
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 1]).all()
    assert torch.equal(out[0, 1, 5], torch.zeros(d)) and maxp[1, 5] == 0


def test_kernel_rejects_bad_arguments():
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    probs, out = torch.empty(2, 5, 5), torch.empty(2, 2, 5, 8)

    def fwd(q=q, k=k, v=v, pairs=torch.tensor([0, 3]), probs=probs, out=out):
        native.attention_fused_forward(q.numpy(), k.numpy(), v.numpy(), pairs.numpy(), None, 0, False, 1.0, None,
                                       probs.numpy(), out.numpy(), None)

    fwd()
    with pytest.raises(ValueError, match="out of range"):
        fwd(pairs=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="distinct"):
        fwd(pairs=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="float32"):
        fwd(q=q.double())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fwd(k=k.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="Hk dividing H"):
        fwd(k=k[:, :, :, :4])
    with pytest.raises(ValueError, match="like k"):
        fwd(v=v[:, :1])
    with pytest.raises(ValueError, match="probs"):
        fwd(probs=torch.empty(2, 5, 4))
    with pytest.raises(ValueError, match="out"):
        fwd(out=torch.empty(2, 2, 8, 5).transpose(2, 3))


@pytest.mark.skipif(not _native.has_fused(), reason="pruned_attention takes the fused kernel on AVX-512 only")
@pytest.mark.parametrize("strided", [False, True])
def test_pruned_attention_takes_the_fused_kernel(strided, monkeypatch):
    b, h, s, d = 2, 6, 23, 16
    g = torch.Generator().manual_seed(4)
    shape = (b, s, h, d) if strided else (b, h, s, d)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    if strided:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    go = torch.randn(b, h, s, d, generator=g)
    hm = torch.tensor([False, True, False, False, True, False])
    calls = []
    kernel = _native.fused_forward
    monkeypatch.setattr(_native, "fused_forward", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, conf = pruned_attention(qq, kk, vv, hm, is_causal=True, return_confidence=True)
    grads = torch.autograd.grad(out, (qq, kk, vv), go)
    assert calls == [1]
    r_out, r_conf, r_grads = reference_grads(q, k, v, go, hm, is_causal=True)
    close(out, r_out, "out")
    close(conf, r_conf, "confidence")
    for name, a, r in zip("qkv", grads, r_grads):
        close(a, r, f"d{name}")
    _pool.empty_cache()


def test_fused_is_not_taken_where_it_does_not_apply():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    some = torch.tensor([True, False, True, False]).expand(2, 4)

    def pairs(q, k, keep, keep_probs=True):
        return pa_module._fused_pairs(q, k, keep, keep_probs)

    assert pairs(q.double(), k.double(), some) is None  # float32 only
    assert pairs(q, k, torch.ones(2, 4, dtype=torch.bool)) is None  # nothing pruned: flash
    assert pairs(q, k, torch.zeros(2, 4, dtype=torch.bool)) is None  # nothing kept
    long = torch.randn(1, 2, 513, 16)
    assert pairs(long, long[:, :, :512], torch.tensor([[True, False]]), keep_probs=False) is None  # > PAIR_MAX
    many = torch.randn(17, 2, 512, 16)  # 17 pairs of 512 x 512: over MATERIALIZE_MAX kept for a backward
    keep = torch.tensor([True, False]).expand(17, 2)
    assert pairs(many, many, keep) is None
    if _native.has_fused():
        assert pairs(q, k, some).tolist() == [0, 2, 4, 6]
        assert pairs(q, k, torch.tensor([True, False, False, True]).expand(2, 4)).tolist() == [0, 3, 4, 7]
        assert len(pairs(many, many, keep, keep_probs=False)) == 17  # one pair's at a time: fits


@pytest.mark.skipif(not _native.has_fused(), reason="pruned_attention takes the fused kernel on AVX-512 only")
def test_without_a_backward_no_probabilities_are_kept(monkeypatch):
    """no_grad (or inputs without grad): no autograd node, P in per-thread buffers; the same output and
    confidence as with a backward."""
    b, h, s, d = 2, 5, 37, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    hm = torch.rand(b, h, generator=g) > 0.5
    am = torch.ones(b, s, dtype=torch.bool)
    am[1, 30:] = False
    seen = []
    kernel = _native.fused_forward
    monkeypatch.setattr(_native, "fused_forward", lambda *a, **kw: seen.append(a[8]) or kernel(*a, **kw))
    with torch.no_grad():
        out, conf = pruned_attention(q, k, v, hm, attn_mask=am, return_confidence=True)
    assert seen == [None] and out.grad_fn is None
    out2, conf2 = pruned_attention(q, k, v, hm, attn_mask=am, return_confidence=True)  # no input needs grad
    assert seen[-1] is None and torch.equal(out, out2) and torch.equal(conf, conf2)
    qq = q.clone().requires_grad_()
    out3, conf3 = pruned_attention(qq, k, v, hm, attn_mask=am, return_confidence=True)
    assert seen[-1] is not None and out3.grad_fn is not None
    assert torch.equal(out, out3.detach()) and torch.equal(conf, conf3)
    r_out, r_conf, _ = reference_grads(q, k, v, torch.zeros(b, h, s, d), hm, attn_mask=am)
    close(out, r_out, "out")
    close(conf, r_conf, "confidence")
    _pool.empty_cache()
