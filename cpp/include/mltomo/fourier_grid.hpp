// The working set of Fourier components of an n^3 box: the half-spectrum entries inside a
// sphere of radius `radius` (integer frequency units), with the weights that turn half-spectrum
// sums into full-spectrum sums.
//
// Layout: half spectrum n * n * (n/2+1), index [z][y][x], frequencies ky,kz in FFT order
// (0..n/2-1, -n/2..-1) and kx = 0..n/2. The kernels only ever loop over this list.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mltomo {

struct WorkingSet {
  int n = 0;
  double radius = 0;
  std::vector<std::int64_t> index;  // flat half-spectrum index of each component
  std::vector<int> kx, ky, kz;      // integer frequencies
  std::vector<float> hweight;       // 2 where the component stands for itself and its mirror, else 1
  // How much of the component a scatter back into a reference takes: 1 for exactly one member
  // of each {k, -k} pair (kx > 0, or kx == 0 with ky > 0 or (ky == 0 and kz > 0)), 1/2 for the
  // self-conjugate DC (fold_x0_plane doubles it), 0 for the other member of a pair.
  std::vector<float> scatter_factor;
  // Contiguous stretches of the list along x: components j0..j0+len-1 sit at half-spectrum
  // indices start..start+len-1 (one stretch per (z, y) row), for sequential fills.
  struct Run {
    std::int64_t start;
    std::int32_t j0, len;
  };
  std::vector<Run> runs;
  std::size_t size() const { return index.size(); }
  std::size_t half_size() const { return static_cast<std::size_t>(n) * n * (n / 2 + 1); }
};

// Throws std::invalid_argument unless 0 <= radius <= n/2 - 1 (the Nyquist planes are never used).
WorkingSet make_working_set(int n, double radius);

}  // namespace mltomo
