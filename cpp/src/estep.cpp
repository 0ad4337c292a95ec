#include "mltomo/estep.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mltomo {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// A translation map with at most this many kept samples is back-shifted by direct phase sums;
// wider maps use one forward FFT.
constexpr int kDirectPhaseMax = 12;
constexpr int kMaxCachedGroups = 64;
// Log-weights are stored in float32 relative to a per-particle offset (double). The offset is
// the first scored map's maximum and moves up to a new map's maximum when that exceeds it by
// more than this, so every stored value that can still matter lies within about
// [log prune, kRebase] of zero, where float32 resolves ~4e-6 nats (at 1e5 it resolves 0.008).
constexpr double kRebase = 32.0;

// sum_j h_j w_j |a_j|^2 in double with independent partial sums (a long dependent chain of
// additions would cost more than the products).
double weighted_norm(const float* h, const float* w, const cfloat* a, std::size_t J) {
  double acc[4] = {0, 0, 0, 0};
  std::size_t j = 0;
  for (; j + 4 <= J; j += 4)
    for (int u = 0; u < 4; ++u) acc[u] += double(h[j + u] * w[j + u] * std::norm(a[j + u]));
  for (; j < J; ++j) acc[0] += double(h[j] * w[j] * std::norm(a[j]));
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

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

// Compact, per-particle copies of the data restricted to the working set.
struct ParticleData {
  std::vector<cfloat> wx;  // w_j X_j
  std::vector<float> w;    // w_j
  double x_norm = 0;       // sum_full w |X|^2
  double x_norm_nodc = 0;
  double n_obs = 0;        // full-spectrum count of observed components
};

// Per-thread buffers and accumulators.
struct ThreadScratch {
  AlignedArray<cfloat> cbuf;  // half spectrum of the working box
  AlignedArray<float> rbuf;   // real working box
  std::vector<double> scores;
  std::vector<float> scores_f;
  std::vector<std::complex<double>> phi;
  std::vector<double> post;
  std::vector<cdouble> ysum, S;
  std::vector<double> msum, M, F, W, scalars;
  std::int64_t samples = 0, kept = 0, maps_pruned = 0;
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

namespace {

EStepSetup validated(const EStepSetup& s) {
  require(s.K >= 1 && s.R >= 1 && s.T >= 1 && s.G >= 1, "empty problem dimensions");
  require(s.refs && s.masks && s.rotations && s.shifts && s.log_prior_shift && s.log_alpha, "missing array");
  require(s.sigma2 > 0 && std::isfinite(s.sigma2), "sigma2 must be positive and finite");
  require(s.prune >= 0 && s.prune < 1, "prune must be in [0, 1)");
  require(s.nthreads >= 1, "nthreads must be >= 1");
  require(s.grid.P % 2 == 0 && s.grid.pad > 0, "padded box must be even");
  require(s.grid.pad * s.radius + 1 <= s.grid.P / 2.0,
          "padded box too small for the working radius: need pad*radius+1 <= P/2");
  return s;
}

// z = w X conj(R A) on the working set, zero elsewhere, written sequentially run by run.
void cross_spectrum(const WorkingSet& ws, const cfloat* wx, const cfloat* ref, cfloat* z) {
  std::size_t pos = 0;
  for (const auto& run : ws.runs) {
    const std::size_t st = static_cast<std::size_t>(run.start);
    if (st > pos) std::memset(static_cast<void*>(z + pos), 0, sizeof(cfloat) * (st - pos));
    cfloat* dst = z + st;
    const cfloat* aa = wx + run.j0;
    const cfloat* bb = ref + run.j0;
    for (std::int32_t q = 0; q < run.len; ++q) dst[q] = aa[q] * std::conj(bb[q]);
    pos = st + run.len;
  }
  const std::size_t half_n = ws.half_size();
  if (pos < half_n) std::memset(static_cast<void*>(z + pos), 0, sizeof(cfloat) * (half_n - pos));
}

// Restricts particle i to the working set.
void compact_particle(const WorkingSet& ws, const cfloat* X, const float* w, ParticleData& d) {
  const std::size_t J = ws.size();
  d.wx.resize(J);
  d.w.resize(J);
  double xn = 0, nobs = 0, xdc = 0;
  for (std::size_t j = 0; j < J; ++j) {
    const float wj = w[ws.index[j]];
    const cfloat xj = X[ws.index[j]];
    d.w[j] = wj;
    d.wx[j] = wj * xj;
    const double e = double(ws.hweight[j]) * wj * std::norm(xj);
    xn += e;
    nobs += double(ws.hweight[j]) * (wj > 0 ? 1.0 : 0.0);
    if (ws.kx[j] == 0 && ws.ky[j] == 0 && ws.kz[j] == 0) xdc = e;
  }
  d.x_norm = xn;
  d.x_norm_nodc = xn - xdc;
  d.n_obs = nobs;
}

struct Best {
  int k = -1, r = -1, t = -1;
  double p = 0, log_sum = -std::numeric_limits<double>::infinity();
  std::int64_t nsig = 0;
};

// Log-sum-exp over a particle's kept samples (the maximum subtracted); stores the total in c.
Best ml_posterior(Candidates& c, const ParticleData& d, int R, int T, double log_prune, double inv2s2) {
  Best b;
  if (c.kr.empty()) return b;
  const double Lmax = c.run_best;
  const double thr = Lmax + log_prune;
  double total = 0;
  float best_L = kNegInf;
  for (std::size_t q = 0; q < c.kr.size(); ++q) {
    if (c.best[q] < thr) continue;
    const float* L = &c.maps[q * T];
    for (int t = 0; t < T; ++t) {
      if (L[t] < thr) continue;
      total += std::exp(L[t] - Lmax);
      ++b.nsig;
      if (L[t] > best_L) {
        best_L = L[t];
        b.k = c.kr[q] / R;
        b.r = c.kr[q] % R;
        b.t = t;
      }
    }
  }
  c.total = total;
  b.p = std::exp(best_L - Lmax) / total;
  b.log_sum = c.offset + Lmax + std::log(total) - d.x_norm * inv2s2;
  return b;
}

Best cc_posterior(const Candidates& c, int R) {
  Best b;
  if (c.cc_kr < 0) return b;
  b.k = c.cc_kr / R;
  b.r = c.cc_kr % R;
  b.t = c.cc_t;
  b.p = 1;
  b.nsig = 1;
  b.log_sum = c.run_best;
  return b;
}

}  // namespace

EStepPlan::EStepPlan(const EStepSetup& setup)
    : s_(validated(setup)),
      rotations_(setup.rotations, setup.rotations + 9 * static_cast<std::size_t>(setup.R)),
      log_prior_shift_(setup.log_prior_shift, setup.log_prior_shift + setup.T),
      log_alpha_(setup.log_alpha, setup.log_alpha + setup.K),
      shifts_(setup.shifts, setup.shifts + 3 * static_cast<std::size_t>(setup.T)),
      ws_(make_working_set(setup.n, setup.radius)),
      fft_(setup.n) {
  s_.rotations = rotations_.data();
  s_.log_prior_shift = log_prior_shift_.data();
  s_.log_alpha = log_alpha_.data();
  s_.shifts = shifts_.data();
  s_.rot_block = std::max(1, s_.rot_block);
  build_shift_tables();
  const std::size_t J = ws_.size(), K = s_.K, G = s_.G;
  // sum_j hweight w_gj |R A|^2 depends on the particle only through its mask group: cache it
  // per (class, rotation, group) when there are few groups.
  cache_norms_ = s_.G <= kMaxCachedGroups;
  if (cache_norms_) {
    group_w_.resize(G * J);
    for (std::size_t gi = 0; gi < G; ++gi)
      for (std::size_t j = 0; j < J; ++j) group_w_[gi * J + j] = s_.masks[gi * ws_.half_size() + ws_.index[j]];
  }
  const double per_rotation = double(K) * (J * sizeof(cfloat) + (cache_norms_ ? G * sizeof(double) : 0));
  cache_rotated_ = per_rotation * s_.R <= s_.rotated_cache_bytes;
  slots_ = cache_rotated_ ? s_.R : std::min(s_.R, s_.rot_block);
  rotated_.resize(K * slots_ * J);
  norm_cache_.resize(cache_norms_ ? K * slots_ * G : 0);
  rotated_ready_.assign(s_.R, 0);
}

void EStepPlan::build_shift_tables() {
  const int n = s_.n, T = s_.T;
  const std::size_t J = ws_.size();
  tidx_.resize(T);
  t2_.resize(T);
  for (int t = 0; t < T; ++t) {
    const int sx = s_.shifts[3 * t], sy = s_.shifts[3 * t + 1], sz = s_.shifts[3 * t + 2];
    require(std::abs(sx) < n / 2 && std::abs(sy) < n / 2 && std::abs(sz) < n / 2, "shift outside the box");
    const int x = (sx % n + n) % n, y = (sy % n + n) % n, z = (sz % n + n) % n;
    tidx_[t] = (static_cast<std::int64_t>(z) * n + y) * n + x;
    t2_[t] = double(sx) * sx + double(sy) * sy + double(sz) * sz;
  }
  // exp(+2 pi i m / n) for the direct back-shift.
  phase_.resize(n);
  for (int m = 0; m < n; ++m) phase_[m] = std::polar(1.0, kTwoPi * m / n);
  // Phases exp(+2 pi i k_j . t / n) per shift, when they fit in 128 MB: back-shifting a map
  // with few significant shifts then costs a few J-length products instead of an FFT.
  if (static_cast<double>(T) * J * sizeof(cfloat) > 128.0 * (1 << 20)) return;
  phase_table_.resize(static_cast<std::size_t>(T) * J);
  for (int t = 0; t < T; ++t) {
    const int sx = s_.shifts[3 * t], sy = s_.shifts[3 * t + 1], sz = s_.shifts[3 * t + 2];
    for (std::size_t j = 0; j < J; ++j) {
      const int m = ((ws_.kx[j] * sx + ws_.ky[j] * sy + ws_.kz[j] * sz) % n + n) % n;
      phase_table_[static_cast<std::size_t>(t) * J + j] =
          cfloat(static_cast<float>(phase_[m].real()), static_cast<float>(phase_[m].imag()));
    }
  }
}

std::size_t EStepPlan::slot(int k, int r, int r0) const {
  return static_cast<std::size_t>(k) * slots_ + (cache_rotated_ ? r : r - r0);
}

// Stage 1: R_r A_k (and its masked norms) for the rotations of [r0, r1) some particle of the
// batch searches and the cache does not hold yet. Called by every thread of the team.
void EStepPlan::rotate_block(EStepRun& run, int r0, int r1) {
  const std::size_t J = ws_.size();
  const int R = s_.R, nr = r1 - r0;
#pragma omp single
  {
    run.t_rot -= omp_get_wtime();
    for (int r = r0; r < r1; ++r) {
      bool any = run.batch.rot_mask == nullptr;
      for (int i = 0; i < run.batch.N && !any; ++i) any = run.batch.rot_mask[static_cast<std::size_t>(i) * R + r] != 0;
      run.needed[r - r0] = any && !(cache_rotated_ && rotated_ready_[r]);
    }
  }
#pragma omp for schedule(dynamic)
  for (int q = 0; q < s_.K * nr; ++q) {
    const int k = q / nr, r = r0 + q % nr;
    if (!run.needed[r - r0]) continue;
    const std::size_t sl = slot(k, r, r0);
    cfloat* out_kr = rotated_.data() + sl * J;
    gather(s_.refs + static_cast<std::size_t>(k) * s_.grid.half_size(), s_.grid, s_.rotations + 9 * std::size_t(r),
           ws_, out_kr);
    if (cache_norms_)
      for (int gi = 0; gi < s_.G; ++gi)
        norm_cache_[sl * s_.G + gi] = weighted_norm(ws_.hweight.data(), group_w_.data() + std::size_t(gi) * J, out_kr, J);
  }
#pragma omp single
  {
    if (cache_rotated_)
      for (int r = r0; r < r1; ++r) rotated_ready_[r] |= run.needed[r - r0];
    run.t_rot += omp_get_wtime();
  }
}

// Stage 2: scores every translation of every (particle, class, rotation) of the block with one
// inverse FFT each and keeps the maps that may matter. Called by every thread of the team.
void EStepPlan::score_block(EStepRun& run, int r0, int r1) {
  const int R = s_.R, T = s_.T;
  const std::size_t J = ws_.size();
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = s_.prune > 0 ? std::log(s_.prune) : -std::numeric_limits<double>::infinity();
  const double inv2s2 = 1.0 / (2.0 * s_.sigma2);
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
#pragma omp single
  run.t_score -= omp_get_wtime();
#pragma omp for schedule(dynamic)
  for (int i = 0; i < run.batch.N; ++i) {
    const ParticleData& d = run.pdata[i];
    Candidates& c = run.cands[i];
    for (int k = 0; k < s_.K; ++k) {
      const double la = s_.log_alpha[k];
      if (!(la > -std::numeric_limits<double>::infinity())) continue;  // alpha_k = 0
      for (int r = r0; r < r1; ++r) {
        if (run.batch.rot_mask && !run.batch.rot_mask[static_cast<std::size_t>(i) * R + r]) continue;
        const std::size_t sl = slot(k, r, r0);
        const cfloat* ref = rotated_.data() + sl * J;
        cross_spectrum(ws_, d.wx.data(), ref, th.cbuf.get());  // c2r destroys its input
        const double ref_norm = cache_norms_ ? norm_cache_[sl * s_.G + run.batch.group[i]]
                                             : weighted_norm(ws_.hweight.data(), d.w.data(), ref, J);
        fft_.c2r(th.cbuf.get(), th.rbuf.get());
        th.samples += T;
        const std::int32_t kr = k * R + r;
        const float* cross = th.rbuf.get();
        if (!cc_mode) {
          for (int t = 0; t < T; ++t)
            th.scores[t] = la + s_.log_prior_shift[t] - (ref_norm - 2.0 * cross[tidx_[t]]) * inv2s2;
          if (!c.push_ml(kr, th.scores.data(), T, log_prune, th.scores_f)) ++th.maps_pruned;
          continue;
        }
        // CC: DC is the first component of the working set (index 0).
        const double ref_dc = d.w[0] * std::norm(ref[0]);
        const double cross_dc = (d.wx[0] * std::conj(ref[0])).real();
        const double denom = std::sqrt(std::max(1e-300, d.x_norm_nodc * (ref_norm - ref_dc)));
        for (int t = 0; t < T; ++t) {
          const double cc = (cross[tidx_[t]] - cross_dc) / denom;
          if (cc > c.run_best) {
            c.run_best = static_cast<float>(cc);
            c.cc_kr = kr;
            c.cc_t = t;
            c.cc_s = ref_norm - 2.0 * cross[tidx_[t]];
          }
        }
      }
    }
  }
#pragma omp single
  run.t_score += omp_get_wtime();
}

// Stage 3: posteriors of each particle and its per-particle outputs.
void EStepPlan::posteriors(EStepRun& run) {
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = s_.prune > 0 ? std::log(s_.prune) : -std::numeric_limits<double>::infinity();
  const double inv2s2 = 1.0 / (2.0 * s_.sigma2);
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
  const ParticleOutputs& out = run.out;
#pragma omp single
  run.t_acc -= omp_get_wtime();  // posteriors and sums
#pragma omp for schedule(dynamic)
  for (int i = 0; i < run.batch.N; ++i) {
    const ParticleData& d = run.pdata[i];
    const Best b = cc_mode ? cc_posterior(run.cands[i], s_.R)
                           : ml_posterior(run.cands[i], d, s_.R, s_.T, log_prune, inv2s2);
    th.kept += b.nsig;
    out.best_class[i] = b.k;
    out.best_rot[i] = b.r;
    out.best_shift[i] = b.t;
    out.max_post[i] = b.p;
    out.n_significant[i] = b.nsig;
    out.log_sum[i] = b.log_sum;
    out.x_norm[i] = d.x_norm;
    out.n_observed[i] = d.n_obs;
  }
}

// Who contributes to which (class, rotation), particles in ascending order. One thread.
void EStepPlan::index_contributions(EStepRun& run) {
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = s_.prune > 0 ? std::log(s_.prune) : -std::numeric_limits<double>::infinity();
  const int N = run.batch.N;
  auto& kr_start = run.kr_start;
  // Calls add(i, kr, cand) for every kept map, in particle order.
  auto for_each_kept = [&](auto&& add) {
    for (int i = 0; i < N; ++i) {
      const Candidates& c = run.cands[i];
      if (cc_mode) {
        if (c.cc_kr >= 0) add(i, c.cc_kr, -1);
        continue;
      }
      const double thr = c.run_best + log_prune;
      for (std::size_t q = 0; q < c.kr.size(); ++q)
        if (c.best[q] >= thr) add(i, c.kr[q], static_cast<std::int32_t>(q));
    }
  };
  kr_start.assign(static_cast<std::size_t>(s_.K) * s_.R + 1, 0);
  for_each_kept([&](int, std::int32_t kr, std::int32_t) { ++kr_start[kr + 1]; });
  for (std::size_t q = 1; q < kr_start.size(); ++q) kr_start[q] += kr_start[q - 1];
  run.entries.resize(kr_start.back());
  std::vector<std::int64_t> fill(kr_start.begin(), kr_start.end() - 1);
  for_each_kept([&](int i, std::int32_t kr, std::int32_t q) { run.entries[fill[kr]++] = EStepRun::Entry{i, q}; });
}

namespace {

// One (particle, class, rotation)'s share of the sums: P over t in `post`, and its totals.
struct MapShare {
  double pkr = 0, pd2 = 0, pt2 = 0;
  int nkept = 0;
};

}  // namespace

// Stage 4: weighted sums. Each (class, rotation) sums its particles in the particle frame and
// is scattered into the reference once. Static round-robin schedule: which thread adds what,
// and in which order, depends only on the sizes and the thread count.
void EStepPlan::weighted_sums(EStepRun& run) {
  const int R = s_.R, T = s_.T;
  const std::size_t J = ws_.size(), half_P = s_.grid.half_size();
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = s_.prune > 0 ? std::log(s_.prune) : -std::numeric_limits<double>::infinity();
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
  std::vector<double>& post = th.post;
  // P_t of the map and its totals; d^2 = sum w|X|^2 + 2 sigma^2 (log alpha + log p(t) - L).
  auto share = [&](const ParticleData& d, const Candidates& c, int k, std::int32_t cand) {
    MapShare m;
    if (cc_mode) {
      std::fill(post.begin(), post.end(), 0.0);
      post[c.cc_t] = 1;
      return MapShare{1, d.x_norm + c.cc_s, t2_[c.cc_t], 1};
    }
    const double Lmax = c.run_best, thr = Lmax + log_prune;
    const float* L = &c.maps[static_cast<std::size_t>(cand) * T];
    for (int t = 0; t < T; ++t) {
      post[t] = 0;
      if (L[t] < thr) continue;
      const double p = std::exp(L[t] - Lmax) / c.total;
      post[t] = p;
      m.pkr += p;
      const double s = 2.0 * s_.sigma2 * ((s_.log_alpha[k] + s_.log_prior_shift[t] - c.offset) - L[t]);
      m.pd2 += p * (d.x_norm + s);
      m.pt2 += p * t2_[t];
      ++m.nkept;
    }
    return m;
  };
#pragma omp for schedule(static, 1)
  for (int kr = 0; kr < s_.K * R; ++kr) {
    const std::int64_t e0 = run.kr_start[kr], e1 = run.kr_start[kr + 1];
    if (e0 == e1) continue;
    const int k = kr / R, r = kr % R;
    std::fill(th.ysum.begin(), th.ysum.end(), cdouble(0, 0));
    std::fill(th.msum.begin(), th.msum.end(), 0.0);
    double pfull = 0;
    for (std::int64_t e = e0; e < e1; ++e) {
      const ParticleData& d = run.pdata[run.entries[e].particle];
      const MapShare m = share(d, run.cands[run.entries[e].particle], k, run.entries[e].cand);
      th.W[k] += m.pkr;
      pfull += m.pkr;
      th.scalars[0] += m.pd2;
      th.scalars[1] += m.pt2;
      back_shift_phases(th, m.nkept);
      for (std::size_t j = 0; j < J; ++j) {
        th.ysum[j] += th.phi[j] * std::complex<double>(d.wx[j].real(), d.wx[j].imag());
        th.msum[j] += m.pkr * d.w[j];
      }
    }
    const std::size_t off = static_cast<std::size_t>(k) * half_P;
    scatter(th.ysum.data(), th.msum.data(), pfull, s_.grid, s_.rotations + 9 * static_cast<std::size_t>(r), ws_,
            th.S.data() + off, th.M.data() + off, th.F.data() + off);
  }
#pragma omp single
  run.t_acc += omp_get_wtime();
}

// phi_j = sum_t P_t exp(+2 pi i k_j . t / n), which undoes the shifts: direct phase sums for a
// map with few kept shifts, one forward FFT of the posterior map otherwise.
void EStepPlan::back_shift_phases(ThreadScratch& th, int nkept) const {
  const std::size_t J = ws_.size();
  const int n = s_.n, T = s_.T;
  const int direct_max = phase_table_.empty() ? 1 : kDirectPhaseMax;
  auto& phi = th.phi;
  if (nkept > direct_max) {
    std::memset(th.rbuf.get(), 0, sizeof(float) * fft_.real_size());
    for (int t = 0; t < T; ++t) th.rbuf[tidx_[t]] += static_cast<float>(th.post[t]);
    fft_.r2c(th.rbuf.get(), th.cbuf.get());
    for (std::size_t j = 0; j < J; ++j) {
      const cfloat f = th.cbuf[ws_.index[j]];
      phi[j] = std::complex<double>(f.real(), -f.imag());
    }
    return;
  }
  std::fill(phi.begin(), phi.end(), std::complex<double>(0, 0));
  for (int t = 0; t < T; ++t) {
    const double p = th.post[t];
    if (p == 0) continue;
    if (!phase_table_.empty()) {
      const cfloat* E = &phase_table_[static_cast<std::size_t>(t) * J];
      for (std::size_t j = 0; j < J; ++j) phi[j] += p * std::complex<double>(E[j].real(), E[j].imag());
      continue;
    }
    const int sx = s_.shifts[3 * t], sy = s_.shifts[3 * t + 1], sz = s_.shifts[3 * t + 2];
    for (std::size_t j = 0; j < J; ++j) {
      const int m = ((ws_.kx[j] * sx + ws_.ky[j] * sy + ws_.kz[j] * sz) % n + n) % n;
      phi[j] += p * phase_[m];
    }
  }
}

// Fixed-order reduction of the per-thread sums into the caller's accumulators.
void EStepPlan::reduce(EStepRun& run, const Accumulators& acc) const {
  const int K = s_.K;
  const std::size_t half_P = s_.grid.half_size();
  for (const ThreadScratch& th : run.scratch) {
    for (int k = 0; k < K; ++k) acc.W[k] += th.W[k];
    acc.scalars[0] += th.scalars[0];
    acc.scalars[1] += th.scalars[1];
  }
  std::vector<cdouble> s(half_P);
  std::vector<double> m(half_P), f(half_P);
  for (int k = 0; k < K; ++k) {
    const std::size_t off = static_cast<std::size_t>(k) * half_P;
    std::fill(s.begin(), s.end(), cdouble(0, 0));
    std::fill(m.begin(), m.end(), 0.0);
    std::fill(f.begin(), f.end(), 0.0);
    for (const ThreadScratch& th : run.scratch) {
      const cdouble* a = th.S.data() + off;
      const double* b = th.M.data() + off;
      const double* c = th.F.data() + off;
      for (std::size_t q = 0; q < half_P; ++q) {
        s[q] += a[q];
        m[q] += b[q];
        f[q] += c[q];
      }
    }
    fold_x0_plane(s_.grid, s.data(), m.data());
    fold_x0_plane(s_.grid, f.data());
    for (std::size_t q = 0; q < half_P; ++q) {
      acc.S[off + q] += s[q];
      acc.M[off + q] += m[q];
      acc.Mfull[off + q] += f[q];
    }
  }
}

EStepCounters EStepPlan::run(const ParticleBatch& batch, const ParticleOutputs& out, const Accumulators& acc) {
  require(batch.N >= 0, "negative particle count");
  for (int i = 0; i < batch.N; ++i)
    require(batch.group[i] >= 0 && batch.group[i] < s_.G, "particle " + std::to_string(i) + " has a bad mask group");
  const int nt = s_.nthreads, rb = s_.rot_block;
  const std::size_t J = ws_.size(), half_n = ws_.half_size(), KP = std::size_t(s_.K) * s_.grid.half_size();
  EStepRun run(batch, out);
  run.pdata.resize(batch.N);
  run.cands.resize(batch.N);
  run.scratch.resize(nt);
  run.needed.resize(rb);
  const double t_start = omp_get_wtime();
#pragma omp parallel num_threads(nt)
  {
    ThreadScratch& th = run.scratch[omp_get_thread_num()];  // first touch by its thread
    th.cbuf = aligned_array<cfloat>(half_n);
    th.rbuf = aligned_array<float>(fft_.real_size());
    th.scores.resize(s_.T);
    th.scores_f.resize(s_.T);
    th.phi.resize(J);
    th.post.resize(s_.T);
    th.ysum.resize(J);
    th.msum.resize(J);
    th.S.assign(KP, cdouble(0, 0));
    th.M.assign(KP, 0.0);
    th.F.assign(KP, 0.0);
    th.W.assign(s_.K, 0.0);
    th.scalars.assign(2, 0.0);
#pragma omp for schedule(static)
    for (int i = 0; i < batch.N; ++i) {
      compact_particle(ws_, batch.particles + std::size_t(i) * half_n,
                       s_.masks + std::size_t(batch.group[i]) * half_n, run.pdata[i]);
      run.cands[i].clear();
    }
    for (int r0 = 0; r0 < s_.R; r0 += rb) {
      rotate_block(run, r0, std::min(s_.R, r0 + rb));
      score_block(run, r0, std::min(s_.R, r0 + rb));
    }
    posteriors(run);
#pragma omp single
    index_contributions(run);
    weighted_sums(run);
  }
  reduce(run, acc);
  EStepCounters cnt;
  for (const ThreadScratch& th : run.scratch) {
    cnt.samples += th.samples;
    cnt.kept += th.kept;
    cnt.maps_pruned += th.maps_pruned;
  }
  cnt.seconds_rotate = run.t_rot;
  cnt.seconds_score = run.t_score;
  cnt.seconds_accumulate = run.t_acc;
  cnt.seconds_total = omp_get_wtime() - t_start;
  return cnt;
}

}  // namespace mltomo
