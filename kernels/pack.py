"""Triton kernels for blockwise quantization (pack) and dequantization (unpack).

The spec is the numpy reference ``fedsparse.quant``; these kernels produce bit-identical ``tstep``,
``scales`` and ``codes`` for round-to-nearest and for stochastic rounding, and ``dequantize`` matches the
reference exactly. How that is kept on a real GPU, not only under the interpreter:

* Division. Triton's ``/`` on float32 lowers on NVIDIA to ``div.full.f32`` (about 2 ulp, not correctly
  rounded), so every division here is ``tl.div_rn``, which lowers to ``div.rn.f32`` (IEEE round to
  nearest even, denormals kept) and which the interpreter runs as ``np.divide`` on float32 arrays (also
  IEEE). The division cannot be replaced by a multiply with a reciprocal: that rounds twice.
* Rounding. ``rint`` is only in libdevice, which the interpreter cannot run (``extern_elementwise``
  raises), and ``tl.floor`` lowers on NVIDIA to ``cvt.rmi.ftz.f32.f32``, which flushes subnormals
  (floor(-1e-40) would give 0, not -1). ``_rint_small`` and ``_floor_small`` build round-half-to-even
  and floor from truncation to int32 (``cvt.rzi.s32.f32``, no ftz) and exact compares instead; they are
  exact on the clamped range |y| <= qmax they are used on, and leave nothing to reassociate (the
  ``(y + 1.5*2**23) - 1.5*2**23`` trick would rely on no fast-math folding).
* Multiply-add contraction. Launches pass ``enable_fp_fusion=False`` so multiplies stay ``mul.rn.f32``
  (a bare ``mul.f32`` lets ptxas fuse it into a following add). Even with fusion on, the only multiply
  that feeds an add is ``u = float(h >> 8) * 2**-24`` before ``y + u`` in stochastic rounding, and
  that product is exact (a 24-bit integer times a power of two), so an fma gives the same bits.
  ``e_g = float32(s_g) * tstep`` and ``(code - off) * e_g`` are plain multiplies, rounded once each,
  in the reference's order.
* Conversions. float32 -> float16 uses Triton's default round to nearest even (``cvt.rn.f16.f32``),
  the same as numpy's ``astype(float16)``. No instruction used here flushes denormals (checked in the
  sm_90 PTX: no ``.ftz``; no libdevice call, so ``enable_reflect_ftz`` does not apply): a tiny step of
  a tiny tensor, e.g. float32(s_g) * 1e-32, stays a denormal as in numpy.
* Hash. ``lowbias32`` works on uint32 tensors: Triton's 32-bit integer multiply and numpy's uint32
  arrays both wrap modulo 2**32, and ``>>`` on unsigned types is a logical shift.

Work layout: a program owns ``GPB`` whole groups (``GPB * GROUP <= BLOCK``) and walks them in chunks of
``CHUNK`` elements (``CHUNK = min(GROUP, BLOCK)``), so per-group values (absmax, scale, step) are
computed once per program and broadcast, and large groups (up to 65536) still fit in registers. The
element tile is 3-D ``[GPB, CHUNK // PER, PER]`` with ``PER = 8 // bits`` codes per byte, so packing a
byte is a sum of disjoint shifted bit fields over the last axis. Groups hold a multiple of 4 elements,
so no byte straddles two groups.

Launch sequence of ``quantize`` (no host sync anywhere: grids depend only on ``n``):
  1. ``torch.zeros(1)`` for tmax (a memset),
  2. ``_group_absmax_kernel``: per-group absmax -> ``amax[G]``, and ``tl.atomic_max`` into ``tmax``
     (max is exact and order-independent, so the atomic does not cost determinism),
  3. ``_encode_kernel``: tstep, scales and packed codes.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["quantize", "dequantize"]

# Elements per program. On a GPU 4096 float32 (16 KiB in, 0.5-4 KiB out) keeps enough programs in
# flight to saturate memory bandwidth; under the CPU interpreter every program costs a millisecond or
# two of Python overhead, so programs there are as large as the tensor (up to 2**16 elements).
_GPU_BLOCK = 4096
_GPU_WARPS = 8
_INTERP_MAX_BLOCK = 1 << 16


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lowbias32(x):
    """Wellons' lowbias32 on a uint32 tensor (wraps modulo 2**32, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _uniform01(key, idx):
    """u in [0, 1) for int64 element indices ``idx``: (lowbias32(key ^ idx mod 2**32) >> 8) * 2**-24.

    ``key`` is lowbias32(seed mod 2**32), computed once on the host. The product is exact (a 24-bit
    integer times a power of two), so it rounds the same whatever the backend fuses it with.
    """
    h = _lowbias32(idx.to(tl.uint32) ^ key)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _floor_small(z):
    """floor of float32 ``z`` with |z| < 2**24, as int32.

    Not ``tl.floor``: on NVIDIA it lowers to ``cvt.rmi.ftz.f32.f32``, which flushes a negative
    subnormal to -0 and returns 0 instead of -1. Truncation (``cvt.rzi.s32.f32``) and the comparison
    keep subnormals.
    """
    t = z.to(tl.int32)  # rounds toward zero
    return t - (z < t.to(tl.float32)).to(tl.int32)


@triton.jit
def _rint_small(y):
    """Round half to even of float32 ``y`` with |y| < 2**24, as int32 (numpy.rint semantics).

    Works on a = |y|: f = trunc(a) = floor(a), and d = a - f is exact (it is a's fractional bits), so
    d is compared with 0.5 without rounding; then the sign is restored. No ``floor`` (ftz on
    NVIDIA, see ``_floor_small``) and nothing a compiler may reassociate, unlike the
    ``(y + 1.5*2**23) - 1.5*2**23`` trick.
    """
    a = tl.abs(y)
    fi = a.to(tl.int32)
    d = a - fi.to(tl.float32)
    up = (d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))
    r = fi + up.to(tl.int32)
    return tl.where(y < 0, -r, r)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _group_absmax_kernel(
    x_ptr,  # float32[n]
    amax_ptr,  # float32[G] out: max |x| per group
    tmax_ptr,  # float32[1] in/out, zero on entry: max over all groups (atomic)
    n,
    G,
    GROUP: tl.constexpr,  # group size, power of two >= 16
    GPB: tl.constexpr,  # groups per program
    CHUNK: tl.constexpr,  # elements of a group handled per loop step (divides GROUP)
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * GPB + tl.arange(0, GPB)  # int64: n may exceed 2**31
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros([GPB, CHUNK], dtype=tl.float32)
    for c in tl.range(0, GROUP // CHUNK):
        offs = rows[:, None] * GROUP + c * CHUNK + cols[None, :]
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        acc = tl.maximum(acc, tl.abs(v))
    amax = tl.max(acc, axis=1)  # [GPB]; rows past G are 0 and cannot raise the max
    tl.store(amax_ptr + rows, amax, mask=rows < G)
    tl.atomic_max(tmax_ptr, tl.max(amax, axis=0))


@triton.jit(do_not_specialize=["key"])
def _encode_kernel(
    x_ptr,  # float32[n]
    amax_ptr,  # float32[G] from _group_absmax_kernel
    tmax_ptr,  # float32[1] from _group_absmax_kernel
    tstep_ptr,  # float32[1] out
    scales_ptr,  # float16[G] out
    codes_ptr,  # uint8[nbytes] out
    n,
    G,
    nbytes,
    key,  # lowbias32(seed) as a 32-bit integer; unused unless STOCHASTIC
    BITS: tl.constexpr,  # 8, 4 or 2
    GROUP: tl.constexpr,
    GPB: tl.constexpr,
    CB: tl.constexpr,  # bytes per loop step of a group: CHUNK // PER
    STOCHASTIC: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    CHUNK: tl.constexpr = CB * PER
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    OFF: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)

    # Per-tensor step; every program recomputes it (one division) rather than waiting on another.
    tmax = tl.load(tmax_ptr)
    tstep = tl.div_rn(tmax, tl.full([], QMAX, tl.float32))
    tl.store(tstep_ptr, tstep, mask=pid == 0)

    # Per-group scale and step, once per program. Denominators are made safe where the reference's
    # np.where discards the quotient (no 0/0 in lanes that are thrown away).
    rows = pid.to(tl.int64) * GPB + tl.arange(0, GPB)
    amax = tl.load(amax_ptr + rows, mask=rows < G, other=0.0)
    tpos = tmax > 0
    rel = tl.where(tpos, tl.div_rn(amax, tl.where(tpos, tmax, 1.0)), 0.0)
    s16 = rel.to(tl.float16)  # round to nearest even, like numpy astype(float16)
    tl.store(scales_ptr + rows, s16, mask=rows < G)
    step = s16.to(tl.float32) * tstep  # e_g, one rounding, as in the reference
    step3 = step[:, None, None]
    spos = step3 > 0
    den = tl.where(spos, step3, 1.0)

    b = tl.arange(0, CB)
    j = tl.arange(0, PER)
    shifts = (j * BITS)[None, None, :]
    for c in tl.range(0, GROUP // CHUNK):
        eoffs = rows[:, None, None] * GROUP + c * CHUNK + b[None, :, None] * PER + j[None, None, :]
        m = eoffs < n
        x = tl.load(x_ptr + eoffs, mask=m, other=0.0)
        y = tl.where(spos, tl.div_rn(x, den), 0.0)
        if STOCHASTIC:
            # y + u rounds in float32 exactly as in the reference, before floor and clip.
            # clip(floor(z)) == floor(clip(z)) for an integer QMAX; clipping first bounds |z|.
            u = _uniform01(key.to(tl.uint32), eoffs)
            q = _floor_small(tl.minimum(tl.maximum(y + u, -QMAX), QMAX))
        else:
            # clip(rint(y)) == rint(clip(y)) because QMAX is an integer; clipping first keeps |y| small.
            q = _rint_small(tl.minimum(tl.maximum(y, -QMAX), QMAX))
        code = tl.where(m, q + OFF, 0)  # padding elements contribute zero bits
        byte = tl.sum(code << shifts, axis=2)  # disjoint bit fields: sum == or
        boffs = rows[:, None] * (GROUP // PER) + c * CB + b[None, :]
        tl.store(codes_ptr + boffs, byte.to(tl.uint8), mask=boffs < nbytes)


@triton.jit
def _decode_kernel(
    codes_ptr,  # uint8[nbytes]
    scales_ptr,  # float16[G]
    tstep_ptr,  # float32[1]
    out_ptr,  # float32[n] out
    n,
    G,
    nbytes,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GPB: tl.constexpr,
    CB: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    CHUNK: tl.constexpr = CB * PER
    MASK: tl.constexpr = (1 << BITS) - 1
    OFF: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)
    tstep = tl.load(tstep_ptr)
    rows = pid.to(tl.int64) * GPB + tl.arange(0, GPB)
    s = tl.load(scales_ptr + rows, mask=rows < G, other=0.0).to(tl.float32)
    step3 = (s * tstep)[:, None, None]  # e_g first, then (code - off) * e_g: the reference's order
    b = tl.arange(0, CB)
    j = tl.arange(0, PER)
    shifts = (j * BITS)[None, None, :]
    for c in tl.range(0, GROUP // CHUNK):
        boffs = rows[:, None] * (GROUP // PER) + c * CB + b[None, :]
        byte = tl.load(codes_ptr + boffs, mask=boffs < nbytes, other=0).to(tl.int32)
        eoffs = rows[:, None, None] * GROUP + c * CHUNK + b[None, :, None] * PER + j[None, None, :]
        m = eoffs < n
        # Padding fields decode to -OFF; zero them so discarded lanes cannot overflow (-2 * 3e38).
        code = tl.where(m, ((byte[:, :, None] >> shifts) & MASK) - OFF, 0)
        v = code.to(tl.float32) * step3
        tl.store(out_ptr + eoffs, v, mask=m)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _check_params(bits: int, group_size: int) -> None:
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    if not (16 <= group_size <= 65536) or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two in [16, 65536], got {group_size}")


def _tiling(n: int, group_size: int, bits: int, device: torch.device, block_size: int | None):
    """(GPB, CB, grid, num_warps) for a tensor of n elements."""
    if block_size is None:
        if device.type == "cuda":
            block_size = _GPU_BLOCK
        else:  # interpreter: one program per 2**16 elements, no bigger than the tensor needs
            block_size = min(_INTERP_MAX_BLOCK, max(16, triton.next_power_of_2(n)))
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    chunk = min(group_size, block_size)
    gpb = max(1, block_size // group_size)
    cb = chunk // (8 // bits)
    g = -(-n // group_size)
    grid = (triton.cdiv(g, gpb),)
    return gpb, cb, grid, _GPU_WARPS if device.type == "cuda" else 1


def _seed_key(seed: int) -> int:
    """lowbias32(seed mod 2**32) as a Python int, computed on the host (the same for every element)."""
    x = seed & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    # Pass as a signed 32-bit value so the argument is typed i32 whatever its bits; the kernel
    # reinterprets it as uint32.
    return x - (1 << 32) if x >= (1 << 31) else x


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    stochastic: bool = False,
    seed: int = 0,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise-quantize a float32 vector, bit-identical to ``fedsparse.quant.quantize``.

    Args:
        x: float32 [n], contiguous, 1-D (CUDA in production; CPU under TRITON_INTERPRET=1). Must be
            finite: the caller checks (torch.isfinite); non-finite input gives unspecified codes.
        bits: 8, 4 or 2.
        group_size: power of two in [16, 65536].
        stochastic: round with floor(y + u), u = uniform01(seed, element index), instead of rint.
        seed: any Python int (taken modulo 2**32).
        block_size: elements per program (power of two >= 16); None picks one per device.

    Returns:
        (tstep float32 [1], scales float16 [G], codes uint8 [ceil(n * bits / 8)]) on x's device,
        G = ceil(n / group_size).

    Three device operations (a memset and two kernels), no host synchronisation.
    """
    _check_params(bits, group_size)
    if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError("x must be a contiguous 1-D float32 tensor")
    n = x.numel()
    g = -(-n // group_size)
    nbytes = -(-n * bits // 8)
    dev = x.device
    tstep = torch.zeros(1, dtype=torch.float32, device=dev)
    scales = torch.empty(g, dtype=torch.float16, device=dev)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if n == 0:  # nothing to launch; tmax = 0 gives tstep = 0, as in the reference
        return tstep, scales, codes
    gpb, cb, grid, warps = _tiling(n, group_size, bits, dev, block_size)
    amax = torch.empty(g, dtype=torch.float32, device=dev)
    tmax = torch.zeros(1, dtype=torch.float32, device=dev)  # atomic_max target; |x| >= 0
    _group_absmax_kernel[grid](
        x, amax, tmax, n, g, GROUP=group_size, GPB=gpb, CHUNK=cb * (8 // bits), num_warps=warps,
        enable_fp_fusion=False,
    )
    _encode_kernel[grid](
        x, amax, tmax, tstep, scales, codes, n, g, nbytes, _seed_key(seed) if stochastic else 0,
        BITS=bits, GROUP=group_size, GPB=gpb, CB=cb, STOCHASTIC=bool(stochastic), num_warps=warps,
        enable_fp_fusion=False,
    )
    return tstep, scales, codes


def dequantize(
    tstep: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    n: int,
    bits: int,
    group_size: int,
    *,
    block_size: int | None = None,
) -> torch.Tensor:
    """Inverse of ``quantize``, bit-identical to ``fedsparse.quant.dequantize``.

    Args:
        tstep: float32 [1] (a Python float is accepted too).
        scales: float16 [ceil(n / group_size)].
        codes: uint8 [ceil(n * bits / 8)], the little-endian bit stream.
        n, bits, group_size: as given to ``quantize``.
        block_size: elements per program (power of two >= 16); None picks one per device.

    Returns:
        float32 [n] on codes' device: (code - 2**(bits-1)) * (float32(scale_g) * tstep).
    """
    _check_params(bits, group_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dev = codes.device
    if not isinstance(tstep, torch.Tensor):
        tstep = torch.tensor([float(np.float32(tstep))], dtype=torch.float32, device=dev)
    g = -(-n // group_size)
    nbytes = -(-n * bits // 8)
    if tstep.dtype != torch.float32 or tstep.numel() != 1:
        raise ValueError("tstep must be a float32 tensor of one element")
    if scales.dtype != torch.float16 or scales.dim() != 1 or scales.numel() != g:
        raise ValueError(f"scales must be float16 [{g}], got {scales.dtype} {list(scales.shape)}")
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != nbytes:
        raise ValueError(f"codes must be uint8 [{nbytes}], got {codes.dtype} {list(codes.shape)}")
    if tstep.device != dev or scales.device != dev:
        raise ValueError("tstep, scales and codes must be on the same device")
    out = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    gpb, cb, grid, warps = _tiling(n, group_size, bits, dev, block_size)
    _decode_kernel[grid](
        codes.contiguous(), scales.contiguous(), tstep.contiguous(), out, n, g, nbytes,
        BITS=bits, GROUP=group_size, GPB=gpb, CB=cb, num_warps=warps,
        enable_fp_fusion=False,
    )
    return out
