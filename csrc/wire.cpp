// Native parser of the fedsparse wire format (version 1); python/fedsparse/wire.py is its reference and
// docs/wire-format.md the spec. The bytes are hostile: every read goes through Reader, which checks the
// bound first; sizes are computed in int64 with explicit caps so nothing overflows; a malformed payload
// raises ValueError (turned into fedsparse.PayloadError by the caller) and nothing else.
#include <pybind11/pybind11.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "crc32.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

constexpr int64_t kHeaderSize = 20, kCrcSize = 4;
constexpr int64_t kMaxTensors = 1 << 16, kMaxNameBytes = 1024, kMaxNdim = 8, kMaxDim = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxMetaBytes = 1 << 20, kMinGroup = 16, kMaxGroup = 1 << 16;

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Reader {
  const uint8_t* buf;
  int64_t pos, end;

  int64_t take(int64_t n, const std::string& what) {
    if (n < 0 || n > end - pos)
      throw ParseError("truncated payload: " + what + " needs " + std::to_string(n) + " bytes at offset " +
                       std::to_string(pos) + ", " + std::to_string(end - pos) + " left");
    const int64_t start = pos;
    pos += n;
    return start;
  }
  uint8_t u8(const std::string& what) { return buf[take(1, what)]; }
  int64_t varint(const std::string& what, int64_t limit) {
    uint64_t value = 0;
    int shift = 0;
    while (true) {
      const uint8_t b = u8(what);
      value |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) break;
      shift += 7;
      if (shift > 35) throw ParseError("malformed varint for " + what);
    }
    if (value > uint64_t(limit)) throw ParseError(what + " = " + std::to_string(value) + " exceeds the limit");
    return int64_t(value);
  }
};

int64_t popcount_bits(const uint8_t* p, int64_t nbits) {
  int64_t c = 0;
  for (int64_t i = 0; i < nbits / 8; ++i) c += __builtin_popcount(p[i]);
  if (nbits % 8) c += __builtin_popcount(p[nbits / 8] & ((1u << (nbits % 8)) - 1));
  return c;
}

int64_t values_nbytes(int64_t n, int bits, int64_t gs) {
  if (bits == 32) return 4 * n;
  if (bits == 16) return 2 * n;
  return 4 + 2 * ((n + gs - 1) / gs) + (n * bits + 7) / 8;
}

void check_values(const uint8_t* p, int64_t n_kept, int bits, int64_t gs, const std::string& label) {
  if (bits == 32) {
    for (int64_t i = 0; i < n_kept; ++i)
      if (!std::isfinite(load_f32le(p + 4 * i))) throw ParseError("values of " + label + " contain NaN or Inf");
    return;
  }
  if (bits == 16) {
    for (int64_t i = 0; i < n_kept; ++i)
      if ((load_u16le(p + 2 * i) & 0x7c00) == 0x7c00) throw ParseError("values of " + label + " contain NaN or Inf");
    return;
  }
  const float tstep = load_f32le(p);
  // Decoded values are at most 2**(bits-1) * tstep (a hostile code may be one past qmax): keep that finite.
  if (!(tstep >= 0.f && std::isfinite(tstep * float(1 << (bits - 1)))))
    throw ParseError("values of " + label + ": tensor scale is not a finite non-negative number small enough to decode");
  const int64_t g = (n_kept + gs - 1) / gs;
  for (int64_t i = 0; i < g; ++i) {
    const float s = f16_to_f32(load_u16le(p + 4 + 2 * i));
    if (!(s >= 0.f && s <= 1.f)) throw ParseError("values of " + label + ": group scales outside [0, 1] or NaN");
  }
  const int64_t nbytes = (n_kept * bits + 7) / 8, used = (n_kept * bits) % 8;
  if (used && (p[4 + 2 * g + nbytes - 1] >> used))
    throw ParseError("codes of " + label + " have non-zero padding bits");
}

struct Head {
  std::string name;
  int dtype, bits, kind;
  bool is_meta;
  int64_t n_heads;
  std::vector<int64_t> shape;
  int64_t numel;
};

py::tuple parse(const py::buffer& payload, int64_t max_elements) {
  py::buffer_info info = payload.request();
  const uint8_t* buf = static_cast<const uint8_t*>(info.ptr);
  const int64_t n = int64_t(info.size * info.itemsize);
  std::vector<Head> heads;
  std::vector<py::tuple> out_entries;
  int64_t group_size = 0, meta_offset = 0, meta_len = 0, version = 0;
  std::vector<std::array<int64_t, 5>> spans;  // mask_offset, mask_nbits, n_kept, data_offset, data_nbytes
  try {
    py::gil_scoped_release nogil;
    if (n < kHeaderSize + kCrcSize)
      throw ParseError("truncated payload: " + std::to_string(n) + " bytes, a payload has at least 24");
    if (std::memcmp(buf, "FSPK", 4) != 0) throw ParseError("bad magic: not a fedsparse payload");
    version = load_u16le(buf + 4);
    if (version != 1) throw ParseError("unsupported payload version " + std::to_string(version));
    if (crc32(buf, n - kCrcSize) != load_u32le(buf + n - kCrcSize))
      throw ParseError("CRC mismatch: payload corrupted or truncated");
    if (load_u16le(buf + 6) != 0) throw ParseError("unknown header flags");
    group_size = load_u32le(buf + 8);
    const int64_t n_tensors = load_u32le(buf + 12);
    meta_len = load_u32le(buf + 16);
    if (group_size < kMinGroup || group_size > kMaxGroup || (group_size & (group_size - 1)))
      throw ParseError("group_size " + std::to_string(group_size) + " is not a power of two in [16, 65536]");
    if (n_tensors > kMaxTensors) throw ParseError("too many tensors: " + std::to_string(n_tensors));
    if (meta_len > kMaxMetaBytes) throw ParseError("metadata exceeds the limit");
    Reader r{buf, kHeaderSize, n - kCrcSize};
    meta_offset = r.take(meta_len, "metadata");

    std::string prev;
    int64_t total = 0;
    for (int64_t i = 0; i < n_tensors; ++i) {
      const std::string what = "tensor #" + std::to_string(i);
      Head h;
      const int64_t prefix = r.varint(what + " name prefix", int64_t(prev.size()));
      const int64_t suffix = r.varint(what + " name length", kMaxNameBytes - prefix);
      const int64_t at = r.take(suffix, what + " name");
      h.name = prev.substr(0, size_t(prefix)) + std::string(reinterpret_cast<const char*>(buf + at), size_t(suffix));
      if (h.name.empty()) throw ParseError(what + " has an empty name");
      prev = h.name;
      h.dtype = r.u8(what + " dtype");
      h.bits = r.u8(what + " bits");
      const int flags = r.u8(what + " flags");
      if (h.dtype > 3) throw ParseError(what + ": unknown dtype code");
      if (h.bits != 32 && h.bits != 16 && h.bits != 8 && h.bits != 4 && h.bits != 2)
        throw ParseError(what + ": unsupported bit width " + std::to_string(h.bits));
      if (flags & ~0x7) throw ParseError(what + ": unknown flags");
      h.kind = flags & 0x3;
      h.is_meta = flags & 0x4;
      h.n_heads = r.varint(what + " n_heads", kMaxDim);
      const int ndim = r.u8(what + " ndim");
      if (ndim > kMaxNdim) throw ParseError(what + ": too many dimensions");
      h.numel = 1;
      bool zero = false;
      for (int d = 0; d < ndim; ++d) {
        const int64_t dim = r.varint(what + " dim", kMaxDim);
        h.shape.push_back(dim);
        zero |= dim == 0;
        // Cap as we multiply so the product never overflows; a zero dim anywhere makes numel 0.
        if (!zero) h.numel = dim > 0 && h.numel > (max_elements + 1) / dim ? max_elements + 1 : h.numel * dim;
      }
      if (zero) h.numel = 0;
      total += h.numel;
      if (total > max_elements) throw ParseError(what + ": declared shapes exceed the element cap");
      if (h.kind == 1 || h.kind == 2) {
        if (ndim == 0 || h.n_heads == 0)
          throw ParseError(what + ": head sparsity needs a tensor of rank >= 1 and n_heads >= 1");
        const int64_t head_dim = h.kind == 1 ? h.shape.front() : h.shape.back();
        if (head_dim % h.n_heads) throw ParseError(what + ": heads do not divide the shape");
      } else if (h.n_heads != 0) {
        throw ParseError(what + ": n_heads given for a tensor without head sparsity");
      }
      heads.push_back(std::move(h));
    }

    for (const Head& h : heads) {
      const std::string label = "'" + h.name + "'";
      const int64_t nbits = (h.kind == 1 || h.kind == 2) ? h.n_heads : (h.kind == 3 ? h.numel : 0);
      const int64_t mask_offset = r.take((nbits + 7) / 8, "mask of " + label);
      if (nbits % 8 && (buf[mask_offset + nbits / 8] >> (nbits % 8)))
        throw ParseError("mask of " + label + " has non-zero padding bits");
      const int64_t kept = popcount_bits(buf + mask_offset, nbits);
      const int64_t n_kept = h.kind == 0 ? h.numel : (h.kind == 3 ? kept : kept * (h.numel / h.n_heads));
      const int64_t size = values_nbytes(n_kept, h.bits, group_size);
      const int64_t data_offset = r.take(size, "values of " + label);
      check_values(buf + data_offset, n_kept, h.bits, group_size, label);
      spans.push_back({mask_offset, nbits, n_kept, data_offset, size});
    }
    if (r.pos != r.end)
      throw ParseError(std::to_string(r.end - r.pos) + " bytes of trailing garbage after the last tensor");
  } catch (const ParseError& e) {
    throw py::value_error(e.what());
  }
  py::list entries;
  for (size_t i = 0; i < heads.size(); ++i) {
    const Head& h = heads[i];
    py::tuple shape(h.shape.size());
    for (size_t d = 0; d < h.shape.size(); ++d) shape[d] = h.shape[d];
    const auto& s = spans[i];
    entries.append(py::make_tuple(py::bytes(h.name), h.dtype, h.bits, h.kind, h.is_meta, h.n_heads, shape, s[0],
                                  s[1], s[2], s[3], s[4]));
  }
  return py::make_tuple(version, group_size, meta_offset, meta_len, entries);
}

}  // namespace
}  // namespace fedsparse

void init_wire(py::module_& m) {
  m.def("parse_payload", &fedsparse::parse, py::arg("payload"), py::arg("max_elements"),
        "Validate a payload and return (version, group_size, meta_offset, meta_len, entries); raises "
        "ValueError on anything malformed.");
}
