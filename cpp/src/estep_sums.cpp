// Stage 4 of the E-step: the weighted sums W_k, S_k, M_k, Mfull_k and the sigma / xi sums.
#include <omp.h>

#include "estep_state.hpp"

namespace mltomo {
namespace {

// A translation map with at most this many kept samples is back-shifted by direct phase sums;
// wider maps use one forward FFT.
constexpr int kDirectPhaseMax = 12;

// One (particle, class, rotation)'s share of the sums: P over t in `post`, and its totals.
struct MapShare {
  double pkr = 0, pd2 = 0, pt2 = 0;
  int nkept = 0;
};

}  // namespace

// Who contributes to which (class, rotation), particles in ascending order. One thread.
void EStepPlan::index_contributions(EStepRun& run) {
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = log_prune_of(s_.prune);
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

// Stage 4: weighted sums. Each (class, rotation) sums its particles in the particle frame and
// is scattered into the reference once. Static round-robin schedule: which thread adds what,
// and in which order, depends only on the sizes and the thread count.
void EStepPlan::weighted_sums(EStepRun& run) {
  const int R = s_.R, T = s_.T;
  const WorkingSet& aw = acc_ws();
  const std::size_t J = aw.size(), half_P = s_.grid.half_size();
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = log_prune_of(s_.prune);
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
  std::vector<double>& post = th.post;
  // P_t of the map and its totals; d^2 = sum w|X|^2 + 2 sigma^2 (log alpha + log p(t) - L).
  auto share = [&](int i, const ParticleData& d, const Candidates& c, int k, std::int32_t cand) {
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
      const double s = 2.0 * s_.sigma2 * ((class_prior(run.batch, i, k) + s_.log_prior_shift[t] - c.offset) - L[t]);
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
      const int i = run.entries[e].particle;
      const MapShare m = share(i, run.pdata[i], run.cands[i], k, run.entries[e].cand);
      const ParticleData& d = run.pdata[i];
      th.W[k] += m.pkr;
      pfull += m.pkr;
      th.scalars[0] += m.pd2;
      th.scalars[1] += m.pt2;
      back_shift_phases(th, m.nkept);
      const cfloat* wx = d.sum_wx();
      const float* w = d.sum_w();
      for (std::size_t j = 0; j < J; ++j) {
        th.ysum[j] += th.phi[j] * std::complex<double>(wx[j].real(), wx[j].imag());
        th.msum[j] += m.pkr * w[j];
      }
    }
    const std::size_t off = static_cast<std::size_t>(k) * half_P;
    scatter(th.ysum.data(), th.msum.data(), pfull, s_.grid, s_.rotations + 9 * static_cast<std::size_t>(r), aw,
            th.S.data() + off, th.M.data() + off, th.F.data() + off);
  }
#pragma omp single
  run.t_acc += omp_get_wtime();
}

// phi_j = sum_t P_t exp(+2 pi i k_j . t / n), which undoes the shifts: direct phase sums for a
// map with few kept shifts, one forward FFT of the posterior map otherwise.
void EStepPlan::back_shift_phases(ThreadScratch& th, int nkept) const {
  const WorkingSet& aw = acc_ws();
  const std::size_t J = aw.size();
  const int n = s_.n, T = s_.T;
  const int direct_max = phase_table_.empty() ? 1 : kDirectPhaseMax;
  auto& phi = th.phi;
  if (nkept > direct_max) {
    std::memset(th.rbuf.get(), 0, sizeof(float) * fft_.real_size());
    for (int t = 0; t < T; ++t) th.rbuf[tidx_[t]] += static_cast<float>(th.post[t]);
    fft_.r2c(th.rbuf.get(), th.cbuf.get());
    for (std::size_t j = 0; j < J; ++j) {
      const cfloat f = th.cbuf[aw.index[j]];
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
      const int m = ((aw.kx[j] * sx + aw.ky[j] * sy + aw.kz[j] * sz) % n + n) % n;
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

}  // namespace mltomo
