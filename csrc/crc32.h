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
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, int64_t len_b);
}  // namespace fedsparse
