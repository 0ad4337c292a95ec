// The back-shift of the E-step's weighted sums: for one (particle, class, rotation) with
// translation posterior P_t,
//
//     y_j += phi_j (w X)_j,    phi_j = sum_t P_t exp(+2 pi i k_j . t / n),
//
// on the accumulated working set, which undoes the shifts before the sum is rotated back into
// the reference. The shifts lie on a small integer box, so the phase factorises per axis,
// exp(+2 pi i kx sx/n) exp(+2 pi i ky sy/n) exp(+2 pi i kz sz/n), and phi is a separable sum:
//
//     B_sz(ky, kx) = sum_{t with z-shift sz} P_t ey(sy, ky) ex(sx, kx)     (one plane per sz)
//     phi(kx, ky, kz) = sum_sz ez(sz, kz) B_sz(ky, kx)
//
// The first costs (kept shifts) x n x (n/2 + 1) products, the second (distinct sz) products
// per component: a few per component for the narrow posteriors the E-step keeps, where a
// product per component and kept shift read from a (T, J) phase table was memory-bound. A map
// with many kept shifts is cheaper through one FFT of the posterior (add_spectrum).
//
// Layout: the components in runs along x (one per (z, y) row, kx = 0 .. len-1) cut into chunks
// of 8 (kx0 = 0, 8, ...); a complex array is 8 real parts then 8 imaginary parts per chunk,
// zero in the lanes past a run's end.
#pragma once
#include <complex>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mltomo/fft_plan.hpp"
#include "mltomo/fourier_grid.hpp"
#include "mltomo/shift_scores.hpp"  // MLTOMO_SIMD_CLONES

namespace mltomo {

class BackShifter {
 public:
  static constexpr int kLanes = 8;
  static constexpr int kVec = 2 * kLanes;  // values of one chunk: re x 8, im x 8

  // ws: the accumulated working set; shifts: (T, 3) integer (x, y, z), |s| < n/2.
  BackShifter(const WorkingSet& ws, const std::int32_t* shifts, int T);

  std::size_t layout_size() const { return chunks_.size() * kVec; }  // values of one layout array
  std::size_t scratch_size() const { return scratch_size_; }         // floats of per-thread scratch

  // out (layout_size floats) = v (J values in working-set order) in layout order.
  void to_layout(const cfloat* v, float* out) const;
  // out[j] = y (layout_size doubles) in working-set order.
  void from_layout(const double* y, std::complex<double>* out) const;

  // y (layout, double) += phi * wx (layout, float) with phi from the shifts kept[0..nkept)
  // and their posteriors p[0..nkept) (phi and the product in float, the sum in double).
  void add_shifted(const std::int32_t* kept, const double* p, int nkept, const float* wx, double* y,
                   float* scratch) const;
  // The same with phi_j = conj(F[index_j]), F a half spectrum of the n^3 box (the r2c of the
  // posterior map placed at the shifts).
  void add_spectrum(const cfloat* F, const float* wx, double* y) const;

  // Whether add_shifted is cheaper than an r2c of the box plus add_spectrum for nkept shifts.
  bool separable_is_cheaper(int nkept) const { return nkept <= max_separable_; }

 private:
  struct Chunk {
    std::int32_t j0, len, kx0, y, z;  // first component, lanes used, first kx, row (FFT-order indices)
  };
  int n_ = 0, T_ = 0;
  int mx_ = 0, my_ = 0, mz_ = 0;  // half-ranges of the shift box
  int xp_ = 0;                    // kx columns held per row: the chunks' kx0 + 8, at most
  // add_shifted's two passes (cloned for AVX2 + FMA; called from this file only)
  MLTOMO_SIMD_CLONES void build_planes(const std::int32_t* kept, const double* p, int nkept, float* scratch) const;
  MLTOMO_SIMD_CLONES void apply_planes(const std::int32_t* used, int nused, const float* wx, double* y,
                                       const float* scratch) const;
  std::vector<Chunk> chunks_;
  std::vector<std::int64_t> index_;  // (J) half-spectrum index of component j
  std::vector<std::int32_t> rows_y_;  // the y rows any chunk uses
  std::vector<std::int32_t> sx_, sy_, sz_;  // (T) shift components
  std::vector<float> exr_, exi_;  // (2 mx + 1, xp) exp(+2 pi i kx sx / n)
  std::vector<float> eyr_, eyi_;  // (2 my + 1, n) exp(+2 pi i y sy / n), y the FFT-order index
  std::vector<float> ezr_, ezi_;  // (2 mz + 1, n)
  std::size_t scratch_size_ = 0;
  int max_separable_ = 0;
};

}  // namespace mltomo
