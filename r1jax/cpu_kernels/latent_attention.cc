// Absorbed MLA attention over the latent cache, fused, float32, for XLA:CPU (an XLA FFI handler).
//
// For each batch row b, query s and head h (r1jax/layers/mla.py's letters):
//   scores[t] = (q_latent[b,s,h,:] . latent[b,t,:] + q_rope[b,s,h,:] . rope_key[b,t,:]) * scale
//   scores[t] = -1e30 where !mask[b,s,t]          (finite: a fully masked row gets a uniform softmax)
//   out[b,s,h,:] = sum_t softmax(scores)[t] * latent[b,t,:]
// which is `bshc,btc->bsht` + `bshr,btr->bsht`, masked softmax, `bsht,btc->bshc`.
//
// Why a kernel: with 8 heads the scores are a skinny product against the transposed latent, which
// XLA:CPU's dot kernels run far below the machine's FMA rate, and the [b, s, h, t] scores and
// probabilities make three more passes over memory. Here each block of kBlock keys is read from
// memory once, scored for all heads (register tiles of 2 heads x 4 keys), softmaxed online
// (running max and sum per head) and folded into the output (tiles of 4 heads x 24 latent dims)
// while it is still in L1.
//
// Work items are (row (b, s), chunk of keys): a decode step's few rows are split along the keys
// too (flash-decoding) so that every thread of XLA's intra-op pool has work; the chunks' partial
// results (max, sum, unnormalised output) are merged at the end.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vec8.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using r1jax::load8;
using r1jax::store8;
using r1jax::v8;
using r1jax::v8i;

constexpr int64_t kBlock = 32;      // keys per online-softmax block: a block's latent fits in L1
constexpr int64_t kHeads = 4;       // heads per value-pass register tile
constexpr float kNegInf = -1e30f;   // as r1jax.layers.common.NEG_INF
constexpr int64_t kMinChunk = 256;  // keys per work item at least
constexpr int64_t kPrefetch = 64;   // keys ahead: software prefetch, 2x faster out of cache


// Keeps v in a register: without it GCC folds each use of a loaded key into its FMA as a memory
// operand, loading it once per head, and the tiles become bound by loads instead of FMAs.
inline v8 in_register(v8 v) {
#if defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}

inline float hsum(v8 v) {
  v8 a = v + __builtin_shuffle(v, v8i{4, 5, 6, 7, 0, 1, 2, 3});
  a = a + __builtin_shuffle(a, v8i{2, 3, 0, 1, 6, 7, 4, 5});
  a = a + __builtin_shuffle(a, v8i{1, 0, 3, 2, 5, 4, 7, 6});
  return a[0];
}

// The sums of eight vectors, as one vector: {sum(a[0]), ..., sum(a[7])}.
inline v8 hsum8(const v8* a) {
#if defined(__AVX__)
  __m256 s01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]);
  __m256 s23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  __m256 s45 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]);
  __m256 s67 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  __m256 s03 = _mm256_hadd_ps(s01, s23);  // lanes: 0123 of each 128-bit half
  __m256 s47 = _mm256_hadd_ps(s45, s67);
  __m256 lo = _mm256_permute2f128_ps(s03, s47, 0x20);
  __m256 hi = _mm256_permute2f128_ps(s03, s47, 0x31);
  return (v8)_mm256_add_ps(lo, hi);
#else
  v8 out;
  for (int i = 0; i < 8; ++i) out[i] = hsum(a[i]);
  return out;
#endif
}

// exp(x) for the softmax's x <= 0: 2^n exp(f) with Cephes' expf polynomial (~1 ulp), 0 below
// -87.3 (where float32 exp underflows).
inline v8 exp8(v8 x) {
  const v8i under = x < -87.3f;
  x = under ? v8{} - 87.3f : x;
  v8 n = x * 1.44269504088896341f + 0.5f;
  v8i ni = __builtin_convertvector(n, v8i);
  ni = ni - (__builtin_convertvector(ni, v8) > n ? v8i{} + 1 : v8i{});  // floor(n)
  n = __builtin_convertvector(ni, v8);
  x = x - n * 0.693359375f;
  x = x + n * 2.12194440e-4f;
  v8 y = 1.9875691500e-4f * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  v8i bits = (ni + 127) << 23;
  v8 pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return under ? v8{} : y * pow2n;
}

struct Dims {
  int64_t B, S, H, C, R, T;
  float scale;
};

// A block's scores live in "quad" layout: for head pair g (heads 2g, 2g + 1) and quad k4 (keys
// 4 k4 .. 4 k4 + 3 of the block), one vector of 8 lanes, lane 4 hh + kk = head 2g + hh, key
// 4 k4 + kk. It is what the 2 heads x 4 keys register tile's cross-lane sum (hsum8) yields, so
// the tile stores one vector instead of extracting eight lanes; the softmax works on it
// directly (each 128-bit half is one head), and the value pass reads its weights from it.
constexpr int64_t kQuads = kBlock / 4;
inline int64_t quad_index(int64_t head, int64_t key) {
  return ((head / 2) * kQuads + key / 4) * 8 + (head % 2) * 4 + key % 4;
}

// a[4 hh + kk] += q[hh, j:j+8] * keys[kk][j:j+8] over j < dim (8-wide partial dot products of
// 2 queries, rows of q `dim` apart, with 4 keys).
inline void accumulate_products(const float* q, const float* const* keys, int64_t dim, v8* a) {
  for (int64_t j = 0; j < dim; j += 8) {
    v8 x[4];
    for (int kk = 0; kk < 4; ++kk) x[kk] = in_register(load8(keys[kk] + j));
    for (int hh = 0; hh < 2; ++hh) {
      const v8 qv = in_register(load8(q + hh * dim + j));
      for (int kk = 0; kk < 4; ++kk) a[4 * hh + kk] += qv * x[kk];
    }
  }
}

// Scores (unscaled, unmasked) of keys [tb, tb + n) for heads 2g, 2g + 1, in quad layout. A short
// last quad repeats its last key (valid memory; the softmax gives those lanes weight 0).
void score_tile(const Dims& d, const float* q, const float* qr, const float* lat,
                const float* kpe, int64_t tb, int64_t n, int64_t g, float* scores) {
  const int64_t C = d.C, R = d.R;
  const float* q0 = q + 2 * g * C;
  const float* qr0 = qr + 2 * g * R;
  for (int64_t k4 = 0; 4 * k4 < n; ++k4) {
    const float* k[4];
    const float* r[4];
    for (int kk = 0; kk < 4; ++kk) {
      const int64_t t = tb + std::min(4 * k4 + kk, n - 1);
      k[kk] = lat + t * C;
      r[kk] = kpe + t * R;
    }
    // Fetch these 4 keys' lines kPrefetch keys ahead into L2 while they compute, a share of the
    // lines per head pair (a burst of prefetches stalls the loads behind it). Into L2, not L1:
    // the block being scored and folded in must stay in L1.
    const int64_t pairs = d.H / 2;
    for (int64_t line = g; line < 4 * C / 16; line += pairs) {
      __builtin_prefetch(k[0] + kPrefetch * C + 16 * line, 0, 2);
    }
    for (int64_t line = g; line < 4 * R / 16; line += pairs) {
      __builtin_prefetch(r[0] + kPrefetch * R + 16 * line, 0, 2);
    }
    v8 a[8] = {};  // a[4 * hh + kk]
    accumulate_products(q0, k, C, a);
    accumulate_products(qr0, r, R, a);
    store8(scores + (g * kQuads + k4) * 8, hsum8(a));
  }
}

// acc[h][j:j + 8 NV] += p[h][i] * lat[tb + i][j:j + 8 NV] for heads [h0, h0 + kHeads), p in quad
// layout: a register tile of kHeads heads x NV vectors over the block's keys. NV = 3 makes 12
// FMA chains, 16 registers with the 3 latent vectors and the weight (AVX2 has 16): more chains
// than FMA latency x ports (8) hide the loads, and per key 7 loads feed 12 FMAs.
template <int NV>
void accumulate_tile(const Dims& d, const float* lat, const float* p, int64_t tb, int64_t n,
                     int64_t h0, int64_t j, float* acc) {
  const int64_t C = d.C;
  v8 a[kHeads][NV];
  for (int64_t hh = 0; hh < kHeads; ++hh) {
    for (int v = 0; v < NV; ++v) a[hh][v] = load8(acc + (h0 + hh) * C + j + 8 * v);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* k = lat + (tb + i) * C + j;
    v8 x[NV];
    for (int v = 0; v < NV; ++v) x[v] = in_register(load8(k + 8 * v));
    for (int64_t hh = 0; hh < kHeads; ++hh) {
      const float w = p[quad_index(h0 + hh, i)];
      for (int v = 0; v < NV; ++v) a[hh][v] += w * x[v];
    }
  }
  for (int64_t hh = 0; hh < kHeads; ++hh) {
    for (int v = 0; v < NV; ++v) store8(acc + (h0 + hh) * C + j + 8 * v, a[hh][v]);
  }
}

// The value pass of one block: tiles of 3 vectors per head, then 1 for the rest of C.
void accumulate_block(const Dims& d, const float* lat, const float* p, int64_t tb, int64_t n,
                      float* acc) {
  for (int64_t h0 = 0; h0 < d.H; h0 += kHeads) {
    int64_t j = 0;
    for (; j + 24 <= d.C; j += 24) accumulate_tile<3>(d, lat, p, tb, n, h0, j, acc);
    for (; j < d.C; j += 8) accumulate_tile<1>(d, lat, p, tb, n, h0, j, acc);
  }
}

// Per 128-bit half (one head of the quad layout): every lane gets the half's max / sum.
inline v8 half_max(v8 v) {
  v = v > __builtin_shuffle(v, v8i{1, 0, 3, 2, 5, 4, 7, 6}) ? v : __builtin_shuffle(v, v8i{1, 0, 3, 2, 5, 4, 7, 6});
  const v8 w = __builtin_shuffle(v, v8i{2, 3, 0, 1, 6, 7, 4, 5});
  return v > w ? v : w;
}
inline v8 half_sum(v8 v) {
  v = v + __builtin_shuffle(v, v8i{1, 0, 3, 2, 5, 4, 7, 6});
  return v + __builtin_shuffle(v, v8i{2, 3, 0, 1, 6, 7, 4, 5});
}

// Running softmax state of one row and chunk: per head pair g, max m and sum l as quad-layout
// vectors (each half one head, its four lanes equal).
struct Running {
  std::vector<v8> m, l;
  explicit Running(int64_t pairs) : m(pairs, v8{} + kNegInf), l(pairs, v8{}) {}
};

// Scales and masks one block's scores, turns them into exp(score - running max) and updates
// the running max and sum of each head; rescales acc where the max grew.
void softmax_block(const Dims& d, const bool* mask, int64_t tb, int64_t n, float* scores,
                   Running& run, float* acc) {
  v8i keep[kQuads], in_block[kQuads];  // per quad: lanes kk and 4 + kk are key 4 k4 + kk
  for (int64_t k4 = 0; 4 * k4 < n; ++k4) {
    for (int kk = 0; kk < 4; ++kk) {
      const int64_t i = 4 * k4 + kk;
      in_block[k4][kk] = in_block[k4][kk + 4] = i < n ? -1 : 0;
      keep[k4][kk] = keep[k4][kk + 4] = i < n && mask[tb + i] ? -1 : 0;
    }
  }
  for (int64_t g = 0; g < d.H / 2; ++g) {
    v8 vmax = v8{} + kNegInf;
    for (int64_t k4 = 0; 4 * k4 < n; ++k4) {
      float* sc = scores + (g * kQuads + k4) * 8;
      const v8 s = keep[k4] ? load8(sc) * d.scale : v8{} + kNegInf;
      store8(sc, s);
      vmax = vmax > s ? vmax : s;
    }
    const v8 mn = half_max(run.m[g] > vmax ? run.m[g] : vmax);
    const v8 corr = exp8(run.m[g] - mn);
    v8 vsum = {};
    for (int64_t k4 = 0; 4 * k4 < n; ++k4) {
      // Lanes past n get weight 0; masked keys exp(-1e30 - max), which is 0 unless every key so
      // far is masked (then the max is -1e30 too and the weights uniform, as the reference).
      float* sc = scores + (g * kQuads + k4) * 8;
      const v8 w = in_block[k4] ? exp8(load8(sc) - mn) : v8{};
      store8(sc, w);
      vsum += w;
    }
    run.l[g] = run.l[g] * corr + half_sum(vsum);
    run.m[g] = mn;
    for (int64_t hh = 0; hh < 2; ++hh) {
      const float c = corr[4 * hh];
      if (c != 1.f) {
        float* row = acc + (2 * g + hh) * d.C;
        for (int64_t j = 0; j < d.C; ++j) row[j] *= c;
      }
    }
  }
}

// One row (b, s) over keys [t0, t1): partial max m[H], sum l[H] and unnormalised output acc[H, C].
void attend_chunk(const Dims& d, const float* q, const float* qr, const float* lat,
                  const float* kpe, const bool* mask, int64_t t0, int64_t t1, float* m, float* l,
                  float* acc) {
  std::vector<float> scores(d.H * kBlock);
  Running run(d.H / 2);
  std::fill(acc, acc + d.H * d.C, 0.f);
  for (int64_t tb = t0; tb < t1; tb += kBlock) {
    const int64_t n = std::min(kBlock, t1 - tb);
    for (int64_t g = 0; g < d.H / 2; ++g) score_tile(d, q, qr, lat, kpe, tb, n, g, scores.data());
    softmax_block(d, mask, tb, n, scores.data(), run, acc);
    accumulate_block(d, lat, scores.data(), tb, n, acc);
  }
  for (int64_t h = 0; h < d.H; ++h) {
    m[h] = run.m[h / 2][4 * (h % 2)];
    l[h] = run.l[h / 2][4 * (h % 2)];
  }
}

// out[row, h, :] from the chunks' partial results (max m, sum l, unnormalised acc per item),
// merged in chunk order.
void merge(const Dims& d, int64_t chunks, const std::vector<float>& m, const std::vector<float>& l,
           const std::vector<float>& acc, float* out) {
  const int64_t HC = d.H * d.C;
  for (int64_t row = 0; row < d.B * d.S; ++row) {
    for (int64_t h = 0; h < d.H; ++h) {
      float mx = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, m[(row * chunks + c) * d.H + h]);
      float total = 0.f;
      float* dst = out + row * HC + h * d.C;
      std::fill(dst, dst + d.C, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t it = row * chunks + c;
        const float w = std::exp(m[it * d.H + h] - mx);
        total += l[it * d.H + h] * w;
        const float* src = acc.data() + it * HC + h * d.C;
        for (int64_t j = 0; j < d.C; ++j) dst[j] += w * src[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < d.C; ++j) dst[j] *= inv;
    }
  }
}

ffi::Error LatentAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> qr, ffi::Buffer<ffi::F32> lat,
                               ffi::Buffer<ffi::F32> kpe, ffi::Buffer<ffi::PRED> mask, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), rd = qr.dimensions(), ld = lat.dimensions(),
             kd = kpe.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || rd.size() != 4 || ld.size() != 3 || kd.size() != 3 || md.size() != 3) {
    return ffi::Error::InvalidArgument("latent_attention: operand ranks must be 4, 4, 3, 3, 3");
  }
  const Dims d{qd[0], qd[1], qd[2], qd[3], rd[3], ld[1], scale};
  if (d.H % kHeads || d.C % 16 || d.R % 8 || rd[0] != d.B || rd[1] != d.S || rd[2] != d.H ||
      ld[0] != d.B || ld[2] != d.C || kd[0] != d.B || kd[1] != d.T || kd[2] != d.R ||
      md[0] != d.B || md[1] != d.S || md[2] != d.T) {
    return ffi::Error::InvalidArgument(
        "latent_attention: shapes must be q [b,s,h,c], q_rope [b,s,h,r], latent [b,t,c], "
        "rope_key [b,t,r], mask [b,s,t] with h % 4 == 0, c % 16 == 0, r % 8 == 0");
  }
  const int64_t rows = d.B * d.S, HC = d.H * d.C;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Enough chunks of keys that every thread gets two items, each at least kMinChunk keys.
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + rows - 1) / rows);
  int64_t chunk = std::max(kMinChunk, (d.T + wanted - 1) / wanted);
  chunk = (chunk + kBlock - 1) / kBlock * kBlock;
  const int64_t chunks = std::max<int64_t>(1, (d.T + chunk - 1) / chunk);
  const int64_t items = rows * chunks;
  std::vector<float> m(items * d.H), l(items * d.H), acc(items * HC);
  const float *qp = q.typed_data(), *qrp = qr.typed_data(), *latp = lat.typed_data(),
              *kpep = kpe.typed_data();
  const bool* maskp = mask.typed_data();
  r1jax::parallel_for(pool, items, [&](int64_t it) {
    const int64_t row = it / chunks, c = it % chunks, b = row / d.S;
    const int64_t t0 = c * chunk, t1 = std::min(d.T, t0 + chunk);
    attend_chunk(d, qp + row * HC, qrp + row * d.H * d.R, latp + b * d.T * d.C,
                 kpep + b * d.T * d.R, maskp + row * d.T, t0, t1, m.data() + it * d.H,
                 l.data() + it * d.H, acc.data() + it * HC);
  });
  merge(d, chunks, m, l, acc, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(R1jaxLatentAttention, LatentAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_latent [b, s, h, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rope [b, s, h, r]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // latent [b, t, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rope_key [b, t, r]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [b, s, t]
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [b, s, h, c]
