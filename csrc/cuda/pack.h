// Launchers of the CUDA C++ pack/unpack kernels (csrc/cuda/pack.cu).
//
// Plain C++: no CUDA or pybind11 headers, so csrc/cuda_bindings.cpp (built by the host compiler) can
// include it. Every pointer is a device pointer; the caller allocates every output (a torch tensor, say)
// and passes its address. Nothing here synchronizes: work is enqueued on `stream` (a cudaStream_t,
// nullptr for the legacy default stream) on the calling thread's current device.
//
// The arithmetic is that of python/fedsparse/quant.py, step for step in float32 with IEEE
// round-to-nearest-even, so codes are bit-identical to the numpy reference and the CPU kernels for
// round-to-nearest (and for stochastic rounding with the same seed).
//
// Each launcher returns a Status: ok() on success; otherwise `op` names the launcher, `what` says which
// argument or step failed and `cuda_error` holds the cudaError_t (0 when an argument was rejected before anything ran).
// Pointers cannot be bounds-checked here: the caller guarantees the sizes documented below
// (python/fedsparse/_cuda.py does).
#pragma once
#include <cstdint>

namespace fedsparse {
namespace cuda {

struct Status {
  int cuda_error = 0;          // a cudaError_t; 0 with what != nullptr: a rejected argument
  const char* what = nullptr;  // static string; nullptr on success
  const char* op = "";         // the launcher: "quantize", "dequantize", "mask_to_bitmap"
  bool ok() const { return what == nullptr; }
};

// Name (cudaErrorInvalidValue, ...) and message of a cudaError_t.
const char* error_name(int cuda_error);
const char* error_string(int cuda_error);

// Number of CUDA devices, 0 when there is no driver or no device (never fails).
int device_count();

// Bytes of float16 scales and of codes for n elements (as in quant.py) and of a quantize workspace.
int64_t num_groups(int64_t n, int64_t group_size);
int64_t code_bytes(int64_t n, int bits);
int64_t quantize_workspace_bytes(int64_t n, int64_t group_size);

// Offsets inside the quantize workspace (int32 each): after quantize() has run,
// workspace[kWorkspaceStatus] is nonzero when a NaN or Inf was met (replaced by 0 if nan_to_zero).
constexpr int64_t kWorkspaceStatus = 4;

// mask: n bytes, nonzero = kept (torch.bool or uint8).
// bitmap: ceil(n/8) bytes, little-endian (element i is bit i%8 of byte i/8), padding bits zero.
// count: one int64 (8-byte aligned): the number of kept elements.
Status mask_to_bitmap(const uint8_t* mask, int64_t n, uint8_t* bitmap, int64_t* count, void* stream);

// x: n float32 (the compact vector of kept elements); bits 8, 4 or 2; group_size a power of two in
// [16, 65536]. Writes tstep (4 bytes, one float32), scales (2*num_groups bytes, float16 bits) and codes
// (code_bytes bytes, little-endian bit stream, padding bits zero). No alignment is required of tstep,
// scales or codes: they may be the three parts of one wire-format value section
// (section, section + 4, section + 4 + 2*G). workspace: quantize_workspace_bytes, 16-byte aligned,
// no initial contents. Stochastic rounding uses the counter hash of quant.uniform01(seed, n).
// NaN/Inf count as 0 in the absmax; nan_to_zero encodes them as 0 too (otherwise their codes are
// unspecified); either way the workspace status word flags them.
Status quantize(const float* x, int64_t n, int bits, int64_t group_size, bool stochastic, uint32_t seed,
                bool nan_to_zero, uint8_t* tstep, uint8_t* scales, uint8_t* codes, void* workspace,
                void* stream);

// Inverse of quantize: out[i] = (code_i - 2**(bits-1)) * float32(scale_g) * tstep, n float32.
Status dequantize(const uint8_t* tstep, const uint8_t* scales, const uint8_t* codes, int64_t n, int bits,
                  int64_t group_size, float* out, void* stream);

}  // namespace cuda
}  // namespace fedsparse
