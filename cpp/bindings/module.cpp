#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <omp.h>

#include "mltomo/fft_plan.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "mltomo C++ kernels (OpenMP + FFTW).";
  m.def("fftw_version", &mltomo::fftw_version_string, "Which FFTW the extension was linked against.");
  m.def("max_threads", &omp_get_max_threads, "OpenMP's default thread count.");
}
