// CRC-32 with zlib's polynomial (0xEDB88320, reflected): the wire format's checksum.
#pragma once
#include <cstdint>

namespace fedsparse {
// Carry-less-multiply folding where the CPU has PCLMULQDQ (chosen at run time), slicing-by-8 otherwise.
uint32_t crc32(const uint8_t* p, int64_t n);
// The portable slicing-by-8 version (the fast path's tail, and its test peer).
uint32_t crc32_portable(uint32_t crc, const uint8_t* p, int64_t n);
}  // namespace fedsparse
