// One register of floats as one value: GCC's vector extension, 16 lanes where the CPU has
// AVX-512, 8 elsewhere (one AVX2 register). Sixteen lanes on AVX2 would be two registers per
// value, and the attention kernel's 2 x 8 query vectors and accumulators would spill out of
// AVX2's 16 registers (measured 20x slower). Every operation on it is lane-wise, so code
// written with it has no cross-lane dependence and needs no fast-math flags to vectorize.
#pragma once

#include <cstdint>
#include <cstring>

namespace vprkit_kernels {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif

typedef float fvec __attribute__((vector_size(kLanes * 4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));

inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline fvec splat(float x) { return fvec{} + x; }

// exp(x) for x <= 0, lane-wise, Cephes' single-precision polynomial (about 1 ulp): 2^n * e^r
// with n = round(x / ln 2) and r = x - n ln 2, ln 2 split in two constants for exactness.
inline fvec exp_nonpositive(fvec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  // round to nearest by adding and subtracting 1.5 * 2^23 (no libm call)
  fvec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  fvec r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  fvec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * reinterpret_cast<fvec&>(bits);
}

inline float sum_lanes(fvec v) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline void store(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }

// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), as PyTorch's vectorized
// CPU erf; gelu(x) = x / 2 * (1 + erf(x / sqrt 2)), nn.GELU's exact form.
inline fvec erf(fvec x) {
  const fvec ax = x < 0.0f ? -x : x;
  const fvec t = 1.0f / (ax * 0.3275911f + 1.0f);
  fvec p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const fvec y = 1.0f - p * t * exp_nonpositive(-ax * ax);
  return x < 0.0f ? -y : y;
}

inline fvec gelu(fvec x) { return x * 0.5f * (1.0f + erf(x * 0.70710678118654752f)); }

}  // namespace vprkit_kernels
