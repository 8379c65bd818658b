// Native parser of the fedsparse wire format (version 1); python/fedsparse/wire.py is its reference and
// docs/wire-format.md the spec. The bytes are hostile: every read goes through Reader, which checks the
// bound first; sizes are computed in int64 with explicit caps so nothing overflows; a malformed payload
// raises ValueError (turned into fedsparse.PayloadError by the caller) and nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "common.h"
#include "crc32.h"
#include "parallel.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

constexpr int64_t kHeaderSize = 20, kCrcSize = 4;
constexpr int64_t kMaxTensors = 1 << 16, kMaxNameBytes = 1024, kMaxNdim = 8, kMaxDim = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxMetaBytes = 1 << 20, kMinGroup = 16, kMaxGroup = 1 << 16;

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Every read names its field for the error message, which is built only when a check fails (a well-formed
// payload costs no string work): "<field>" alone, "tensor #<i><field>" while reading tensor i's header,
// "<field>'<name>'" for its mask and values.
struct Reader {
  const uint8_t* buf;
  int64_t pos, end;
  int64_t tensor = -1;                // header of tensor #tensor being read, or -1
  std::string_view name;  // the tensor whose mask / values are being read, or empty

  std::string where(const char* field) const {
    if (!name.empty()) return field + ("'" + std::string(name) + "'");
    if (tensor >= 0) return "tensor #" + std::to_string(tensor) + field;
    return field;
  }
  int64_t take(int64_t n, const char* field) {
    if (n < 0 || n > end - pos)
      throw ParseError("truncated payload: " + where(field) + " needs " + std::to_string(n) + " bytes at offset " +
                       std::to_string(pos) + ", " + std::to_string(end - pos) + " left");
    const int64_t start = pos;
    pos += n;
    return start;
  }
  uint8_t u8(const char* field) { return buf[take(1, field)]; }
  int64_t varint(const char* field, int64_t limit) {
    uint64_t value = 0;
    int shift = 0;
    while (true) {
      const uint8_t b = u8(field);
      value |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) break;
      shift += 7;
      if (shift > 35) throw ParseError("malformed varint for " + where(field));
    }
    if (value > uint64_t(limit)) throw ParseError(where(field) + " = " + std::to_string(value) + " exceeds the limit");
    return int64_t(value);
  }
};

int64_t popcount_bits(const uint8_t* p, int64_t nbits) {
  int64_t c = 0;
  for (int64_t i = 0; i < nbits / 8; ++i) c += __builtin_popcount(p[i]);
  if (nbits % 8) c += __builtin_popcount(p[nbits / 8] & ((1u << (nbits % 8)) - 1));
  return c;
}

// Group scales are float16 in [0, 1] (or -0): checked on the bits, so the loop vectorizes.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
bool scales_ok(const uint8_t* p, int64_t g) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < g; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);  // little-endian host (checked in quant.cpp)
    bad |= uint32_t(h > 0x3c00) & uint32_t(h != 0x8000);
  }
  return !bad;
}

void check_values(const uint8_t* p, int64_t n_kept, int bits, int64_t gs, std::string_view name) {
  const auto label = [&] { return "'" + std::string(name) + "'"; };
  if (bits == 32) {
    for (int64_t i = 0; i < n_kept; ++i)
      if (!std::isfinite(load_f32le(p + 4 * i))) throw ParseError("values of " + label() + " contain NaN or Inf");
    return;
  }
  if (bits == 16) {
    for (int64_t i = 0; i < n_kept; ++i)
      if ((load_u16le(p + 2 * i) & 0x7c00) == 0x7c00) throw ParseError("values of " + label() + " contain NaN or Inf");
    return;
  }
  const float tstep = load_f32le(p);
  // Decoded values are at most 2**(bits-1) * tstep (a hostile code may be one past qmax): keep that finite.
  if (!(tstep >= 0.f && std::isfinite(tstep * float(1 << (bits - 1)))))
    throw ParseError("values of " + label() + ": tensor scale is not a finite non-negative number small enough to decode");
  const int64_t g = (n_kept + gs - 1) / gs;
  if (!scales_ok(p + 4, g)) throw ParseError("values of " + label() + ": group scales outside [0, 1] or NaN");
  const int64_t nbytes = (n_kept * bits + 7) / 8, used = (n_kept * bits) % 8;
  if (used && (p[4 + 2 * g + nbytes - 1] >> used))
    throw ParseError("codes of " + label() + " have non-zero padding bits");
}

struct Head {
  size_t name_at, name_len;  // in Parsed::names
  int dtype, bits, kind;
  bool is_meta;
  int64_t n_heads;
  int ndim = 0;
  std::array<int64_t, kMaxNdim> shape;  // in place: no allocation per tensor
  int64_t numel;
};

struct Parsed {
  int64_t version = 0, group_size = 0, meta_offset = 0, meta_len = 0, table_end = 0;
  std::string names;  // every tensor's name, one after the other (one allocation, not one per name)
  std::vector<Head> heads;
  std::vector<std::array<int64_t, 5>> spans;  // mask_offset, mask_nbits, n_kept, data_offset, data_nbytes

  std::string_view name(const Head& h) const { return std::string_view(names).substr(h.name_at, h.name_len); }
};

py::tuple entry_tuple(const Parsed& p, const Head& h, const std::array<int64_t, 5>& s) {
  py::tuple shape(h.ndim);
  for (int d = 0; d < h.ndim; ++d) shape[d] = h.shape[size_t(d)];
  const std::string_view name = p.name(h);
  return py::make_tuple(py::bytes(name.data(), name.size()), h.dtype, h.bits, h.kind, h.is_meta, h.n_heads, shape,
                        s[0], s[1], s[2], s[3], s[4]);
}

// The parser proper: no Python, so it runs without the GIL and in parallel. verify=false skips the value
// checks (for re-reading the table of a payload already verified), crc=false the CRC (verify=false implies it:
// the server's aggregate checks it inside its accumulate pass instead); bounds are always checked.
void parse_into(const uint8_t* buf, int64_t n, int64_t max_elements, bool verify, Parsed& out, bool crc = true) {
  if (n < kHeaderSize + kCrcSize)
    throw ParseError("truncated payload: " + std::to_string(n) + " bytes, a payload has at least 24");
  if (std::memcmp(buf, "FSPK", 4) != 0) throw ParseError("bad magic: not a fedsparse payload");
  out.version = load_u16le(buf + 4);
  if (out.version != 1) throw ParseError("unsupported payload version " + std::to_string(out.version));
  if (verify && crc && crc32(buf, n - kCrcSize) != load_u32le(buf + n - kCrcSize))
    throw ParseError("CRC mismatch: payload corrupted or truncated");
  if (load_u16le(buf + 6) != 0) throw ParseError("unknown header flags");
  out.group_size = load_u32le(buf + 8);
  const int64_t n_tensors = load_u32le(buf + 12);
  out.meta_len = load_u32le(buf + 16);
  if (out.group_size < kMinGroup || out.group_size > kMaxGroup || (out.group_size & (out.group_size - 1)))
    throw ParseError("group_size " + std::to_string(out.group_size) + " is not a power of two in [16, 65536]");
  if (n_tensors > kMaxTensors) throw ParseError("too many tensors: " + std::to_string(n_tensors));
  if (out.meta_len > kMaxMetaBytes) throw ParseError("metadata exceeds the limit");
  Reader r{buf, kHeaderSize, n - kCrcSize};
  out.meta_offset = r.take(out.meta_len, "metadata");

  size_t prev_at = 0, prev_len = 0;  // the previous name, in out.names
  int64_t total = 0;
  out.heads.reserve(size_t(std::min(n_tensors, (n - r.pos) / 6)));  // a table entry takes >= 6 bytes
  out.spans.reserve(out.heads.capacity());
  out.names.reserve(out.heads.capacity() * 48);
  for (int64_t i = 0; i < n_tensors; ++i) {
    r.tensor = i;
    const auto what = [i] { return "tensor #" + std::to_string(i); };
    Head h;
    const int64_t prefix = r.varint(" name prefix", int64_t(prev_len));
    const int64_t suffix = r.varint(" name length", kMaxNameBytes - prefix);
    const int64_t at = r.take(suffix, " name");
    h.name_at = out.names.size();
    h.name_len = size_t(prefix + suffix);
    if (h.name_len == 0) throw ParseError(what() + " has an empty name");
    out.names.resize(h.name_at + h.name_len);  // the previous name's prefix, then the new suffix
    std::memmove(&out.names[h.name_at], out.names.data() + prev_at, size_t(prefix));
    std::memcpy(&out.names[h.name_at + size_t(prefix)], buf + at, size_t(suffix));
    prev_at = h.name_at;
    prev_len = h.name_len;
    h.dtype = r.u8(" dtype");
    h.bits = r.u8(" bits");
    const int flags = r.u8(" flags");
    if (h.dtype > 3) throw ParseError(what() + ": unknown dtype code");
    if (h.bits != 32 && h.bits != 16 && h.bits != 8 && h.bits != 4 && h.bits != 2)
      throw ParseError(what() + ": unsupported bit width " + std::to_string(h.bits));
    if (flags & ~0x7) throw ParseError(what() + ": unknown flags");
    h.kind = flags & 0x3;
    h.is_meta = flags & 0x4;
    h.n_heads = r.varint(" n_heads", kMaxDim);
    const int ndim = h.ndim = r.u8(" ndim");
    if (ndim > kMaxNdim) throw ParseError(what() + ": too many dimensions");
    h.numel = 1;
    bool zero = false;
    for (int d = 0; d < ndim; ++d) {
      const int64_t dim = r.varint(" dim", kMaxDim);
      h.shape[size_t(d)] = dim;
      zero |= dim == 0;
      // Cap as we multiply so the product never overflows; a zero dim anywhere makes numel 0.
      if (!zero) h.numel = dim > 0 && h.numel > (max_elements + 1) / dim ? max_elements + 1 : h.numel * dim;
    }
    if (zero) h.numel = 0;
    total += h.numel;
    if (total > max_elements) throw ParseError(what() + ": declared shapes exceed the element cap");
    if (h.kind == 1 || h.kind == 2) {
      if (ndim == 0 || h.n_heads == 0)
        throw ParseError(what() + ": head sparsity needs a tensor of rank >= 1 and n_heads >= 1");
      const int64_t head_dim = h.kind == 1 ? h.shape[0] : h.shape[size_t(ndim - 1)];
      if (head_dim % h.n_heads) throw ParseError(what() + ": heads do not divide the shape");
    } else if (h.n_heads != 0) {
      throw ParseError(what() + ": n_heads given for a tensor without head sparsity");
    }
    out.heads.push_back(std::move(h));
  }

  out.table_end = r.pos;
  // Where each tensor's mask and values lie: a chain (each mask's count gives the next one's offset). The value
  // checks come after it, with every tensor's scales asked for at once; a structural error still comes after
  // the value errors of the tensors before it, as in one pass.
  const auto check_values_of = [&](size_t n) {
    for (size_t i = 0; verify && i < n; ++i) {
      const auto& s = out.spans[i];
      const int64_t scales = out.heads[i].bits <= 8 ? 4 + 2 * ((s[2] + out.group_size - 1) / out.group_size) : 0;
      for (int64_t at = 0; at < scales; at += 64) __builtin_prefetch(buf + s[3] + at);
      if (s[4]) __builtin_prefetch(buf + s[3] + s[4] - 1);  // the padding byte
    }
    for (size_t i = 0; verify && i < n; ++i)
      check_values(buf + out.spans[i][3], out.spans[i][2], out.heads[i].bits, out.group_size, out.name(out.heads[i]));
  };
  try {
    for (const Head& h : out.heads) {
      r.name = out.name(h);
      const int64_t nbits = (h.kind == 1 || h.kind == 2) ? h.n_heads : (h.kind == 3 ? h.numel : 0);
      const int64_t mask_offset = r.take((nbits + 7) / 8, "mask of ");
      if (nbits % 8 && (buf[mask_offset + nbits / 8] >> (nbits % 8)))
        throw ParseError("mask of '" + std::string(out.name(h)) + "' has non-zero padding bits");
      const int64_t kept = popcount_bits(buf + mask_offset, nbits);
      const int64_t n_kept = h.kind == 0 ? h.numel : (h.kind == 3 ? kept : kept * (h.numel / h.n_heads));
      const int64_t size = values_nbytes(n_kept, h.bits, out.group_size);
      const int64_t data_offset = r.take(size, "values of ");
      out.spans.push_back({mask_offset, nbits, n_kept, data_offset, size});
    }
    if (r.pos != r.end)
      throw ParseError(std::to_string(r.end - r.pos) + " bytes of trailing garbage after the last tensor");
  } catch (const ParseError&) {
    check_values_of(out.spans.size());
    throw;
  }
  check_values_of(out.spans.size());
}

// compact=false: (version, group_size, meta_offset, meta_len, entries) with a tuple per entry. compact=true:
// (version, group_size, meta_offset, meta_len, table_end, spans int64 [n, 5] of (mask_offset, n_kept, bits,
// data_offset, data_nbytes), [(index, entry tuple) of the metadata entries only]): a server that has seen the
// same table before needs nothing more.
py::tuple to_python(const Parsed& p, bool compact) {
  py::list entries;
  if (!compact) {
    for (size_t i = 0; i < p.heads.size(); ++i) entries.append(entry_tuple(p, p.heads[i], p.spans[i]));
    return py::make_tuple(p.version, p.group_size, p.meta_offset, p.meta_len, entries);
  }
  py::array_t<int64_t> table({py::ssize_t(p.heads.size()), py::ssize_t(5)});
  int64_t* t = table.mutable_data();
  for (size_t i = 0; i < p.heads.size(); ++i) {
    const auto& s = p.spans[i];
    t[5 * i + 0] = s[0];
    t[5 * i + 1] = s[2];
    t[5 * i + 2] = p.heads[i].bits;
    t[5 * i + 3] = s[3];
    t[5 * i + 4] = s[4];
    if (p.heads[i].is_meta) entries.append(py::make_tuple(i, entry_tuple(p, p.heads[i], s)));
  }
  return py::make_tuple(p.version, p.group_size, p.meta_offset, p.meta_len, p.table_end, table, entries);
}

py::tuple parse(const py::buffer& payload, int64_t max_elements, bool verify, bool compact) {
  py::buffer_info info = payload.request();
  Parsed p;
  try {
    py::gil_scoped_release nogil;
    parse_into(static_cast<const uint8_t*>(info.ptr), int64_t(info.size * info.itemsize), max_elements, verify, p);
  } catch (const ParseError& e) {
    throw py::value_error(e.what());
  }
  return to_python(p, compact);
}

// Several payloads verified in parallel (the CRC is most of the work), each returned as parse(compact=True)
// does, or as the error message (str) of that payload: the caller decides which error to raise first.
py::list parse_many(const py::sequence& payloads, int64_t max_elements, bool crc) {
  const size_t n = py::len(payloads);
  std::vector<py::buffer_info> views;
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) views.push_back(py::buffer(payloads[i]).request());
  std::vector<Parsed> parsed(n);
  std::vector<std::string> errors(n);
  {
    py::gil_scoped_release nogil;
    int64_t total = 0;
    for (const auto& v : views) total += int64_t(v.size * v.itemsize);
    parallel_units(int64_t(n), total > (int64_t(1) << 20) ? max_threads() : 1, [&](int64_t i, int) {
      try {
        const auto& v = views[size_t(i)];
        parse_into(static_cast<const uint8_t*>(v.ptr), int64_t(v.size * v.itemsize), max_elements, true,
                   parsed[size_t(i)], crc);
      } catch (const std::exception& e) {  // ParseError, or bad_alloc on a hostile table
        errors[size_t(i)] = e.what();
        if (errors[size_t(i)].empty()) errors[size_t(i)] = "malformed payload";
      }
    });
  }
  py::list out;
  for (size_t i = 0; i < n; ++i) {
    if (errors[i].empty()) out.append(to_python(parsed[i], true));
    else out.append(py::str(errors[i]));
  }
  return out;
}

// A new bytes object of n bytes (n >= 2) and a writable uint8 array over its storage whose base is it: pack
// writes the payload in place and returns the bytes, with no final copy (8.6 MB, and its page faults, for a
// 64 MiB update at 8 bits). Sound because the object is fresh and private until pack returns it: nothing has
// seen or hashed it (CPython shares only the 0- and 1-byte objects, hence n >= 2).
py::array_t<uint8_t> payload_buffer(py::ssize_t n) {
  FS_CHECK(n >= 2, "payload_buffer needs n >= 2");
  PyObject* raw = PyBytes_FromStringAndSize(nullptr, n);
  if (raw == nullptr) throw py::error_already_set();
  py::bytes owner = py::reinterpret_steal<py::bytes>(raw);
  return py::array_t<uint8_t>({n}, {py::ssize_t(1)}, reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(raw)), owner);
}

}  // namespace
}  // namespace fedsparse

void init_wire(py::module_& m) {
  m.def("payload_buffer", &fedsparse::payload_buffer, py::arg("n"),
        "A writable uint8 array [n] over a new bytes object (its .base), for writing a payload in place.");
  m.def("parse_payload", &fedsparse::parse, py::arg("payload"), py::arg("max_elements"), py::arg("verify") = true,
        py::arg("compact") = false,
        "Validate a payload and return (version, group_size, meta_offset, meta_len, entries); raises "
        "ValueError on anything malformed. compact=True: (version, group_size, meta_offset, meta_len, table_end, "
        "spans int64 [n, 5] = (mask_offset, n_kept, bits, data_offset, data_nbytes), [(index, entry) of the "
        "metadata entries]). verify=False: skip the CRC and value checks (bounds are still checked).");
  m.def("parse_payloads", &fedsparse::parse_many, py::arg("payloads"), py::arg("max_elements"), py::arg("crc") = true,
        "parse_payload(p, max_elements, compact=True) of each payload, verified in parallel; a payload that fails "
        "gives its error message (str) in its place. crc=False: every check but the CRC (the caller checks it; "
        "accumulate(check_crc=True) does).");
}
