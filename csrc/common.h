// Shared helpers of the CPU kernels: checks, little-endian loads and float16 conversion.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#define FS_CHECK(cond, msg)                                                    \
  do {                                                                         \
    if (!(cond)) throw std::invalid_argument(std::string("fedsparse: ") + (msg)); \
  } while (0)

namespace fedsparse {

// Sparsity kinds of the wire format (python/fedsparse/sparsity.py).
enum Kind { kDense = 0, kHeadRows = 1, kHeadCols = 2, kElements = 3 };

// Bytes of a value section of n values (docs/wire-format.md): float32, float16, or for 8/4/2 bits a float32
// tensor scale, one float16 scale per group of gs values, then the codes packed into bytes.
inline int64_t values_nbytes(int64_t n, int bits, int64_t gs) {
  if (bits == 32) return 4 * n;
  if (bits == 16) return 2 * n;
  return 4 + 2 * ((n + gs - 1) / gs) + (n * bits + 7) / 8;
}

// Little-endian loads from possibly unaligned bytes (the wire format is little-endian everywhere).
inline uint32_t load_u32le(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline uint16_t load_u16le(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }
inline float load_f32le(const uint8_t* p) {
  uint32_t u = load_u32le(p);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store_u16le(uint8_t* p, uint16_t v) { p[0] = uint8_t(v); p[1] = uint8_t(v >> 8); }
inline void store_f32le(uint8_t* p, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  p[0] = uint8_t(u); p[1] = uint8_t(u >> 8); p[2] = uint8_t(u >> 16); p[3] = uint8_t(u >> 24);
}

// IEEE float32 -> float16, round to nearest even (F. Giesen's branch-light method). Relies on the FPU's
// default rounding for the subnormal path, so this file must not be built with -ffast-math.
inline uint16_t f32_to_f16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= 0x47800000u) {  // >= 65536: Inf, or NaN (kept quiet)
    out = u > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (u < 0x38800000u) {  // below 2**-14: subnormal or zero
    float f, magic = 0.5f;
    std::memcpy(&f, &u, 4);
    f += magic;
    uint32_t r, m;
    std::memcpy(&r, &f, 4);
    std::memcpy(&m, &magic, 4);
    out = uint16_t(r - m);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
    out = uint16_t(u >> 13);
  }
  return uint16_t(out | (sign >> 16));
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = float(mant) * (1.0f / 16777216.0f);  // exact: mant * 2**-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace fedsparse
