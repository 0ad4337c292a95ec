// The separable back-shift of mltomo/back_shift.hpp.
#include "mltomo/back_shift.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd8.hpp"

namespace mltomo {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr int kMaxLevels = 256;  // z-shift levels a call can track (2 mz + 1)

using simd8::load;
using simd8::store;
using simd8::v8;
typedef float v4 __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
// p[0..8) += v, in double.
MLTOMO_INLINE void add_to(double* p, v8 v) {
  const v4 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  v4d a, b;
  std::memcpy(&a, p, sizeof a);
  std::memcpy(&b, p + 4, sizeof b);
  a += __builtin_convertvector(lo, v4d);
  b += __builtin_convertvector(hi, v4d);
  std::memcpy(p, &a, sizeof a);
  std::memcpy(p + 4, &b, sizeof b);
}

// exp(+2 pi i m s / n) for s in [-h, h] (row s + h) and m in [0, len), real and imaginary parts.
void phase_rows(int n, int h, int len, std::vector<float>& re, std::vector<float>& im) {
  re.assign(static_cast<std::size_t>(2 * h + 1) * len, 0.f);
  im.assign(re.size(), 0.f);
  for (int s = -h; s <= h; ++s)
    for (int m = 0; m < len; ++m) {
      const long q = ((static_cast<long>(m) * s) % n + n) % n;  // exact argument reduction
      const double a = kTwoPi * static_cast<double>(q) / n;
      re[static_cast<std::size_t>(s + h) * len + m] = static_cast<float>(std::cos(a));
      im[static_cast<std::size_t>(s + h) * len + m] = static_cast<float>(std::sin(a));
    }
}

}  // namespace

BackShifter::BackShifter(const WorkingSet& ws, const std::int32_t* shifts, int T)
    : n_(ws.n), T_(T), index_(ws.index) {
  if (T < 1 || !shifts) throw std::invalid_argument("back-shift: no shifts");
  sx_.resize(T);
  sy_.resize(T);
  sz_.resize(T);
  for (int t = 0; t < T; ++t) {
    sx_[t] = shifts[3 * t];
    sy_[t] = shifts[3 * t + 1];
    sz_[t] = shifts[3 * t + 2];
    if (std::abs(sx_[t]) >= n_ / 2 || std::abs(sy_[t]) >= n_ / 2 || std::abs(sz_[t]) >= n_ / 2)
      throw std::invalid_argument("back-shift: shift outside the box");
    mx_ = std::max(mx_, std::abs(sx_[t]));
    my_ = std::max(my_, std::abs(sy_[t]));
    mz_ = std::max(mz_, std::abs(sz_[t]));
  }
  if (2 * mz_ + 1 > kMaxLevels) throw std::invalid_argument("back-shift: z-shift range too large");
  const int nh = n_ / 2 + 1;
  std::vector<std::uint8_t> y_used(n_, 0);
  for (const auto& run : ws.runs) {
    const std::int64_t row = run.start / nh;  // z * n + y; every run starts at kx = 0
    if (run.start % nh != 0) throw std::invalid_argument("back-shift: a run does not start at kx = 0");
    const int y = static_cast<int>(row % n_), z = static_cast<int>(row / n_);
    y_used[y] = 1;
    for (int kx0 = 0; kx0 < run.len; kx0 += kLanes) {
      chunks_.push_back(Chunk{run.j0 + kx0, std::min(kLanes, run.len - kx0), kx0, y, z});
      xp_ = std::max(xp_, kx0 + kLanes);
    }
  }
  for (int y = 0; y < n_; ++y)
    if (y_used[y]) rows_y_.push_back(y);
  phase_rows(n_, mx_, xp_, exr_, exi_);
  phase_rows(n_, my_, n_, eyr_, eyi_);
  phase_rows(n_, mz_, n_, ezr_, ezi_);
  scratch_size_ = static_cast<std::size_t>(2 * mz_ + 1) * n_ * xp_ * 2;
  // Products per kept shift (building the planes) against an r2c of the box (about
  // 2.5 N log2 N flops, N = n^3) and the per-component pass both paths share.
  const double plane = 4.0 * rows_y_.size() * xp_;
  const double N = double(n_) * n_ * n_;
  max_separable_ = std::max(8, static_cast<int>(2.5 * N * std::log2(N) / std::max(plane, 1.0)));
}

void BackShifter::to_layout(const cfloat* v, float* out) const {
  std::memset(out, 0, sizeof(float) * layout_size());
  for (std::size_t c = 0; c < chunks_.size(); ++c) {
    const Chunk& ch = chunks_[c];
    float* o = out + c * kVec;
    for (int l = 0; l < ch.len; ++l) {
      o[l] = v[ch.j0 + l].real();
      o[kLanes + l] = v[ch.j0 + l].imag();
    }
  }
}

void BackShifter::from_layout(const double* y, std::complex<double>* out) const {
  for (std::size_t c = 0; c < chunks_.size(); ++c) {
    const Chunk& ch = chunks_[c];
    const double* v = y + c * kVec;
    for (int l = 0; l < ch.len; ++l) out[ch.j0 + l] = std::complex<double>(v[l], v[kLanes + l]);
  }
}

void BackShifter::add_shifted(const std::int32_t* kept, const double* p, int nkept, const float* wx, double* y,
                              float* scratch) const {
  const std::size_t plane_floats = static_cast<std::size_t>(xp_) * 2 * n_;
  std::int32_t used[kMaxLevels];
  int nused = 0;
  bool seen[kMaxLevels] = {};
  for (int q = 0; q < nkept; ++q) {
    const int lv = sz_[kept[q]] + mz_;
    if (seen[lv]) continue;
    seen[lv] = true;
    used[nused++] = lv;
    std::memset(scratch + lv * plane_floats, 0, sizeof(float) * plane_floats);
  }
  build_planes(kept, p, nkept, scratch);
  apply_planes(used, nused, wx, y, scratch);
}

// B_sz(ky, kx) += P_t ey(sy, ky) ex(sx, kx) for the kept shifts.
void BackShifter::build_planes(const std::int32_t* kept, const double* p, int nkept, float* scratch) const {
  const int nxc = xp_ / kLanes;
  const std::size_t row_floats = static_cast<std::size_t>(xp_) * 2, plane_floats = row_floats * n_;
  for (int q = 0; q < nkept; ++q) {
    const int t = kept[q];
    const float pt = static_cast<float>(p[q]);
    const float* xr = exr_.data() + static_cast<std::size_t>(sx_[t] + mx_) * xp_;
    const float* xi = exi_.data() + static_cast<std::size_t>(sx_[t] + mx_) * xp_;
    const float* yr = eyr_.data() + static_cast<std::size_t>(sy_[t] + my_) * n_;
    const float* yi = eyi_.data() + static_cast<std::size_t>(sy_[t] + my_) * n_;
    float* plane = scratch + (sz_[t] + mz_) * plane_floats;
    for (const int ky : rows_y_) {
      const float cr = pt * yr[ky], ci = pt * yi[ky];
      float* b = plane + ky * row_floats;
      for (int xc = 0; xc < nxc; ++xc) {
        const v8 er = load(xr + xc * kLanes), ei = load(xi + xc * kLanes);
        float* bc = b + xc * kVec;
        store(bc, load(bc) + cr * er - ci * ei);
        store(bc + kLanes, load(bc + kLanes) + cr * ei + ci * er);
      }
    }
  }
}

// phi = sum_sz ez(sz, kz) B_sz(ky, kx) over the used z levels; y += phi (w X).
void BackShifter::apply_planes(const std::int32_t* used, int nused, const float* wx, double* y,
                               const float* scratch) const {
  const std::size_t row_floats = static_cast<std::size_t>(xp_) * 2, plane_floats = row_floats * n_;
  for (std::size_t c = 0; c < chunks_.size(); ++c) {
    const Chunk& ch = chunks_[c];
    const std::size_t off = ch.y * row_floats + (ch.kx0 / kLanes) * kVec;
    v8 fr = {}, fi = {};
    for (int u = 0; u < nused; ++u) {
      const std::size_t lv = used[u];
      const float zr = ezr_[lv * n_ + ch.z], zi = ezi_[lv * n_ + ch.z];
      const float* b = scratch + lv * plane_floats + off;
      const v8 br = load(b), bi = load(b + kLanes);
      fr += zr * br - zi * bi;
      fi += zr * bi + zi * br;
    }
    const float* w = wx + c * kVec;
    const v8 wr = load(w), wi = load(w + kLanes);
    double* yc = y + c * kVec;
    add_to(yc, fr * wr - fi * wi);
    add_to(yc + kLanes, fr * wi + fi * wr);
  }
}

void BackShifter::add_spectrum(const cfloat* F, const float* wx, double* y) const {
  for (std::size_t c = 0; c < chunks_.size(); ++c) {
    const Chunk& ch = chunks_[c];
    const float* w = wx + c * kVec;
    double* yc = y + c * kVec;
    for (int l = 0; l < ch.len; ++l) {
      const cfloat f = F[index_[ch.j0 + l]];
      const double fr = f.real(), fi = -f.imag();  // phi = conj(F)
      yc[l] += fr * w[l] - fi * w[kLanes + l];
      yc[kLanes + l] += fr * w[kLanes + l] + fi * w[l];
    }
  }
}

}  // namespace mltomo
