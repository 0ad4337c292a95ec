#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "mltomo/interp.hpp"

namespace mltomo {
namespace {

struct Corner {
  std::int64_t base;  // flat index of the (x0, y0, z0) neighbour
  std::int64_t dy, dz;  // flat offsets to y0+1, z0+1 (wrapped)
  float fx, fy, fz;
  bool conj;
};

inline int wrap(int i, int P) { return i < 0 ? i + P : i; }

inline Corner locate(const PaddedGeometry& g, const double R[9], double kx, double ky, double kz) {
  // p = pad * R^T k
  double px = g.pad * (R[0] * kx + R[3] * ky + R[6] * kz);
  double py = g.pad * (R[1] * kx + R[4] * ky + R[7] * kz);
  double pz = g.pad * (R[2] * kx + R[5] * ky + R[8] * kz);
  Corner c;
  c.conj = px < 0;
  if (c.conj) {
    px = -px;
    py = -py;
    pz = -pz;
  }
  const int x0 = static_cast<int>(px);  // px >= 0
  const int y0 = static_cast<int>(std::floor(py));
  const int z0 = static_cast<int>(std::floor(pz));
  c.fx = static_cast<float>(px - x0);
  c.fy = static_cast<float>(py - y0);
  c.fz = static_cast<float>(pz - z0);
  const int P = g.P;
  const std::int64_t nh = P / 2 + 1;
  const int yy0 = wrap(y0, P), yy1 = wrap(y0 + 1, P);
  const int zz0 = wrap(z0, P), zz1 = wrap(z0 + 1, P);
  c.base = (static_cast<std::int64_t>(zz0) * P + yy0) * nh + x0;
  c.dy = static_cast<std::int64_t>(yy1 - yy0) * nh;
  c.dz = static_cast<std::int64_t>(zz1 - zz0) * P * nh;
  return c;
}

}  // namespace

void gather(const cfloat* grid, const PaddedGeometry& g, const double R[9], const WorkingSet& ws, cfloat* out) {
  // Blocks of components: locate them all and request their neighbours' lines, then
  // interpolate (the neighbours of consecutive components lie apart in the grid).
  constexpr std::size_t kBlock = 16;
  Corner cs[kBlock];
  const std::size_t J = ws.size();
  for (std::size_t j0 = 0; j0 < J; j0 += kBlock) {
    const std::size_t m = std::min(kBlock, J - j0);
    for (std::size_t u = 0; u < m; ++u) {
      const std::size_t j = j0 + u;
      cs[u] = locate(g, R, ws.kx[j], ws.ky[j], ws.kz[j]);
      const cfloat* b = grid + cs[u].base;
      __builtin_prefetch(b);
      __builtin_prefetch(b + cs[u].dy);
      __builtin_prefetch(b + cs[u].dz);
      __builtin_prefetch(b + cs[u].dz + cs[u].dy);
    }
    for (std::size_t u = 0; u < m; ++u) {
      const Corner& c = cs[u];
      const cfloat* b = grid + c.base;
      const float gx = 1.f - c.fx, gy = 1.f - c.fy, gz = 1.f - c.fz;
      const cfloat v00 = gx * b[0] + c.fx * b[1];
      const cfloat v10 = gx * b[c.dy] + c.fx * b[c.dy + 1];
      const cfloat v01 = gx * b[c.dz] + c.fx * b[c.dz + 1];
      const cfloat v11 = gx * b[c.dz + c.dy] + c.fx * b[c.dz + c.dy + 1];
      const cfloat v = gz * (gy * v00 + c.fy * v10) + c.fz * (gy * v01 + c.fy * v11);
      out[j0 + u] = c.conj ? std::conj(v) : v;
    }
  }
}

namespace {
// The 8 trilinear weights of a located sample and the offsets of its neighbours from c.base.
inline void corner_weights(const Corner& c, double w[8], std::int64_t off[8]) {
  const double fx = c.fx, fy = c.fy, fz = c.fz;
  w[0] = (1 - fx) * (1 - fy) * (1 - fz);
  w[1] = fx * (1 - fy) * (1 - fz);
  w[2] = (1 - fx) * fy * (1 - fz);
  w[3] = fx * fy * (1 - fz);
  w[4] = (1 - fx) * (1 - fy) * fz;
  w[5] = fx * (1 - fy) * fz;
  w[6] = (1 - fx) * fy * fz;
  w[7] = fx * fy * fz;
  const std::int64_t o[8] = {0, 1, c.dy, c.dy + 1, c.dz, c.dz + 1, c.dz + c.dy, c.dz + c.dy + 1};
  std::copy(o, o + 8, off);
}
}  // namespace

void scatter_interleaved(const cdouble* values, const double* weights, double full_weight, const PaddedGeometry& g,
                         const double R[9], const WorkingSet& ws, double* acc) {
  const std::size_t J = ws.size();
  // The accumulator is larger than the cache and the neighbours of consecutive components lie
  // apart in it: their lines are requested kAhead components early.
  constexpr std::size_t kAhead = 8;
  for (std::size_t j = 0; j < J; ++j) {
    if (j + kAhead < J) {
      const std::size_t a = j + kAhead;
      const Corner n = locate(g, R, ws.kx[a], ws.ky[a], ws.kz[a]);
      const double* b = acc + 4 * n.base;
      __builtin_prefetch(b, 1);
      __builtin_prefetch(b + 4 * n.dy, 1);
      __builtin_prefetch(b + 4 * n.dz, 1);
      __builtin_prefetch(b + 4 * (n.dz + n.dy), 1);
    }
    const double sf = ws.scatter_factor[j];
    if (sf == 0) continue;
    const Corner c = locate(g, R, ws.kx[j], ws.ky[j], ws.kz[j]);
    double w[8];
    std::int64_t off[8];
    corner_weights(c, w, off);
    cdouble v = values[j];
    if (c.conj) v = std::conj(v);
    const double vr = sf * v.real(), vi = sf * v.imag(), m = sf * weights[j], f = sf * full_weight;
    for (int q = 0; q < 8; ++q) {
      double* a = acc + 4 * (c.base + off[q]);
      a[0] += w[q] * vr;
      a[1] += w[q] * vi;
      a[2] += w[q] * m;
      a[3] += w[q] * f;
    }
  }
}

void fold_x0_plane(const PaddedGeometry& g, cdouble* accS, double* accM) {
  const int P = g.P;
  const std::int64_t nh = P / 2 + 1;
  std::vector<cdouble> s0;
  std::vector<double> m0;
  if (accS) s0.resize(static_cast<std::size_t>(P) * P);
  if (accM) m0.resize(static_cast<std::size_t>(P) * P);
  for (int z = 0; z < P; ++z)
    for (int y = 0; y < P; ++y) {
      const std::int64_t i = (static_cast<std::int64_t>(z) * P + y) * nh;
      if (accS) s0[static_cast<std::size_t>(z) * P + y] = accS[i];
      if (accM) m0[static_cast<std::size_t>(z) * P + y] = accM[i];
    }
  for (int z = 0; z < P; ++z)
    for (int y = 0; y < P; ++y) {
      const int mz = (P - z) % P, my = (P - y) % P;
      const std::int64_t i = (static_cast<std::int64_t>(z) * P + y) * nh;
      const std::size_t mi = static_cast<std::size_t>(mz) * P + my;
      if (accS) accS[i] += std::conj(s0[mi]);
      if (accM) accM[i] += m0[mi];
    }
}

void fold_x0_plane(const PaddedGeometry& g, double* acc) { fold_x0_plane(g, nullptr, acc); }

namespace {
void require_fits(const PaddedGeometry& g, double radius) {
  if (g.pad * radius + 1 > g.P / 2.0) throw std::invalid_argument("grid too small for pad and radius");
}
}  // namespace

void rotate_forward(const cfloat* grid, const PaddedGeometry& g, const double R[9], int n, double radius,
                    cfloat* out) {
  require_fits(g, radius);
  const WorkingSet ws = make_working_set(n, radius);
  std::vector<cfloat> vals(ws.size());
  gather(grid, g, R, ws, vals.data());
  std::fill(out, out + ws.half_size(), cfloat(0, 0));
  for (std::size_t j = 0; j < ws.size(); ++j) out[ws.index[j]] = vals[j];
}

void rotate_back(const cfloat* values, const float* weights, int n, double radius, double full_weight,
                 const PaddedGeometry& g, const double R[9], cdouble* S, double* M, double* Mfull) {
  require_fits(g, radius);
  const WorkingSet ws = make_working_set(n, radius);
  std::vector<cdouble> vals(ws.size());
  std::vector<double> wts(ws.size());
  for (std::size_t j = 0; j < ws.size(); ++j) {
    vals[j] = values[ws.index[j]];
    wts[j] = weights[ws.index[j]];
  }
  std::vector<double> acc(4 * g.half_size(), 0.0);
  scatter_interleaved(vals.data(), wts.data(), full_weight, g, R, ws, acc.data());
  std::vector<cdouble> s_tmp(g.half_size());
  std::vector<double> m_tmp(g.half_size()), f_tmp(Mfull ? g.half_size() : 0);
  for (std::size_t q = 0; q < g.half_size(); ++q) {
    s_tmp[q] = cdouble(acc[4 * q], acc[4 * q + 1]);
    m_tmp[q] = acc[4 * q + 2];
    if (Mfull) f_tmp[q] = acc[4 * q + 3];
  }
  fold_x0_plane(g, s_tmp.data(), m_tmp.data());
  if (Mfull) fold_x0_plane(g, f_tmp.data());
  for (std::size_t q = 0; q < g.half_size(); ++q) {
    S[q] += s_tmp[q];
    M[q] += m_tmp[q];
    if (Mfull) Mfull[q] += f_tmp[q];
  }
}

}  // namespace mltomo
