"""pack/unpack against the numpy reference: native and reference kernels must give identical bytes."""
import numpy as np
import pytest

import fedsparse
from fedsparse import PackError, _backend, pack, unpack
from fedsparse.quant import dequantize, quantize

needs_native = pytest.mark.skipif(not fedsparse.has_native(), reason="native module not built")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setattr(_backend, "native", None)


def both_backends(fn):
    """Run fn() with the native kernels and with the reference; return both results."""
    native = fn()
    saved, _backend.native = _backend.native, None
    try:
        reference = fn()
    finally:
        _backend.native = saved
    return native, reference


def lora(rng, r=8, d=96, scale=1.0):
    return {"m.q.lora_A.weight": (rng.standard_normal((r, d)) * scale).astype(np.float32),
            "m.q.lora_B.weight": (rng.standard_normal((d, r)) * scale).astype(np.float32)}


@needs_native
@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("n", [0, 1, 15, 64, 1000, 4097, 70001])
@pytest.mark.parametrize("group_size", [16, 64, 1024])
def test_native_matches_reference_dense(bits, n, group_size):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    native, ref = both_backends(lambda: pack({"w": x}, bits=bits, group_size=group_size))
    assert native == ref
    a, b = both_backends(lambda: unpack(native)["w"])
    np.testing.assert_array_equal(a, b)


@needs_native
@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("kept", [[], [0], [1, 3], list(range(12))], ids=["none", "first", "some", "all"])
def test_native_matches_reference_heads(bits, kept):
    rng = np.random.default_rng(1)
    upd = {"enc.q.lora_A.weight": rng.standard_normal((8, 96)).astype(np.float32),
           "enc.q.lora_B.weight": rng.standard_normal((96, 8)).astype(np.float32),
           "enc.o_proj.lora_A.weight": rng.standard_normal((4, 96)).astype(np.float32),
           "enc.o_proj.lora_B.weight": rng.standard_normal((96, 4)).astype(np.float32)}
    mask = np.isin(np.arange(12), kept)
    kw = dict(bits=bits, head_mask={"enc.q": mask, "enc.o_proj": mask})
    native, ref = both_backends(lambda: pack(upd, **kw))
    assert native == ref
    dn, dr = both_backends(lambda: dict(unpack(native)))
    for name in upd:
        np.testing.assert_array_equal(dn[name], dr[name])
    # pruned slices decode as zeros, kept slices approximate the input
    rows = np.repeat(mask, 8)
    assert not dn["enc.q.lora_B.weight"][~rows].any()
    assert not dn["enc.o_proj.lora_A.weight"][:, ~rows].any()
    assert dn["enc.q.lora_A.weight"].any() and dn["enc.o_proj.lora_B.weight"].any()  # other factors whole
    assert unpack(native).head_masks == {} or all(
        np.array_equal(m, mask) for m in unpack(native).head_masks.values())


@pytest.mark.parametrize("bits,tol", [(32, 0), (16, 1e-3), (8, 1e-2), (4, 0.15), (2, 1.0)])
def test_round_trip_error(bits, tol):
    x = np.random.default_rng(2).standard_normal((64, 33)).astype(np.float32)
    y = unpack(pack({"w": x}, bits=bits))["w"]
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert err <= tol


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 1e6, 1e30])
@pytest.mark.parametrize("bits", [8, 4])
def test_huge_and_tiny_magnitudes(magnitude, bits):
    x = (np.random.default_rng(3).standard_normal(1000) * magnitude).astype(np.float32)
    y = unpack(pack({"w": x}, bits=bits))["w"]
    assert np.isfinite(y).all()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)  # float32 norms underflow at 1e-30
    assert np.linalg.norm(y64 - x64) / np.linalg.norm(x64) < (0.01 if bits == 8 else 0.15)


def test_zeros_and_mixed_groups():
    x = np.zeros(300, np.float32)
    x[100:110] = 1e20  # one loud group, others tiny or zero
    x[200:210] = 1e17  # 1e-3 of the loudest: a normal float16 relative scale
    x[250:260] = 1e10  # 1e-10 of the loudest: below float16's 2**-24, decodes as zero (documented)
    native, ref = both_backends(lambda: pack({"w": x}, bits=8, group_size=16))
    assert native == ref
    y = unpack(native)["w"]
    assert not y[:100].any() and np.allclose(y[100:110], 1e20, rtol=1e-2)
    np.testing.assert_allclose(y[200:210], 1e17, rtol=1e-2)  # relative float16 group scale keeps quiet groups
    assert not y[250:260].any()


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_dtypes_are_recorded(dtype):
    x = np.arange(10, dtype=dtype)
    u = unpack(pack({"w": x}, bits=32))
    assert u.dtypes == {"w": dtype} and u.shapes == {"w": (10,)}
    np.testing.assert_array_equal(u["w"], x.astype(np.float32))


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    upd = {"a": torch.randn(4, 6, dtype=torch.bfloat16), "b": torch.randn(3, requires_grad=True)}
    u = unpack(pack(upd, bits=32))
    assert u.dtypes == {"a": "bfloat16", "b": "float32"}
    assert torch.equal(u.torch("a"), upd["a"])
    assert u.torch("b").dtype == torch.float32 and torch.equal(u.torch("b"), upd["b"].detach())
    assert set(u.to_dict(as_torch=True)) == {"a", "b"}


def test_stochastic_rounding_is_seeded_and_unbiased():
    x = np.full(20000, 0.3, np.float32)
    x[::64] = 1.0  # sets every group's scale: 0.3 lies between the 2-bit levels 0 and 1
    quiet = x == np.float32(0.3)
    a = pack({"w": x}, bits=2, rounding="stochastic", seed=7)
    assert a == pack({"w": x}, bits=2, rounding="stochastic", seed=7)
    assert a != pack({"w": x}, bits=2, rounding="stochastic", seed=8)
    native, ref = both_backends(lambda: pack({"w": x}, bits=2, rounding="stochastic", seed=7))
    assert native == ref
    y = unpack(a)["w"][quiet]
    assert abs(y.mean() - 0.3) < 0.01  # nearest rounding gives 0 everywhere, far from 0.3
    nearest = unpack(pack({"w": x}, bits=2))["w"][quiet]
    assert abs(nearest.mean() - 0.3) > 0.2


def test_topk():
    x = np.random.default_rng(4).standard_normal((50, 40)).astype(np.float32)
    u = unpack(pack({"w": x}, bits=32, topk=0.1))
    y = u["w"]
    assert np.count_nonzero(y) == 200
    threshold = np.sort(np.abs(x).ravel())[-200]
    np.testing.assert_array_equal(y[np.abs(x) >= threshold], x[np.abs(x) >= threshold])
    assert u.element_masks["w"].sum() == 200
    native, ref = both_backends(lambda: pack({"w": x}, bits=4, topk=0.1))
    assert native == ref


def test_pack_returns_plain_bytes_nobody_else_holds():
    """pack writes the payload in place into a new bytes object: once it returns, no writable view of it may
    survive (the only references are the caller's)."""
    import sys

    p = pack({"w": np.ones((64, 64), np.float32)}, bits=8)
    assert type(p) is bytes
    assert sys.getrefcount(p) == 2  # p and getrefcount's argument
    assert unpack(p)["w"].sum() == 64 * 64


def test_topk_never_sends_zeros():
    x = np.zeros((8, 16), np.float32)
    x[0, :3] = [1.0, -2.0, 0.5]  # 3 non-zeros, fewer than the 10% asked for
    for bits in (32, 8, 4):
        u = unpack(pack({"w": x, "z": np.zeros((4, 4), np.float32)}, bits=bits, topk=0.1))
        assert u.element_masks["w"].sum() == 3 and u.element_masks["z"].sum() == 0
        assert not u["z"].any()
        native, ref = both_backends(lambda: pack({"w": x, "z": np.zeros(5, np.float32)}, bits=bits, topk=0.5))
        assert native == ref


def test_metadata_round_trip():
    meta = {"client_id": "c7", "round": 3, "num_examples": 120, "branch": None, "lr": 1e-4,
            "head_scores": np.linspace(0, 1, 72).reshape(6, 12)}
    u = unpack(pack({"w": np.ones(3, np.float32)}, metadata=meta))
    assert {k: v for k, v in u.metadata.items() if k != "head_scores"} == {k: v for k, v in meta.items()
                                                                          if k != "head_scores"}
    np.testing.assert_array_equal(u.metadata["head_scores"], meta["head_scores"].astype(np.float32))
    assert list(u) == ["w"]
    half = unpack(pack({}, metadata={"s": np.array([0.1, 0.7], np.float16)}))
    assert half.layout.entries[0].bits == 16  # float16 arrays stay float16 on the wire, losslessly
    np.testing.assert_array_equal(half.metadata["s"], np.array([0.1, 0.7], np.float16).astype(np.float32))


def test_empty_update_and_empty_tensor():
    u = unpack(pack({}))
    assert len(u) == 0 and u.metadata == {}
    u = unpack(pack({"e": np.zeros((0, 5), np.float32)}, bits=4))
    assert u["e"].shape == (0, 5)


def test_nan_raises_or_zeroes():
    x = np.array([1.0, np.nan, 2.0, np.inf], np.float32)
    for bits in (32, 16, 8):
        with pytest.raises(PackError, match="'w' contains NaN or Inf"):
            pack({"w": x}, bits=bits)
    native, ref = both_backends(lambda: pack({"w": x}, bits=8, nan="zero"))
    assert native == ref
    y = unpack(native)["w"]
    assert y[1] == 0 and y[3] == 0 and abs(y[2] - 2) < 0.02


def test_float16_overflow_is_an_error():
    with pytest.raises(PackError, match="float16 range"):
        pack({"w": np.array([1e6], np.float32)}, bits=16)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "bits must be"),
    ({"group_size": 48}, "group_size"),
    ({"rounding": "up"}, "rounding"),
    ({"nan": "ignore"}, "nan must be"),
    ({"topk": 1.5}, "topk"),
    ({"head_mask": {"nope": np.ones(12, bool)}}, "no tensor of the update is under it"),
    ({"head_mask": {"m.q": np.ones(5, bool)}}, "'m.q.lora_B.weight': head mask of length 5"),
    ({"head_mask": {"m.q": np.ones(12)}}, "bool"),
    ({"metadata": {"x": object()}}, "JSON"),
    ({"metadata": {"x": np.array([np.nan])}}, "NaN"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(PackError, match=match):
        pack(lora(np.random.default_rng(5)), **kwargs)


def test_bad_update_values():
    with pytest.raises(PackError, match="not a floating type"):
        pack({"w": np.arange(3)})
    with pytest.raises(PackError, match="mapping"):
        pack([np.ones(3)])


def test_reference_quant_roundtrip_spec():
    x = np.random.default_rng(6).standard_normal(999).astype(np.float32)
    tstep, scales, codes = quantize(x, 4, 64)
    assert scales.dtype == np.float16 and codes.size == 500 and scales.max() == 1
    y = dequantize(tstep, scales, codes, 999, 4, 64)
    assert np.abs(y - x).max() <= np.abs(x).max() / 7 / 2 * 1.01


def test_error_feedback_tracks_the_true_sum():
    rng = np.random.default_rng(8)
    ef = fedsparse.ErrorFeedback()
    true_sum = np.zeros(500, np.float32)
    sent_sum = np.zeros(500, np.float32)
    plain_sum = np.zeros(500, np.float32)
    for _ in range(30):
        x = rng.standard_normal(500).astype(np.float32) * 0.1
        true_sum += x
        sent_sum += unpack(ef.pack({"w": x}, bits=2))["w"]
        plain_sum += unpack(pack({"w": x}, bits=2))["w"]
    ef_err = np.abs(sent_sum - true_sum).max()
    assert ef_err <= np.abs(ef.residual["w"]).max() + 1e-5  # the gap is exactly what is still held back
    assert ef_err < np.abs(plain_sum - true_sum).max() / 2
