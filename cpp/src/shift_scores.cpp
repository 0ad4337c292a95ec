// The pruned, separable inverse transform of mltomo/shift_scores.hpp.
#include "mltomo/shift_scores.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd8.hpp"

namespace mltomo {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr int kL = ShiftScorer::kLanes, kV = ShiftScorer::kVec;
// A c2r of N points costs about this many of plan_cost()'s units per N log2 N (calibrated
// with bench/bench_kernel.py against the system FFTW).
constexpr double kFftCostPerPoint = 0.4;

using simd8::load;
using simd8::store;
using simd8::v8;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// ky = 0, +1, -1, +2, -2, ... -> 0, 1, 2, 3, 4, ...
int ky_group(int ky) { return ky == 0 ? 0 : (ky > 0 ? 2 * ky - 1 : -2 * ky); }

// out[s] (s in [s0, s0 + NU), complex vectors) = init + sum_{a=1..L} tab[a][s] in[a-1], with
// init the vector c0 or zero.
template <int NU>
MLTOMO_INLINE void chunk(const float* c0, const float* in, int L, const float* tab, int ld, int s0, float* out) {
  v8 ar[NU], ai[NU];
  const v8 zero = {};
  for (int u = 0; u < NU; ++u) {
    ar[u] = c0 ? load(c0) : zero;
    ai[u] = c0 ? load(c0 + kL) : zero;
  }
  for (int a = 1; a <= L; ++a) {
    const v8 pr = load(in + (a - 1) * kV), pi = load(in + (a - 1) * kV + kL);
    const float* t = tab + a * ld + s0;
    for (int u = 0; u < NU; ++u) {
      ar[u] += t[u] * pr;
      ai[u] += t[u] * pi;
    }
  }
  for (int u = 0; u < NU; ++u) {
    store(out + (s0 + u) * kV, ar[u]);
    store(out + (s0 + u) * kV + kL, ai[u]);
  }
}

// chunk() for every s in [s0, s1), four at a time (the accumulators stay in registers).
MLTOMO_INLINE void sums(const float* c0, const float* in, int L, const float* tab, int ld, int s0, int s1, float* out) {
  int s = s0;
  for (; s + 4 <= s1; s += 4) chunk<4>(c0, in, L, tab, ld, s, out);
  switch (s1 - s) {
    case 3: chunk<3>(c0, in, L, tab, ld, s, out); break;
    case 2: chunk<2>(c0, in, L, tab, ld, s, out); break;
    case 1: chunk<1>(c0, in, L, tab, ld, s, out); break;
    default: break;
  }
}

// One symmetric contraction: out(+-s) = C_s +- i S_s for s = 0..m, with
// C_s = c0 + sum_a cos(a s) P_a and S_s = sum_a sin(a s) M_a (P_a = f(a) + f(-a), M_a = f(a) - f(-a)),
// written at dst + (m +- s) * stride. C and S are scratch of (m + 1) vectors each.
MLTOMO_INLINE void pair_transform(const float* c0, const float* P, const float* M, int L, const float* ct, const float* st, int m,
                    float* dst, std::size_t stride, float* C, float* S) {
  sums(c0, P, L, ct, m + 1, 0, m + 1, C);
  sums(nullptr, M, L, st, m + 1, 1, m + 1, S);
  std::memcpy(dst + m * stride, C, sizeof(float) * kV);
  for (int s = 1; s <= m; ++s) {
    const v8 cr = load(C + s * kV), ci = load(C + s * kV + kL);
    const v8 sr = load(S + s * kV), si = load(S + s * kV + kL);
    float* plus = dst + (m + s) * stride;
    float* minus = dst + (m - s) * stride;
    store(plus, cr - si);
    store(plus + kL, ci + sr);
    store(minus, cr + si);
    store(minus + kL, ci - sr);
  }
}

// (re, im) of x conj(r) for one complex vector of each.
MLTOMO_INLINE void cross(const float* x, const float* r, v8& re, v8& im) {
  const v8 xr = load(x), xi = load(x + kL), rr = load(r), ri = load(r + kL);
  re = xr * rr + xi * ri;
  im = xi * rr - xr * ri;
}

// (levels + 1, m + 1) tables of cos and sin(2 pi a s / n), sin scaled by `sign`.
void trig_tables(int n, int levels, int m, std::vector<float>& c, std::vector<float>& s) {
  c.assign(static_cast<std::size_t>(levels + 1) * (m + 1), 0.f);
  s.assign(c.size(), 0.f);
  for (int a = 0; a <= levels; ++a)
    for (int u = 0; u <= m; ++u) {
      const double ph = kTwoPi * ((static_cast<long long>(a) * u) % n) / n;
      c[a * (m + 1) + u] = static_cast<float>(std::cos(ph));
      s[a * (m + 1) + u] = static_cast<float>(std::sin(ph));
    }
}

}  // namespace

ShiftScorer::ShiftScorer(const FrequencyList& f, const std::int32_t* shifts, int T) : n_(f.n), T_(T) {
  require(f.n >= 2 && f.J >= 1 && T >= 1 && f.kx && f.ky && f.kz && f.hweight && shifts,
          "shift scorer: empty working set or shift list");
  for (int t = 0; t < T; ++t) {
    mx_ = std::max(mx_, std::abs(shifts[3 * t]));
    my_ = std::max(my_, std::abs(shifts[3 * t + 1]));
    mz_ = std::max(mz_, std::abs(shifts[3 * t + 2]));
  }
  x8_ = (2 * mx_ + 1 + kL - 1) / kL * kL;
  plan_blocks(f);
  plan_tables(f, shifts);
  const int nz = 2 * mz_ + 1, ny = 2 * my_ + 1;
  const std::size_t tmp = kV * (1 + 2 * static_cast<std::size_t>(lmax_) + 2 * (std::max(mz_, my_) + 1));
  scratch_size_ = kV * (static_cast<std::size_t>(nz) * (nb1_ + 1) + static_cast<std::size_t>(nz) * ny * nb2_) +
                  static_cast<std::size_t>(nz) * ny * x8_ + tmp;
  plan_cost();
}

// The stage-1 blocks (ky, 8 kx), ordered by kx block then ky = 0, +1, -1, ..., their levels,
// and each component's slot in kernel order.
void ShiftScorer::plan_blocks(const FrequencyList& f) {
  int kxmax = 0, kymax = 0;
  for (std::size_t j = 0; j < f.J; ++j) {
    require(f.kx[j] >= 0, "shift scorer: the working set must be a half spectrum (kx >= 0)");
    kxmax = std::max(kxmax, f.kx[j]);
    kymax = std::max(kymax, std::abs(f.ky[j]));
  }
  nb2_ = kxmax / kL + 1;
  ky_groups_ = 2 * kymax + 1;
  const int G = ky_groups_;
  std::vector<int> len(static_cast<std::size_t>(G) * nb2_, -1), id(len.size(), -1);  // max |kz|, -1 absent
  for (std::size_t j = 0; j < f.J; ++j) {
    int& l = len[static_cast<std::size_t>(ky_group(f.ky[j])) * nb2_ + f.kx[j] / kL];
    l = std::max(l, std::abs(f.kz[j]));
  }
  std::size_t off = 0;
  b2_len_.assign(nb2_, 0);
  for (int b2 = 0; b2 < nb2_; ++b2)
    for (int g = 0; g < G; ++g) {
      const int l = len[static_cast<std::size_t>(g) * nb2_ + b2];
      if (l < 0) continue;
      id[static_cast<std::size_t>(g) * nb2_ + b2] = nb1_++;
      b1_len_.push_back(l);
      b1_off_.push_back(static_cast<std::int32_t>(off));
      off += kV * (1 + 2 * static_cast<std::size_t>(l));
      b2_len_[b2] = std::max(b2_len_[b2], (g + 1) / 2);
      lmax_ = std::max({lmax_, l, (g + 1) / 2});
    }
  layout_size_ = off;
  b2_src_.assign(static_cast<std::size_t>(nb2_) * G, nb1_);  // nb1_: the zero block
  for (int b2 = 0; b2 < nb2_; ++b2)
    for (int g = 0; g < G; ++g)
      if (id[static_cast<std::size_t>(g) * nb2_ + b2] >= 0)
        b2_src_[static_cast<std::size_t>(b2) * G + g] = id[static_cast<std::size_t>(g) * nb2_ + b2];
  slot_.resize(f.J);
  std::vector<std::uint8_t> seen(layout_size_, 0);
  for (std::size_t j = 0; j < f.J; ++j) {
    const int b = id[static_cast<std::size_t>(ky_group(f.ky[j])) * nb2_ + f.kx[j] / kL], kz = f.kz[j];
    const int level = kz == 0 ? 0 : (kz > 0 ? 2 * kz - 1 : -2 * kz);
    slot_[j] = b1_off_[b] + level * kV + f.kx[j] % kL;
    require(!seen[slot_[j]]++, "shift scorer: a frequency appears twice in the working set");
  }
}

// Trigonometric tables of the three contractions (the kx one carries the multiplicity h) and
// where each shift sits in the output box.
void ShiftScorer::plan_tables(const FrequencyList& f, const std::int32_t* shifts) {
  const int n = n_;
  int lz = 0;
  for (int l : b1_len_) lz = std::max(lz, l);
  trig_tables(n, lz, mz_, cz_, sz_);
  trig_tables(n, (ky_groups_ - 1) / 2, my_, cy_, sy_);
  std::vector<float> h(static_cast<std::size_t>(nb2_) * kL, 0.f);
  for (std::size_t j = 0; j < f.J; ++j) {
    float& hk = h[f.kx[j]];
    require(hk == 0 || hk == f.hweight[j], "shift scorer: the multiplicity must depend on kx only");
    hk = f.hweight[j];
  }
  hc_.assign(h.size() * x8_, 0.f);
  hs_.assign(h.size() * x8_, 0.f);
  for (std::size_t kx = 0; kx < h.size(); ++kx)
    for (int xi = 0; xi <= 2 * mx_; ++xi) {
      const long long m = (static_cast<long long>(kx) * (xi - mx_) % n + n) % n;
      const double ph = kTwoPi * m / n;
      hc_[kx * x8_ + xi] = static_cast<float>(h[kx] * std::cos(ph));
      hs_[kx * x8_ + xi] = static_cast<float>(-h[kx] * std::sin(ph));
    }
  box_index_.resize(T_);
  for (int t = 0; t < T_; ++t)
    box_index_[t] = ((shifts[3 * t + 2] + mz_) * (2 * my_ + 1) + (shifts[3 * t + 1] + my_)) * x8_ + shifts[3 * t] + mx_;
}

// Vector multiply-adds per sample (one v8 FMA = 1): stage 1 (cross spectrum, pairs, 2m_z+1
// sums per level and part), stage 2 (the same per z and |ky| level) and stage 3.
void ShiftScorer::plan_cost() {
  const double nz = 2 * mz_ + 1, ny = 2 * my_ + 1;
  double c = 0;
  for (int l : b1_len_) c += l * (10 + 2 * nz) + 2 * nz + 4;
  for (int l : b2_len_) c += nz * (l * (2 + 2 * ny) + 2 * ny);
  c += nz * ny * nb2_ * kL * (x8_ / kL) * 2.0;
  cost_ = c;
}

void ShiftScorer::to_layout(const cfloat* v, float* out) const {
  std::memset(out, 0, sizeof(float) * layout_size_);
  for (std::size_t j = 0; j < slot_.size(); ++j) {
    out[slot_[j]] = v[j].real();
    out[slot_[j] + kL] = v[j].imag();
  }
}

// Y(z; block) for every stage-1 block: the cross spectrum, paired +-kz, contracted over kz.
void ShiftScorer::stage1(const float* wx, const float* ref, float* Y, float* tmp) const {
  const std::size_t stride = static_cast<std::size_t>(nb1_ + 1) * kV;
  for (int zi = 0; zi <= 2 * mz_; ++zi) std::memset(Y + zi * stride + nb1_ * kV, 0, sizeof(float) * kV);
  float *c0 = tmp, *P = c0 + kV, *M = P + lmax_ * kV, *C = M + lmax_ * kV;
  float* S = C + (std::max(mz_, my_) + 1) * kV;
  for (int b = 0; b < nb1_; ++b) {
    const float *x = wx + b1_off_[b], *r = ref + b1_off_[b];
    v8 re, im, vr, vi;
    cross(x, r, re, im);
    store(c0, re);
    store(c0 + kL, im);
    const int L = b1_len_[b];
    for (int a = 1; a <= L; ++a) {
      cross(x + (2 * a - 1) * kV, r + (2 * a - 1) * kV, re, im);
      cross(x + 2 * a * kV, r + 2 * a * kV, vr, vi);
      store(P + (a - 1) * kV, re + vr);
      store(P + (a - 1) * kV + kL, im + vi);
      store(M + (a - 1) * kV, re - vr);
      store(M + (a - 1) * kV + kL, im - vi);
    }
    pair_transform(c0, P, M, L, cz_.data(), sz_.data(), mz_, Y + b * kV, stride, C, S);
  }
}

// V(z, y; kx block): for every z, the stage-1 blocks of ky = +-a paired and contracted over ky.
void ShiftScorer::stage2(const float* Y, float* V, float* tmp) const {
  const std::size_t ys = static_cast<std::size_t>(nb1_ + 1) * kV, vs = static_cast<std::size_t>(nb2_) * kV;
  const int ny = 2 * my_ + 1;
  float *P = tmp + kV, *M = P + lmax_ * kV, *C = M + lmax_ * kV;
  float* S = C + (std::max(mz_, my_) + 1) * kV;
  for (int b2 = 0; b2 < nb2_; ++b2) {
    const std::int32_t* src = &b2_src_[static_cast<std::size_t>(b2) * ky_groups_];
    const int L = b2_len_[b2];
    for (int zi = 0; zi <= 2 * mz_; ++zi) {
      const float* Yz = Y + zi * ys;
      for (int a = 1; a <= L; ++a) {
        const float *u = Yz + src[2 * a - 1] * kV, *v = Yz + src[2 * a] * kV;
        for (int h = 0; h < kV; h += kL) {
          store(P + (a - 1) * kV + h, load(u + h) + load(v + h));
          store(M + (a - 1) * kV + h, load(u + h) - load(v + h));
        }
      }
      pair_transform(Yz + src[0] * kV, P, M, L, cy_.data(), sy_.data(), my_,
                     V + (static_cast<std::size_t>(zi) * ny * nb2_ + b2) * kV, vs, C, S);
    }
  }
}

// c(x, y, z) = sum_kx h Re(V e^{i 2 pi kx x / n}) on every (z, y) line, vectorised over x.
void ShiftScorer::stage3(const float* V, float* box) const {
  const int lines = (2 * mz_ + 1) * (2 * my_ + 1);
  for (int line = 0; line < lines; ++line) {
    const float* lv = V + static_cast<std::size_t>(line) * nb2_ * kV;
    for (int xv = 0; xv < x8_; xv += kL) {
      v8 acc = {};
      for (int b2 = 0; b2 < nb2_; ++b2)
        for (int l = 0; l < kL; ++l) {
          const std::size_t row = static_cast<std::size_t>(b2 * kL + l) * x8_ + xv;
          acc += lv[b2 * kV + l] * load(&hc_[row]) + lv[b2 * kV + kL + l] * load(&hs_[row]);
        }
      store(box + static_cast<std::size_t>(line) * x8_ + xv, acc);
    }
  }
}

void ShiftScorer::score(const float* wx, const float* ref, float* scratch, float* cross) const {
  const int nz = 2 * mz_ + 1, ny = 2 * my_ + 1;
  float* Y = scratch;
  float* V = Y + static_cast<std::size_t>(nz) * (nb1_ + 1) * kV;
  float* box = V + static_cast<std::size_t>(nz) * ny * nb2_ * kV;
  float* tmp = box + static_cast<std::size_t>(nz) * ny * x8_;
  stage1(wx, ref, Y, tmp);
  stage2(Y, V, tmp);
  stage3(V, box);
  for (int t = 0; t < T_; ++t) cross[t] = box[box_index_[t]];
}

bool ShiftScorer::simd() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__) && !defined(MLTOMO_NO_CLONES)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

double ShiftScorer::fft_cost(int n) {
  const double N = double(n) * n * n;
  return kFftCostPerPoint * N * std::log2(N);
}

}  // namespace mltomo
