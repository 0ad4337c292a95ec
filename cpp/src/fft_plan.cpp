#include "mltomo/fft_plan.hpp"

#include <mutex>
#include <stdexcept>
#include <string>

#ifndef MLTOMO_FFTW_SOURCE
#define MLTOMO_FFTW_SOURCE "unknown"
#endif

namespace mltomo {
namespace {
std::mutex& planner_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

FftPlan3D::FftPlan3D(int n) : n_(n) {
  if (n < 2) throw std::invalid_argument("FFT size must be at least 2, got " + std::to_string(n));
  real_size_ = static_cast<std::size_t>(n) * n * n;
  half_size_ = static_cast<std::size_t>(n) * n * (n / 2 + 1);
  auto re = aligned_array<float>(real_size_);
  auto cx = aligned_array<cfloat>(half_size_);
  auto* fcx = reinterpret_cast<fftwf_complex*>(cx.get());
  std::lock_guard<std::mutex> lock(planner_mutex());
  // FFTW_MEASURE would overwrite the arrays; they are scratch here.
  c2r_ = fftwf_plan_dft_c2r_3d(n, n, n, fcx, re.get(), FFTW_MEASURE);
  r2c_ = fftwf_plan_dft_r2c_3d(n, n, n, re.get(), fcx, FFTW_MEASURE);
  if (!c2r_ || !r2c_) throw std::runtime_error("FFTW could not plan a transform of size " + std::to_string(n));
}

FftPlan3D::~FftPlan3D() {
  std::lock_guard<std::mutex> lock(planner_mutex());
  if (c2r_) fftwf_destroy_plan(c2r_);
  if (r2c_) fftwf_destroy_plan(r2c_);
}

void FftPlan3D::c2r(cfloat* in, float* out) const {
  fftwf_execute_dft_c2r(c2r_, reinterpret_cast<fftwf_complex*>(in), out);
}

void FftPlan3D::r2c(float* in, cfloat* out) const {
  fftwf_execute_dft_r2c(r2c_, in, reinterpret_cast<fftwf_complex*>(out));
}

const char* fftw_version_string() {
  static const std::string s = std::string(MLTOMO_FFTW_SOURCE) + " " + fftwf_version;
  return s.c_str();
}

}  // namespace mltomo
