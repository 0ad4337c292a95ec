// Rotating references in Fourier space: trilinear interpolation in a padded half-spectrum
// grid (gather, "R_r A") and its exact adjoint (scatter, "R_r^{-1}").
//
// The padded grid holds a reference of the n^3 box transformed on a P^3 box, P = pad * n
// (zero-padded in real space), with the same unitary-n normalisation, so that grid point
// pad * k holds the reference's coefficient at integer frequency k. A particle-frame
// component k is looked up at p = pad * R^T k. Only grid points with px >= 0 are stored;
// p with px < 0 is read as the conjugate at -p. Callers keep pad*radius + 1 <= P/2 so every
// neighbour lies inside the stored grid.
#pragma once
#include <complex>
#include <cstddef>
#include <cstdint>

#include "mltomo/fft_plan.hpp"
#include "mltomo/fourier_grid.hpp"

namespace mltomo {

using cdouble = std::complex<double>;

struct PaddedGeometry {
  int P;       // padded box size (even)
  double pad;  // padding factor: grid point pad*k holds frequency k
  std::size_t half_size() const { return static_cast<std::size_t>(P) * P * (P / 2 + 1); }
};

// out[j] = reference at pad * R^T k_j for every component j of `ws` (R row-major 3x3).
void gather(const cfloat* grid, const PaddedGeometry& g, const double R[9], const WorkingSet& ws, cfloat* out);

// Adjoint of gather (with WorkingSet::scatter_factor), before the x = 0 fold, into one
// interleaved accumulator of four doubles per grid point (S real, S imaginary, M, Mfull; one
// cache line per neighbour pair instead of three): S[nbr] += w_nbr * values[j] (conjugated where
// p was mirrored), M[nbr] += w_nbr * weights[j] and Mfull[nbr] += w_nbr * full_weight (the
// weight a fully observed particle would leave: the M-step's per-grid-point count of
// observations).
void scatter_interleaved(const cdouble* values, const double* weights, double full_weight, const PaddedGeometry& g,
                         const double R[9], const WorkingSet& ws, double* acc);

// Completes the adjoint on the stored x = 0 plane: a sample near px = 0 also touches the
// mirrored, conjugated neighbours there. S[0,y,z] += conj(S[0,-y,-z]); M likewise.
void fold_x0_plane(const PaddedGeometry& g, cdouble* accS, double* accM);
void fold_x0_plane(const PaddedGeometry& g, double* acc);

// out (n, n, n/2+1) = R A on the working set |k| <= radius, zero elsewhere.
// std::invalid_argument unless pad*radius + 1 <= P/2.
void rotate_forward(const cfloat* grid, const PaddedGeometry& g, const double R[9], int n, double radius,
                    cfloat* out);

// Adds R^{-1}[values], R^{-1}[weights] and full_weight R^{-1}[1] (folded, on the working set of
// the n^3 box) into S, M and Mfull (Mfull may be null). values, weights: (n, n, n/2+1).
void rotate_back(const cfloat* values, const float* weights, int n, double radius, double full_weight,
                 const PaddedGeometry& g, const double R[9], cdouble* S, double* M, double* Mfull);

}  // namespace mltomo
