// Private to the E-step's sources: the per-call state EStepPlan::run passes between its stages.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mltomo/estep.hpp"

namespace mltomo {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Log-weights are stored in float32 relative to a per-particle offset (double). The offset is
// the first scored map's maximum and moves up to a new map's maximum when that exceeds it by
// more than this, so every stored value that can still matter lies within about
// [log prune, kRebase] of zero, where float32 resolves ~4e-6 nats (at 1e5 it resolves 0.008).
constexpr double kRebase = 32.0;


inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// log(prune), -inf when nothing is pruned.
inline double log_prune_of(double prune) {
  return prune > 0 ? std::log(prune) : -std::numeric_limits<double>::infinity();
}
inline double log_prune_of(const EStepSetup& s) {
  return std::isnan(s.log_prune) ? log_prune_of(s.prune) : s.log_prune;
}

// The translation maps of one particle that may still matter. A map is dropped as soon as its
// best log-weight falls below (running maximum + log prune): the final maximum can only be
// higher, so such a map would be pruned anyway and dropping it early is exact. `best`, `maps`
// and `run_best` are relative to `offset`.
struct Candidates {
  std::vector<std::int32_t> kr;  // k * R + r
  std::vector<float> best;       // max over t of the log-weight
  std::vector<float> maps;       // T log-weights per candidate
  float run_best = kNegInf;
  double offset = 0;
  bool has_offset = false;
  std::size_t compact_at = 64;
  // CC mode: the single best sample and its d^2 - sum w |X|^2.
  std::int32_t cc_kr = -1, cc_t = -1;
  double cc_s = 0;
  double total = 0;  // sum of exp(L - run_best) over the kept samples

  void clear() {
    kr.clear();
    best.clear();
    maps.clear();
    run_best = kNegInf;
    offset = 0;
    has_offset = false;
    compact_at = 64;
    cc_kr = cc_t = -1;
    cc_s = 0;
  }

  // Moves the offset to `to`; stored values that can still matter change by less than
  // kRebase + |log prune|, so the float subtraction is exact to their resolution.
  void rebase(double to) {
    const float d = static_cast<float>(to - offset);
    for (float& v : maps) v -= d;
    for (float& v : best) v -= d;
    run_best -= d;
    offset = to;
  }

  void compact(double log_prune, int T) {
    const float thr = static_cast<float>(run_best + log_prune);
    std::size_t w = 0;
    for (std::size_t c = 0; c < kr.size(); ++c) {
      if (best[c] < thr) continue;
      if (w != c) {
        kr[w] = kr[c];
        best[w] = best[c];
        std::memmove(&maps[w * T], &maps[c * T], sizeof(float) * T);
      }
      ++w;
    }
    kr.resize(w);
    best.resize(w);
    maps.resize(w * T);
    compact_at = std::max<std::size_t>(64, 2 * w);
  }

  // Keeps the ML map `L` (absolute log-weights, double) unless it is already negligible.
  // Returns false if it was pruned.
  bool push_ml(std::int32_t kr_index, const double* L, int T, double log_prune, std::vector<float>& scratch) {
    double mxd = -std::numeric_limits<double>::infinity();
    for (int t = 0; t < T; ++t) mxd = std::max(mxd, L[t]);
    if (!std::isfinite(mxd)) return false;
    if (!has_offset) {
      offset = mxd;
      has_offset = true;
    } else if (mxd - offset > kRebase) {
      rebase(mxd);
    }
    const float mx = static_cast<float>(mxd - offset);
    if (mx > run_best) run_best = mx;
    if (mx < run_best + log_prune) return false;
    for (int t = 0; t < T; ++t) scratch[t] = static_cast<float>(L[t] - offset);
    kr.push_back(kr_index);
    best.push_back(mx);
    maps.insert(maps.end(), scratch.begin(), scratch.begin() + T);
    if (kr.size() >= compact_at) compact(log_prune, T);
    return true;
  }
};

// Compact, per-particle copies of the data restricted to the scored set, and on the
// accumulated set (the whole working set) in the back-shift's layout.
struct ParticleData {
  std::vector<cfloat> wx;  // w_j X_j on the scored set
  std::vector<float> w;    // w_j
  AlignedArray<float> bwx; // w X on the accumulated set, BackShifter layout
  double x_norm = 0;       // sum_full w |X|^2 over the accumulated set (the whole working set)
  double x_norm_nodc = 0;  // over the scored set, without DC (CC)
  double n_obs = 0;        // full-spectrum count of observed components of the accumulated set
};

// Per-thread buffers and accumulators.
struct ThreadScratch {
  AlignedArray<cfloat> cbuf;  // half spectrum of the working box
  AlignedArray<float> rbuf;   // real working box
  AlignedArray<float> kwx;    // the particle's w X in the pruned kernel's order
  AlignedArray<float> kscratch;
  std::vector<float> cross;   // (T) correlations at the shifts of the current (i, k, r)
  std::vector<double> scores;
  std::vector<float> scores_f;
  std::vector<std::int32_t> kept_t;  // the kept shifts of the current map and their posteriors
  std::vector<double> kept_p;
  AlignedArray<double> ylay;    // the current (class, rotation)'s back-shifted sum, BackShifter layout
  AlignedArray<float> bscratch;  // BackShifter scratch
  std::vector<cfloat> wx_acc;   // a particle's w X on the accumulated set (while compacting)
  std::vector<float> w_acc;
  std::vector<double> gsum;     // (G) posterior mass of each mask group in the current (class, rotation)
  std::vector<std::uint8_t> gflag;
  std::vector<std::int32_t> gtouched;
  std::vector<cdouble> ysum;
  std::vector<double> msum, W, scalars;
  std::vector<double> smf;  // (K, half_P, 4) S real, S imaginary, M, Mfull (scatter_interleaved)
  std::int64_t samples = 0, kept = 0, maps_pruned = 0, maps_kernel = 0;
};

struct EStepRun {
  struct Entry {
    std::int32_t particle, cand;
  };
  const ParticleBatch& batch;
  const ParticleOutputs& out;
  std::vector<ParticleData> pdata;
  std::vector<Candidates> cands;
  std::vector<ThreadScratch> scratch;
  std::vector<std::uint8_t> needed;       // (slots) rotation needed by this batch and not cached
  std::vector<std::int64_t> kr_start;     // (K R + 1) entries of each (class, rotation)
  std::vector<Entry> entries;             // particles contributing to each (class, rotation)
  double t_rot = 0, t_score = 0, t_acc = 0;
  EStepRun(const ParticleBatch& b, const ParticleOutputs& o) : batch(b), out(o) {}
};

}  // namespace mltomo
