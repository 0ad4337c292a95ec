// pybind11 bindings: thin. Each function checks dtype, shape and C-contiguity of every array
// (naming the argument in the error), never copies, releases the GIL and calls C++ that knows
// nothing of Python. numpy owns every buffer; accumulators are added into.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <complex>
#include <cstdint>
#include <string>
#include <vector>

#include "mltomo/estep.hpp"
#include "mltomo/fft_plan.hpp"
#include "mltomo/fourier_grid.hpp"
#include "mltomo/interp.hpp"

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

// Checks a numpy array without converting it; -1 in `shape` accepts any extent.
template <class T>
T* checked(py::handle obj, const char* name, std::vector<py::ssize_t> shape, bool writable = false) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                         std::string(py::str(a.dtype())));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
    throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + ", got " + shape_str(got));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

py::ssize_t dim(py::handle obj, int axis) { return py::reinterpret_borrow<py::array>(obj).shape(axis); }

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
  const py::ssize_t P = dim(grid, 0);
  const cfloat* g = checked<cfloat>(grid, "grid", {P, P, P / 2 + 1});
  const double* R = checked<double>(rotation, "rotation", {3, 3});
  const mltomo::WorkingSet ws = mltomo::make_working_set(n, radius);
  const mltomo::PaddedGeometry geo{static_cast<int>(P), pad};
  if (pad * radius + 1 > P / 2.0) throw py::value_error("grid too small for pad and radius");
  py::array_t<cfloat> out({n, n, n / 2 + 1});
  cfloat* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<cfloat> vals(ws.size());
    mltomo::gather(g, geo, R, ws, vals.data());
    std::fill(o, o + ws.half_size(), cfloat(0, 0));
    for (std::size_t j = 0; j < ws.size(); ++j) o[ws.index[j]] = vals[j];
  }
  return out;
}

void rotate_back(py::handle values, py::handle weights, double pad, py::handle rotation, double radius, py::handle S,
                 py::handle M, py::object Mfull, double full_weight) {
  const py::ssize_t n = dim(values, 0);
  const cfloat* v = checked<cfloat>(values, "values", {n, n, n / 2 + 1});
  const float* w = checked<float>(weights, "weights", {n, n, n / 2 + 1});
  const double* R = checked<double>(rotation, "rotation", {3, 3});
  const py::ssize_t P = dim(S, 0);
  cdouble* s = checked<cdouble>(S, "S", {P, P, P / 2 + 1}, true);
  double* m = checked<double>(M, "M", {P, P, P / 2 + 1}, true);
  double* mf = Mfull.is_none() ? nullptr : checked<double>(Mfull, "Mfull", {P, P, P / 2 + 1}, true);
  const mltomo::WorkingSet ws = mltomo::make_working_set(static_cast<int>(n), radius);
  const mltomo::PaddedGeometry geo{static_cast<int>(P), pad};
  if (pad * radius + 1 > P / 2.0) throw py::value_error("S too small for pad and radius");
  py::gil_scoped_release release;
  std::vector<cdouble> vals(ws.size());
  std::vector<double> wts(ws.size());
  for (std::size_t j = 0; j < ws.size(); ++j) {
    vals[j] = v[ws.index[j]];
    wts[j] = w[ws.index[j]];
  }
  std::vector<cdouble> s_tmp(geo.half_size(), cdouble(0, 0));
  std::vector<double> m_tmp(geo.half_size(), 0.0), f_tmp(mf ? geo.half_size() : 0, 0.0);
  mltomo::scatter(vals.data(), wts.data(), full_weight, geo, R, ws, s_tmp.data(), m_tmp.data(),
                  mf ? f_tmp.data() : nullptr);
  mltomo::fold_x0_plane(geo, s_tmp.data(), m_tmp.data());
  if (mf) mltomo::fold_x0_plane(geo, f_tmp.data());
  for (std::size_t q = 0; q < geo.half_size(); ++q) {
    s[q] += s_tmp[q];
    m[q] += m_tmp[q];
    if (mf) mf[q] += f_tmp[q];
  }
}

py::dict estep(py::handle refs, double pad, py::handle particles, py::handle masks, py::handle groups, double radius,
               py::handle rotations, py::handle shifts, py::handle log_prior_shift, py::handle log_alpha,
               double sigma2, py::handle W, py::handle S, py::handle M, py::handle Mfull, py::handle sums, py::handle best_class,
               py::handle best_rot, py::handle best_shift, py::handle max_post, py::handle n_significant,
               py::handle log_sum, py::handle x_norm, py::handle n_observed, py::object rot_mask, int mode,
               double prune, int nthreads, int rot_block) {
  mltomo::EStepProblem pb;
  const py::ssize_t K = dim(refs, 0), P = dim(refs, 1);
  pb.refs = checked<cfloat>(refs, "refs", {K, P, P, P / 2 + 1});
  pb.K = static_cast<int>(K);
  pb.grid = mltomo::PaddedGeometry{static_cast<int>(P), pad};
  const py::ssize_t N = dim(particles, 0), n = dim(particles, 1);
  pb.particles = checked<cfloat>(particles, "particles", {N, n, n, n / 2 + 1});
  pb.N = static_cast<int>(N);
  pb.n = static_cast<int>(n);
  const py::ssize_t G = dim(masks, 0);
  pb.masks = checked<float>(masks, "masks", {G, n, n, n / 2 + 1});
  pb.G = static_cast<int>(G);
  pb.group = checked<std::int32_t>(groups, "groups", {N});
  pb.radius = radius;
  const py::ssize_t R = dim(rotations, 0);
  pb.rotations = checked<double>(rotations, "rotations", {R, 3, 3});
  pb.R = static_cast<int>(R);
  const py::ssize_t T = dim(shifts, 0);
  pb.shifts = checked<std::int32_t>(shifts, "shifts", {T, 3});
  pb.T = static_cast<int>(T);
  pb.log_prior_shift = checked<double>(log_prior_shift, "log_prior_shift", {T});
  pb.log_alpha = checked<double>(log_alpha, "log_alpha", {K});
  pb.rot_mask = rot_mask.is_none() ? nullptr : checked<std::uint8_t>(rot_mask, "rot_mask", {N, R});
  pb.sigma2 = sigma2;
  if (mode != 0 && mode != 1) throw py::value_error("mode must be 0 (ML) or 1 (CC)");
  pb.mode = static_cast<mltomo::ScoreMode>(mode);
  pb.prune = prune;
  pb.nthreads = thread_count(nthreads);
  pb.rot_block = rot_block;

  mltomo::EStepResult out;
  out.W = checked<double>(W, "W", {K}, true);
  out.S = checked<cdouble>(S, "S", {K, P, P, P / 2 + 1}, true);
  out.M = checked<double>(M, "M", {K, P, P, P / 2 + 1}, true);
  out.Mfull = checked<double>(Mfull, "Mfull", {K, P, P, P / 2 + 1}, true);
  out.sums = checked<double>(sums, "sums", {2}, true);
  out.best_class = checked<std::int32_t>(best_class, "best_class", {N}, true);
  out.best_rot = checked<std::int32_t>(best_rot, "best_rot", {N}, true);
  out.best_shift = checked<std::int32_t>(best_shift, "best_shift", {N}, true);
  out.max_post = checked<double>(max_post, "max_post", {N}, true);
  out.n_significant = checked<std::int64_t>(n_significant, "n_significant", {N}, true);
  out.log_sum = checked<double>(log_sum, "log_sum", {N}, true);
  out.x_norm = checked<double>(x_norm, "x_norm", {N}, true);
  out.n_observed = checked<double>(n_observed, "n_observed", {N}, true);

  mltomo::EStepCounters c;
  {
    py::gil_scoped_release release;
    c = mltomo::run_estep(pb, out);
  }
  py::dict d;
  d["samples"] = c.samples;
  d["kept"] = c.kept;
  d["maps_pruned"] = c.maps_pruned;
  d["seconds_rotate"] = c.seconds_rotate;
  d["seconds_score"] = c.seconds_score;
  d["seconds_accumulate"] = c.seconds_accumulate;
  d["seconds_total"] = c.seconds_total;
  return d;
}

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
  m.def("estep", &estep, py::arg("refs"), py::arg("pad"), py::arg("particles"), py::arg("masks"), py::arg("groups"),
        py::arg("radius"), py::arg("rotations"), py::arg("shifts"), py::arg("log_prior_shift"), py::arg("log_alpha"),
        py::arg("sigma2"), py::arg("W"), py::arg("S"), py::arg("M"), py::arg("Mfull"), py::arg("sums"), py::arg("best_class"),
        py::arg("best_rot"), py::arg("best_shift"), py::arg("max_post"), py::arg("n_significant"),
        py::arg("log_sum"), py::arg("x_norm"), py::arg("n_observed"), py::arg("rot_mask") = py::none(),
        py::arg("mode") = 0, py::arg("prune") = 1e-8, py::arg("nthreads") = 0, py::arg("rot_block") = 32);
  m.def("bench_c2r", &bench_c2r, py::arg("n"), py::arg("count"), py::arg("nthreads") = 0);
}
