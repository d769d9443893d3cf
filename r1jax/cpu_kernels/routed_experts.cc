// Routed SwiGLU experts for a decode step's few tokens, float32, for XLA:CPU (an XLA FFI handler).
//
// Dims as r1jax/layers/experts.py: T tokens, D model, F expert ffn, E experts, K per token.
//   for each pair (t, k) with e = experts[t, k] < E:
//     h = x[t] @ wi[e]                   [2F]   wi [E, D, 2F] = [gate | up]
//     a = silu(h[:F]) * h[F:]            [F]
//     y[t, k] = weights[t, k] * (a @ wo[e])   [D]   wo [E, F, D]
//   out[t] = sum over k, in order, of y[t, k]   (pairs with e >= E add nothing)
//
// Why a kernel: at decode sizes the step is bound by reading the used experts' weights (1.5 MB
// each on `small`), and XLA:CPU's loop over pairs copies each pair's expert weights out of the
// stack before its vector-matrix products. Here each distinct expert is one work item: its
// weights are streamed once, row by row, for all of its tokens, on XLA's intra-op threads.
// Every pair's output has its own slot and the final sum runs in (t, k) order, so the result
// does not depend on which thread ran which expert.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "stream_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The pairs grouped by expert, and what each group reads and writes (one work item per group).
struct ExpertGroups {
  int64_t T, K, D, F, E;
  const float *x, *weights, *wi, *wo;
  std::vector<int64_t> order, start;  // pairs grouped by expert: order[start[g] : start[g + 1]]
  std::vector<int32_t> group_expert;
  std::vector<float> pair_out;  // [T * K, D]

  void run_group(int64_t g) {
    const int64_t* pairs = order.data() + start[g];
    const int64_t n = start[g + 1] - start[g];
    const int64_t e = group_expert[g];
    std::vector<float> xs(n * D), h(n * 2 * F), a(n * F), y(n * D);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&xs[i * D], x + (pairs[i] / K) * D, D * sizeof(float));
    r1jax::stream_rows(xs.data(), wi + e * D * 2 * F, h.data(), n, D, 2 * F, 0, D);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < F; ++j) {
        const float gate = h[i * 2 * F + j];
        a[i * F + j] = gate / (1.f + std::exp(-gate)) * h[i * 2 * F + F + j];
      }
    }
    r1jax::stream_rows(a.data(), wo + e * F * D, y.data(), n, F, D, 0, F);
    for (int64_t i = 0; i < n; ++i) {
      const float w = weights[pairs[i]];
      float* dst = pair_out.data() + pairs[i] * D;
      for (int64_t j = 0; j < D; ++j) dst[j] = w * y[i * D + j];
    }
  }
};

ffi::Error RoutedExpertsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> experts,
                             ffi::Buffer<ffi::F32> wi, ffi::Buffer<ffi::F32> wo,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = weights.dimensions(), ed = experts.dimensions(),
             id = wi.dimensions(), od = wo.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || ed.size() != 2 || id.size() != 3 || od.size() != 3) {
    return ffi::Error::InvalidArgument("routed_experts: operand ranks must be 2, 2, 2, 3, 3");
  }
  ExpertGroups work;
  work.T = xd[0];
  work.D = xd[1];
  work.K = ed[1];
  work.E = od[0];
  work.F = od[1];
  if (wd[0] != work.T || wd[1] != work.K || ed[0] != work.T || id[0] != work.E ||
      id[1] != work.D || id[2] != 2 * work.F || od[2] != work.D) {
    return ffi::Error::InvalidArgument(
        "routed_experts: shapes must be x [T,D], weights and experts [T,K], wi [E,D,2F], "
        "wo [E,F,D]");
  }
  work.x = x.typed_data();
  work.weights = weights.typed_data();
  work.wi = wi.typed_data();
  work.wo = wo.typed_data();
  const int32_t* ids = experts.typed_data();
  const int64_t pairs = work.T * work.K;
  // Group the pairs by expert (stable: a group's pairs in (t, k) order); ids >= E are skipped.
  for (int64_t p = 0; p < pairs; ++p) {
    if (ids[p] >= 0 && ids[p] < work.E) work.order.push_back(p);
  }
  std::stable_sort(work.order.begin(), work.order.end(),
                   [ids](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  for (int64_t i = 0; i < static_cast<int64_t>(work.order.size()); ++i) {
    if (i == 0 || ids[work.order[i]] != ids[work.order[i - 1]]) {
      work.start.push_back(i);
      work.group_expert.push_back(ids[work.order[i]]);
    }
  }
  work.start.push_back(static_cast<int64_t>(work.order.size()));
  work.pair_out.assign(pairs * work.D, 0.f);
  const int64_t groups = static_cast<int64_t>(work.group_expert.size());
  r1jax::parallel_for(pool, groups, [&](int64_t g) { work.run_group(g); });
  float* o = out->typed_data();
  std::fill(o, o + work.T * work.D, 0.f);
  for (int64_t t = 0; t < work.T; ++t) {
    for (int64_t k = 0; k < work.K; ++k) {
      const int32_t e = ids[t * work.K + k];
      if (e < 0 || e >= work.E) continue;
      const float* src = work.pair_out.data() + (t * work.K + k) * work.D;
      for (int64_t j = 0; j < work.D; ++j) o[t * work.D + j] += src[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(R1jaxRoutedExperts, RoutedExpertsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // experts [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wi [E, D, 2F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wo [E, F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [T, D]
