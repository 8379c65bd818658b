"""Reference (numpy) blockwise quantization: the spec the native, Triton and CUDA kernels follow.

Codes are bit-identical across implementations for round-to-nearest, so every step is spelled out in
float32 with IEEE round-to-nearest-even:

    qmax   = 2**(bits-1) - 1                      (127, 7, 1)
    tmax   = max |x|                                (float32, over the whole compacted tensor)
    tstep  = float32(tmax) / float32(qmax)          (stored once per tensor, float32)
    s_g    = float16(absmax_g / tmax)               (stored per group, float16, in [0, 1]; 0 if tmax == 0)
    e_g    = float32(s_g) * tstep                   (the step of group g)
    q      = clamp(rint(x / e_g), -qmax, qmax)      (0 where e_g == 0)
    code   = q + 2**(bits-1)                        (unsigned, 1 .. 2**bits - 1)

The two-level scale (a float32 per tensor, a float16 per group relative to it) keeps float16 scales
exact for huge and tiny magnitudes alike. Stochastic rounding replaces rint(y) by floor(y + u) with u a
counter-based hash of (seed, element index) in [0, 1): unbiased, seeded, and the same on every backend.

Codes are a little-endian bit stream: element i of a b-bit tensor occupies bits [i*b, (i+1)*b) counted
from bit 0 of byte 0; padding bits of the last byte are zero.
"""
from __future__ import annotations

import numpy as np

QUANT_BITS = (8, 4, 2)
RAW_BITS = (32, 16)
ALL_BITS = (32, 16, 8, 4, 2)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def num_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def code_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def lowbias32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (Wellons' lowbias32) on uint32 arrays."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def uniform01(seed: int, n: int, start: int = 0) -> np.ndarray:
    """u[i] in [0, 1) for element indices start..start+n-1: (lowbias32(lowbias32(seed) ^ i) >> 8) * 2**-24."""
    key = lowbias32(np.uint32(seed & 0xFFFFFFFF))
    idx = (np.arange(start, start + n, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    h = lowbias32(idx ^ key)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def group_absmax(x: np.ndarray, group_size: int) -> np.ndarray:
    """float32[G]: max |x| over each group of group_size elements (the last may be short)."""
    n = x.size
    g = num_groups(n, group_size)
    padded = np.zeros(g * group_size, dtype=np.float32)
    padded[:n] = np.abs(x)
    return padded.reshape(g, group_size).max(axis=1) if g else np.zeros(0, np.float32)


def quantize(x: np.ndarray, bits: int, group_size: int, *, stochastic: bool = False, seed: int = 0):
    """Quantize float32[n] -> (tstep: float32, scales: float16[G], codes: uint8[ceil(n*bits/8)])."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    q_max = np.float32(qmax(bits))
    amax = group_absmax(x, group_size)
    tmax = amax.max() if amax.size else np.float32(0)
    tstep = np.float32(tmax) / q_max
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(tmax > 0, amax / np.float32(tmax), np.float32(0)).astype(np.float32)
    scales = rel.astype(np.float16)
    step = scales.astype(np.float32) * np.float32(tstep)
    step_e = np.repeat(step, group_size)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(step_e > 0, x / step_e, np.float32(0)).astype(np.float32)
    if stochastic:
        q = np.floor(y + uniform01(seed, n))
    else:
        q = np.rint(y)
    q = np.clip(q, -q_max, q_max).astype(np.int32)
    codes = pack_codes((q + (1 << (bits - 1))).astype(np.uint8), bits)
    return np.float32(tstep), scales, codes


def dequantize(tstep, scales: np.ndarray, codes: np.ndarray, n: int, bits: int, group_size: int) -> np.ndarray:
    """Inverse of quantize: float32[n] = (code - 2**(bits-1)) * float32(scale_g) * tstep."""
    u = unpack_codes(codes, n, bits).astype(np.int32) - (1 << (bits - 1))
    step = np.asarray(scales, dtype=np.float16).astype(np.float32) * np.float32(tstep)
    return u.astype(np.float32) * np.repeat(step, group_size)[:n]


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8[n] codes (< 2**bits) -> little-endian bit stream uint8[ceil(n*bits/8)]."""
    if bits == 8:
        return u.astype(np.uint8)
    per = 8 // bits
    n = u.size
    padded = np.zeros(code_bytes(n, bits) * per, dtype=np.uint8)
    padded[:n] = u
    padded = padded.reshape(-1, per)
    out = np.zeros(padded.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= padded[:, j] << np.uint8(j * bits)
    return out


def unpack_codes(codes: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Little-endian bit stream -> uint8[n] codes."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes[:n]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(codes >> np.uint8(j * bits)) & mask for j in range(per)]
    return np.stack(parts, axis=1).reshape(-1)[:n]
