// The one pybind11 module fedsparse._C. Each kernel file registers its functions through an init_*
// function; this file only wires them together. No libtorch: buffers come in as numpy/buffer objects.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_quant(py::module_& m);
void init_wire(py::module_& m);
void init_crc32(py::module_& m);
void init_aggregate(py::module_& m);
void init_finish(py::module_& m);
void init_attention(py::module_& m);
void init_attention_probs(py::module_& m);
void init_attention_fused(py::module_& m);
#ifdef FEDSPARSE_WITH_CUDA
void init_cuda(py::module_& m);
#endif

static py::dict build_info() {
  py::dict d;
#ifdef FEDSPARSE_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#ifdef FEDSPARSE_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  d["avx2"] = bool(__builtin_cpu_supports("avx2"));
#else
  d["avx2"] = false;
#endif
  d["compiler"] = __VERSION__;
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedsparse native kernels (CPU C++, optional CUDA C++)";
  m.def("build_info", &build_info, "Compile-time facts: OpenMP, CUDA, AVX2 at run time, compiler.");
  init_quant(m);
  init_wire(m);
  init_crc32(m);
  init_aggregate(m);
  init_finish(m);
  init_attention(m);
  init_attention_probs(m);
  init_attention_fused(m);
#ifdef FEDSPARSE_WITH_CUDA
  init_cuda(m);
#endif
}
