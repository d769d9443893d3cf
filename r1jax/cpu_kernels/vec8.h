// The kernels' vector types and their unaligned loads and stores: v8, 8 floats (AVX2 registers
// with -march=native; GCC lowers it to narrower vectors or scalars elsewhere), and vw, the widest
// the compiler targets: 16 floats where AVX-512 is there (twice the FMA rate of AVX2 on the
// Xeons that have it), else 8.
#ifndef R1JAX_CPU_KERNELS_VEC8_H_
#define R1JAX_CPU_KERNELS_VEC8_H_

#include <cstdint>
#include <cstring>

namespace r1jax {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vw __attribute__((vector_size(4 * kLanes)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

inline vw loadw(const float* p) {
  vw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storew(float* p, vw v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace r1jax

#endif  // R1JAX_CPU_KERNELS_VEC8_H_
