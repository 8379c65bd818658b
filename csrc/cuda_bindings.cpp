// Python bindings of the CUDA C++ pack/unpack kernels (csrc/cuda/pack.cu) as fedsparse._C.cuda.
//
// Built only when CMake found a CUDA toolkit (FEDSPARSE_WITH_CUDA); compiled by the host compiler, it
// sees only the plain C++ launchers of cuda/pack.h. Device pointers and the stream come in as integers
// (torch: tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), so no libtorch is needed.
// These are raw entry points that cannot check buffer sizes: python/fedsparse/_cuda.py is the checked
// torch API. A rejected argument raises ValueError; a CUDA error raises RuntimeError naming the step.
#ifdef FEDSPARSE_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/pack.h"

namespace py = pybind11;

namespace {

namespace fc = fedsparse::cuda;

template <class T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void raise_if_failed(const fc::Status& s) {
  if (s.ok()) return;
  const std::string where = std::string("fedsparse CUDA ") + s.op + ": " + s.what;
  if (s.cuda_error == 0) throw std::invalid_argument(where);
  throw std::runtime_error(where + " failed: " + fc::error_name(s.cuda_error) + " (" + std::to_string(s.cuda_error) +
                           "): " + fc::error_string(s.cuda_error));
}

}  // namespace

void init_cuda(py::module_& m) {
  py::module_ c = m.def_submodule(
      "cuda",
      "CUDA C++ pack/unpack kernels on raw device pointers (ints) and a cudaStream_t (int, 0 = default "
      "stream), enqueued on the current device without synchronizing. Use fedsparse._cuda for torch "
      "tensors: these functions cannot check buffer sizes.");

  c.def("device_count", &fc::device_count, "Number of CUDA devices; 0 when there is no driver or device.");
  c.def("num_groups", &fc::num_groups, py::arg("n"), py::arg("group_size"));
  c.def("code_bytes", &fc::code_bytes, py::arg("n"), py::arg("bits"));
  c.def("quantize_workspace_bytes", &fc::quantize_workspace_bytes, py::arg("n"), py::arg("group_size"),
        "Bytes of the scratch buffer quantize() needs (16-byte aligned).");
  c.attr("WORKSPACE_STATUS_OFFSET") = fc::kWorkspaceStatus;

  c.def(
      "mask_to_bitmap",
      [](std::uintptr_t mask, int64_t n, std::uintptr_t bitmap, std::uintptr_t count, std::uintptr_t stream) {
        fc::Status s;
        {
          py::gil_scoped_release nogil;
          s = fc::mask_to_bitmap(as_ptr<const uint8_t>(mask), n, as_ptr<uint8_t>(bitmap), as_ptr<int64_t>(count),
                                 as_ptr<void>(stream));
        }
        raise_if_failed(s);
      },
      py::arg("mask"), py::arg("n"), py::arg("bitmap"), py::arg("count"), py::arg("stream") = 0,
      "mask: n bytes (nonzero = kept) -> bitmap: ceil(n/8) bytes, little-endian, padding bits zero; "
      "count: one int64 (8-byte aligned), the number kept.");

  c.def(
      "quantize",
      [](std::uintptr_t x, int64_t n, int bits, int64_t group_size, bool stochastic, uint32_t seed, bool nan_to_zero,
         std::uintptr_t tstep, std::uintptr_t scales, std::uintptr_t codes, std::uintptr_t workspace,
         std::uintptr_t stream) {
        fc::Status s;
        {
          py::gil_scoped_release nogil;
          s = fc::quantize(as_ptr<const float>(x), n, bits, group_size, stochastic, seed, nan_to_zero,
                           as_ptr<uint8_t>(tstep), as_ptr<uint8_t>(scales), as_ptr<uint8_t>(codes),
                           as_ptr<void>(workspace), as_ptr<void>(stream));
        }
        raise_if_failed(s);
      },
      py::arg("x"), py::arg("n"), py::arg("bits"), py::arg("group_size"), py::arg("stochastic"), py::arg("seed"),
      py::arg("nan_to_zero"), py::arg("tstep"), py::arg("scales"), py::arg("codes"), py::arg("workspace"),
      py::arg("stream") = 0,
      "float32 x[n] -> tstep (4 bytes), float16 scales (2*G bytes), codes (ceil(n*bits/8) bytes), as "
      "fedsparse.quant.quantize; no alignment needed for those three. workspace: quantize_workspace_bytes "
      "bytes, 16-byte aligned; its int32 at WORKSPACE_STATUS_OFFSET is nonzero afterwards if NaN/Inf was met.");

  c.def(
      "dequantize",
      [](std::uintptr_t tstep, std::uintptr_t scales, std::uintptr_t codes, int64_t n, int bits, int64_t group_size,
         std::uintptr_t out, std::uintptr_t stream) {
        fc::Status s;
        {
          py::gil_scoped_release nogil;
          s = fc::dequantize(as_ptr<const uint8_t>(tstep), as_ptr<const uint8_t>(scales), as_ptr<const uint8_t>(codes),
                             n, bits, group_size, as_ptr<float>(out), as_ptr<void>(stream));
        }
        raise_if_failed(s);
      },
      py::arg("tstep"), py::arg("scales"), py::arg("codes"), py::arg("n"), py::arg("bits"), py::arg("group_size"),
      py::arg("out"), py::arg("stream") = 0, "Inverse of quantize: writes float32 out[n].");
}

#endif  // FEDSPARSE_WITH_CUDA
