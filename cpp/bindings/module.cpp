// pybind11 bindings: thin. Each function checks that every array argument is an ndarray, then
// its dtype, dimensions, C-contiguity and shape (naming the argument in the error), never
// copies, releases the GIL and calls C++ that knows nothing of Python. numpy owns every buffer:
// accumulators are the caller's, added into by name; per-particle outputs are new arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mltomo/back_shift.hpp"
#include "mltomo/estep.hpp"
#include "mltomo/fft_plan.hpp"
#include "mltomo/fourier_grid.hpp"
#include "mltomo/interp.hpp"
#include "mltomo/shift_scores.hpp"

namespace py = pybind11;
using mltomo::cdouble;
using mltomo::cfloat;

namespace {

template <class T>
const char* dtype_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, cfloat>::value) return "complex64";
  if (std::is_same<T, cdouble>::value) return "complex128";
  if (std::is_same<T, std::int32_t>::value) return "int32";
  if (std::is_same<T, std::int64_t>::value) return "int64";
  if (std::is_same<T, std::uint8_t>::value) return "uint8";
  return "?";
}

std::string shape_str(const std::vector<py::ssize_t>& s) {
  std::string r = "(";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + (s[i] < 0 ? std::string("*") : std::to_string(s[i]));
  return r + (s.size() == 1 ? ",)" : ")");
}

// The numpy array `obj` must be, checked in this order before anything reads its shape: an
// ndarray, of dtype T, with `ndim` axes, C-contiguous (and writable if asked). Never converts.
template <class T>
py::array array_arg(py::handle obj, const std::string& name, int ndim, bool writable = false) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a numpy array, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(name + " must have dtype " + dtype_name<T>() + ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(name + " must have " + std::to_string(ndim) + " dimensions, got " + std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(name + " must be writable");
  return a;
}

// array_arg, then the shape (-1 accepts any extent); returns the data pointer.
template <class T>
T* checked(py::handle obj, const std::string& name, std::vector<py::ssize_t> shape, bool writable = false) {
  py::array a = array_arg<T>(obj, name, static_cast<int>(shape.size()), writable);
  bool ok = true;
  for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
    throw py::value_error(name + " must have shape " + shape_str(shape) + ", got " + shape_str(got));
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// Extent of `axis` of an argument that passes array_arg.
template <class T>
py::ssize_t dim(py::handle obj, const std::string& name, int ndim, int axis) {
  return array_arg<T>(obj, name, ndim).shape(axis);
}

int thread_count(int nthreads) { return nthreads > 0 ? nthreads : omp_get_max_threads(); }

py::dict working_set(int n, double radius) {
  const mltomo::WorkingSet ws = mltomo::make_working_set(n, radius);
  py::dict d;
  d["index"] = py::array_t<std::int64_t>(ws.index.size(), ws.index.data());
  d["kx"] = py::array_t<int>(ws.kx.size(), ws.kx.data());
  d["ky"] = py::array_t<int>(ws.ky.size(), ws.ky.data());
  d["kz"] = py::array_t<int>(ws.kz.size(), ws.kz.data());
  d["hweight"] = py::array_t<float>(ws.hweight.size(), ws.hweight.data());
  d["scatter_factor"] = py::array_t<float>(ws.scatter_factor.size(), ws.scatter_factor.data());
  return d;
}

py::array_t<cfloat> rotate_forward(py::handle grid, double pad, py::handle rotation, int n, double radius) {
  const py::ssize_t P = dim<cfloat>(grid, "grid", 3, 0);
  const cfloat* g = checked<cfloat>(grid, "grid", {P, P, P / 2 + 1});
  const double* R = checked<double>(rotation, "rotation", {3, 3});
  py::array_t<cfloat> out({n, n, n / 2 + 1});
  cfloat* o = out.mutable_data();
  py::gil_scoped_release release;
  mltomo::rotate_forward(g, mltomo::PaddedGeometry{static_cast<int>(P), pad}, R, n, radius, o);
  return out;
}

void rotate_back(py::handle values, py::handle weights, double pad, py::handle rotation, double radius, py::handle S,
                 py::handle M, py::object Mfull, double full_weight) {
  const py::ssize_t n = dim<cfloat>(values, "values", 3, 0);
  const cfloat* v = checked<cfloat>(values, "values", {n, n, n / 2 + 1});
  const float* w = checked<float>(weights, "weights", {n, n, n / 2 + 1});
  const double* R = checked<double>(rotation, "rotation", {3, 3});
  const py::ssize_t P = dim<cdouble>(S, "S", 3, 0);
  cdouble* s = checked<cdouble>(S, "S", {P, P, P / 2 + 1}, true);
  double* m = checked<double>(M, "M", {P, P, P / 2 + 1}, true);
  double* mf = Mfull.is_none() ? nullptr : checked<double>(Mfull, "Mfull", {P, P, P / 2 + 1}, true);
  py::gil_scoped_release release;
  mltomo::rotate_back(v, w, static_cast<int>(n), radius, full_weight, mltomo::PaddedGeometry{static_cast<int>(P), pad},
                      R, s, m, mf);
}

// The E-step plan of one iteration, as Python sees it: keeps the borrowed reference and mask
// arrays alive while the C++ plan lives.
class PyEStepPlan {
 public:
  PyEStepPlan(py::handle refs, double pad, py::handle masks, double radius, py::handle rotations,
              py::handle shifts, py::handle log_prior_shift, py::handle log_alpha, double sigma2,
              const std::string& mode, double prune, int nthreads, int rot_block, double rotated_cache_bytes,
              const std::string& kernel, double score_radius, double log_prune) {
    mltomo::EStepSetup st;
    const py::ssize_t K = dim<cfloat>(refs, "refs", 4, 0), P = dim<cfloat>(refs, "refs", 4, 1);
    st.refs = checked<cfloat>(refs, "refs", {K, P, P, P / 2 + 1});
    st.K = static_cast<int>(K);
    st.grid = mltomo::PaddedGeometry{static_cast<int>(P), pad};
    const py::ssize_t G = dim<float>(masks, "masks", 4, 0), n = dim<float>(masks, "masks", 4, 1);
    st.masks = checked<float>(masks, "masks", {G, n, n, n / 2 + 1});
    st.G = static_cast<int>(G);
    st.n = static_cast<int>(n);
    st.radius = radius;
    st.score_radius = score_radius;
    const py::ssize_t R = dim<double>(rotations, "rotations", 3, 0);
    st.rotations = checked<double>(rotations, "rotations", {R, 3, 3});
    st.R = static_cast<int>(R);
    const py::ssize_t T = dim<std::int32_t>(shifts, "shifts", 2, 0);
    st.shifts = checked<std::int32_t>(shifts, "shifts", {T, 3});
    st.T = static_cast<int>(T);
    st.log_prior_shift = checked<double>(log_prior_shift, "log_prior_shift", {T});
    st.log_alpha = checked<double>(log_alpha, "log_alpha", {K});
    st.sigma2 = sigma2;
    if (mode != "ml" && mode != "cc") throw py::value_error("mode must be 'ml' or 'cc', got '" + mode + "'");
    st.mode = mode == "ml" ? mltomo::ScoreMode::MaximumLikelihood : mltomo::ScoreMode::CrossCorrelation;
    st.prune = prune;
    st.log_prune = log_prune;
    st.nthreads = thread_count(nthreads);
    st.rot_block = rot_block;
    st.rotated_cache_bytes = rotated_cache_bytes;
    if (kernel != "auto" && kernel != "fft" && kernel != "pruned")
      throw py::value_error("kernel must be 'auto', 'fft' or 'pruned', got '" + kernel + "'");
    st.kernel = kernel == "fft"      ? mltomo::ShiftKernel::Fft
                : kernel == "pruned" ? mltomo::ShiftKernel::Pruned
                                     : mltomo::ShiftKernel::Auto;
    refs_ = py::reinterpret_borrow<py::array>(refs);
    masks_ = py::reinterpret_borrow<py::array>(masks);
    py::gil_scoped_release release;
    plan_ = std::make_unique<mltomo::EStepPlan>(st);
  }

  // Scores a chunk of particles and adds into `sums` (any object with float64 W (K,), complex128
  // S and float64 M, Mfull (K, P, P, P/2+1) and float64 scalars (2,)). Returns
  // {"scores": {name: (N,) array}, "counters": {name: number}}.
  py::dict run(py::handle particles, py::handle groups, py::handle sums, py::object rot_mask,
               py::object class_offsets, bool rot_mass) {
    const py::ssize_t n = plan_->n(), K = plan_->K(), R = plan_->R(), P = plan_->grid().P;
    const py::ssize_t N = dim<cfloat>(particles, "particles", 4, 0);
    mltomo::ParticleBatch batch;
    batch.particles = checked<cfloat>(particles, "particles", {N, n, n, n / 2 + 1});
    batch.N = static_cast<int>(N);
    batch.group = checked<std::int32_t>(groups, "groups", {N});
    batch.rot_mask = rot_mask.is_none() ? nullptr : checked<std::uint8_t>(rot_mask, "rot_mask", {N, R});
    batch.class_offsets =
        class_offsets.is_none() ? nullptr : checked<double>(class_offsets, "class_offsets", {N, K});
    mltomo::Accumulators acc;  // sums=None: scores only
    if (!sums.is_none()) {
      acc.W = checked<double>(sums.attr("W"), "sums.W", {K}, true);
      acc.S = checked<cdouble>(sums.attr("S"), "sums.S", {K, P, P, P / 2 + 1}, true);
      acc.M = checked<double>(sums.attr("M"), "sums.M", {K, P, P, P / 2 + 1}, true);
      acc.Mfull = checked<double>(sums.attr("Mfull"), "sums.Mfull", {K, P, P, P / 2 + 1}, true);
      acc.scalars = checked<double>(sums.attr("scalars"), "sums.scalars", {2}, true);
    }
    py::array_t<std::int32_t> best_class(N), best_rot(N), best_shift(N);
    py::array_t<double> max_post(N), log_sum(N), x_norm(N), n_observed(N);
    py::array_t<std::int64_t> n_significant(N);
    py::array_t<double> class_log_sum({N, K});
    py::array_t<double> rot_masses(rot_mass ? std::vector<py::ssize_t>{N, R} : std::vector<py::ssize_t>{0, R});
    mltomo::ParticleOutputs out{best_class.mutable_data(), best_rot.mutable_data(), best_shift.mutable_data(),
                                max_post.mutable_data(),   n_significant.mutable_data(), log_sum.mutable_data(),
                                x_norm.mutable_data(),     n_observed.mutable_data(),    class_log_sum.mutable_data(),
                                rot_mass ? rot_masses.mutable_data() : nullptr};
    mltomo::EStepCounters c;
    {
      py::gil_scoped_release release;
      c = plan_->run(batch, out, acc);
    }
    py::dict scores, counters, result;
    scores["best_class"] = best_class;
    scores["best_rot"] = best_rot;
    scores["best_shift"] = best_shift;
    scores["max_post"] = max_post;
    scores["n_significant"] = n_significant;
    scores["log_sum"] = log_sum;
    scores["x_norm"] = x_norm;
    scores["n_observed"] = n_observed;
    scores["class_log_sum"] = class_log_sum;
    if (rot_mass) scores["rot_log_mass"] = rot_masses;
    counters["samples"] = c.samples;
    counters["kept"] = c.kept;
    counters["maps_pruned"] = c.maps_pruned;
    counters["maps_pruned_kernel"] = c.maps_pruned_kernel;
    counters["seconds_rotate"] = c.seconds_rotate;
    counters["seconds_score"] = c.seconds_score;
    counters["seconds_accumulate"] = c.seconds_accumulate;
    counters["seconds_total"] = c.seconds_total;
    result["scores"] = scores;
    result["counters"] = counters;
    return result;
  }

  std::string kernel() const { return plan_->kernel() == mltomo::ShiftKernel::Pruned ? "pruned" : "fft"; }

 private:
  py::array refs_, masks_;
  std::unique_ptr<mltomo::EStepPlan> plan_;
};

// Bare batched inverse FFTs: `count` c2r transforms of size n on `nthreads` threads, the same
// way the E-step calls them (per-thread scratch, input refilled each time). For benchmarks.
double bench_c2r(int n, long count, int nthreads) {
  py::gil_scoped_release release;
  const mltomo::FftPlan3D plan(n);
  const int nt = thread_count(nthreads);
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
  {
    auto c = mltomo::aligned_array<cfloat>(plan.half_size());
    auto r = mltomo::aligned_array<float>(plan.real_size());
#pragma omp for schedule(dynamic)
    for (long q = 0; q < count; ++q) {
      std::fill(c.get(), c.get() + plan.half_size(), cfloat(1e-3f * (q % 7), 0.f));
      plan.c2r(c.get(), r.get());
    }
  }
  return omp_get_wtime() - t0;
}

// The pruned kernel on its own: correlations at `shifts` (T, 3) of the cross spectrum
// wx conj(ref) given on an arbitrary half-spectrum frequency list (kx, ky, kz, hweight: (J,)).
// For tests against numpy's irfftn.
py::array_t<float> shift_correlations(int n, py::handle kx, py::handle ky, py::handle kz, py::handle hweight,
                                      py::handle shifts, py::handle wx, py::handle ref) {
  const py::ssize_t J = dim<std::int32_t>(kx, "kx", 1, 0), T = dim<std::int32_t>(shifts, "shifts", 2, 0);
  mltomo::FrequencyList f;
  f.n = n;
  f.J = static_cast<std::size_t>(J);
  f.kx = checked<std::int32_t>(kx, "kx", {J});
  f.ky = checked<std::int32_t>(ky, "ky", {J});
  f.kz = checked<std::int32_t>(kz, "kz", {J});
  f.hweight = checked<float>(hweight, "hweight", {J});
  const std::int32_t* s = checked<std::int32_t>(shifts, "shifts", {T, 3});
  const cfloat* a = checked<cfloat>(wx, "wx", {J});
  const cfloat* b = checked<cfloat>(ref, "ref", {J});
  py::array_t<float> out(T);
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  const mltomo::ShiftScorer k(f, s, static_cast<int>(T));
  auto la = mltomo::aligned_array<float>(k.layout_size()), lb = mltomo::aligned_array<float>(k.layout_size());
  auto scratch = mltomo::aligned_array<float>(k.scratch_size());
  k.to_layout(a, la.get());
  k.to_layout(b, lb.get());
  k.score(la.get(), lb.get(), scratch.get(), o);
  return out;
}

// The weighted sums' back-shift on its own: y_j = (sum_t post_t exp(+2 pi i k_j.t/n)) wx_j on the
// working set |k| <= radius of an n^3 box, by the separable sum ("separable") or one r2c of the
// posterior map ("fft"), as the E-step does it. For tests against numpy.
py::array_t<cdouble> back_shift(int n, double radius, py::handle shifts, py::handle post, py::handle wx,
                                const std::string& method) {
  const mltomo::WorkingSet ws = mltomo::make_working_set(n, radius);
  const py::ssize_t T = dim<std::int32_t>(shifts, "shifts", 2, 0), J = static_cast<py::ssize_t>(ws.size());
  const std::int32_t* s = checked<std::int32_t>(shifts, "shifts", {T, 3});
  const double* p = checked<double>(post, "post", {T});
  const cfloat* v = checked<cfloat>(wx, "wx", {J});
  if (method != "separable" && method != "fft") throw py::value_error("method must be 'separable' or 'fft'");
  py::array_t<cdouble> out(J);
  cdouble* o = out.mutable_data();
  py::gil_scoped_release release;
  const mltomo::BackShifter b(ws, s, static_cast<int>(T));
  auto lw = mltomo::aligned_array<float>(b.layout_size());
  auto y = mltomo::aligned_array<double>(b.layout_size());
  std::fill(y.get(), y.get() + b.layout_size(), 0.0);
  b.to_layout(v, lw.get());
  std::vector<std::int32_t> kept;
  std::vector<double> pk;
  for (int t = 0; t < T; ++t)
    if (p[t] != 0) {
      kept.push_back(t);
      pk.push_back(p[t]);
    }
  if (method == "separable") {
    auto scratch = mltomo::aligned_array<float>(b.scratch_size());
    b.add_shifted(kept.data(), pk.data(), static_cast<int>(kept.size()), lw.get(), y.get(), scratch.get());
  } else {
    const mltomo::FftPlan3D plan(n);
    auto r = mltomo::aligned_array<float>(plan.real_size());
    auto c = mltomo::aligned_array<cfloat>(plan.half_size());
    std::fill(r.get(), r.get() + plan.real_size(), 0.f);
    for (std::size_t q = 0; q < kept.size(); ++q) {
      const int t = kept[q];
      const int x = (s[3 * t] % n + n) % n, yy = (s[3 * t + 1] % n + n) % n, z = (s[3 * t + 2] % n + n) % n;
      r[(static_cast<std::size_t>(z) * n + yy) * n + x] += static_cast<float>(pk[q]);
    }
    plan.r2c(r.get(), c.get());
    b.add_spectrum(c.get(), lw.get(), y.get());
  }
  b.from_layout(y.get(), o);
  return out;
}

// `count` pruned-kernel scores (cross spectrum included) of the working set |k| <= radius of an
// n^3 box at the shifts within +-max_shift, on `nthreads` threads, as the E-step calls them.
// Returns {"seconds", "cost", "fft_cost"}. For benchmarks, beside bench_c2r.
py::dict bench_shift_scores(int n, double radius, int max_shift, long count, int nthreads) {
  const mltomo::WorkingSet ws = mltomo::make_working_set(n, radius);
  std::vector<std::int32_t> shifts;
  for (int z = -max_shift; z <= max_shift; ++z)
    for (int y = -max_shift; y <= max_shift; ++y)
      for (int x = -max_shift; x <= max_shift; ++x) shifts.insert(shifts.end(), {x, y, z});
  const int T = static_cast<int>(shifts.size() / 3);
  const mltomo::ShiftScorer k({n, ws.kx.data(), ws.ky.data(), ws.kz.data(), ws.hweight.data(), ws.size()},
                              shifts.data(), T);
  std::vector<cfloat> v(ws.size());
  for (std::size_t j = 0; j < v.size(); ++j) v[j] = cfloat(std::cos(0.1f * j), std::sin(0.3f * j));
  auto wx = mltomo::aligned_array<float>(k.layout_size());
  k.to_layout(v.data(), wx.get());
  const int nt = thread_count(nthreads);
  double seconds = 0;
  {
    py::gil_scoped_release release;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
    {
      auto ref = mltomo::aligned_array<float>(k.layout_size());
      auto scratch = mltomo::aligned_array<float>(k.scratch_size());
      std::vector<float> cross(T);
      k.to_layout(v.data(), ref.get());
#pragma omp for schedule(dynamic, 16)
      for (long q = 0; q < count; ++q) {
        ref[q % k.layout_size()] += 1e-3f;  // a new reference each time, as in the E-step
        k.score(wx.get(), ref.get(), scratch.get(), cross.data());
      }
    }
    seconds = omp_get_wtime() - t0;
  }
  py::dict d;
  d["seconds"] = seconds;
  d["cost"] = k.cost();
  d["fft_cost"] = mltomo::ShiftScorer::fft_cost(n);
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "mltomo C++ kernels (OpenMP + FFTW). Called through mltomo.estep / mltomo.rotation.";
  m.def("fftw_version", &mltomo::fftw_version_string, "Which FFTW the extension was linked against.");
  m.def("max_threads", &omp_get_max_threads, "OpenMP's default thread count.");
  m.def("working_set", &working_set, py::arg("n"), py::arg("radius"));
  m.def("rotate_forward", &rotate_forward, py::arg("grid"), py::arg("pad"), py::arg("rotation"), py::arg("n"),
        py::arg("radius"));
  m.def("rotate_back", &rotate_back, py::arg("values"), py::arg("weights"), py::arg("pad"), py::arg("rotation"),
        py::arg("radius"), py::arg("S"), py::arg("M"), py::arg("Mfull") = py::none(), py::arg("full_weight") = 1.0);
  py::class_<PyEStepPlan>(m, "EStepPlan",
                          "What the E-step of one iteration keeps across chunks of particles: working set, FFT "
                          "plan, shift tables, rotated references. Borrows refs and masks (keep them unchanged).")
      .def(py::init<py::handle, double, py::handle, double, py::handle, py::handle, py::handle, py::handle, double,
                    const std::string&, double, int, int, double, const std::string&, double, double>(),
           py::kw_only(), py::arg("refs"), py::arg("pad"), py::arg("masks"), py::arg("radius"), py::arg("rotations"),
           py::arg("shifts"), py::arg("log_prior_shift"), py::arg("log_alpha"), py::arg("sigma2"),
           py::arg("mode") = "ml", py::arg("prune") = 1e-8, py::arg("nthreads") = 0, py::arg("rot_block") = 32,
           py::arg("rotated_cache_bytes") = 256.0 * (1 << 20), py::arg("kernel") = "auto",
           py::arg("score_radius") = -1.0, py::arg("log_prune") = std::numeric_limits<double>::quiet_NaN())
      .def_property_readonly("kernel", &PyEStepPlan::kernel,
                             "'fft' or 'pruned': how this plan scores the shifts ('auto' resolved).")
      .def("run", &PyEStepPlan::run, py::kw_only(), py::arg("particles"), py::arg("groups"), py::arg("sums"),
           py::arg("rot_mask") = py::none(), py::arg("class_offsets") = py::none(), py::arg("rot_mass") = false,
           "Scores a chunk, adds into sums.W/S/M/Mfull/scalars, returns {'scores': {...}, 'counters': {...}}.");
  m.def("bench_c2r", &bench_c2r, py::arg("n"), py::arg("count"), py::arg("nthreads") = 0);
  m.def("shift_correlations", &shift_correlations, py::kw_only(), py::arg("n"), py::arg("kx"), py::arg("ky"),
        py::arg("kz"), py::arg("hweight"), py::arg("shifts"), py::arg("wx"), py::arg("ref"),
        "The pruned kernel alone: sum_j h_j Re(wx_j conj(ref_j) e^{+2 pi i k_j.t/n}) at each shift t (T,).");
  m.def("back_shift", &back_shift, py::kw_only(), py::arg("n"), py::arg("radius"), py::arg("shifts"), py::arg("post"),
        py::arg("wx"), py::arg("method") = "separable",
        "The weighted sums' back-shift alone: (sum_t post_t e^{+2 pi i k_j.t/n}) wx_j on the working set (J,).");
  m.def("bench_shift_scores", &bench_shift_scores, py::arg("n"), py::arg("radius"), py::arg("max_shift"),
        py::arg("count"), py::arg("nthreads") = 0);
}
