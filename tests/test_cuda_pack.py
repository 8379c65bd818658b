"""The CUDA C++ pack/unpack kernels (csrc/cuda/pack.cu, fedsparse._C.cuda, fedsparse._cuda).

Without a GPU: pack.cu must compile with nvcc for sm_80 and sm_90 (warnings are errors), the module
must import without torch, and the raw bindings must reject bad arguments and raise, not crash, when
CUDA has no device. With a GPU (and a CUDA build): codes, scales and tstep are bit-identical to the
numpy reference fedsparse.quant for every bit width, odd sizes, both rounding modes and misaligned
buffers; dequantize is identical; bitmaps equal numpy's packbits.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsparse import quant
from fedsparse._backend import native

ROOT = Path(__file__).resolve().parents[1]
PACK_CU = ROOT / "csrc" / "cuda" / "pack.cu"

try:
    import torch
except ImportError:  # the server side runs without torch
    torch = None

CUDA_BUILD = native is not None and bool(native.build_info().get("cuda", False))
HAS_GPU = torch is not None and torch.cuda.is_available()
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILD, reason="fedsparse._C built without CUDA kernels")
needs_gpu = pytest.mark.skipif(not (CUDA_BUILD and HAS_GPU),
                               reason="needs a CUDA device (torch.cuda) and a CUDA build of fedsparse._C")


# --------------------------------------------------------------------------------------------------
# No GPU needed.

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_pack_cu_compiles_for_sm80_and_sm90(tmp_path):
    cmd = ["nvcc", "-c", str(PACK_CU), "-o", str(tmp_path / "pack.o"), "-std=c++17", "-O3",
           f"-I{ROOT / 'csrc'}", "--ftz=false", "--prec-div=true",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "pack.o").stat().st_size > 0


def test_cuda_module_imports_without_torch():
    code = "import sys, fedsparse, fedsparse._cuda; assert 'torch' not in sys.modules, 'torch was imported'"
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_available_matches_build_and_devices():
    from fedsparse import _cuda

    if not (CUDA_BUILD and HAS_GPU):
        assert not _cuda.available()
    else:
        # torch sees a GPU: so must the kernels' (static) CUDA runtime, else the driver is too old for it
        assert native.cuda.device_count() > 0, "the CUDA runtime linked into fedsparse._C sees no device"
        assert _cuda.available()


@needs_cuda_build
def test_raw_bindings_reject_bad_arguments():
    c = native.cuda
    # Rejected before any CUDA call, so fake pointers are never touched.
    with pytest.raises(ValueError, match="bits"):
        c.quantize(16, 100, 3, 64, False, 0, False, 16, 32, 64, 128, 0)
    with pytest.raises(ValueError, match="group_size"):
        c.quantize(16, 100, 8, 48, False, 0, False, 16, 32, 64, 128, 0)
    with pytest.raises(ValueError, match="group_size"):
        c.dequantize(16, 32, 64, 100, 4, 8, 128, 0)
    with pytest.raises(ValueError, match="n must be"):
        c.mask_to_bitmap(16, -1, 32, 64, 0)
    with pytest.raises(ValueError, match="null pointer"):
        c.quantize(0, 100, 8, 64, False, 0, False, 16, 32, 64, 128, 0)
    with pytest.raises(ValueError, match="aligned"):
        c.quantize(16, 100, 8, 64, False, 0, False, 16, 32, 64, 129, 0)
    assert c.num_groups(100, 64) == quant.num_groups(100, 64)
    assert c.code_bytes(101, 2) == quant.code_bytes(101, 2)
    assert c.quantize_workspace_bytes(1000, 64) == 16 + 4 * quant.num_groups(1000, 64)


@needs_cuda_build
def test_cuda_errors_raise_without_a_device():
    c = native.cuda
    if c.device_count() > 0:
        pytest.skip("a CUDA device is present: this test feeds fake pointers")
    with pytest.raises(RuntimeError, match=r"fedsparse CUDA quantize: .*failed: cudaError"):
        c.quantize(16, 100, 8, 64, False, 0, False, 16, 32, 64, 128, 0)
    with pytest.raises(RuntimeError, match=r"fedsparse CUDA mask_to_bitmap: .*failed"):
        c.mask_to_bitmap(16, 100, 32, 64, 0)
    with pytest.raises(RuntimeError, match=r"fedsparse CUDA dequantize: .*failed"):
        c.dequantize(16, 32, 64, 100, 4, 64, 128, 0)
    c.dequantize(16, 32, 64, 0, 4, 64, 128, 0)  # n == 0: nothing to do, no CUDA call


# --------------------------------------------------------------------------------------------------
# GPU: against the numpy reference.

SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 33, 127, 255, 1000, 4097, 65537, 100_003]
GROUPS = [16, 32, 64, 128, 256, 512, 4096, 65536]


def _data(n, seed, kind="wide"):
    rng = np.random.default_rng(seed)
    if kind == "wide":  # magnitudes over 16 decades: float16 scales go subnormal and to zero
        return (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)).astype(np.float32)
    if kind == "ties":  # exact halves: round-half-to-even must match np.rint
        return (rng.integers(-6, 7, n) * 0.5).astype(np.float32)
    if kind == "sparse":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.random(n) < 0.7] = 0
        return x
    return np.zeros(n, np.float32)


def _assert_same(got, ref, n, bits, group_size, tag=""):
    t, s, c = (a.cpu().numpy() for a in got)
    rt, rs, rc = ref
    assert t.tobytes() == np.float32(rt).tobytes(), tag
    np.testing.assert_array_equal(s.view(np.uint16), rs.view(np.uint16), err_msg=f"scales {tag}")
    np.testing.assert_array_equal(c, rc, err_msg=f"codes {tag}")


@needs_gpu
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_matches_reference(bits, group_size, stochastic):
    from fedsparse import _cuda

    for i, n in enumerate(SIZES):
        kind = ("wide", "ties", "sparse", "zeros")[i % 4] if n < 1000 else "wide"
        x = _data(n, 1000 * bits + i, kind)
        seed = 12345 + i
        got = _cuda.quantize(torch.from_numpy(x).cuda(), bits, group_size, stochastic=stochastic, seed=seed)
        ref = quant.quantize(x, bits, group_size, stochastic=stochastic, seed=seed)
        _assert_same(got, ref, n, bits, group_size, (n, kind))
        y = _cuda.dequantize(*got, n, bits, group_size).cpu().numpy()
        ry = quant.dequantize(*ref, n, bits, group_size)
        assert y.tobytes() == ry.astype(np.float32).tobytes(), (n, kind)


@needs_gpu
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_quantize_large_and_empty(bits):
    from fedsparse import _cuda

    for n, gs in [(0, 64), (3_000_001, 16), (3_000_001, 65536), (2_500_000, 1024)]:
        x = _data(n, n + bits)
        got = _cuda.quantize(torch.from_numpy(x).cuda(), bits, gs, stochastic=bits == 4, seed=7)
        ref = quant.quantize(x, bits, gs, stochastic=bits == 4, seed=7)
        _assert_same(got, ref, n, bits, gs, n)
        y = _cuda.dequantize(*got, n, bits, gs)
        assert y.cpu().numpy().tobytes() == quant.dequantize(*ref, n, bits, gs).astype(np.float32).tobytes()


@needs_gpu
@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_misaligned_pointers(bits):
    """x, tstep, scales, codes and out at odd byte offsets: the kernels fall back to scalar accesses."""
    from fedsparse import _cuda

    c = native.cuda
    n, gs = 10_007, 64
    g, cb = quant.num_groups(n, gs), quant.code_bytes(n, bits)
    x = _data(n, 99)
    ref = quant.quantize(x, bits, gs)
    for xoff in (1, 2, 3):
        xs = torch.zeros(n + 4, dtype=torch.float32, device="cuda")
        xs[xoff:xoff + n] = torch.from_numpy(x).cuda()
        for boff in (1, 3):
            buf = torch.full((4 + 2 * g + cb + 16,), 0xCD, dtype=torch.uint8, device="cuda")
            ws = torch.empty(c.quantize_workspace_bytes(n, gs), dtype=torch.uint8, device="cuda")
            p = buf.data_ptr() + boff
            stream = torch.cuda.current_stream().cuda_stream
            c.quantize(xs[xoff:].data_ptr(), n, bits, gs, False, 0, False, p, p + 4, p + 4 + 2 * g, ws.data_ptr(),
                       stream)
            b = buf.cpu().numpy()
            assert b[boff:boff + 4].view(np.float32)[0] == ref[0]
            np.testing.assert_array_equal(b[boff + 4:boff + 4 + 2 * g].view(np.uint16), ref[1].view(np.uint16))
            np.testing.assert_array_equal(b[boff + 4 + 2 * g:boff + 4 + 2 * g + cb], ref[2])
            assert (b[:boff] == 0xCD).all() and (b[boff + 4 + 2 * g + cb:] == 0xCD).all(), "wrote out of bounds"
            out = torch.full((n + 4,), -1.0, dtype=torch.float32, device="cuda")
            c.dequantize(p, p + 4, p + 4 + 2 * g, n, bits, gs, out[xoff:].data_ptr(), stream)
            o = out.cpu().numpy()
            assert o[xoff:xoff + n].tobytes() == quant.dequantize(*ref, n, bits, gs).astype(np.float32).tobytes()
            assert (o[:xoff] == -1).all() and (o[xoff + n:] == -1).all()


@needs_gpu
def test_section_roundtrip_and_wire_layout():
    from fedsparse import _cuda

    n, bits, gs = 5003, 4, 128
    x = _data(n, 5)
    sec = _cuda.quantize_section(torch.from_numpy(x).cuda(), bits, gs)
    assert sec.numel() == _cuda.section_nbytes(n, bits, gs)
    rt, rs, rc = quant.quantize(x, bits, gs)
    expect = np.float32(rt).tobytes() + rs.astype("<f2").tobytes() + rc.tobytes()
    assert sec.cpu().numpy().tobytes() == expect
    y = _cuda.dequantize_section(sec, n, bits, gs)
    assert y.cpu().numpy().tobytes() == quant.dequantize(rt, rs, rc, n, bits, gs).astype(np.float32).tobytes()


@needs_gpu
def test_non_finite_values():
    from fedsparse import _cuda
    from fedsparse.errors import PackError

    n = 3000
    x = _data(n, 11)
    x[[0, 17, 2999]] = [np.nan, np.inf, -np.inf]
    xt = torch.from_numpy(x).cuda()
    with pytest.raises(PackError, match="NaN"):
        _cuda.quantize(xt, 8, 64)
    got = _cuda.quantize(xt, 8, 64, nan_to_zero=True)
    _assert_same(got, quant.quantize(np.nan_to_num(x, nan=0, posinf=0, neginf=0), 8, 64), n, 8, 64)


@needs_gpu
def test_non_default_stream_and_input_dtypes():
    from fedsparse import _cuda

    n, bits, gs = 70_001, 2, 256
    x = _data(n, 3)
    ref = quant.quantize(x, bits, gs)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xt = torch.from_numpy(x).cuda(non_blocking=False)
        got = _cuda.quantize(xt.reshape(7, -1), bits, gs, check_finite=False)  # 70_001 = 7 * 10_001
        y = _cuda.dequantize(*got, n, bits, gs)
    s.synchronize()
    _assert_same(got, ref, n, bits, gs)
    assert y.cpu().numpy().tobytes() == quant.dequantize(*ref, n, bits, gs).astype(np.float32).tobytes()
    # a non-contiguous float64 input is cast to a contiguous float32 vector, as numpy does
    x2 = torch.from_numpy(np.stack([x, -x], axis=1).astype(np.float64)).cuda()[:, 0]
    assert not x2.is_contiguous()
    _assert_same(_cuda.quantize(x2, bits, gs), ref, n, bits, gs)


@needs_gpu
@pytest.mark.parametrize("n", [0, 1, 5, 31, 32, 33, 127, 128, 129, 1000, 4097, 1_000_003])
def test_mask_to_bitmap(n):
    from fedsparse import _cuda
    from fedsparse.sparsity import pack_bitmap

    rng = np.random.default_rng(n)
    m = rng.choice(np.array([0, 0, 0, 1, 2, 255], dtype=np.uint8), size=n)
    ref = np.frombuffer(pack_bitmap(m != 0), dtype=np.uint8)
    for off in (0, 1, 3):  # misaligned mask starts
        buf = torch.zeros(n + 4, dtype=torch.uint8, device="cuda")
        buf[off:off + n] = torch.from_numpy(m).cuda()
        for mask in (buf[off:off + n], buf[off:off + n].bool()):
            bitmap, count = _cuda.mask_to_bitmap(mask)
            np.testing.assert_array_equal(bitmap.cpu().numpy(), ref)
            assert int(count) == int(np.count_nonzero(m))


@needs_gpu
def test_wrapper_rejects_bad_inputs():
    from fedsparse import _cuda

    with pytest.raises(ValueError, match="CUDA"):
        _cuda.quantize(torch.zeros(10), 8, 64)
    with pytest.raises(ValueError, match="bits"):
        _cuda.quantize(torch.zeros(10, device="cuda"), 3, 64)
    with pytest.raises(ValueError, match="elements"):
        _cuda.dequantize(torch.zeros(1, device="cuda"), torch.zeros(1, dtype=torch.float16, device="cuda"),
                         torch.zeros(3, dtype=torch.uint8, device="cuda"), 100, 8, 64)
    with pytest.raises(TypeError):
        _cuda.mask_to_bitmap(torch.zeros(10, dtype=torch.float32, device="cuda"))
