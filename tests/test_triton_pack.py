"""Triton pack/unpack kernels (fedsparse.kernels.pack) against the numpy spec (fedsparse.quant).

Everything must be bit-identical: tstep, scales, codes and the dequantized values. On CPU the kernels
run under TRITON_INTERPRET=1 (set by conftest.py before any kernel is defined); with
FEDSPARSE_TRITON_REAL=1 on a GPU machine the same tests run on the device.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from hypothesis import given, settings, strategies as st  # noqa: E402

from fedsparse import quant  # noqa: E402
from fedsparse.kernels import pack  # noqa: E402

DEVICE = "cuda" if os.environ.get("FEDSPARSE_TRITON_REAL") == "1" and torch.cuda.is_available() else "cpu"


def _bits_of(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def check(x: np.ndarray, bits: int, group_size: int, *, stochastic=False, seed=0, block_size=None):
    """Run kernels and reference on x; assert every output is bit-identical. Returns the kernel outputs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.size
    t, s, c = pack.quantize(
        torch.from_numpy(x).to(DEVICE), bits, group_size, stochastic=stochastic, seed=seed, block_size=block_size
    )
    rt, rs, rc = quant.quantize(x, bits, group_size, stochastic=stochastic, seed=seed)
    assert t.dtype == torch.float32 and t.shape == (1,)
    assert s.dtype == torch.float16 and s.shape == (quant.num_groups(n, group_size),)
    assert c.dtype == torch.uint8 and c.shape == (quant.code_bytes(n, bits),)
    t_np, s_np, c_np = t.cpu().numpy(), s.cpu().numpy(), c.cpu().numpy()
    assert _bits_of(t_np[0]) == _bits_of(np.float32(rt)), (t_np[0], rt)
    assert _bits_of(s_np) == _bits_of(rs), np.flatnonzero(s_np.view(np.uint16) != rs.view(np.uint16))[:10]
    bad = np.flatnonzero(c_np != rc)
    assert bad.size == 0, f"codes differ at bytes {bad[:10]}: {c_np[bad[:10]]} vs {rc[bad[:10]]}"

    d = pack.dequantize(t, s, c, n, bits, group_size, block_size=block_size)
    rd = quant.dequantize(rt, rs, rc, n, bits, group_size)
    assert d.dtype == torch.float32 and d.shape == (n,)
    d_np = d.cpu().numpy()
    bad = np.flatnonzero(d_np.view(np.uint32) != rd.view(np.uint32))
    assert bad.size == 0, f"dequantized values differ at {bad[:10]}: {d_np[bad[:10]]} vs {rd[bad[:10]]}"
    return t, s, c, d


def _mixed(n: int, rng) -> np.ndarray:
    """Normal values with per-element magnitudes spanning 1e-30 .. 1e30, some exact zeros."""
    x = rng.standard_normal(n).astype(np.float32)
    mag = rng.choice(np.array([1e-30, 1e-6, 1.0, 1e6, 1e30], np.float32), size=n)
    x = x * mag
    x[rng.random(n) < 0.1] = 0.0
    return x.astype(np.float32)


SIZES = [0, 1, 2, 3, 17, 1000, 4097]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [16, 64, 1024])
@pytest.mark.parametrize("n", SIZES)
def test_rtn_normal(n, bits, group_size):
    rng = np.random.default_rng(n * 131 + bits * 7 + group_size)
    check(rng.standard_normal(n).astype(np.float32), bits, group_size)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 3.0e38, 1e-38])
def test_rtn_extreme_magnitudes(bits, scale):
    rng = np.random.default_rng(int(bits))
    x = (rng.uniform(-1, 1, 1001) * np.float32(scale)).astype(np.float32)
    assert np.isfinite(x).all()
    check(x, bits, 32)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [16, 256])
def test_rtn_mixed_magnitudes(bits, group_size):
    # Groups whose scale relative to tmax is a float16 subnormal or underflows to 0 (step 0 -> q 0).
    check(_mixed(5003, np.random.default_rng(bits)), bits, group_size)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_zeros_and_signed_zeros(bits):
    x = np.zeros(1001, np.float32)
    x[::2] = -0.0
    t, s, c, d = check(x, bits, 16)
    assert float(t[0]) == 0.0 and not s.any()
    assert (c.cpu().numpy() == quant.pack_codes(np.full(1001, 1 << (bits - 1), np.uint8), bits)).all()
    # one nonzero group among zero groups
    x[500] = -2.5
    check(x, bits, 16)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_half_to_even(bits):
    # One group holds +-qmax so that tstep = 1, s = 1, e = 1 and y = x exactly: exercises every tie
    # (k + 0.5) and its float32 neighbours, both signs, and values beyond qmax (clipped).
    qm = quant.qmax(bits)
    k = np.arange(-qm - 2, qm + 2, dtype=np.float32)
    halves = k + np.float32(0.5)
    vals = np.concatenate(
        [k, halves, np.nextafter(halves, np.float32(np.inf)), np.nextafter(halves, np.float32(-np.inf)),
         np.float32([0.49999997, -0.49999997, 1e-30, -1e-30])]
    ).astype(np.float32)
    vals = np.clip(vals, -qm, qm)  # keep the group's absmax exactly qmax
    x = np.concatenate([np.float32([qm]), vals]).astype(np.float32)
    t, s, c, _ = check(x, bits, 1024)
    assert float(t[0]) == 1.0 and float(s[0]) == 1.0


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", [1, 17, 1000, 4097])
def test_stochastic_matches_reference(n, bits):
    rng = np.random.default_rng(n + bits)
    x = rng.standard_normal(n).astype(np.float32)
    for seed in (0, 1, 0xDEADBEEF, 2**40 + 3, -7):
        check(x, bits, 64, stochastic=True, seed=seed)


def test_stochastic_mixed_and_zero():
    rng = np.random.default_rng(5)
    check(_mixed(3001, rng), 4, 16, stochastic=True, seed=99)
    check(np.zeros(300, np.float32), 2, 16, stochastic=True, seed=99)


def test_stochastic_unbiased():
    # 2-bit, absmax 1 in every group: tstep = 1, e = 1, q in {0, 1} with P(1) = x.
    n = 1 << 16
    x = np.full(n, 0.3, np.float32)
    x[::64] = 1.0
    inner = np.ones(n, bool)
    inner[::64] = False
    means = []
    for seed in range(4):
        _, _, _, d = check(x, 2, 64, stochastic=True, seed=seed)
        means.append(d.cpu().numpy()[inner].mean())
    m = float(np.mean(means))
    sigma = np.sqrt(0.3 * 0.7 / (inner.sum() * len(means)))
    assert abs(m - 0.3) < 6 * sigma, (m, sigma)
    # round-to-nearest is biased here (always 0), which is why stochastic rounding exists
    _, _, _, d = check(x, 2, 64)
    assert float(d.cpu().numpy()[inner].max()) == 0.0
    # different seeds give different codes
    c0 = pack.quantize(torch.from_numpy(x).to(DEVICE), 2, 64, stochastic=True, seed=0)[2]
    c1 = pack.quantize(torch.from_numpy(x).to(DEVICE), 2, 64, stochastic=True, seed=1)[2]
    assert not torch.equal(c0, c1)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_many_programs_and_chunked_groups(bits):
    # Small blocks force several programs per launch, and group_size > block_size forces the
    # in-program loop over chunks of a group; also the largest allowed group size.
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(70001).astype(np.float32)
    check(x, bits, 64, block_size=4096)
    check(x, bits, 65536, block_size=8192)
    check(x, bits, 65536, stochastic=True, seed=3, block_size=16384)
    check(x[:1001], bits, 16, block_size=16)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_bound(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(4097).astype(np.float32)
    t, s, c, d = check(x, bits, 64)
    step = np.repeat(s.cpu().numpy().astype(np.float32) * t.cpu().numpy()[0], 64)[: x.size]
    err = np.abs(d.cpu().numpy() - x)
    assert (err <= step * 0.5 * (1 + 1e-3) + 1e-30).all()
    # re-quantizing the dequantized tensor reproduces the codes
    t2, s2, c2 = pack.quantize(d, bits, 64)
    assert torch.equal(c2, c) and torch.equal(s2, s) and torch.equal(t2, t)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 3000),
    bits=st.sampled_from([8, 4, 2]),
    log_group=st.integers(4, 12),
    exp=st.integers(-149, 127),
    spread=st.integers(0, 40),
    stochastic=st.booleans(),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_property_matches_reference(n, bits, log_group, exp, spread, stochastic, seed):
    rng = np.random.default_rng(abs(seed) % 2**32)
    e = rng.integers(exp - spread, exp + 1, size=n)
    x = (rng.uniform(-1, 1, n) * np.exp2(np.clip(e, -149, 127).astype(np.float64)))
    x = np.clip(x, -3.4e38, 3.4e38).astype(np.float32)
    check(x, bits, 1 << log_group, stochastic=stochastic, seed=seed)


def test_dequantize_accepts_python_float_tstep():
    x = np.linspace(-3, 3, 100, dtype=np.float32)
    t, s, c = pack.quantize(torch.from_numpy(x).to(DEVICE), 4, 16)
    d1 = pack.dequantize(t, s, c, 100, 4, 16)
    d2 = pack.dequantize(float(t[0]), s, c, 100, 4, 16)
    assert torch.equal(d1, d2)


def test_argument_validation():
    x = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError):
        pack.quantize(x, 3, 16)
    with pytest.raises(ValueError):
        pack.quantize(x, 4, 24)
    with pytest.raises(ValueError):
        pack.quantize(x, 4, 8)
    with pytest.raises(ValueError):
        pack.quantize(x, 4, 1 << 17)
    with pytest.raises(ValueError):
        pack.quantize(x.double(), 4, 16)
    with pytest.raises(ValueError):
        pack.quantize(torch.zeros(4, 4, device=DEVICE), 4, 16)
    t, s, c = pack.quantize(x, 4, 16)
    with pytest.raises(ValueError):
        pack.dequantize(t, s, c[:-1], 10, 4, 16)
    with pytest.raises(ValueError):
        pack.dequantize(t, s.float(), c, 10, 4, 16)
    with pytest.raises(ValueError):
        pack.dequantize(t, s, c, 11, 2, 16)
