// stream_rows: acc [M, N] = x [M, rows k0..k1 of K] @ w [k0..k1, N], reading w once, in order.
#ifndef R1JAX_CPU_KERNELS_STREAM_ROWS_H_
#define R1JAX_CPU_KERNELS_STREAM_ROWS_H_

#include <algorithm>
#include <cstdint>

#include "vec8.h"

namespace r1jax {

constexpr int64_t kStreamBlockRows = 4;  // rows of w per pass over the accumulators

// acc[m, :] = sum over k in [k0, k1), in order, of x[m, k] * w[k, :] (x [M, K] row-major,
// w [K, N]): the rows of w stream through once, contiguously, kStreamBlockRows at a time against
// the accumulators, with the next rows prefetched. Bound by reading w when M is small (decode).
inline void stream_rows(const float* x, const float* w, float* acc, int64_t M, int64_t K,
                        int64_t N, int64_t k0, int64_t k1) {
  const int64_t vec = N / 8 * 8;
  std::fill(acc, acc + M * N, 0.f);
  for (int64_t k = k0; k < k1; k += kStreamBlockRows) {
    const int64_t rows = std::min(kStreamBlockRows, k1 - k);
    const float* w0 = w + k * N;
    for (int64_t j = 0; j < N; j += 16) __builtin_prefetch(w0 + 2 * kStreamBlockRows * N + j);
    for (int64_t m = 0; m < M; ++m) {
      float xs[kStreamBlockRows];
      for (int64_t r = 0; r < rows; ++r) xs[r] = x[m * K + k + r];
      float* a_row = acc + m * N;
      int64_t j = 0;
      if (rows == kStreamBlockRows) {
        for (; j < vec; j += 8) {
          v8 a = load8(a_row + j);
          for (int64_t r = 0; r < kStreamBlockRows; ++r) a += xs[r] * load8(w0 + r * N + j);
          store8(a_row + j, a);
        }
      }
      for (; j < N; ++j) {
        float a = a_row[j];
        for (int64_t r = 0; r < rows; ++r) a += xs[r] * w0[r * N + j];
        a_row[j] = a;
      }
    }
  }
}

}  // namespace r1jax

#endif  // R1JAX_CPU_KERNELS_STREAM_ROWS_H_
