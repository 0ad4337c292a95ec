// Stage 4 of the E-step: the weighted sums W_k, S_k, M_k, Mfull_k and the sigma / xi sums.
#include <omp.h>

#include "estep_state.hpp"

namespace mltomo {
namespace {

// One (particle, class, rotation)'s share of the sums: its kept P_t (in the thread's kept_t,
// kept_p), and its totals.
struct MapShare {
  double pkr = 0, pd2 = 0, pt2 = 0;
};

}  // namespace

// Who contributes to which (class, rotation), particles in ascending order. One thread.
void EStepPlan::index_contributions(EStepRun& run) {
  const bool cc_mode = s_.mode == ScoreMode::CrossCorrelation;
  const double log_prune = log_prune_of(s_);
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
  const double log_prune = log_prune_of(s_);
  ThreadScratch& th = run.scratch[omp_get_thread_num()];
  // P_t of the map and its totals; d^2 = sum w|X|^2 + 2 sigma^2 (log alpha + log p(t) - L).
  auto share = [&](int i, const ParticleData& d, const Candidates& c, int k, std::int32_t cand) {
    MapShare m;
    th.kept_t.clear();
    th.kept_p.clear();
    if (cc_mode) {
      th.kept_t.push_back(c.cc_t);
      th.kept_p.push_back(1.0);
      return MapShare{1, d.x_norm + c.cc_s, t2_[c.cc_t]};
    }
    const double Lmax = c.run_best, thr = Lmax + log_prune;
    const float* L = &c.maps[static_cast<std::size_t>(cand) * T];
    for (int t = 0; t < T; ++t) {
      if (L[t] < thr) continue;
      const double p = std::exp(L[t] - Lmax) / c.total;
      th.kept_t.push_back(t);
      th.kept_p.push_back(p);
      m.pkr += p;
      const double s = 2.0 * s_.sigma2 * ((class_prior(run.batch, i, k) + s_.log_prior_shift[t] - c.offset) - L[t]);
      m.pd2 += p * (d.x_norm + s);
      m.pt2 += p * t2_[t];
    }
    return m;
  };
#pragma omp for schedule(static, 1)
  for (int kr = 0; kr < s_.K * R; ++kr) {
    const std::int64_t e0 = run.kr_start[kr], e1 = run.kr_start[kr + 1];
    if (e0 == e1) continue;
    const int k = kr / R, r = kr % R;
    std::memset(th.ylay.get(), 0, sizeof(double) * back_->layout_size());
    double pfull = 0;
    for (std::int64_t e = e0; e < e1; ++e) {
      const int i = run.entries[e].particle;
      const MapShare m = share(i, run.pdata[i], run.cands[i], k, run.entries[e].cand);
      th.W[k] += m.pkr;
      pfull += m.pkr;
      th.scalars[0] += m.pd2;
      th.scalars[1] += m.pt2;
      back_shift(th, run.pdata[i]);
      const int g = run.batch.group[i];  // w_i is its group's mask: M sums the groups' masses
      if (!th.gflag[g]) {
        th.gflag[g] = 1;
        th.gtouched.push_back(g);
      }
      th.gsum[g] += m.pkr;
    }
    std::fill(th.msum.begin(), th.msum.end(), 0.0);
    for (const int g : th.gtouched) {
      const float* mask = s_.masks + static_cast<std::size_t>(g) * aw.half_size();
      const double pg = th.gsum[g];
      for (std::size_t j = 0; j < J; ++j) th.msum[j] += pg * mask[aw.index[j]];
      th.gsum[g] = 0;
      th.gflag[g] = 0;
    }
    th.gtouched.clear();
    back_->from_layout(th.ylay.get(), th.ysum.data());
    const std::size_t off = static_cast<std::size_t>(k) * half_P;
    scatter_interleaved(th.ysum.data(), th.msum.data(), pfull, s_.grid, s_.rotations + 9 * static_cast<std::size_t>(r),
                        aw, th.smf.data() + 4 * off);
  }
#pragma omp single
  run.t_acc += omp_get_wtime();
}

// ylay += phi (w X) for the thread's kept shifts, phi_j = sum_t P_t exp(+2 pi i k_j.t/n) (undoes
// the shifts): the separable sum for a map with few kept shifts, one forward FFT of the posterior
// map otherwise.
void EStepPlan::back_shift(ThreadScratch& th, const ParticleData& d) const {
  const int nkept = static_cast<int>(th.kept_t.size());
  if (back_->separable_is_cheaper(nkept)) {
    back_->add_shifted(th.kept_t.data(), th.kept_p.data(), nkept, d.bwx.get(), th.ylay.get(), th.bscratch.get());
    return;
  }
  std::memset(th.rbuf.get(), 0, sizeof(float) * fft_.real_size());
  for (int q = 0; q < nkept; ++q) th.rbuf[tidx_[th.kept_t[q]]] += static_cast<float>(th.kept_p[q]);
  fft_.r2c(th.rbuf.get(), th.cbuf.get());
  back_->add_spectrum(th.cbuf.get(), d.bwx.get(), th.ylay.get());
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
      const double* a = th.smf.data() + 4 * off;
      for (std::size_t q = 0; q < half_P; ++q) {
        s[q] += cdouble(a[4 * q], a[4 * q + 1]);
        m[q] += a[4 * q + 2];
        f[q] += a[4 * q + 3];
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
