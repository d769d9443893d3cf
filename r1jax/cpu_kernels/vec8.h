// vec8: the 8-float vector type of the kernels (AVX2 registers with -march=native; GCC lowers it
// to narrower vectors or scalars elsewhere) and its unaligned loads and stores.
#ifndef R1JAX_CPU_KERNELS_VEC8_H_
#define R1JAX_CPU_KERNELS_VEC8_H_

#include <cstdint>
#include <cstring>

namespace r1jax {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace r1jax

#endif  // R1JAX_CPU_KERNELS_VEC8_H_
