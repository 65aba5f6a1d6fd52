// CPU kernel for slice2vol.methods.gaussian.splat: the same sums and gradients as the PyTorch
// path (see splat.py for the mathematics), one Gaussian box per loop iteration, OpenMP over
// Gaussians.  Compiled at first use by torch.utils.cpp_extension; splat.py falls back to the
// PyTorch path when no compiler is available.
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

// The box of Gaussian j, visited once by the forward and once by the backward pass so both read
// the same lattice points: visit(idx, di, dj, dk, e) for every point, with (di, dj, dk) = lattice
// offset - fractional centre and e = exp(-q / 2) of the quadratic form there.  A template, so
// the lambda inlines and the forward's inner loop still vectorises.
template <typename T, typename Visit>
static inline void visit_box(const T* c, const T* p, const int64_t* base, const int64_t* st, const int64_t* rad,
                             int64_t j, int dims, Visit&& visit) {
  const T* cj = c + 3 * j;
  const T* P = p + 9 * j;
  const int64_t r = rad[j];
  const T f0 = cj[0] - std::nearbyint(cj[0]), f1 = cj[1] - std::nearbyint(cj[1]);
  const T f2 = dims == 3 ? cj[2] - std::nearbyint(cj[2]) : cj[2];
  const int64_t rk = dims == 3 ? r : 0;
  for (int64_t oi = -r; oi <= r; ++oi) {
    const T di = (T)oi - f0;
    for (int64_t oj = -r; oj <= r; ++oj) {
      const T dj = (T)oj - f1;
      const T qij = P[0] * di * di + P[4] * dj * dj + 2 * P[1] * di * dj;
      const int64_t idx_ij = base[j] + oi * st[3 * j] + oj * st[3 * j + 1];
      for (int64_t ok = -rk; ok <= rk; ++ok) {
        const T dk = (T)ok - f2;
        const T q = qij + P[8] * dk * dk + 2 * (P[2] * di + P[5] * dj) * dk;
        visit(idx_ij + ok * st[3 * j + 2], di, dj, dk, std::exp((T)-0.5 * q));
      }
    }
  }
}

// Each thread adds into its own copy of the output, summed at the end, instead of atomic adds:
// without atomics the inner loop vectorises (with -ffast-math, exp included), and with a static
// schedule a sum is the same on every run.  The copies cost nthreads x size of memory.
template <typename T>
static void fwd_box(const T* c, const T* p, const T* a, const int64_t* base, const int64_t* st, const int64_t* rad,
                    int64_t j, int dims, T* out) {
  const T aj = a[j];
  visit_box(c, p, base, st, rad, j, dims, [&](int64_t idx, T, T, T, T e) { out[idx] += aj * e; });
}

template <typename T>
static void fwd_impl(const T* c, const T* p, const T* a, const int64_t* base, const int64_t* st, const int64_t* rad,
                     int64_t J, int dims, T* out, int64_t size) {
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), (int)((J + 255) / 256)));
  if (nt == 1) {
    for (int64_t j = 0; j < J; ++j) fwd_box(c, p, a, base, st, rad, j, dims, out);
    return;
  }
  std::vector<T> priv((size_t)(nt - 1) * (size_t)size, (T)0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    T* mine = tid == 0 ? out : priv.data() + (size_t)(tid - 1) * (size_t)size;
#pragma omp for schedule(static, 64)
    for (int64_t j = 0; j < J; ++j) fwd_box(c, p, a, base, st, rad, j, dims, mine);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < size; ++i) {
      T acc = out[i];
      for (int t = 1; t < nt; ++t) acc += priv[(size_t)(t - 1) * (size_t)size + i];
      out[i] = acc;
    }
  }
}

template <typename T>
static void bwd_impl(const T* g, const T* c, const T* p, const T* a, const int64_t* base, const int64_t* st,
                     const int64_t* rad, int64_t J, int dims, T* gc, T* gp, T* ga) {
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t j = 0; j < J; ++j) {
    const T* P = p + 9 * j;
    const T aj = a[j];
    double sa = 0, m0 = 0, m1 = 0, m2 = 0, s00 = 0, s11 = 0, s22 = 0, s01 = 0, s02 = 0, s12 = 0;
    visit_box(c, p, base, st, rad, j, dims, [&](int64_t idx, T di, T dj, T dk, T e) {
      const T ge = g[idx] * e;
      sa += ge;
      const double w = ge * aj;
      m0 += w * di; m1 += w * dj; m2 += w * dk;
      s00 += w * di * di; s11 += w * dj * dj; s22 += w * dk * dk;
      s01 += w * di * dj; s02 += w * di * dk; s12 += w * dj * dk;
    });
    ga[j] = (T)sa;
    // d = o - f with d d/d c = -I (also for the 2D plane offset d_k = -c_k)
    gc[3 * j + 0] = (T)(P[0] * m0 + P[1] * m1 + P[2] * m2);
    gc[3 * j + 1] = (T)(P[3] * m0 + P[4] * m1 + P[5] * m2);
    gc[3 * j + 2] = (T)(P[6] * m0 + P[7] * m1 + P[8] * m2);
    T* q = gp + 9 * j;
    q[0] = (T)(-0.5 * s00); q[1] = (T)(-0.5 * s01); q[2] = (T)(-0.5 * s02);
    q[3] = (T)(-0.5 * s01); q[4] = (T)(-0.5 * s11); q[5] = (T)(-0.5 * s12);
    q[6] = (T)(-0.5 * s02); q[7] = (T)(-0.5 * s12); q[8] = (T)(-0.5 * s22);
  }
}

torch::Tensor splat_forward(torch::Tensor c, torch::Tensor p, torch::Tensor a, torch::Tensor base,
                            torch::Tensor st, torch::Tensor rad, int64_t dims, int64_t size) {
  auto out = torch::zeros({size}, c.options());
  const int64_t J = c.size(0);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "splat_forward", [&] {
    fwd_impl<scalar_t>(c.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), base.data_ptr<int64_t>(),
                       st.data_ptr<int64_t>(), rad.data_ptr<int64_t>(), J, (int)dims, out.data_ptr<scalar_t>(), size);
  });
  return out;
}

std::vector<torch::Tensor> splat_backward(torch::Tensor g, torch::Tensor c, torch::Tensor p, torch::Tensor a,
                                          torch::Tensor base, torch::Tensor st, torch::Tensor rad, int64_t dims) {
  auto gc = torch::zeros_like(c), gp = torch::zeros_like(p), ga = torch::zeros_like(a);
  const int64_t J = c.size(0);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "splat_backward", [&] {
    bwd_impl<scalar_t>(g.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                       base.data_ptr<int64_t>(), st.data_ptr<int64_t>(), rad.data_ptr<int64_t>(), J, (int)dims,
                       gc.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>());
  });
  return {gc, gp, ga};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &splat_forward, "truncated Gaussian splat (CPU)");
  m.def("backward", &splat_backward, "its gradients (CPU)");
}
