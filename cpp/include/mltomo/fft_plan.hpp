// RAII single-precision FFTW plans for cubic real volumes.
//
// FFTW's planner is not thread-safe: plans are created (and destroyed) under one static
// mutex, outside parallel regions. A plan is executed with FFTW's new-array API on
// per-thread scratch obtained from fftwf_malloc, so one plan serves every thread.
// Note that a multi-dimensional c2r transform destroys its complex input.
#pragma once
#include <fftw3.h>

#include <complex>
#include <cstddef>
#include <memory>

namespace mltomo {

using cfloat = std::complex<float>;

struct FftwFree {
  void operator()(void* p) const noexcept { fftwf_free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], FftwFree>;

// SIMD-aligned, uninitialised buffer of `count` elements.
template <class T>
AlignedArray<T> aligned_array(std::size_t count) {
  void* p = fftwf_malloc(sizeof(T) * (count ? count : 1));
  if (!p) throw std::bad_alloc();
  return AlignedArray<T>(static_cast<T*>(p));
}

// Unnormalised 3D transforms of an n^3 real volume and its n*n*(n/2+1) half spectrum.
// c2r computes out[m] = sum over the full spectrum of in[k] exp(+2 pi i k.m / n);
// r2c computes out[k] = sum_m in[m] exp(-2 pi i k.m / n).
class FftPlan3D {
 public:
  explicit FftPlan3D(int n);
  ~FftPlan3D();
  FftPlan3D(const FftPlan3D&) = delete;
  FftPlan3D& operator=(const FftPlan3D&) = delete;

  int n() const { return n_; }
  std::size_t real_size() const { return real_size_; }
  std::size_t half_size() const { return half_size_; }

  // Both arrays must come from aligned_array (or share its alignment). `in` is destroyed.
  void c2r(cfloat* in, float* out) const;
  void r2c(float* in, cfloat* out) const;

 private:
  int n_;
  std::size_t real_size_, half_size_;
  fftwf_plan c2r_ = nullptr;
  fftwf_plan r2c_ = nullptr;
};

// "system <version>" or "pylib-fftw3f <version>".
const char* fftw_version_string();

}  // namespace mltomo
