// Private to the SIMD sources (shift_scores.cpp, back_shift.cpp): eight floats as one vector.
// GCC and Clang lower the arithmetic to whatever SIMD the target has. The helpers are always
// inlined, so each clone of a MLTOMO_SIMD_CLONES function (AVX2 + FMA, or the baseline) gets
// its own code; the note that passing a v8 without AVX changes the ABI does not apply to them.
#pragma once
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"
#define MLTOMO_INLINE inline __attribute__((always_inline))

namespace mltomo {
namespace simd8 {

typedef float v8 __attribute__((vector_size(32)));

MLTOMO_INLINE v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MLTOMO_INLINE void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

}  // namespace simd8
}  // namespace mltomo
