// SwiGLU routed experts on CPU: the whole MLP of every expert, forward and backward, with the rows split
// between the intra-op threads (each thread runs its own experts' GEMMs single-threaded).
//
// Shapes: N token copies sorted by expert, E experts, D hidden, F expert FFN hidden; counts[e] rows each.
//
//   forward:   g = x @ Wg[e],  u = x @ Wu[e],  h = silu(g) * u,  y = h @ Wd[e]          (saves g and u)
//   backward:  a = silu(g), h = a * u (recomputed),  dh = dy @ Wd[e]^T,  du = dh * a,
//              dg = silu'(g) * dh * u,  dx = dg @ Wg[e]^T + du @ Wu[e]^T,
//              dWd[e] = h^T dy,  dWg[e] = x^T dg,  dWu[e] = x^T du
//
// Why: on a CPU a small per-expert GEMM (a few hundred rows) does not scale over threads inside MKL, and a
// Python loop over 64 experts spends milliseconds in op dispatch. Here the N rows are cut into one
// contiguous range per thread (equal rows = equal GEMM work, whatever the routing), each thread walks its
// experts in blocks of at most `block_rows` rows so that g, u and h stay in its cache, and an expert cut
// between two threads gets its weight-gradient share summed after the parallel region.
// The Python fallback with the same math is kernels/swiglu_experts.py; the reference is experts_loop.

// Per-operator headers only (not ATen/ATen.h): the first-use build takes a fraction of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

struct Span {
  int64_t expert;
  int64_t start;  // first row
  int64_t stop;   // one past the last row
};

// One list of spans per part: part p holds rows [p*N/P, (p+1)*N/P), cut at expert borders and into blocks.
std::vector<std::vector<Span>> partition(const std::vector<int64_t>& counts, int64_t parts, int64_t block_rows) {
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  std::vector<std::vector<Span>> out(parts);
  int64_t expert_start = 0;
  size_t e = 0;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = total * p / parts, hi = total * (p + 1) / parts;
    // advance to the expert holding row lo
    while (e < counts.size() && expert_start + counts[e] <= lo) {
      expert_start += counts[e];
      ++e;
    }
    int64_t es = expert_start;
    for (size_t k = e; k < counts.size() && es < hi; es += counts[k], ++k) {
      const int64_t s = std::max(lo, es), t = std::min(hi, es + counts[k]);
      for (int64_t b = s; b < t; b += block_rows) out[p].push_back({static_cast<int64_t>(k), b, std::min(t, b + block_rows)});
    }
  }
  return out;
}

int64_t num_parts(int64_t rows, int64_t min_rows_per_part) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, rows / std::max<int64_t>(1, min_rows_per_part)));
}

void check_inputs(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& wd, at::IntArrayRef counts) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x_ND must be a contiguous 2-d tensor");
  TORCH_CHECK(wg.dim() == 3 && wu.sizes() == wg.sizes(), "w_gate_EDF and w_up_EDF must be [E, D, F]");
  TORCH_CHECK(wd.dim() == 3 && wd.size(0) == wg.size(0) && wd.size(1) == wg.size(2) && wd.size(2) == wg.size(1),
              "w_down_EFD must be [E, F, D]");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == wg.size(0), "one count per expert");
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  TORCH_CHECK(total == x.size(0), "counts must sum to the rows of x_ND");
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& wd,
                                           at::IntArrayRef counts, int64_t block_rows, int64_t min_rows_per_part) {
  check_inputs(x, wg, wu, wd, counts);
  const int64_t N = x.size(0), F = wg.size(2), D = wd.size(2);
  Tensor g = at::empty({N, F}, x.options()), u = at::empty({N, F}, x.options()), y = at::empty({N, D}, x.options());
  const std::vector<int64_t> cnt(counts.begin(), counts.end());
  const int64_t P = num_parts(N, min_rows_per_part);
  const auto spans = partition(cnt, P, block_rows);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's grad mode: these are plain kernels below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor h = at::empty({std::min(block_rows, N), F}, x.options());
    for (int64_t p = begin; p < end; ++p) {
      for (const Span& sp : spans[p]) {
        const int64_t n = sp.stop - sp.start;
        Tensor x_b = x.narrow(0, sp.start, n), g_b = g.narrow(0, sp.start, n), u_b = u.narrow(0, sp.start, n);
        Tensor h_b = h.narrow(0, 0, n);
        at::mm_out(g_b, x_b, wg.select(0, sp.expert));
        at::mm_out(u_b, x_b, wu.select(0, sp.expert));
        at::silu_out(h_b, g_b).mul_(u_b);
        Tensor y_b = y.narrow(0, sp.start, n);
        at::mm_out(y_b, h_b, wd.select(0, sp.expert));
      }
    }
  });
  return {y, g, u};
}

// out (=|+=) a^T b, written when `first`, accumulated otherwise.
inline void mm_t_into(Tensor out, const Tensor& a, const Tensor& b, bool first) {
  if (first) {
    at::mm_out(out, a.t(), b);
  } else {
    out.addmm_(a.t(), b);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& dy_in, const Tensor& x, const Tensor& wg,
                                                    const Tensor& wu, const Tensor& wd, const Tensor& g,
                                                    const Tensor& u, at::IntArrayRef counts, bool need_x,
                                                    bool need_w, int64_t block_rows, int64_t min_rows_per_part) {
  check_inputs(x, wg, wu, wd, counts);
  const Tensor dy = dy_in.contiguous();
  const int64_t N = x.size(0), E = wg.size(0), F = wg.size(2);
  Tensor dx = need_x ? at::empty_like(x) : Tensor();
  Tensor dwg, dwu, dwd;
  const std::vector<int64_t> cnt(counts.begin(), counts.end());
  if (need_w) {
    dwg = at::empty_like(wg, at::MemoryFormat::Contiguous);
    dwu = at::empty_like(wu, at::MemoryFormat::Contiguous);
    dwd = at::empty_like(wd, at::MemoryFormat::Contiguous);
    for (int64_t e = 0; e < E; ++e) {
      if (cnt[e] == 0) {
        dwg.select(0, e).zero_();
        dwu.select(0, e).zero_();
        dwd.select(0, e).zero_();
      }
    }
  }
  const int64_t P = num_parts(N, min_rows_per_part);
  const auto spans = partition(cnt, P, block_rows);
  std::vector<int64_t> starts(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) starts[e + 1] = starts[e] + cnt[e];
  // A part whose first expert began in an earlier part keeps that expert's weight-gradient share apart.
  std::vector<int64_t> shared_expert(P, -1);
  std::vector<Tensor> shared_g(P), shared_u(P), shared_d(P);
  for (int64_t p = 0; p < P; ++p) {
    if (need_w && !spans[p].empty() && starts[spans[p].front().expert] < spans[p].front().start) {
      const int64_t e = spans[p].front().expert;
      shared_expert[p] = e;
      shared_g[p] = at::empty_like(dwg.select(0, e));
      shared_u[p] = at::empty_like(dwu.select(0, e));
      shared_d[p] = at::empty_like(dwd.select(0, e));
    }
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t rows = std::min(block_rows, N);
    Tensor a = at::empty({rows, F}, x.options()), h = at::empty({rows, F}, x.options());
    Tensor dh = at::empty({rows, F}, x.options()), du = at::empty({rows, F}, x.options());
    for (int64_t p = begin; p < end; ++p) {
      int64_t last_expert = -1;
      for (const Span& sp : spans[p]) {
        const int64_t n = sp.stop - sp.start, e = sp.expert;
        const bool first = e != last_expert;
        last_expert = e;
        Tensor g_b = g.narrow(0, sp.start, n), u_b = u.narrow(0, sp.start, n);
        Tensor dy_b = dy.narrow(0, sp.start, n), x_b = x.narrow(0, sp.start, n);
        Tensor a_b = a.narrow(0, 0, n), dh_b = dh.narrow(0, 0, n), du_b = du.narrow(0, 0, n);
        at::silu_out(a_b, g_b);
        at::mm_out(dh_b, dy_b, wd.select(0, e).t());
        at::mul_out(du_b, dh_b, a_b);
        dh_b.mul_(u_b);
        Tensor dg_b = at::silu_backward_out(dh_b, dh_b, g_b);  // in place: dh's buffer becomes dg
        if (need_x) {
          Tensor dx_b = dx.narrow(0, sp.start, n);
          at::mm_out(dx_b, dg_b, wg.select(0, e).t());
          dx_b.addmm_(du_b, wu.select(0, e).t());
        }
        if (need_w) {
          Tensor h_b = h.narrow(0, 0, n);
          at::mul_out(h_b, a_b, u_b);
          const bool apart = e == shared_expert[p];
          mm_t_into(apart ? shared_d[p] : dwd.select(0, e), h_b, dy_b, first);
          mm_t_into(apart ? shared_g[p] : dwg.select(0, e), x_b, dg_b, first);
          mm_t_into(apart ? shared_u[p] : dwu.select(0, e), x_b, du_b, first);
        }
      }
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    if (shared_expert[p] >= 0) {
      const int64_t e = shared_expert[p];
      dwg.select(0, e).add_(shared_g[p]);
      dwu.select(0, e).add_(shared_u[p]);
      dwd.select(0, e).add_(shared_d[p]);
    }
  }
  return {dx, dwg, dwu, dwd};
}

}  // namespace

TORCH_LIBRARY(moe_plugin_cpu, m) {
  m.def(
      "swiglu_experts_forward(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, int[] counts, int block_rows, "
      "int min_rows_per_part) -> (Tensor, Tensor, Tensor)");
  m.def(
      "swiglu_experts_backward(Tensor dy, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor g, Tensor u, "
      "int[] counts, bool need_x, bool need_w, int block_rows, int min_rows_per_part) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(moe_plugin_cpu, CPU, m) {
  m.impl("swiglu_experts_forward", &forward);
  m.impl("swiglu_experts_backward", &backward);
}
