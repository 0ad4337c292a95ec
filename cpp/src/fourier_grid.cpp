#include "mltomo/fourier_grid.hpp"

#include <stdexcept>
#include <string>

namespace mltomo {

WorkingSet make_working_set(int n, double radius) {
  if (n < 4 || n % 2) throw std::invalid_argument("working box must be even and >= 4, got " + std::to_string(n));
  if (!(radius >= 0) || radius > n / 2 - 1)
    throw std::invalid_argument("working radius " + std::to_string(radius) + " outside [0, n/2-1] for n=" +
                                std::to_string(n));
  WorkingSet ws;
  ws.n = n;
  ws.radius = radius;
  const int nh = n / 2 + 1;
  const double r2 = radius * radius;
  for (int z = 0; z < n; ++z) {
    const int fz = z < n / 2 ? z : z - n;
    for (int y = 0; y < n; ++y) {
      const int fy = y < n / 2 ? y : y - n;
      for (int x = 0; x < nh; ++x) {
        const double d2 = double(x) * x + double(fy) * fy + double(fz) * fz;
        if (d2 > r2 + 1e-9) continue;
        ws.index.push_back((static_cast<std::int64_t>(z) * n + y) * nh + x);
        ws.kx.push_back(x);
        ws.ky.push_back(fy);
        ws.kz.push_back(fz);
        ws.hweight.push_back(x == 0 ? 1.f : 2.f);
        const bool dc = x == 0 && fy == 0 && fz == 0;
        const bool uniq = x > 0 || fy > 0 || (fy == 0 && fz > 0);
        ws.scatter_factor.push_back(dc ? 0.5f : (uniq ? 1.f : 0.f));
      }
    }
  }
  for (std::size_t j = 0; j < ws.index.size(); ++j) {
    if (!ws.runs.empty() && ws.runs.back().start + ws.runs.back().len == ws.index[j]) {
      ++ws.runs.back().len;
    } else {
      ws.runs.push_back(WorkingSet::Run{ws.index[j], static_cast<std::int32_t>(j), 1});
    }
  }
  return ws;
}

}  // namespace mltomo
