// Correlations at a few integer shifts without a full inverse FFT: a pruned, separable inverse
// transform (the E-step's "pruned" scoring kernel).
//
// For one (particle, class, rotation) the E-step needs, at the T searched shifts t = (x, y, z),
//
//   c(t) = Re sum_{full spectrum} Z(k) e^{+2 pi i k.t/n} = sum_{j in working set} h_j Re(Z_j e^{+2 pi i k_j.t/n}),
//
// with Z = w X conj(R A) on the half spectrum and h_j the half-spectrum multiplicity (1 on the
// kx = 0 plane, 2 elsewhere): exactly what one c2r of the working box holds at the index of t.
// It is evaluated on the box [-mx, mx] x [-my, my] x [-mz, mz] of integer shifts that holds
// every searched one (m = the largest |component| per axis), one axis at a time:
//
//   Y(z; kx, ky) = sum_kz Z(kx, ky, kz) e^{i 2 pi kz z / n}          z in [-mz, mz]
//   V(z, y; kx)  = sum_ky Y(z; kx, ky)  e^{i 2 pi ky y / n}          y in [-my, my]
//   c(x, y, z)   = sum_kx h(kx) Re(V(z, y; kx) e^{i 2 pi kx x / n})   x in [-mx, mx]
//
// and both contractions over a symmetric frequency range pair +k with -k,
//
//   sum_k f(k) e^{i k s} = f(0) + sum_{k>0} [cos(ks) (f(k) + f(-k)) + i sin(ks) (f(k) - f(-k))],
//
// so +s and -s come from one cosine sum and one sine sum with real coefficients: about
// (2m+1) real multiply-adds per component and axis instead of 4 (2m+1).
//
// Layout ("kernel order"): SIMD lanes run over 8 consecutive kx, (re x 8, im x 8) per vector.
// A stage-1 block is one ky and 8 kx; it stores kz = 0, then kz = +1, -1, +2, -2, ... up to
// the block's largest |kz|; components absent from the working set are zero. The stage-2
// blocks are the same 8 kx, with levels |ky|. Any working set works; a ball is the cheap case.
#pragma once
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdlib>  // defines __GLIBC__ on glibc
#include <vector>

#include "mltomo/fft_plan.hpp"

// The stages are compiled twice, for AVX2 + FMA and for the baseline, and picked at load time
// (GCC function multiversioning; glibc's ifunc). Elsewhere they are compiled once.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(MLTOMO_NO_CLONES)
#define MLTOMO_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MLTOMO_SIMD_CLONES
#endif

namespace mltomo {

// Which kernel scores the shifts of one (particle, class, rotation): a full c2r of the working
// box, the pruned transform, or whichever the cost model expects to be cheaper.
enum class ShiftKernel : int { Auto = 0, Fft = 1, Pruned = 2 };

// A working set as the kernel needs it: integer frequencies and half-spectrum multiplicities.
struct FrequencyList {
  int n = 0;  // box size (any n >= 2, odd included)
  const int *kx = nullptr, *ky = nullptr, *kz = nullptr;
  const float* hweight = nullptr;
  std::size_t J = 0;
};

class ShiftScorer {
 public:
  static constexpr int kLanes = 8;           // kx per SIMD vector
  static constexpr int kVec = 2 * kLanes;    // floats per complex vector (re x 8, im x 8)

  // shifts: (T, 3) integer (x, y, z). std::invalid_argument on an empty or inconsistent input.
  ShiftScorer(const FrequencyList& f, const std::int32_t* shifts, int T);

  int T() const { return T_; }
  std::size_t layout_size() const { return layout_size_; }    // floats of a kernel-order array
  std::size_t scratch_size() const { return scratch_size_; }  // floats of per-thread scratch

  // out (layout_size floats) = v (J values in working-set order) in kernel order, zeros elsewhere.
  void to_layout(const cfloat* v, float* out) const;

  // cross[t] = sum_j h_j Re(wx_j conj(ref_j) e^{+2 pi i k_j.t/n}) for the T shifts, with wx and
  // ref in kernel order and `scratch` of scratch_size floats (both 32-byte aligned or not).
  void score(const float* wx, const float* ref, float* scratch, float* cross) const;

  // Estimated relative cost per (i, k, r): multiply-adds of this kernel, and a c2r of n^3 in
  // the same units (calibrated on the bench, bench/bench_kernel.py).
  double cost() const { return cost_; }
  static double fft_cost(int n);
  // Whether the AVX2 + FMA build of the stages runs here (else the slower baseline one).
  static bool simd();

 private:
  void plan_blocks(const FrequencyList& f);
  void plan_tables(const FrequencyList& f, const std::int32_t* shifts);
  void plan_cost();
  MLTOMO_SIMD_CLONES void stage1(const float* wx, const float* ref, float* Y, float* tmp) const;
  MLTOMO_SIMD_CLONES void stage2(const float* Y, float* V, float* tmp) const;
  MLTOMO_SIMD_CLONES void stage3(const float* V, float* box) const;

  int n_ = 0, T_ = 0;
  int mx_ = 0, my_ = 0, mz_ = 0;  // half-ranges of the shift box
  int nb1_ = 0, nb2_ = 0;         // stage-1 blocks (ky, 8 kx), stage-2 blocks (8 kx)
  int x8_ = 0;                    // 2 mx + 1 rounded up to 8
  int lmax_ = 0;                  // longest pair list of any block
  std::vector<std::int32_t> slot_;       // (J) float offset of each component's real part
  std::vector<std::int32_t> b1_off_, b1_len_;  // (nb1) float offset and |kz| levels of a block
  std::vector<std::int32_t> b2_len_;     // (nb2) |ky| levels of a stage-2 block
  std::vector<std::int32_t> b2_src_;     // (nb2, 1 + 2 Ky) stage-1 block of ky = 0, +1, -1, ... (nb1: zero)
  int ky_groups_ = 1;
  std::vector<float> cz_, sz_, cy_, sy_;  // (levels, m + 1) cos / sin(2 pi a s / n)
  std::vector<float> hc_, hs_;           // (8 nb2, x8) h cos, -h sin(2 pi kx x / n)
  std::vector<std::int32_t> box_index_;  // (T) index of shift t in the (2mz+1, 2my+1, x8) box
  std::size_t layout_size_ = 0, scratch_size_ = 0;
  double cost_ = 0;
};

}  // namespace mltomo
