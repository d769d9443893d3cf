// Absorbed MLA attention over the latent cache, fused, float32, for XLA:CPU (an XLA FFI handler).
//
// For each batch row b, query s and head h (r1jax/layers/mla.py's letters; wkv_b [c, h, d + dv]
// is W^UK in its first d columns, W^UV in the last dv):
//   q_latent[b,s,h,:] = sum_d q_nope[b,s,h,d] * wkv_b[:,h,d]                     (W^UK folded in)
//   scores[t] = (q_latent[b,s,h,:] . latent[b,t,:] + q_rope[b,s,h,:] . rope_key[b,t,:]) * scale
//   scores[t] = -1e30 where !mask[b,s,t]          (finite: a fully masked row gets a uniform softmax)
//   o[b,s,h,:] = sum_t softmax(scores)[t] * latent[b,t,:]
//   out[b,s,h,v] = sum_c o[b,s,h,c] * wkv_b[c,h,d+v]                              (W^UV folded in)
// which is `bshd,chd->bshc`, `bshc,btc->bsht` + `bshr,btr->bsht`, masked softmax,
// `bsht,btc->bshc`, `bshc,chd->bshd`.
//
// Why a kernel: with 8 heads the scores are a skinny product against the transposed latent, which
// XLA:CPU's dot kernels run far below the machine's FMA rate, and the [b, s, h, t] scores and
// probabilities make three more passes over memory. Here each block of kBlock keys is read from
// memory once, scored for all heads (register tiles of 8 heads x 12 keys, the heads in the
// vector lanes: no cross-lane sums), softmaxed online (running max and sum per head) and folded
// into the output (tiles of 4 heads x 24 latent dims) while it is still in L1.
//
// Work items are (row (b, s), chunk of keys): a decode step's few rows are split along the keys
// too (flash-decoding) so that every thread of XLA's intra-op pool has work; each row's query is
// folded once (a 256 KiB read of W^UK on `small`), and the chunks' partial results (max, sum,
// unnormalised output) are merged per row at the end, then folded through W^UV. The two folds
// are vector-matrix products with 8 heads' small matrices, which XLA's dots ran at ~40 and ~75 us
// a layer on the 2-core VM (the second on a strided slice of wkv_b) for ~10 us of reading.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vec8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using r1jax::load8;
using r1jax::store8;
using r1jax::v8;
using r1jax::v8i;

constexpr int64_t kBlock = 36;      // keys per online-softmax block: 3 score tiles, 23 KiB of L1
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

struct Dims {
  int64_t B, S, H, C, R, T, D, DV;  // D, DV: the query's nope and the value head dims
  float scale;
};

// The sums of eight vectors, as one vector: {sum(a[0]), ..., sum(a[7])}.
inline v8 hsum8(const v8* a) {
  v8 s[4];
  for (int i = 0; i < 4; ++i) {  // three rounds of adding lane pairs, two vectors at a time
    s[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], v8i{0, 8, 2, 10, 4, 12, 6, 14}) +
           __builtin_shuffle(a[2 * i], a[2 * i + 1], v8i{1, 9, 3, 11, 5, 13, 7, 15});
  }
  for (int i = 0; i < 2; ++i) {
    s[i] = __builtin_shuffle(s[2 * i], s[2 * i + 1], v8i{0, 1, 8, 9, 4, 5, 12, 13}) +
           __builtin_shuffle(s[2 * i], s[2 * i + 1], v8i{2, 3, 10, 11, 6, 7, 14, 15});
  }
  return __builtin_shuffle(s[0], s[1], v8i{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(s[0], s[1], v8i{4, 5, 6, 7, 12, 13, 14, 15});
}

// q_latent[h][c] = sum_j q_nope[h][j] * w[c][h][j] (w = wkv_b [C, H, D + DV]): dot products of
// 8 rows of w at a time with the query, summed across lanes together.
void fold_query(const Dims& d, const float* q_nope, const float* w, float* q_latent) {
  const int64_t DW = d.D + d.DV;
  for (int64_t h = 0; h < d.H; ++h) {
    const float* q = q_nope + h * d.D;
    for (int64_t c0 = 0; c0 < d.C; c0 += 8) {
      v8 a[8] = {};
      for (int64_t j = 0; j < d.D; j += 8) {
        const v8 qv = load8(q + j);
        for (int cc = 0; cc < 8; ++cc) a[cc] += load8(w + ((c0 + cc) * d.H + h) * DW + j) * qv;
      }
      store8(q_latent + h * d.C + c0, hsum8(a));
    }
  }
}

// out[h][v0 + v] = sum_c o[h][c] * w[c][h][D + v0 + v] for v < 8 NV, summed in blocks of 16 c
// (float32 error ~ 16 + C / 16 roundings rather than C, near XLA's dot).
template <int NV>
void fold_value_tile(const Dims& d, const float* o, const float* w, int64_t h, int64_t v0,
                     float* out) {
  const int64_t DW = d.D + d.DV;
  v8 a[NV] = {};
  for (int64_t c0 = 0; c0 < d.C; c0 += 16) {
    v8 p[NV] = {};
    for (int64_t c = c0; c < std::min(d.C, c0 + 16); ++c) {
      const float x = o[h * d.C + c];
      const float* row = w + (c * d.H + h) * DW + d.D + v0;
      for (int v = 0; v < NV; ++v) p[v] += x * load8(row + 8 * v);
    }
    for (int v = 0; v < NV; ++v) a[v] += p[v];
  }
  for (int v = 0; v < NV; ++v) store8(out + h * d.DV + v0 + 8 * v, a[v]);
}

// out[h][v] = sum_c o[h][c] * w[c][h][D + v]: W^UV folded into one row's attention output.
void fold_value(const Dims& d, const float* o, const float* w, float* out) {
  for (int64_t h = 0; h < d.H; ++h) {
    int64_t v0 = 0;
    for (; v0 + 32 <= d.DV; v0 += 32) fold_value_tile<4>(d, o, w, h, v0, out);
    for (; v0 < d.DV; v0 += 8) fold_value_tile<1>(d, o, w, h, v0, out);
  }
}

constexpr int64_t kKeyTile = 12;  // keys per score tile: 12 FMA chains, 14 registers with q
constexpr int64_t kSumDims = 32;  // dims per partial sum of a score

// exp2(x) for the softmax's x <= 0: 2^n 2^f, n = round(x), 2^f = exp(f ln 2) by Cephes' expf
// polynomial (~1 ulp); 0 below -126 (where float32 2^x leaves the normal range).
inline v8 exp2_8(v8 x) {
  const v8i under = x < -126.f;
  x = under ? v8{} - 126.f : x;
  v8 n = x + 0.5f;
  v8i ni = __builtin_convertvector(n, v8i);
  ni = ni - (__builtin_convertvector(ni, v8) > n ? v8i{} + 1 : v8i{});  // floor(x + 0.5)
  n = __builtin_convertvector(ni, v8);
  x = (x - n) * 0.693147180559945f;  // x - n exact: |x| < 2^23
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

// Scores live as [key][Hp], Hp = H rounded up to 8: one vector per key and group of 8 heads,
// the score tile's accumulators as they are. The queries are transposed to match, qt[j][Hp]
// (the latent dims j < C, then the rope dims), and pre-multiplied by scale * log2(e), so the
// scores are in log2 units and the softmax takes exp2 of them.
//
// a[kk] = sum over dims j in [j0, j1) of keys[kk * dim + j] * q[j] (8 heads' lanes): per dim,
// one vector of q and each key's element broadcast, NK FMA chains; no cross-lane sums. Each dim
// fetches one line of the keys kPrefetch ahead (pf; NK floats apart, so each line is reached)
// into L2, not L1: the block being scored and folded in must stay in L1.
template <int NK>
inline void score_dims(const float* qt, int64_t Hp, const float* keys, int64_t dim, int64_t j0,
                       int64_t j1, const float* pf, v8* a) {
  for (int kk = 0; kk < NK; ++kk) a[kk] = v8{};
  for (int64_t j = j0; j < j1; ++j) {
    __builtin_prefetch(pf + NK * j, 0, 2);
    const v8 q = load8(qt + j * Hp);
    for (int kk = 0; kk < NK; ++kk) a[kk] += keys[kk * dim + j] * q;
  }
}

// s[kk][0:8] = 8 heads' scores of keys t .. t + NK - 1 (k, r: key t's latent and rope key),
// summed in blocks of kSumDims dims into s: a float32 error of ~kSumDims + (C + R) / kSumDims
// roundings instead of C + R in one chain (the cross-lane sums of the dot-product layout were
// ~20 + 3; XLA's dots block too).
template <int NK>
inline void score_keys(const float* qt, int64_t Hp, const float* k, int64_t C, const float* r,
                       int64_t R, float* s) {
  v8 a[NK];
  bool first = true;
  const auto add_to_s = [&] {
    for (int kk = 0; kk < NK; ++kk) {
      store8(s + kk * Hp, first ? a[kk] : load8(s + kk * Hp) + a[kk]);
    }
    first = false;
  };
  for (int64_t j0 = 0; j0 < C; j0 += kSumDims) {
    score_dims<NK>(qt, Hp, k, C, j0, std::min(C, j0 + kSumDims), k + kPrefetch * C, a);
    add_to_s();
  }
  for (int64_t j0 = 0; j0 < R; j0 += kSumDims) {
    score_dims<NK>(qt + C * Hp, Hp, r, R, j0, std::min(R, j0 + kSumDims), r + kPrefetch * R, a);
    add_to_s();
  }
}

// Scores of keys [tb, tb + n) for every head group: tiles of kKeyTile keys, then 4, then 1.
template <int64_t kC, int64_t kR>
void score_block(const Dims& d, int64_t Hp, const float* qt, const float* lat, const float* kpe,
                 int64_t tb, int64_t n, float* scores) {
  const int64_t C = kC ? kC : d.C, R = kR ? kR : d.R;
  for (int64_t hg = 0; hg < Hp; hg += 8) {
    int64_t i = 0;
    for (; i + kKeyTile <= n; i += kKeyTile) {
      score_keys<kKeyTile>(qt + hg, Hp, lat + (tb + i) * C, C, kpe + (tb + i) * R, R,
                           scores + i * Hp + hg);
    }
    for (; i + 4 <= n; i += 4) {
      score_keys<4>(qt + hg, Hp, lat + (tb + i) * C, C, kpe + (tb + i) * R, R,
                    scores + i * Hp + hg);
    }
    for (; i < n; ++i) {
      score_keys<1>(qt + hg, Hp, lat + (tb + i) * C, C, kpe + (tb + i) * R, R,
                    scores + i * Hp + hg);
    }
  }
}

// acc[h][j:j + 8 NV] += p[i][h] * lat[tb + i][j:j + 8 NV] for heads [h0, h0 + kHeads): a
// register tile of kHeads heads x NV vectors over the block's keys. NV = 3 makes 12 FMA chains,
// 16 registers with the 3 latent vectors and the weight (AVX2 has 16): more chains than FMA
// latency x ports (8) hide the loads, and per key 7 loads feed 12 FMAs.
template <int NV>
void accumulate_tile(int64_t C, int64_t Hp, const float* lat, const float* p, int64_t tb,
                     int64_t n, int64_t h0, int64_t j, float* acc) {
  v8 a[kHeads][NV];
  for (int64_t hh = 0; hh < kHeads; ++hh) {
    for (int v = 0; v < NV; ++v) a[hh][v] = load8(acc + (h0 + hh) * C + j + 8 * v);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* k = lat + (tb + i) * C + j;
    v8 x[NV];
    for (int v = 0; v < NV; ++v) x[v] = in_register(load8(k + 8 * v));
    for (int64_t hh = 0; hh < kHeads; ++hh) {
      const float w = p[i * Hp + h0 + hh];
      for (int v = 0; v < NV; ++v) a[hh][v] += w * x[v];
    }
  }
  for (int64_t hh = 0; hh < kHeads; ++hh) {
    for (int v = 0; v < NV; ++v) store8(acc + (h0 + hh) * C + j + 8 * v, a[hh][v]);
  }
}

// The value pass of one block: tiles of 3 vectors per head, the last 4 as 2 + 2 (a 1-vector
// tile has only 4 chains, half the FMA rate).
template <int64_t kC>
void accumulate_block(const Dims& d, int64_t Hp, const float* lat, const float* p, int64_t tb,
                      int64_t n, float* acc) {
  const int64_t C = kC ? kC : d.C;
  for (int64_t h0 = 0; h0 < d.H; h0 += kHeads) {
    int64_t j = 0;
    for (; C - j >= 24 && C - j != 32; j += 24) {
      accumulate_tile<3>(C, Hp, lat, p, tb, n, h0, j, acc);
    }
    for (; C - j >= 16; j += 16) accumulate_tile<2>(C, Hp, lat, p, tb, n, h0, j, acc);
    for (; j < C; j += 8) accumulate_tile<1>(C, Hp, lat, p, tb, n, h0, j, acc);
  }
}

// Running softmax state of one row and chunk, per group of 8 heads: max m and sum l (log2
// units).
struct Running {
  std::vector<v8> m, l;
  explicit Running(int64_t groups) : m(groups, v8{} + kNegInf), l(groups, v8{}) {}
};

// Masks one block's scores, turns them into exp2(score - running max) and updates the running
// max and sum of each head; rescales acc where the max grew.
void softmax_block(const Dims& d, int64_t Hp, const bool* mask, int64_t tb, int64_t n,
                   float* scores, Running& run, float* acc) {
  for (int64_t hg = 0; hg < Hp; hg += 8) {
    v8 mx = run.m[hg / 8];
    for (int64_t i = 0; i < n; ++i) {
      float* sc = scores + i * Hp + hg;
      const v8 s = mask[tb + i] ? load8(sc) : v8{} + kNegInf;
      store8(sc, s);
      mx = mx > s ? mx : s;
    }
    // Masked keys get exp2(-1e30 - max), which is 0 unless every key so far is masked (then
    // the max is -1e30 too and the weights uniform, as the reference).
    const v8 corr = exp2_8(run.m[hg / 8] - mx);
    v8 sum = {};
    for (int64_t i = 0; i < n; ++i) {
      float* sc = scores + i * Hp + hg;
      const v8 w = exp2_8(load8(sc) - mx);
      store8(sc, w);
      sum += w;
    }
    run.l[hg / 8] = run.l[hg / 8] * corr + sum;
    run.m[hg / 8] = mx;
    for (int64_t hh = 0; hh < 8 && hg + hh < d.H; ++hh) {
      const float c = corr[hh];
      if (c != 1.f) {
        float* row = acc + (hg + hh) * d.C;
        for (int64_t j = 0; j < d.C; ++j) row[j] *= c;
      }
    }
  }
}

// One row (b, s) over keys [t0, t1): partial max m[H] and sum l[H] (log2 units) and
// unnormalised output acc[H, C].
template <int64_t kC, int64_t kR>
void attend_chunk(const Dims& d, const float* q, const float* qr, const float* lat,
                  const float* kpe, const bool* mask, int64_t t0, int64_t t1, float* m, float* l,
                  float* acc) {
  const int64_t C = kC ? kC : d.C, R = kR ? kR : d.R, Hp = (d.H + 7) / 8 * 8;
  std::vector<float> qt((C + R) * Hp, 0.f), scores(kBlock * Hp);
  const float s2 = d.scale * 1.44269504088896341f;
  for (int64_t h = 0; h < d.H; ++h) {
    for (int64_t j = 0; j < C; ++j) qt[j * Hp + h] = q[h * C + j] * s2;
    for (int64_t j = 0; j < R; ++j) qt[(C + j) * Hp + h] = qr[h * R + j] * s2;
  }
  Running run(Hp / 8);
  std::fill(acc, acc + d.H * C, 0.f);
  for (int64_t tb = t0; tb < t1; tb += kBlock) {
    const int64_t n = std::min(kBlock, t1 - tb);
    score_block<kC, kR>(d, Hp, qt.data(), lat, kpe, tb, n, scores.data());
    softmax_block(d, Hp, mask, tb, n, scores.data(), run, acc);
    accumulate_block<kC>(d, Hp, lat, scores.data(), tb, n, acc);
  }
  for (int64_t h = 0; h < d.H; ++h) {
    m[h] = run.m[h / 8][h % 8];
    l[h] = run.l[h / 8][h % 8];
  }
}

using ChunkFn = void (*)(const Dims&, const float*, const float*, const float*, const float*,
                         const bool*, int64_t, int64_t, float*, float*, float*);

// attend_chunk with the latent and rope widths as constants where they are a preset's (the
// compiler then unrolls the score tile's dims and addresses its keys with fixed offsets).
ChunkFn chunk_fn(const Dims& d) {
  if (d.C == 128 && d.R == 32) return attend_chunk<128, 32>;  // `small`
  if (d.C == 512 && d.R == 64) return attend_chunk<512, 64>;  // DeepSeek-V2/V3/R1
  return attend_chunk<0, 0>;
}

// o[h, :] of one row from its chunks' partial results (max m, sum l, unnormalised acc per item),
// merged in chunk order.
void merge(const Dims& d, int64_t row, int64_t chunks, const std::vector<float>& m,
           const std::vector<float>& l, const std::vector<float>& acc, float* o) {
  const int64_t HC = d.H * d.C;
  for (int64_t h = 0; h < d.H; ++h) {
    float mx = kNegInf;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, m[(row * chunks + c) * d.H + h]);
    float total = 0.f;
    float* dst = o + h * d.C;
    std::fill(dst, dst + d.C, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t it = row * chunks + c;
      const float w = std::exp2(m[it * d.H + h] - mx);
      total += l[it * d.H + h] * w;
      const float* src = acc.data() + it * HC + h * d.C;
      for (int64_t j = 0; j < d.C; ++j) dst[j] += w * src[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < d.C; ++j) dst[j] *= inv;
  }
}

ffi::Error LatentAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                               ffi::Buffer<ffi::F32> qr, ffi::Buffer<ffi::F32> lat,
                               ffi::Buffer<ffi::F32> kpe, ffi::Buffer<ffi::PRED> mask,
                               ffi::Buffer<ffi::F32> wkv_b, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q_nope.dimensions(), rd = qr.dimensions(), ld = lat.dimensions(),
             kd = kpe.dimensions(), md = mask.dimensions(), wd = wkv_b.dimensions(),
             od = out->dimensions();
  if (qd.size() != 4 || rd.size() != 4 || ld.size() != 3 || kd.size() != 3 || md.size() != 3 ||
      wd.size() != 3 || od.size() != 4) {
    return ffi::Error::InvalidArgument(
        "latent_attention: operand ranks must be 4, 4, 3, 3, 3, 3 and the result's 4");
  }
  const Dims d{qd[0], qd[1], qd[2], ld[2], rd[3], ld[1], qd[3], od[3], scale};
  if (d.H % kHeads || d.C % 16 || d.R % 8 || d.D % 8 || d.DV % 8 || rd[0] != d.B ||
      rd[1] != d.S || rd[2] != d.H || ld[0] != d.B || kd[0] != d.B || kd[1] != d.T ||
      kd[2] != d.R || md[0] != d.B || md[1] != d.S || md[2] != d.T || wd[0] != d.C ||
      wd[1] != d.H || wd[2] != d.D + d.DV || od[0] != d.B || od[1] != d.S || od[2] != d.H) {
    return ffi::Error::InvalidArgument(
        "latent_attention: shapes must be q_nope [b,s,h,d], q_rope [b,s,h,r], latent [b,t,c], "
        "rope_key [b,t,r], mask [b,s,t], wkv_b [c,h,d+dv], out [b,s,h,dv] with h % 4 == 0, "
        "c % 16 == 0, r, d and dv % 8 == 0");
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
  const float *qp = q_nope.typed_data(), *qrp = qr.typed_data(), *latp = lat.typed_data(),
              *kpep = kpe.typed_data(), *wp = wkv_b.typed_data();
  const bool* maskp = mask.typed_data();
  const ChunkFn attend = chunk_fn(d);
  float* outp = out->typed_data();
  // A row's query fold, before its chunks, and its merge and value fold, after them: in the item
  // itself when the row is one chunk (decode at batch >= threads), else in a pass over the rows
  // before and after the items (a row per item), so that no chunk folds the query again.
  std::vector<float> q_latent(rows * HC);
  const auto start_row = [&](int64_t row) {
    fold_query(d, qp + row * d.H * d.D, wp, q_latent.data() + row * HC);
  };
  const auto finish_row = [&](int64_t row) {
    std::vector<float> o(HC);
    merge(d, row, chunks, m, l, acc, o.data());
    fold_value(d, o.data(), wp, outp + row * d.H * d.DV);
  };
  if (chunks > 1) r1jax::parallel_for(pool, rows, start_row);
  r1jax::parallel_for(pool, items, [&](int64_t it) {
    const int64_t row = it / chunks, c = it % chunks, b = row / d.S;
    const int64_t t0 = c * chunk, t1 = std::min(d.T, t0 + chunk);
    if (chunks == 1) start_row(row);
    attend(d, q_latent.data() + row * HC, qrp + row * d.H * d.R, latp + b * d.T * d.C,
           kpep + b * d.T * d.R, maskp + row * d.T, t0, t1, m.data() + it * d.H,
           l.data() + it * d.H, acc.data() + it * HC);
    if (chunks == 1) finish_row(row);
  });
  if (chunks > 1) r1jax::parallel_for(pool, rows, finish_row);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(R1jaxLatentAttention, LatentAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_nope [b, s, h, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_rope [b, s, h, r]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // latent [b, t, c]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rope_key [b, t, r]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [b, s, t]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wkv_b [c, h, d + dv]
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [b, s, h, dv]
