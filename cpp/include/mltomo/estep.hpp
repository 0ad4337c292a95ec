// The E-step for a block of particles, in RELION's three stages kept apart:
//   1. squared differences d^2(i,k,r,t) for every class, rotation and translation
//      (one inverse FFT per particle, class and rotation scores all translations);
//   2. weights: posteriors by log-sum-exp with the maximum subtracted, pruning below
//      `prune` x the maximum;
//   3. weighted sums: the sufficient statistics W_k, S_k, M_k and the sigma / xi sums,
//      added into caller-owned accumulators.
// Threads split particles. Every thread owns its accumulators; they are added into the
// caller's arrays in thread order, so results are bit-identical for a given thread count.
#pragma once
#include <complex>
#include <cstddef>
#include <cstdint>

#include "mltomo/fft_plan.hpp"
#include "mltomo/interp.hpp"

namespace mltomo {

enum class ScoreMode : int { MaximumLikelihood = 0, CrossCorrelation = 1 };

struct EStepProblem {
  // References: K padded half-spectrum grids (K, P, P, P/2+1).
  const cfloat* refs = nullptr;
  int K = 0;
  PaddedGeometry grid{0, 1.0};
  // Particles: N half spectra of the working box (N, n, n, n/2+1), missing-region masks per
  // group (G, n, n, n/2+1) and the group of each particle.
  const cfloat* particles = nullptr;
  int N = 0;
  int n = 0;
  const float* masks = nullptr;
  int G = 0;
  const std::int32_t* group = nullptr;
  double radius = 0;  // working set: |k| <= radius
  // Search: R rotation matrices (row-major 3x3), T integer shifts (x, y, z) in working voxels,
  // log of the normalised translation prior per shift, log class priors (K).
  const double* rotations = nullptr;
  int R = 0;
  const std::int32_t* shifts = nullptr;
  int T = 0;
  const double* log_prior_shift = nullptr;
  const double* log_alpha = nullptr;
  const std::uint8_t* rot_mask = nullptr;  // (N, R) or null: which rotations each particle searches
  double sigma2 = 1;
  ScoreMode mode = ScoreMode::MaximumLikelihood;
  double prune = 1e-8;  // relative posterior below which a sample is dropped (0 keeps all)
  int nthreads = 1;
  int rot_block = 32;
};

struct EStepResult {
  // Per particle (N): best class/rotation/shift index, its posterior, number of samples kept,
  // log sum_{k,r,t} alpha_k p(t) exp(-d^2 / 2 sigma^2) (ML; best CC in CC mode),
  // sum_j w_ij |X_ij|^2 and J_i^o (full-spectrum count of observed working components).
  std::int32_t* best_class = nullptr;
  std::int32_t* best_rot = nullptr;
  std::int32_t* best_shift = nullptr;
  double* max_post = nullptr;
  std::int64_t* n_significant = nullptr;
  double* log_sum = nullptr;
  double* x_norm = nullptr;
  double* n_observed = nullptr;
  // Accumulators, added into: W (K), S (K, P, P, P/2+1) complex, M and Mfull (same, real),
  // sums[0] = sum P d^2, sums[1] = sum P |t|^2 (working voxels^2).
  double* W = nullptr;
  cdouble* S = nullptr;
  double* M = nullptr;
  double* Mfull = nullptr;  // (K, P, P, P/2+1): sum P R^{-1}[1], the weights of fully observed particles
  double* sums = nullptr;
};

struct EStepCounters {
  std::int64_t samples = 0;       // (i, k, r, t) evaluated
  std::int64_t kept = 0;          // of those, contributing to the sums
  std::int64_t maps_pruned = 0;   // (i, k, r) translation maps dropped as soon as scored
  double seconds_rotate = 0, seconds_score = 0, seconds_accumulate = 0, seconds_total = 0;
};

// Validates sizes (std::invalid_argument) and runs the E-step on the whole problem.
EStepCounters run_estep(const EStepProblem& pb, const EStepResult& out);

}  // namespace mltomo
