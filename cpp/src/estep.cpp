// The E-step plan and stages 1-3: rotate, score, posteriors (stage 4 is in estep_sums.cpp).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "estep_state.hpp"

namespace mltomo {
namespace {

constexpr int kMaxCachedGroups = 64;

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

EStepSetup validated(const EStepSetup& s) {
  require(s.K >= 1 && s.R >= 1 && s.T >= 1 && s.G >= 1, "empty problem dimensions");
  require(s.refs && s.masks && s.rotations && s.shifts && s.log_prior_shift && s.log_alpha, "missing array");
  require(s.sigma2 > 0 && std::isfinite(s.sigma2), "sigma2 must be positive and finite");
  require(s.prune >= 0 && s.prune < 1, "prune must be in [0, 1)");
  require(std::isnan(s.log_prune) || s.log_prune < 0, "log_prune must be negative");
  require(s.nthreads >= 1, "nthreads must be >= 1");
  require(s.grid.P % 2 == 0 && s.grid.pad > 0, "padded box must be even");
  require(s.grid.pad * s.radius + 1 <= s.grid.P / 2.0,
          "padded box too small for the working radius: need pad*radius+1 <= P/2");
  require(s.score_radius < 0 || (s.score_radius > 0 && s.score_radius <= s.radius),
          "score_radius must be in (0, radius], or negative for radius");
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

// w X and w of particle i on the components of `ws`; returns sum_full w |X|^2, its DC term
// and the full-spectrum count of observed components.
struct Compacted {
  double norm = 0, dc = 0, n_obs = 0;
};
Compacted compact_on(const WorkingSet& ws, const cfloat* X, const float* w, std::vector<cfloat>& wx,
                     std::vector<float>& wv) {
  const std::size_t J = ws.size();
  wx.resize(J);
  wv.resize(J);
  Compacted c;
  for (std::size_t j = 0; j < J; ++j) {
    const float wj = w[ws.index[j]];
    const cfloat xj = X[ws.index[j]];
    wv[j] = wj;
    wx[j] = wj * xj;
    const double e = double(ws.hweight[j]) * wj * std::norm(xj);
    c.norm += e;
    c.n_obs += double(ws.hweight[j]) * (wj > 0 ? 1.0 : 0.0);
    if (ws.kx[j] == 0 && ws.ky[j] == 0 && ws.kz[j] == 0) c.dc = e;
  }
  return c;
}

// Restricts particle i to the scored set and, in the back-shift's layout, to the accumulated
// set (`acc`, when it is larger; wx_acc, w_acc: scratch).
void compact_particle(const WorkingSet& ws, const WorkingSet* acc, const BackShifter& back, const cfloat* X,
                      const float* w, ParticleData& d, std::vector<cfloat>& wx_acc, std::vector<float>& w_acc) {
  const Compacted s = compact_on(ws, X, w, d.wx, d.w);
  d.x_norm_nodc = s.norm - s.dc;
  const Compacted a = acc ? compact_on(*acc, X, w, wx_acc, w_acc) : s;
  d.x_norm = a.norm;
  d.n_obs = a.n_obs;
  d.bwx = aligned_array<float>(back.layout_size());
  back.to_layout(acc ? wx_acc.data() : d.wx.data(), d.bwx.get());
}

struct Best {
  int k = -1, r = -1, t = -1;
  double p = 0, log_sum = -std::numeric_limits<double>::infinity();
  std::int64_t nsig = 0;
};

// Log-sum-exp over a particle's kept samples (the maximum subtracted); stores the total in c.
// rot_log_mass (R values, or null) receives log Σ_{k,t} p(k, r, t | X) per rotation r, computed
// about each rotation's own maximum so that it keeps its range where exp(L − Lmax) underflows
// (a coarse window of thousands of nats at 64³ and above); −inf where nothing was kept.
Best ml_posterior(Candidates& c, const ParticleData& d, int R, int T, double log_prune, double inv2s2,
                  double* class_total, double* rot_log_mass) {
  Best b;
  if (c.kr.empty()) return b;
  const double Lmax = c.run_best;
  const double thr = Lmax + log_prune;
  constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
  std::vector<double> rot_sum;
  if (rot_log_mass) {  // each rotation's maximum first
    std::fill(rot_log_mass, rot_log_mass + R, kNegInfD);
    rot_sum.assign(R, 0.0);
    for (std::size_t q = 0; q < c.kr.size(); ++q) {
      if (c.best[q] < thr) continue;
      const float* L = &c.maps[q * T];
      double& m = rot_log_mass[c.kr[q] % R];
      for (int t = 0; t < T; ++t)
        if (L[t] >= thr && L[t] > m) m = L[t];
    }
  }
  double total = 0;
  float best_L = kNegInf;
  for (std::size_t q = 0; q < c.kr.size(); ++q) {
    if (c.best[q] < thr) continue;
    const float* L = &c.maps[q * T];
    const int r = c.kr[q] % R;
    for (int t = 0; t < T; ++t) {
      if (L[t] < thr) continue;
      const double e = std::exp(L[t] - Lmax);
      total += e;
      if (class_total) class_total[c.kr[q] / R] += e;
      if (rot_log_mass) rot_sum[r] += std::exp(L[t] - rot_log_mass[r]);
      ++b.nsig;
      if (L[t] > best_L) {
        best_L = L[t];
        b.k = c.kr[q] / R;
        b.r = r;
        b.t = t;
      }
    }
  }
  c.total = total;
  if (rot_log_mass) {
    const double log_total = Lmax + std::log(total);
    for (int r = 0; r < R; ++r)
      rot_log_mass[r] = rot_sum[r] > 0 ? rot_log_mass[r] + std::log(rot_sum[r]) - log_total : kNegInfD;
  }
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
      ws_(make_working_set(setup.n, setup.score_radius < 0 ? setup.radius : setup.score_radius)),
      fft_(setup.n) {
  WorkingSet whole = make_working_set(setup.n, setup.radius);
  split_ = ws_.size() < whole.size();
  if (split_) acc_ws_ = std::move(whole);
  s_.rotations = rotations_.data();
  s_.log_prior_shift = log_prior_shift_.data();
  s_.log_alpha = log_alpha_.data();
  s_.shifts = shifts_.data();
  s_.rot_block = std::max(1, s_.rot_block);
  build_shift_tables();
  choose_kernel();
  const std::size_t J = ws_.size(), K = s_.K, G = s_.G;
  // sum_j hweight w_gj |R A|^2 depends on the particle only through its mask group: cache it
  // per (class, rotation, group) when there are few groups.
  cache_norms_ = s_.G <= kMaxCachedGroups;
  if (cache_norms_) {
    group_w_.resize(G * J);
    for (std::size_t gi = 0; gi < G; ++gi)
      for (std::size_t j = 0; j < J; ++j) group_w_[gi * J + j] = s_.masks[gi * ws_.half_size() + ws_.index[j]];
  }
  const double per_rotation =
      double(K) * (J * sizeof(cfloat) + klayout_ * sizeof(float) + (cache_norms_ ? G * sizeof(double) : 0));
  cache_rotated_ = per_rotation * s_.R <= s_.rotated_cache_bytes;
  slots_ = cache_rotated_ ? s_.R : std::min(s_.R, s_.rot_block);
  // Uninitialised (a zero fill of a whole iteration's cache cost as much as rotating half of it).
  rotated_ = aligned_array<cfloat>(K * slots_ * J);
  kernel_refs_ = aligned_array<float>(K * slots_ * klayout_);
  norm_cache_.resize(cache_norms_ ? K * slots_ * G : 0);
  rotated_ready_.assign(s_.R, 0);
}

void EStepPlan::build_shift_tables() {
  const int n = s_.n, T = s_.T;
  const WorkingSet& aw = acc_ws();  // the phases back-shift the accumulated set
  tidx_.resize(T);
  t2_.resize(T);
  for (int t = 0; t < T; ++t) {
    const int sx = s_.shifts[3 * t], sy = s_.shifts[3 * t + 1], sz = s_.shifts[3 * t + 2];
    require(std::abs(sx) < n / 2 && std::abs(sy) < n / 2 && std::abs(sz) < n / 2, "shift outside the box");
    const int x = (sx % n + n) % n, y = (sy % n + n) % n, z = (sz % n + n) % n;
    tidx_[t] = (static_cast<std::int64_t>(z) * n + y) * n + x;
    t2_[t] = double(sx) * sx + double(sy) * sy + double(sz) * sz;
  }
  back_ = std::make_unique<BackShifter>(aw, s_.shifts, T);
}

// The pruned kernel when asked for, or (Auto) when its cost model beats one c2r of the working
// box; its baseline (non-AVX2) build is about 12x slower and is only chosen when asked for.
void EStepPlan::choose_kernel() {
  if (s_.kernel == ShiftKernel::Fft) return;
  const FrequencyList f{s_.n, ws_.kx.data(), ws_.ky.data(), ws_.kz.data(), ws_.hweight.data(), ws_.size()};
  pruned_ = std::make_unique<ShiftScorer>(f, s_.shifts, s_.T);
  const double cost = pruned_->cost() * (ShiftScorer::simd() ? 1.0 : 12.0);
  if (s_.kernel == ShiftKernel::Auto && !(cost < ShiftScorer::fft_cost(s_.n))) pruned_.reset();
  klayout_ = pruned_ ? pruned_->layout_size() : 0;
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
    cfloat* out_kr = rotated_.get() + sl * J;
    gather(s_.refs + static_cast<std::size_t>(k) * s_.grid.half_size(), s_.grid, s_.rotations + 9 * std::size_t(r),
           ws_, out_kr);
    if (cache_norms_)
      for (int gi = 0; gi < s_.G; ++gi)
        norm_cache_[sl * s_.G + gi] = weighted_norm(ws_.hweight.data(), group_w_.data() + std::size_t(gi) * J, out_kr, J);
    if (pruned_) pruned_->to_layout(out_kr, kernel_refs_.get() + sl * klayout_);
  }
#pragma omp single
  {
    if (cache_rotated_)
      for (int r = r0; r < r1; ++r) rotated_ready_[r] |= run.needed[r - r0];
    run.t_rot += omp_get_wtime();
  }
}

// The correlations sum_j h_j Re(w X conj(R A) e^{+2 pi i k_j.t/n}) of particle d and the rotated
// reference in slot sl at the T shifts, into th.cross: the pruned kernel (th.kwx holds w X in
// its order), or one inverse FFT read at the shifts.
void EStepPlan::shift_correlations(ThreadScratch& th, const ParticleData& d, std::size_t sl) const {
  if (pruned_) {
    pruned_->score(th.kwx.get(), kernel_refs_.get() + sl * klayout_, th.kscratch.get(), th.cross.data());
    ++th.maps_kernel;
    return;
  }
  cross_spectrum(ws_, d.wx.data(), rotated_.get() + sl * ws_.size(), th.cbuf.get());  // c2r destroys its input
  fft_.c2r(th.cbuf.get(), th.rbuf.get());
  for (int t = 0; t < s_.T; ++t) th.cross[t] = th.rbuf[tidx_[t]];
}

// One map's scores from th.cross: ML log-weights kept as a candidate, or CC's running best.
void EStepPlan::keep_map(ThreadScratch& th, const ParticleData& d, Candidates& c, std::int32_t kr, double la,
                         double ref_norm, const cfloat* ref) const {
  const int T = s_.T;
  const float* cross = th.cross.data();
  th.samples += T;
  if (s_.mode != ScoreMode::CrossCorrelation) {
    const double inv2s2 = 1.0 / (2.0 * s_.sigma2);
    for (int t = 0; t < T; ++t) th.scores[t] = la + s_.log_prior_shift[t] - (ref_norm - 2.0 * cross[t]) * inv2s2;
    if (!c.push_ml(kr, th.scores.data(), T, log_prune_of(s_), th.scores_f)) ++th.maps_pruned;
    return;
  }
  // CC: DC is the first component of the working set (index 0).
  const double ref_dc = d.w[0] * std::norm(ref[0]);
  const double cross_dc = (d.wx[0] * std::conj(ref[0])).real();
  const double denom = std::sqrt(std::max(1e-300, d.x_norm_nodc * (ref_norm - ref_dc)));
  for (int t = 0; t < T; ++t) {
    const double cc = (cross[t] - cross_dc) / denom;
    if (cc > c.run_best) {
      c.run_best = static_cast<float>(cc);
      c.cc_kr = kr;
      c.cc_t = t;
      c.cc_s = ref_norm - 2.0 * cross[t];
    }
  }
}

// Stage 2: scores every translation of every (particle, class, rotation) of the block and keeps
// the maps that may matter. Called by every thread of the team.
void EStepPlan::score_block(EStepRun& run, int r0, int r1) {
  const int R = s_.R;
  const std::size_t J = ws_.size();
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
#pragma omp single
  run.t_score -= omp_get_wtime();
#pragma omp for schedule(dynamic)
  for (int i = 0; i < run.batch.N; ++i) {
    const ParticleData& d = run.pdata[i];
    bool in_layout = false;  // th.kwx holds this particle
    for (int k = 0; k < s_.K; ++k) {
      const double la = class_prior(run.batch, i, k);
      if (!(la > -std::numeric_limits<double>::infinity())) continue;  // alpha_k = 0
      for (int r = r0; r < r1; ++r) {
        if (run.batch.rot_mask && !run.batch.rot_mask[static_cast<std::size_t>(i) * R + r]) continue;
        if (pruned_ && !in_layout) pruned_->to_layout(d.wx.data(), th.kwx.get());
        in_layout = true;
        const std::size_t sl = slot(k, r, r0);
        const cfloat* ref = rotated_.get() + sl * J;
        shift_correlations(th, d, sl);
        const double ref_norm = cache_norms_ ? norm_cache_[sl * s_.G + run.batch.group[i]]
                                             : weighted_norm(ws_.hweight.data(), d.w.data(), ref, J);
        keep_map(th, d, run.cands[i], k * R + r, la, ref_norm, ref);
      }
    }
  }
#pragma omp single
  run.t_score += omp_get_wtime();
}

// Stage 3: posteriors of each particle and its per-particle outputs.
void EStepPlan::posteriors(EStepRun& run) {
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = log_prune_of(s_);
  const double inv2s2 = 1.0 / (2.0 * s_.sigma2);
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
  const ParticleOutputs& out = run.out;
#pragma omp single
  run.t_acc -= omp_get_wtime();  // posteriors and sums
#pragma omp for schedule(dynamic)
  for (int i = 0; i < run.batch.N; ++i) {
    const ParticleData& d = run.pdata[i];
    double* cls = out.class_log_sum ? out.class_log_sum + static_cast<std::size_t>(i) * s_.K : nullptr;
    if (cls) std::fill(cls, cls + s_.K, 0.0);
    double* rm = out.rot_log_mass ? out.rot_log_mass + static_cast<std::size_t>(i) * s_.R : nullptr;
    if (rm) std::fill(rm, rm + s_.R, -std::numeric_limits<double>::infinity());
    const Best b = cc_mode ? cc_posterior(run.cands[i], s_.R)
                           : ml_posterior(run.cands[i], d, s_.R, s_.T, log_prune, inv2s2, cls, rm);
    if (rm && cc_mode && b.r >= 0) rm[b.r] = 0.0;  // log 1
    if (cls) {  // totals -> per-class log sums without the class prior
      const Candidates& c = run.cands[i];
      for (int k = 0; k < s_.K; ++k)
        cls[k] = cls[k] > 0 && !cc_mode
                     ? c.offset + c.run_best + std::log(cls[k]) - d.x_norm * inv2s2 - class_prior(run.batch, i, k)
                     : -std::numeric_limits<double>::infinity();
    }
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

EStepCounters EStepPlan::run(const ParticleBatch& batch, const ParticleOutputs& out, const Accumulators& acc) {
  require(batch.N >= 0, "negative particle count");
  for (int i = 0; i < batch.N; ++i)
    require(batch.group[i] >= 0 && batch.group[i] < s_.G, "particle " + std::to_string(i) + " has a bad mask group");
  const int nt = s_.nthreads, rb = s_.rot_block;
  const std::size_t J = acc_ws().size(), half_n = ws_.half_size(), KP = std::size_t(s_.K) * s_.grid.half_size();
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
    th.cross.resize(s_.T);
    if (pruned_) {
      th.kwx = aligned_array<float>(klayout_);
      th.kscratch = aligned_array<float>(pruned_->scratch_size());
    }
    th.scores.resize(s_.T);
    th.scores_f.resize(s_.T);
    th.kept_t.reserve(s_.T);
    th.kept_p.reserve(s_.T);
    th.ylay = aligned_array<double>(back_->layout_size());
    th.bscratch = aligned_array<float>(back_->scratch_size());
    th.gsum.assign(s_.G, 0.0);
    th.gflag.assign(s_.G, 0);
    th.ysum.resize(J);
    th.msum.resize(J);
    th.smf.assign(4 * KP, 0.0);
    th.W.assign(s_.K, 0.0);
    th.scalars.assign(2, 0.0);
#pragma omp for schedule(static)
    for (int i = 0; i < batch.N; ++i) {
      compact_particle(ws_, split_ ? &acc_ws_ : nullptr, *back_, batch.particles + std::size_t(i) * half_n,
                       s_.masks + std::size_t(batch.group[i]) * half_n, run.pdata[i], th.wx_acc, th.w_acc);
      run.cands[i].clear();
    }
    for (int r0 = 0; r0 < s_.R; r0 += rb) {
      rotate_block(run, r0, std::min(s_.R, r0 + rb));
      score_block(run, r0, std::min(s_.R, r0 + rb));
    }
    posteriors(run);
    if (acc.W) {  // no accumulators: scores only (a coarse pass)
#pragma omp single
      index_contributions(run);
      weighted_sums(run);
    } else {
#pragma omp barrier
#pragma omp single
      run.t_acc += omp_get_wtime();
    }
  }
  if (acc.W) reduce(run, acc);
  EStepCounters cnt;
  for (const ThreadScratch& th : run.scratch) {
    cnt.samples += th.samples;
    cnt.kept += th.kept;
    cnt.maps_pruned += th.maps_pruned;
    cnt.maps_pruned_kernel += th.maps_kernel;
  }
  cnt.seconds_rotate = run.t_rot;
  cnt.seconds_score = run.t_score;
  cnt.seconds_accumulate = run.t_acc;
  cnt.seconds_total = omp_get_wtime() - t_start;
  return cnt;
}

}  // namespace mltomo
