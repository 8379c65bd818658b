"""fedsparse.ops.pruned_attention: the CPU path and the Triton kernels (interpreter) against the reference.

The reference (fedsparse.ops.reference) is the spec; gradients are compared with torch.autograd through it.
Triton runs under TRITON_INTERPRET=1 (tests/conftest.py): small shapes, fp32/fp16 only (bf16 arithmetic is
wrong in the interpreter), small blocks where a test wants several blocks per row/column.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from fedsparse.ops import pruned_attention, reference
from fedsparse.ops.pruned_attention import triton_backward, triton_forward

pa_module = importlib.import_module("fedsparse.ops.pruned_attention")  # the package attribute is the function

TOL = {  # dtype: (atol, rtol) for outputs; gradients get 4x
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def make(b=2, h=4, hk=None, sq=7, sk=None, d=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hk, sk, dv = hk or h, sk or sq, dv or d
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, sk, dv, generator=g).to(dtype)
    go = torch.randn(b, h, sq, dv, generator=g).to(dtype)
    return q, k, v, go, g


def make_mask(kind, b, h, sq, sk, g):
    if kind is None:
        return None
    if kind == "pad":  # sample 0 full, the others padded at the end (sample 1 to a single token)
        m = torch.ones(b, sk, dtype=torch.bool)
        for i in range(1, b):
            m[i, max(1, sk - 3 * i):] = False
        return m
    if kind == "bool4":
        return torch.rand(b, 1, sq, sk, generator=g) > 0.3
    if kind == "float4":
        return torch.randn(1, h, sq, sk, generator=g)
    if kind == "float_key":  # SDPA/transformers style additive padding mask, [B, 1, 1, Sk]
        m = torch.zeros(b, 1, 1, sk)
        m[-1, ..., sk // 2 + 1:] = torch.finfo(torch.float32).min
        return m
    raise AssertionError(kind)


def make_head_mask(kind, b, h, g):
    if kind == "H":
        m = torch.zeros(h, dtype=torch.bool)
        m[torch.randperm(h, generator=g)[: max(1, h // 2)]] = True
        return m
    if kind == "BH":
        return torch.rand(b, h, generator=g) > 0.5
    if kind == "none_pruned":
        return torch.ones(h, dtype=torch.bool)
    if kind == "all_pruned":
        return torch.zeros(b, h, dtype=torch.bool)
    raise AssertionError(kind)


def reference_run(q, k, v, go, hm, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, conf = reference.pruned_attention(qq, kk, vv, hm, return_confidence=True, **kw)
    grads = torch.autograd.grad(out, (qq, kk, vv), go)
    return out.detach(), conf, grads


def op_run(q, k, v, go, hm, with_conf=True, **kw):
    """With confidence, the eager float32 path materializes the kept pairs' probabilities; without, it uses
    ATen's flash kernels (conf is then None)."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if with_conf:
        out, conf = pruned_attention(qq, kk, vv, hm, return_confidence=True, **kw)
    else:
        out, conf = pruned_attention(qq, kk, vv, hm, **kw), None
    grads = torch.autograd.grad(out, (qq, kk, vv), go)
    return out.detach(), conf, grads


def assert_close(got, want, dtype, grad=False, what=""):
    atol, rtol = TOL[dtype]
    if grad:
        atol, rtol = 4 * atol, 4 * rtol
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


CASES = [
    # b, h, hk, sq, sk, d, mask, causal, head mask
    (2, 4, 4, 7, 7, 16, None, False, "H"),
    (2, 4, 4, 1, 1, 8, "pad", False, "BH"),
    (3, 4, 4, 33, 33, 16, "pad", True, "BH"),
    (2, 4, 2, 33, 33, 32, "bool4", False, "H"),
    (2, 4, 4, 5, 9, 16, "float4", True, "BH"),
    (2, 4, 4, 7, 7, 16, "float_key", False, "H"),
    (2, 6, 2, 17, 17, 8, "pad", True, "BH"),
    (2, 4, 4, 33, 33, 16, "pad", True, "none_pruned"),
    (2, 4, 4, 9, 9, 16, "bool4", False, "none_pruned"),
    (2, 4, 4, 7, 7, 16, "pad", False, "all_pruned"),
]


@pytest.fixture(params=["eager", "op"])
def cpu_path(request, monkeypatch):
    """Eager CPU calls take an autograd.Function; "op" forces the registered custom op (what torch.compile
    traces), eagerly."""
    monkeypatch.setattr(pa_module, "_EAGER_CPU", request.param == "eager")
    return request.param


@pytest.mark.parametrize("b,h,hk,sq,sk,d,mask,causal,hmk", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_conf", [True, False])
def test_cpu_matches_reference(b, h, hk, sq, sk, d, mask, causal, hmk, dtype, with_conf, cpu_path):
    q, k, v, go, g = make(b, h, hk, sq, sk, d, dtype=dtype)
    am = make_mask(mask, b, h, sq, sk, g)
    hm = make_head_mask(hmk, b, h, g)
    out, conf, grads = op_run(q, k, v, go, hm, with_conf, attn_mask=am, is_causal=causal)
    r_out, r_conf, r_grads = reference_run(q, k, v, go, hm, attn_mask=am, is_causal=causal)
    assert out.dtype == dtype
    assert_close(out, r_out, dtype, what="out")
    if with_conf:
        assert conf.dtype == torch.float32 and conf.shape == (b, h)
        assert_close(conf, r_conf, dtype, what="confidence")
    for name, a, r in zip("qkv", grads, r_grads):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close(a, r, dtype, grad=True, what=f"d{name}")


def test_cpu_bfloat16_and_float64(cpu_path):
    for dtype in (torch.bfloat16, torch.float64):
        q, k, v, go, g = make(2, 4, 2, 17, 17, 16, dtype=dtype)
        hm = make_head_mask("BH", 2, 4, g)
        am = make_mask("pad", 2, 4, 17, 17, g)
        out, conf, grads = op_run(q, k, v, go, hm, attn_mask=am, is_causal=True)
        r_out, r_conf, r_grads = reference_run(q, k, v, go, hm, attn_mask=am, is_causal=True)
        tol = TOL.get(dtype, TOL[torch.float32])
        torch.testing.assert_close(out.double(), r_out.double(), atol=tol[0], rtol=tol[1])
        torch.testing.assert_close(conf.double(), r_conf.double(), atol=tol[0], rtol=tol[1])
        for a, r in zip(grads, r_grads):
            torch.testing.assert_close(a.double(), r.double(), atol=4 * tol[0], rtol=4 * tol[1])


TRITON_CASES = [
    (2, 4, 4, 7, 7, 16, None, False, "H", None),
    (2, 4, 4, 33, 33, 16, "pad", True, "BH", 16),     # 3 x 3 blocks: the flash loops, causal block skipping
    (2, 4, 2, 33, 20, 32, "bool4", False, "H", 16),   # grouped-query heads: compact dK/dV summed per kv head
    (2, 4, 4, 5, 9, 8, "float4", True, "BH", None),   # Sq != Sk, D below the tile: padded head dim
    (1, 2, 2, 1, 1, 8, "pad", False, "H", None),
    (2, 4, 4, 9, 9, 16, "pad", False, "all_pruned", None),
    (2, 3, 3, 20, 20, 16, "float_key", True, "none_pruned", 16),
]


@pytest.mark.parametrize("b,h,hk,sq,sk,d,mask,causal,hmk,block", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(b, h, hk, sq, sk, d, mask, causal, hmk, block, dtype):
    q, k, v, go, g = make(b, h, hk, sq, sk, d, dtype=dtype)
    am = make_mask(mask, b, h, sq, sk, g)
    hm = make_head_mask(hmk, b, h, g)
    keep = reference.expand_head_mask(hm, b, h)
    scale = 1 / math.sqrt(d)
    out, lse, conf = triton_forward(q, k, v, keep, am, causal, scale, True, block_m=block, block_n=block)
    grads = triton_backward(go, q, k, v, out, lse, keep, am, causal, scale, block_m=block, block_n=block)
    r_out, r_conf, r_grads = reference_run(q, k, v, go, hm, attn_mask=am, is_causal=causal)
    assert_close(out, r_out, dtype, what="out")
    assert_close(conf, r_conf, dtype, what="confidence")
    for name, a, r in zip("qkv", grads, r_grads):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close(a, r, dtype, grad=True, what=f"d{name}")


def test_triton_reads_strided_inputs():
    """q, k, v as [B, S, H, D] buffers viewed as [B, H, S, D] (what transformers hands over)."""
    q, k, v, go, g = make(2, 4, 4, 9, 9, 16)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    hm = make_head_mask("H", 2, 4, g)
    keep = reference.expand_head_mask(hm, 2, 4)
    out, lse, conf = triton_forward(q, k, v, keep, None, False, 0.25, True)
    grads = triton_backward(go, q, k, v, out, lse, keep, None, False, 0.25)
    r_out, r_conf, r_grads = reference_run(q, k, v, go, hm)
    assert_close(out, r_out, torch.float32)
    for a, r in zip(grads, r_grads):
        assert_close(a, r, torch.float32, grad=True)


def test_outputs_shape_and_plain_return():
    q, k, v, go, g = make(2, 4, 4, 7, 7, 16)
    out = pruned_attention(q, k, v, torch.tensor([True, False, True, False]))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 7, 16)
    assert not out[:, 1].any() and not out[:, 3].any() and out[:, 0].abs().sum() > 0


def test_matches_torch_sdpa_on_kept_heads():
    q, k, v, go, g = make(2, 4, 4, 33, 33, 16)
    am = make_mask("pad", 2, 4, 33, 33, g)
    hm = torch.tensor([False, True, True, False])
    out = pruned_attention(q, k, v, hm, attn_mask=am, is_causal=True)
    causal = torch.ones(33, 33, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am[:, None, None, :] & causal)
    want = want * am[:, None, :, None]  # padded queries output zeros (documented)
    torch.testing.assert_close(out[:, 1:3], want[:, 1:3], atol=2e-5, rtol=1e-5)


def test_all_pruned_is_zero_and_cheap(cpu_path):
    q, k, v, go, g = make(2, 4, 4, 7, 7, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, conf = pruned_attention(q, k, v, torch.zeros(4, dtype=torch.bool), return_confidence=True)
    assert not out.any() and not conf.any()
    for t in torch.autograd.grad(out, (q, k, v), go):
        assert not t.any()


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_nan_policy(path, cpu_path):
    """Pruned heads are never read; NaN in a kept head propagates to that head only; empty rows give 0."""
    q, k, v, go, g = make(2, 4, 4, 8, 8, 16)
    q[:, 1] = float("nan")  # head 1 pruned: must not leak
    k[:, 3] = float("inf")
    q[0, 2, 5] = float("nan")  # head 2 kept: row 5 of sample 0 and everything it feeds go NaN
    hm = torch.tensor([True, False, True, False])
    am = torch.ones(2, 8, dtype=torch.bool)
    am[1] = False  # sample 1: nothing valid at all
    keep = hm.expand(2, 4)
    if path == "cpu":
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, conf = pruned_attention(qq, kk, vv, hm, attn_mask=am, return_confidence=True)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), go)
    else:
        out, lse, conf = triton_forward(q, k, v, keep, am, False, 0.25, True)
        dq, dk, dv = triton_backward(go, q, k, v, out, lse, keep, am, False, 0.25)
    for t in (out, dq, dk, dv):
        assert torch.equal(t[:, 1], torch.zeros_like(t[:, 1])) and torch.equal(t[:, 3], torch.zeros_like(t[:, 3]))
        assert torch.equal(t[1], torch.zeros_like(t[1]))  # fully masked sample: zeros, not NaN
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(dq[0, 0]).all()
    assert out[0, 2, 5].isnan().all() and torch.isfinite(out[0, 2, :5]).all()
    assert conf[0, 2].isnan() and torch.isfinite(conf[0, 0]) and conf[0, 0] > 0
    assert torch.equal(conf[1], torch.zeros(4)) and conf[0, 1] == 0 and conf[0, 3] == 0


def test_head_mask_forms_agree():
    q, k, v, go, g = make(3, 4, 4, 9, 9, 16)
    hm = torch.tensor([True, False, False, True])
    a = pruned_attention(q, k, v, hm)
    b = pruned_attention(q, k, v, hm.expand(3, 4).clone())
    c = pruned_attention(q, k, v, hm.to(torch.int64))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_arguments():
    q, k, v, go, g = make(2, 4, 4, 7, 7, 16)
    with pytest.raises(ValueError, match="head_mask"):
        pruned_attention(q, k, v, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        pruned_attention(q, k, v, torch.ones(4, dtype=torch.bool), attn_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        pruned_attention(q, k, v, torch.ones(4, dtype=torch.bool), attn_mask=torch.zeros(2, 3, 7, 7))
    with pytest.raises(ValueError):
        pruned_attention(q, k[:, :3], v[:, :3], torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("hmk,mask,causal", [("BH", "pad", True), ("none_pruned", "float4", False),
                                              ("all_pruned", None, False)])
def test_opcheck(hmk, mask, causal):
    q, k, v, go, g = make(2, 4, 2, 9, 9, 8)
    keep = reference.expand_head_mask(make_head_mask(hmk, 2, 4, g), 2, 4).contiguous()
    am = make_mask(mask, 2, 4, 9, 9, g)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fedsparse.pruned_attention.default,
                          (qq, kk, vv, keep, am, causal, 0.3, True))
    out, lse, _ = torch.ops.fedsparse.pruned_attention(q, k, v, keep, am, causal, 0.3, False)
    torch.library.opcheck(torch.ops.fedsparse.pruned_attention_backward.default,
                          (go, q, k, v, out, lse, keep, am, causal, 0.3))


def test_torch_compile_fullgraph():
    q, k, v, go, g = make(2, 4, 4, 9, 9, 16)
    hm = torch.tensor([True, False, True, False])
    am = make_mask("pad", 2, 4, 9, 9, g)

    def f(q, k, v):
        out, conf = pruned_attention(q, k, v, hm, attn_mask=am, is_causal=True, return_confidence=True)
        return (out * go).sum(), conf

    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    loss, conf = torch.compile(f, backend="aot_eager", fullgraph=True)(qq, kk, vv)
    grads = torch.autograd.grad(loss, (qq, kk, vv))
    r_out, r_conf, r_grads = reference_run(q, k, v, go, hm, attn_mask=am, is_causal=True)
    torch.testing.assert_close(conf, r_conf, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_native_scatter_rows():
    from fedsparse.ops import _native
    if not _native.has_scatter():
        pytest.skip("native module not built")
    from fedsparse import _C
    part = torch.randn(3, 5, 4)
    rows = torch.tensor([4, 0, 2])
    full = torch.full((2, 3, 5, 4), float("nan"))
    _native.scatter_rows(full, rows, part)
    want = torch.zeros(6, 5, 4)
    want[rows] = part
    assert torch.equal(full.view(6, 5, 4), want)
    buf = torch.zeros(6 * 80, dtype=torch.uint8).numpy()
    src = part.view(torch.uint8).reshape(-1).numpy()
    with pytest.raises(ValueError, match="out of range"):
        _C.scatter_rows(buf, src, torch.tensor([0, 1, 6]).numpy(), 80)
    with pytest.raises(ValueError, match="distinct"):
        _C.scatter_rows(buf, src, torch.tensor([0, 1, 1]).numpy(), 80)
    with pytest.raises(ValueError, match="one row per index"):
        _C.scatter_rows(buf, src, torch.tensor([0, 1]).numpy(), 80)
    with pytest.raises(TypeError):  # int32 indices are refused rather than silently converted
        _C.scatter_rows(buf, src, torch.tensor([0, 1, 2], dtype=torch.int32).numpy(), 80)


def test_dispatch_modes_see_the_custom_op():
    """Under a dispatch mode (FlopCounterMode, fedsparse's OP counting) the eager shortcut is not taken."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, go, g = make(2, 4, 4, 8, 8, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with Record() as rec:
        pruned_attention(q, k, v, torch.tensor([True, False, False, False])).backward(go)
    assert "fedsparse.pruned_attention.default" in rec.names
    assert "fedsparse.pruned_attention_backward.default" in rec.names


def test_cpu_buffer_cache_never_hands_out_a_live_buffer():
    from fedsparse.ops import _pool
    shape = (4, 8, 64, 128)  # 1 MiB of float32: cached
    a = _pool.empty(shape, torch.float32)
    a.fill_(1.0)
    view = a[1:3]
    del a
    b = _pool.empty(shape, torch.float32)  # the view keeps a's buffer alive: b must be another one
    b.fill_(2.0)
    assert torch.equal(view, torch.ones_like(view))
    ptr = b.data_ptr()
    del b
    c = _pool.empty((4, 8, 64, 256), torch.float16)  # b's buffer is free: reused (same bytes, another dtype)
    assert c.data_ptr() == ptr and c.dtype == torch.float16 and c.is_contiguous()
    small = _pool.empty((3, 5), torch.bfloat16)  # small tensors are plain allocations
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16
    del view, c
    _pool.empty_cache()
    assert all(not bufs for bufs in _pool._buffers.values())
