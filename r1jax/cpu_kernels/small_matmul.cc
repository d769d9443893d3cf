// out [M, N] = x [M, K] @ w [K, N] for a decode step's few rows M, float32, for XLA:CPU (an XLA
// FFI handler).
//
// Why a kernel: with M <= 8 rows the product is bound by reading w once, but XLA:CPU's dot
// kernels stream a decode step's weights at 5-9 GB/s on the 2-core VM (the `small` LM head,
// [4, 512] x [512, 8192]: 1.9 ms) where the memory gives ~20. Here the rows of w are split into
// chunks of kChunkRows, one work item each over XLA's intra-op threads; an item streams its rows
// once, contiguously (stream_rows.h), against its own [M, N] partial sums (1.1 ms for the
// head). The partial sums are added in chunk order: deterministic whichever thread ran which.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "stream_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kChunkRows = 128;  // rows of w per work item

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] > kMaxRows) {
    return ffi::Error::InvalidArgument("small_matmul: x [M <= 8, K] and w [K, N] expected");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const int64_t items = std::max<int64_t>(1, (K + kChunkRows - 1) / kChunkRows);
  std::vector<float> partial(items * M * N);  // [items, M, N]
  const float *xp = x.typed_data(), *wp = w.typed_data();
  r1jax::parallel_for(pool, items, [&](int64_t it) {
    r1jax::stream_rows(xp, wp, partial.data() + it * M * N, M, K, N, it * kChunkRows,
                       std::min(K, (it + 1) * kChunkRows));
  });
  // The chunks' partial sums, added in chunk order: the same result whichever thread ran which.
  float* o = out->typed_data();
  const int64_t size = M * N;
  std::memcpy(o, partial.data(), size * sizeof(float));
  for (int64_t it = 1; it < items; ++it) {
    const float* p = partial.data() + it * size;
    for (int64_t i = 0; i < size; ++i) o[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(R1jaxSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
