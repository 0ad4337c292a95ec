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

// The translation maps of one particle that may still matter. A map is dropped as soon as its
// best log-weight falls below (running maximum + log prune): the final maximum can only be
// higher, so such a map would be pruned anyway and dropping it early is exact.
struct Candidates {
  std::vector<std::int32_t> kr;  // k * R + r
  std::vector<float> best;       // max over t of the log-weight
  std::vector<float> maps;       // T log-weights per candidate
  float run_best = kNegInf;
  std::size_t compact_at = 64;
  // CC mode: the single best sample.
  std::int32_t cc_kr = -1, cc_t = -1;
  float cc_s = 0;
  double total = 0;  // sum of exp(L - run_best) over the kept samples

  void clear() {
    kr.clear();
    best.clear();
    maps.clear();
    run_best = kNegInf;
    compact_at = 64;
    cc_kr = cc_t = -1;
    cc_s = 0;
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
};

// Compact, per-particle copies of the data restricted to the working set.
struct ParticleData {
  std::vector<cfloat> wx;  // w_j X_j
  std::vector<float> w;    // w_j
  double x_norm = 0;       // sum_full w |X|^2
  double x_norm_nodc = 0;
  double n_obs = 0;        // full-spectrum count of observed components
};

}  // namespace

EStepCounters run_estep(const EStepProblem& pb, const EStepResult& out) {
  require(pb.K >= 1 && pb.N >= 0 && pb.R >= 1 && pb.T >= 1 && pb.G >= 1, "empty problem dimensions");
  require(pb.sigma2 > 0 && std::isfinite(pb.sigma2), "sigma2 must be positive and finite");
  require(pb.prune >= 0 && pb.prune < 1, "prune must be in [0, 1)");
  require(pb.nthreads >= 1, "nthreads must be >= 1");
  const WorkingSet ws = make_working_set(pb.n, pb.radius);
  const PaddedGeometry g = pb.grid;
  require(g.P % 2 == 0 && g.pad > 0, "padded box must be even");
  require(g.pad * pb.radius + 1 <= g.P / 2.0, "padded box too small for the working radius: need pad*radius+1 <= P/2");
  const int n = pb.n, K = pb.K, R = pb.R, T = pb.T, N = pb.N;
  const bool cc_mode = pb.mode == ScoreMode::CrossCorrelation;
  const std::size_t J = ws.size();
  const std::size_t half_n = ws.half_size();
  const std::size_t real_n = static_cast<std::size_t>(n) * n * n;
  const std::size_t half_P = g.half_size();
  const double log_prune = pb.prune > 0 ? std::log(pb.prune) : -std::numeric_limits<double>::infinity();
  const double inv2s2 = 1.0 / (2.0 * pb.sigma2);

  for (int i = 0; i < N; ++i)
    require(pb.group[i] >= 0 && pb.group[i] < pb.G, "particle " + std::to_string(i) + " has a bad mask group");

  // Translations: output index of the c2r and the squared length.
  std::vector<std::int64_t> tidx(T);
  std::vector<double> t2(T);
  for (int t = 0; t < T; ++t) {
    const int sx = pb.shifts[3 * t], sy = pb.shifts[3 * t + 1], sz = pb.shifts[3 * t + 2];
    require(std::abs(sx) < n / 2 && std::abs(sy) < n / 2 && std::abs(sz) < n / 2, "shift outside the box");
    const int x = (sx % n + n) % n, y = (sy % n + n) % n, z = (sz % n + n) % n;
    tidx[t] = (static_cast<std::int64_t>(z) * n + y) * n + x;
    t2[t] = double(sx) * sx + double(sy) * sy + double(sz) * sz;
  }
  // exp(+2 pi i m / n) for the direct back-shift.
  std::vector<std::complex<double>> phase(n);
  for (int m = 0; m < n; ++m) phase[m] = std::polar(1.0, kTwoPi * m / n);

  const FftPlan3D plan(n);
  const int nt = pb.nthreads;
  const int rb = std::max(1, pb.rot_block);

  // Per-thread accumulators, reduced in thread order at the end.
  std::vector<std::vector<cdouble>> accS(nt);
  std::vector<std::vector<double>> accM(nt), accF(nt), accW(nt), accSums(nt);

  std::vector<ParticleData> pdata(N);
  std::vector<Candidates> cands(N);
  std::vector<cfloat> rotated(static_cast<std::size_t>(K) * rb * J);
  // sum_j hweight w_gj |R A|^2 depends on the particle only through its mask group: cache it
  // per (class, rotation, group) when there are few groups.
  const bool cache_norms = pb.G <= kMaxCachedGroups;
  std::vector<double> norm_cache(cache_norms ? static_cast<std::size_t>(K) * rb * pb.G : 0);
  std::vector<float> group_w(cache_norms ? static_cast<std::size_t>(pb.G) * J : 0);
  for (int gi = 0; cache_norms && gi < pb.G; ++gi)
    for (std::size_t j = 0; j < J; ++j)
      group_w[static_cast<std::size_t>(gi) * J + j] = pb.masks[static_cast<std::size_t>(gi) * half_n + ws.index[j]];
  std::vector<std::uint8_t> needed(rb);

  // Phases exp(+2 pi i k_j . t / n) per shift, when they fit in 128 MB: back-shifting a map
  // with few significant shifts then costs a few J-length products instead of an FFT.
  std::vector<cfloat> phase_table;
  if (static_cast<double>(T) * J * sizeof(cfloat) <= 128.0 * (1 << 20)) {
    phase_table.resize(static_cast<std::size_t>(T) * J);
    for (int t = 0; t < T; ++t) {
      const int sx = pb.shifts[3 * t], sy = pb.shifts[3 * t + 1], sz = pb.shifts[3 * t + 2];
      for (std::size_t j = 0; j < J; ++j) {
        const int m = ((ws.kx[j] * sx + ws.ky[j] * sy + ws.kz[j] * sz) % n + n) % n;
        phase_table[static_cast<std::size_t>(t) * J + j] =
            cfloat(static_cast<float>(phase[m].real()), static_cast<float>(phase[m].imag()));
      }
    }
  }
  const int direct_max = phase_table.empty() ? 1 : kDirectPhaseMax;
  struct Entry {
    std::int32_t particle, cand;
  };
  std::vector<std::int64_t> kr_start(static_cast<std::size_t>(K) * R + 1);
  std::vector<Entry> entries;

  EStepCounters cnt;
  std::int64_t samples = 0, kept = 0, maps_pruned = 0;
  const double t_start = omp_get_wtime();
  double t_rot = 0, t_score = 0, t_acc = 0;
  std::string error;

#pragma omp parallel num_threads(nt) reduction(+ : samples, kept, maps_pruned)
  {
    const int tid = omp_get_thread_num();
    auto cbuf = aligned_array<cfloat>(half_n);
    auto rbuf = aligned_array<float>(real_n);
    std::vector<float> scores(T);
    std::vector<std::complex<double>> phi(J);
    std::vector<double> post(T);
    accS[tid].assign(static_cast<std::size_t>(K) * half_P, cdouble(0, 0));
    accM[tid].assign(static_cast<std::size_t>(K) * half_P, 0.0);
    accF[tid].assign(static_cast<std::size_t>(K) * half_P, 0.0);
    accW[tid].assign(K, 0.0);
    accSums[tid].assign(2, 0.0);

    // Stage 0: compact particle data.
#pragma omp for schedule(static)
    for (int i = 0; i < N; ++i) {
      ParticleData& d = pdata[i];
      const cfloat* X = pb.particles + static_cast<std::size_t>(i) * half_n;
      const float* w = pb.masks + static_cast<std::size_t>(pb.group[i]) * half_n;
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
      cands[i].clear();
    }

    // Stage 1: scores, one rotation block at a time.
    for (int r0 = 0; r0 < R; r0 += rb) {
      const int r1 = std::min(R, r0 + rb);
#pragma omp single
      {
        const double t0 = omp_get_wtime();
        for (int r = r0; r < r1; ++r) {
          bool any = pb.rot_mask == nullptr;
          for (int i = 0; i < N && !any; ++i) any = pb.rot_mask[static_cast<std::size_t>(i) * R + r] != 0;
          needed[r - r0] = any;
        }
        t_rot -= t0;
      }
#pragma omp for schedule(dynamic)
      for (int q = 0; q < K * (r1 - r0); ++q) {
        const int k = q / (r1 - r0), r = r0 + q % (r1 - r0);
        if (!needed[r - r0]) continue;
        cfloat* out_kr = rotated.data() + (static_cast<std::size_t>(k) * rb + (r - r0)) * J;
        gather(pb.refs + static_cast<std::size_t>(k) * half_P, g, pb.rotations + 9 * static_cast<std::size_t>(r), ws,
               out_kr);
        if (cache_norms)
          for (int gi = 0; gi < pb.G; ++gi)
            norm_cache[(static_cast<std::size_t>(k) * rb + (r - r0)) * pb.G + gi] =
                weighted_norm(ws.hweight.data(), group_w.data() + static_cast<std::size_t>(gi) * J, out_kr, J);
      }
#pragma omp single
      {
        const double t1 = omp_get_wtime();
        t_rot += t1;
        t_score -= t1;
      }
#pragma omp for schedule(dynamic)
      for (int i = 0; i < N; ++i) {
        const ParticleData& d = pdata[i];
        Candidates& c = cands[i];
        for (int k = 0; k < K; ++k) {
          const double la = pb.log_alpha[k];
          if (!(la > -std::numeric_limits<double>::infinity())) continue;  // alpha_k = 0
          for (int r = r0; r < r1; ++r) {
            if (pb.rot_mask && !pb.rot_mask[static_cast<std::size_t>(i) * R + r]) continue;
            const cfloat* ref = rotated.data() + (static_cast<std::size_t>(k) * rb + (r - r0)) * J;
            // Z = w X conj(R A), written sequentially run by run (c2r destroys its input).
            {
              std::size_t pos = 0;
              cfloat* z = cbuf.get();
              const cfloat* a = d.wx.data();
              for (const auto& run : ws.runs) {
                const std::size_t st = static_cast<std::size_t>(run.start);
                if (st > pos) std::memset(static_cast<void*>(z + pos), 0, sizeof(cfloat) * (st - pos));
                cfloat* dst = z + st;
                const cfloat* aa = a + run.j0;
                const cfloat* bb = ref + run.j0;
                for (std::int32_t q = 0; q < run.len; ++q) dst[q] = aa[q] * std::conj(bb[q]);
                pos = st + run.len;
              }
              if (pos < half_n) std::memset(static_cast<void*>(z + pos), 0, sizeof(cfloat) * (half_n - pos));
            }
            double ref_norm = 0, ref_dc = 0, cross_dc = 0;
            if (cache_norms) {
              ref_norm = norm_cache[(static_cast<std::size_t>(k) * rb + (r - r0)) * pb.G + pb.group[i]];
            } else {
              ref_norm = weighted_norm(ws.hweight.data(), d.w.data(), ref, J);
            }
            if (cc_mode) {
              // DC is the first component of the working set (index 0).
              ref_dc = d.w[0] * std::norm(ref[0]);
              cross_dc = (d.wx[0] * std::conj(ref[0])).real();
            }
            plan.c2r(cbuf.get(), rbuf.get());
            samples += T;
            const std::int32_t kr = k * R + r;
            if (!cc_mode) {
              float mx = kNegInf;
              for (int t = 0; t < T; ++t) {
                const double s = ref_norm - 2.0 * rbuf[tidx[t]];
                const float L = static_cast<float>(la + pb.log_prior_shift[t] - s * inv2s2);
                scores[t] = L;
                mx = std::max(mx, L);
              }
              if (mx > c.run_best) c.run_best = mx;
              if (mx < c.run_best + log_prune) {
                ++maps_pruned;
                continue;
              }
              c.kr.push_back(kr);
              c.best.push_back(mx);
              c.maps.insert(c.maps.end(), scores.begin(), scores.end());
              if (c.kr.size() >= c.compact_at) c.compact(log_prune, T);
            } else {
              const double denom = std::sqrt(std::max(1e-300, d.x_norm_nodc * (ref_norm - ref_dc)));
              for (int t = 0; t < T; ++t) {
                const double cc = (rbuf[tidx[t]] - cross_dc) / denom;
                if (cc > c.run_best) {
                  c.run_best = static_cast<float>(cc);
                  c.cc_kr = kr;
                  c.cc_t = t;
                  c.cc_s = static_cast<float>(ref_norm - 2.0 * rbuf[tidx[t]]);
                }
              }
            }
          }
        }
      }
#pragma omp single
      t_score += omp_get_wtime();
    }

    // Stage 2: posteriors of each particle (log-sum-exp with the maximum subtracted).
#pragma omp single
    t_acc -= omp_get_wtime();
#pragma omp for schedule(dynamic)
    for (int i = 0; i < N; ++i) {
      const ParticleData& d = pdata[i];
      Candidates& c = cands[i];
      int best_k = -1, best_r = -1, best_t = -1;
      double best_p = 0, log_sum = -std::numeric_limits<double>::infinity();
      std::int64_t nsig = 0;
      if (cc_mode) {
        if (c.cc_kr >= 0) {
          best_k = c.cc_kr / R;
          best_r = c.cc_kr % R;
          best_t = c.cc_t;
          best_p = 1;
          nsig = 1;
          log_sum = c.run_best;
        }
      } else if (!c.kr.empty()) {
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
            ++nsig;
            if (L[t] > best_L) {
              best_L = L[t];
              best_k = c.kr[q] / R;
              best_r = c.kr[q] % R;
              best_t = t;
            }
          }
        }
        c.total = total;
        best_p = std::exp(best_L - Lmax) / total;
        log_sum = Lmax + std::log(total) - d.x_norm * inv2s2;
      }
      kept += nsig;
      out.best_class[i] = best_k;
      out.best_rot[i] = best_r;
      out.best_shift[i] = best_t;
      out.max_post[i] = best_p;
      out.n_significant[i] = nsig;
      out.log_sum[i] = log_sum;
      out.x_norm[i] = d.x_norm;
      out.n_observed[i] = d.n_obs;
    }

    // Who contributes to which (class, rotation), particles in ascending order.
#pragma omp single
    {
      std::fill(kr_start.begin(), kr_start.end(), 0);
      for (int i = 0; i < N; ++i) {
        const Candidates& c = cands[i];
        if (cc_mode) {
          if (c.cc_kr >= 0) ++kr_start[c.cc_kr + 1];
          continue;
        }
        const double thr = c.run_best + log_prune;
        for (std::size_t q = 0; q < c.kr.size(); ++q)
          if (c.best[q] >= thr) ++kr_start[c.kr[q] + 1];
      }
      for (std::size_t q = 1; q < kr_start.size(); ++q) kr_start[q] += kr_start[q - 1];
      entries.resize(kr_start.back());
      std::vector<std::int64_t> fill(kr_start.begin(), kr_start.end() - 1);
      for (int i = 0; i < N; ++i) {
        const Candidates& c = cands[i];
        if (cc_mode) {
          if (c.cc_kr >= 0) entries[fill[c.cc_kr]++] = Entry{i, -1};
          continue;
        }
        const double thr = c.run_best + log_prune;
        for (std::size_t q = 0; q < c.kr.size(); ++q)
          if (c.best[q] >= thr) entries[fill[c.kr[q]]++] = Entry{i, static_cast<std::int32_t>(q)};
      }
    }

    // Stage 3: weighted sums. Each (class, rotation) sums its particles in the particle frame
    // and is scattered into the reference once. Static round-robin schedule: which thread adds
    // what, and in which order, depends only on the sizes and the thread count.
    cdouble* S_t = accS[tid].data();
    double* M_t = accM[tid].data();
    double* F_t = accF[tid].data();
    std::vector<cdouble> ysum(J);
    std::vector<double> msum(J);
#pragma omp for schedule(static, 1)
    for (int kr = 0; kr < K * R; ++kr) {
      const std::int64_t e0 = kr_start[kr], e1 = kr_start[kr + 1];
      if (e0 == e1) continue;
      const int k = kr / R, r = kr % R;
      std::fill(ysum.begin(), ysum.end(), cdouble(0, 0));
      std::fill(msum.begin(), msum.end(), 0.0);
      double pfull = 0;
      for (std::int64_t e = e0; e < e1; ++e) {
        const int i = entries[e].particle;
        const ParticleData& d = pdata[i];
        const Candidates& c = cands[i];
        double pkr = 0, pd2 = 0, pt2 = 0;
        int nkept = 0;
        if (cc_mode) {
          std::fill(post.begin(), post.end(), 0.0);
          post[c.cc_t] = 1;
          pkr = 1;
          pd2 = d.x_norm + c.cc_s;
          pt2 = t2[c.cc_t];
          nkept = 1;
        } else {
          const double Lmax = c.run_best, thr = Lmax + log_prune;
          const float* L = &c.maps[static_cast<std::size_t>(entries[e].cand) * T];
          for (int t = 0; t < T; ++t) {
            if (L[t] >= thr) {
              const double p = std::exp(L[t] - Lmax) / c.total;
              post[t] = p;
              pkr += p;
              const double s = 2.0 * pb.sigma2 * (pb.log_alpha[k] + pb.log_prior_shift[t] - L[t]);
              pd2 += p * (d.x_norm + s);
              pt2 += p * t2[t];
              ++nkept;
            } else {
              post[t] = 0;
            }
          }
        }
        accW[tid][k] += pkr;
        pfull += pkr;
        accSums[tid][0] += pd2;
        accSums[tid][1] += pt2;
        // phi_j = sum_t P_t exp(+2 pi i k_j . t / n) undoes the shifts.
        if (nkept <= direct_max) {
          std::fill(phi.begin(), phi.end(), std::complex<double>(0, 0));
          for (int t = 0; t < T; ++t) {
            if (post[t] == 0) continue;
            if (!phase_table.empty()) {
              const cfloat* E = &phase_table[static_cast<std::size_t>(t) * J];
              for (std::size_t j = 0; j < J; ++j) phi[j] += post[t] * std::complex<double>(E[j].real(), E[j].imag());
            } else {
              const int sx = pb.shifts[3 * t], sy = pb.shifts[3 * t + 1], sz = pb.shifts[3 * t + 2];
              for (std::size_t j = 0; j < J; ++j) {
                const int m = ((ws.kx[j] * sx + ws.ky[j] * sy + ws.kz[j] * sz) % n + n) % n;
                phi[j] += post[t] * phase[m];
              }
            }
          }
        } else {
          std::memset(rbuf.get(), 0, sizeof(float) * real_n);
          for (int t = 0; t < T; ++t) rbuf[tidx[t]] += static_cast<float>(post[t]);
          plan.r2c(rbuf.get(), cbuf.get());
          for (std::size_t j = 0; j < J; ++j) {
            const cfloat f = cbuf[ws.index[j]];
            phi[j] = std::complex<double>(f.real(), -f.imag());
          }
        }
        for (std::size_t j = 0; j < J; ++j) {
          ysum[j] += phi[j] * std::complex<double>(d.wx[j].real(), d.wx[j].imag());
          msum[j] += pkr * d.w[j];
        }
      }
      const std::size_t off = static_cast<std::size_t>(k) * half_P;
      scatter(ysum.data(), msum.data(), pfull, g, pb.rotations + 9 * static_cast<std::size_t>(r), ws, S_t + off,
              M_t + off, F_t + off);
    }
#pragma omp single
    t_acc += omp_get_wtime();
  }

  // Fixed-order reduction into the caller's accumulators.
  for (int tid = 0; tid < nt; ++tid) {
    for (int k = 0; k < K; ++k) out.W[k] += accW[tid][k];
    out.sums[0] += accSums[tid][0];
    out.sums[1] += accSums[tid][1];
  }
  for (int k = 0; k < K; ++k) {
    const std::size_t off = static_cast<std::size_t>(k) * half_P;
    std::vector<cdouble> s(half_P, cdouble(0, 0));
    std::vector<double> m(half_P, 0.0), f(half_P, 0.0);
    for (int tid = 0; tid < nt; ++tid) {
      const cdouble* a = accS[tid].data() + off;
      const double* b = accM[tid].data() + off;
      const double* c = accF[tid].data() + off;
      for (std::size_t q = 0; q < half_P; ++q) {
        s[q] += a[q];
        m[q] += b[q];
        f[q] += c[q];
      }
    }
    fold_x0_plane(g, s.data(), m.data());
    fold_x0_plane(g, f.data());
    for (std::size_t q = 0; q < half_P; ++q) {
      out.S[off + q] += s[q];
      out.M[off + q] += m[q];
      out.Mfull[off + q] += f[q];
    }
  }
  cnt.samples = samples;
  cnt.kept = kept;
  cnt.maps_pruned = maps_pruned;
  cnt.seconds_rotate = t_rot;
  cnt.seconds_score = t_score;
  cnt.seconds_accumulate = t_acc;
  cnt.seconds_total = omp_get_wtime() - t_start;
  (void)error;
  return cnt;
}

}  // namespace mltomo
