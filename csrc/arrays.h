// Checked access to the numpy arrays the attention kernels read and write in place. Arrays are never
// converted: a converted copy of an output would swallow the results, so a wrong dtype is an error.
#pragma once
#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace fedsparse {

// The data of x, a C-contiguous numpy array of T with n elements (writable if asked). A pointer into the
// caller's array, valid while the call holds it.
template <class T>
T* array_data(const pybind11::handle& x, int64_t n, const char* what, bool writable) {
  namespace py = pybind11;
  const std::string name(what);
  FS_CHECK(py::isinstance<py::array_t<T>>(x), name + " must be an array of the kernel's dtype");
  const auto a = py::reinterpret_borrow<py::array_t<T>>(x);
  FS_CHECK(a.size() == n && (a.flags() & py::array::c_style),
           name + " must be C-contiguous with " + std::to_string(n) + " elements");
  FS_CHECK(!writable || a.writeable(), name + " must be writable");
  return const_cast<T*>(a.data());
}

// array_data, or nullptr where x is None.
template <class T>
T* optional_array_data(const pybind11::handle& x, int64_t n, const char* what, bool writable) {
  return x.is_none() ? nullptr : array_data<T>(x, n, what, writable);
}

}  // namespace fedsparse
