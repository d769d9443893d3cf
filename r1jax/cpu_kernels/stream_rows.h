// stream_rows: acc [M, N] = x [M, rows k0..k1 of K] @ w [k0..k1, N], reading w once, in order.
#ifndef R1JAX_CPU_KERNELS_STREAM_ROWS_H_
#define R1JAX_CPU_KERNELS_STREAM_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec8.h"

namespace r1jax {

constexpr int64_t kStreamBlockRows = 8;  // rows of w per pass over the accumulators
constexpr int64_t kShortBlockFloats = 16384;  // 64 KiB: a block of rows that short is fetched ahead

// acc[m, :] = sum over k in [k0, k1), in order, of x[m, k] * w[k, :] (x [M, K] row-major,
// w [K, N]): the rows of w stream through once, contiguously, kStreamBlockRows at a time: each
// vector of those rows is loaded once into registers and applied to every row of acc. Bound by
// reading w when M is small (decode). Long rows get no software prefetch: the hardware's
// streams are faster (measured on the 2-core VM: the `small` LM head's 16 MiB at ~26 GB/s
// without, ~18 with a burst prefetch of the next rows); short rows get a spread one (below).
inline void stream_rows(const float* x, const float* w, float* acc, int64_t M, int64_t K,
                        int64_t N, int64_t k0, int64_t k1) {
  constexpr int64_t kRows = kStreamBlockRows;
  const int64_t vec = N / kLanes * kLanes;
  std::fill(acc, acc + M * N, 0.f);
  std::vector<float> xs(M * kRows);  // the block's x[m, k:k + kRows]
  for (int64_t k = k0; k < k1; k += kRows) {
    const int64_t rows = std::min(kRows, k1 - k);
    const float* w0 = w + k * N;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < rows; ++r) xs[m * kRows + r] = x[m * K + k + r];
    }
    // Short rows (a block of kRows is one contiguous run of at most kShortBlockFloats): fetch
    // the next block into L2 while this one computes, a few lines per step of j. The hardware
    // prefetcher alone streams such blocks (a routed expert's [512, 512] weights) at ~22 GB/s on
    // the 2-core VM, ~31 with this; long rows (the LM head's) are separate streams it does well.
    const float* next = w0 + kRows * N;
    const bool fetch_next = N * kRows <= kShortBlockFloats && k + 2 * kRows <= k1;
    const int64_t lines_per_step = (kRows * kLanes + 15) / 16;  // 16 floats a line
    int64_t j = 0;
    if (rows == kRows) {
      for (; j < vec; j += kLanes) {
        if (fetch_next) {
          for (int64_t u = 0; u < lines_per_step; ++u) {
            __builtin_prefetch(next + (j / kLanes * lines_per_step + u) * 16, 0, 2);
          }
        }
        vw wr[kRows];
        for (int64_t r = 0; r < kRows; ++r) wr[r] = loadw(w0 + r * N + j);
        for (int64_t m = 0; m < M; ++m) {
          vw a = loadw(acc + m * N + j);
          for (int64_t r = 0; r < kRows; ++r) a += xs[m * kRows + r] * wr[r];
          storew(acc + m * N + j, a);
        }
      }
    }
    for (; j < N; ++j) {
      for (int64_t m = 0; m < M; ++m) {
        float a = acc[m * N + j];
        for (int64_t r = 0; r < rows; ++r) a += xs[m * kRows + r] * w0[r * N + j];
        acc[m * N + j] = a;
      }
    }
  }
}

}  // namespace r1jax

#endif  // R1JAX_CPU_KERNELS_STREAM_ROWS_H_
