// CRC-32 with zlib's polynomial (0xEDB88320, reflected): the wire format's checksum.
#pragma once
#include <cstdint>

namespace fedsparse {
// Carry-less-multiply folding where the CPU has PCLMULQDQ (chosen at run time), slicing-by-8 otherwise.
uint32_t crc32(const uint8_t* p, int64_t n);
// The portable slicing-by-8 version (the fast path's tail, and its test peer).
uint32_t crc32_portable(uint32_t crc, const uint8_t* p, int64_t n);
// crc continued over n more bytes: crc32_update(crc32(a), b) == crc32(a ++ b) (zlib's crc32(crc, buf, len)).
uint32_t crc32_update(uint32_t crc, const uint8_t* p, int64_t n);
// crc32(a ++ b) from crc32(a), crc32(b) and b's length: a CRC computed in pieces, in parallel.
// portable: the bit-serial products, not the carry-less multiply (the fallback, for its test).
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, int64_t len_b, bool portable = false);
}  // namespace fedsparse

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FS_CRC_FOLD512 1
#define FS_CRC_FOLD_INLINE __attribute__((target("avx512f,avx512vl,vpclmulqdq"), always_inline)) inline
namespace fedsparse {
// 512-bit folding for a loop that reads 64-byte blocks anyway and folds them as it goes (the server's
// accumulate pass), where crc32_can_fold512(): z = crc32_fold_first(crc, block 0), z = crc32_fold_next(z,
// block i) for the blocks that follow, and crc32_fold_finish(z stored to 64 bytes) is crc32_update(crc, all).
bool crc32_can_fold512();
// z * x^distance + next, lane by lane (k: the distance's two constants in every lane).
FS_CRC_FOLD_INLINE __m512i crc32_fold512(__m512i z, __m512i k, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(z, k, 0x00), _mm512_clmulepi64_epi128(z, k, 0x11), next,
                                   0x96);
}
FS_CRC_FOLD_INLINE __m512i crc32_fold_first(uint32_t crc, const uint8_t* block) {
  return _mm512_xor_si512(_mm512_loadu_si512(block), _mm512_zextsi128_si512(_mm_cvtsi32_si128(int(~crc))));
}
FS_CRC_FOLD_INLINE __m512i crc32_fold_next(__m512i z, const uint8_t* block) {  // 64 bytes on: x^(512 -+ 32)
  return crc32_fold512(z, _mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596, 0x154442bd4)), _mm512_loadu_si512(block));
}
uint32_t crc32_fold_finish(const uint8_t* state);
}  // namespace fedsparse
#endif
