// The E-step, planned once per iteration and run on chunks of particles.
//
// An EStepPlan holds what is fixed for an iteration: the working set, the FFT plan, the shift
// table (output indices, |t|^2, phases exp(+2 pi i k.t/n)), the compact masks and the rotated
// references R_r A_k with their masked norms (cached across chunks when they fit in memory).
// EStepPlan::run then goes through RELION's stages, each its own function:
//   1. rotate: R_r A_k for a block of rotations (once per iteration when cached);
//   2. score: d^2(i,k,r,t) for every translation, from the correlations at the searched shifts
//      (one inverse FFT per (i,k,r), or the pruned transform of shift_scores.hpp when the
//      shift box is small against the working box), kept as log-weights relative to a
//      per-particle offset (double) so float32 storage loses nothing;
//   3. posteriors: log-sum-exp with the maximum subtracted, pruning below `prune` x the maximum;
//   4. weighted sums: W_k, S_k, M_k, Mfull_k and the sigma / xi sums, added into caller-owned
//      accumulators.
// Threads split particles. Every thread owns its accumulators; they are added into the
// caller's arrays in thread order, so results are bit-identical for a given thread count and
// do not depend on how particles are chunked into calls except through the order of additions.
#pragma once
#include <complex>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <limits>
#include <vector>

#include "mltomo/back_shift.hpp"
#include "mltomo/fft_plan.hpp"
#include "mltomo/fourier_grid.hpp"
#include "mltomo/interp.hpp"
#include "mltomo/shift_scores.hpp"

namespace mltomo {

enum class ScoreMode : int { MaximumLikelihood = 0, CrossCorrelation = 1 };

// What is fixed for an iteration. The plan copies the small arrays (rotations, shifts, priors)
// and borrows `refs` and `masks`: the caller keeps them alive and unchanged while the plan lives.
struct EStepSetup {
  // References: K padded half-spectrum grids (K, P, P, P/2+1).
  const cfloat* refs = nullptr;
  int K = 0;
  PaddedGeometry grid{0, 1.0};
  // Working box n and its missing-region masks per group (G, n, n, n/2+1).
  int n = 0;
  const float* masks = nullptr;
  int G = 0;
  double radius = 0;  // working set: |k| <= radius (the sums cover all of it)
  // Scores use only |k| <= score_radius (0 < score_radius <= radius; < 0: radius): d^2 counts
  // the reference as 0 beyond it, where the caller's filter has made it 0 (the resolution schedule).
  double score_radius = -1;
  // Search: R rotation matrices (row-major 3x3), T integer shifts (x, y, z) in working voxels,
  // log of the normalised translation prior per shift, log class priors (K).
  const double* rotations = nullptr;
  int R = 0;
  const std::int32_t* shifts = nullptr;
  int T = 0;
  const double* log_prior_shift = nullptr;
  const double* log_alpha = nullptr;
  double sigma2 = 1;
  ScoreMode mode = ScoreMode::MaximumLikelihood;
  double prune = 1e-8;  // relative posterior below which a sample is dropped (0 keeps all)
  // log of the prune factor, replacing `prune` when not NaN: a coarse window at 64³ keeps
  // samples 1,000 nats and more below the best, beyond the ~745 a double's exp holds
  double log_prune = std::numeric_limits<double>::quiet_NaN();
  int nthreads = 1;
  int rot_block = 32;
  double rotated_cache_bytes = 256.0 * (1 << 20);  // keep all R_r A_k if they fit in this
  ShiftKernel kernel = ShiftKernel::Auto;  // how the shifts of one (i, k, r) are scored
};

// One chunk of particles: N half spectra of the working box (N, n, n, n/2+1), the mask group of
// each, and optionally which rotations each particle searches (N, R), or null for all.
struct ParticleBatch {
  const cfloat* particles = nullptr;
  int N = 0;
  const std::int32_t* group = nullptr;
  const std::uint8_t* rot_mask = nullptr;
  // Optional (N, K) per-particle additions to the log class priors (e.g. the self-fit correction
  // of the adaptive scheme), or null.
  const double* class_offsets = nullptr;
};

// Per particle (N): best class/rotation/shift index, its posterior, number of samples kept,
// log sum_{k,r,t} alpha_k p(t) exp(-d^2 / 2 sigma^2) (ML; best CC in CC mode),
// sum_j w_ij |X_ij|^2 and J_i^o (full-spectrum count of observed working components).
struct ParticleOutputs {
  std::int32_t* best_class = nullptr;
  std::int32_t* best_rot = nullptr;
  std::int32_t* best_shift = nullptr;
  double* max_post = nullptr;
  std::int64_t* n_significant = nullptr;
  double* log_sum = nullptr;
  double* x_norm = nullptr;
  double* n_observed = nullptr;
  // (N, K) log sum_{r,t} p(t) exp(-d^2 / 2 sigma^2) of each class over the kept samples, without
  // the class prior (ML; -inf for a class with no kept sample and in CC mode), or null.
  double* class_log_sum = nullptr;
  // (N, R) log of each rotation's posterior mass, summed over classes and shifts (ML; 0 at the
  // best rotation and -inf elsewhere in CC mode), or null. For coarse-to-fine searches; in log
  // form because their windows reach beyond the ~745 nats a double's exp can hold.
  double* rot_log_mass = nullptr;
};

// Accumulators, added into: W (K), S (K, P, P, P/2+1) complex, M and Mfull (same, real),
// scalars[0] = sum P d^2, scalars[1] = sum P |t|^2 (working voxels^2).
struct Accumulators {
  double* W = nullptr;
  cdouble* S = nullptr;
  double* M = nullptr;
  double* Mfull = nullptr;  // sum P R^{-1}[1], the weights of fully observed particles
  double* scalars = nullptr;
};

struct EStepCounters {
  std::int64_t samples = 0;       // (i, k, r, t) evaluated
  std::int64_t kept = 0;          // of those, contributing to the sums
  std::int64_t maps_pruned = 0;   // (i, k, r) translation maps dropped as soon as scored
  std::int64_t maps_pruned_kernel = 0;  // (i, k, r) scored by the pruned kernel (else one c2r)
  double seconds_rotate = 0, seconds_score = 0, seconds_accumulate = 0, seconds_total = 0;
};

struct EStepRun;       // the per-call state (estep_state.hpp)
struct ThreadScratch;  // per-thread buffers and sums (estep_state.hpp)
struct ParticleData;   // a particle on the working set (estep_state.hpp)
struct Candidates;     // its translation maps that may matter (estep_state.hpp)

class EStepPlan {
 public:
  // Validates sizes (std::invalid_argument) and builds the shift tables and FFT plan.
  explicit EStepPlan(const EStepSetup& setup);
  EStepPlan(const EStepPlan&) = delete;
  EStepPlan& operator=(const EStepPlan&) = delete;

  // Scores one chunk of particles, writes `out` and adds into `acc`. Not reentrant: one call
  // at a time per plan (it fills the rotated-reference cache).
  EStepCounters run(const ParticleBatch& batch, const ParticleOutputs& out, const Accumulators& acc);

  int K() const { return s_.K; }
  int R() const { return s_.R; }
  int n() const { return s_.n; }
  int G() const { return s_.G; }
  const PaddedGeometry& grid() const { return s_.grid; }
  // The kernel the plan scores shifts with (Fft or Pruned; Auto is resolved at construction).
  ShiftKernel kernel() const { return pruned_ ? ShiftKernel::Pruned : ShiftKernel::Fft; }

 private:
  friend struct EStepRun;
  void build_shift_tables();
  void choose_kernel();
  void shift_correlations(ThreadScratch& th, const ParticleData& d, std::size_t sl) const;
  void keep_map(ThreadScratch& th, const ParticleData& d, Candidates& c, std::int32_t kr, double la,
                double ref_norm, const cfloat* ref) const;
  void rotate_block(EStepRun& run, int r0, int r1);
  void score_block(EStepRun& run, int r0, int r1);
  void posteriors(EStepRun& run);
  void index_contributions(EStepRun& run);
  void weighted_sums(EStepRun& run);
  void back_shift(ThreadScratch& th, const ParticleData& d) const;
  void reduce(EStepRun& run, const Accumulators& acc) const;
  std::size_t slot(int k, int r, int r0) const;
  // log alpha_k plus the batch's per-particle offset of particle i, if any.
  double class_prior(const ParticleBatch& b, int i, int k) const {
    return log_alpha_[k] + (b.class_offsets ? b.class_offsets[static_cast<std::size_t>(i) * K() + k] : 0.0);
  }

  EStepSetup s_;
  std::vector<double> rotations_, log_prior_shift_, log_alpha_;
  std::vector<std::int32_t> shifts_;
  WorkingSet ws_;                         // the scored components, |k| <= score_radius
  WorkingSet acc_ws_;                     // the accumulated ones, |k| <= radius, if larger (else empty)
  bool split_ = false;                    // score_radius < radius
  const WorkingSet& acc_ws() const { return split_ ? acc_ws_ : ws_; }
  FftPlan3D fft_;
  std::vector<std::int64_t> tidx_;        // (T) output index of shift t in the c2r result
  std::vector<double> t2_;                // (T) |t|^2
  std::unique_ptr<BackShifter> back_;     // the weighted sums' back-shift on acc_ws()
  bool cache_norms_ = false;              // few groups: cache sum hweight w_g |R A|^2 per (k, r, g)
  std::vector<float> group_w_;            // (G, J) masks on the working set, if cache_norms_
  bool cache_rotated_ = false;            // all R_r A_k kept for the iteration
  int slots_ = 0;                         // rotations held: R if cached, else rot_block
  AlignedArray<cfloat> rotated_;          // (K, slots, J), uninitialised: each slot is written before it is read
  std::vector<double> norm_cache_;        // (K, slots, G)
  std::vector<std::uint8_t> rotated_ready_;  // (R) cached rotations already computed
  std::unique_ptr<ShiftScorer> pruned_;   // the pruned kernel, if chosen
  std::size_t klayout_ = 0;               // floats of one array in its kernel order
  AlignedArray<float> kernel_refs_;       // (K, slots, klayout) R_r A_k in kernel order, if pruned_ (uninitialised)
};

}  // namespace mltomo
