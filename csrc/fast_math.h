// Branch-free float helpers written so that GCC vectorises the loops that call them
// (AVX2/AVX-512 clones are picked at load time through target_clones, see contrastive.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fitclip {

// exp(x) for float, Cephes' expf polynomial (about 1 ulp) with an integer-built 2^k.
// Valid for x <= 88; results below FLT_MIN flush to 0 (they only ever add to sums that
// hold a term >= 1 here). NaN in, NaN out; -inf in, 0 out.
static inline __attribute__((always_inline)) float fast_expf(float x) {
  const float lo = -87.33654f;
  float xc = x < lo ? lo : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  float y = p * two_k;
  y = x < lo ? 0.0f : y;
  y = x != x ? x : y;  // keep NaN
  return y;
}

// log(x) for positive normal float x, Cephes' logf polynomial (about 1 ulp), branch-free (the
// exponent and mantissa taken from the bits) so that loops over it vectorise.
static inline __attribute__((always_inline)) float fast_logf(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// log(1 + u) for u in [0, 1], accurate for tiny u as well (Goldberg: log(w) * u / (w - 1) with
// w = 1 + u rounded corrects the rounding of w).
static inline __attribute__((always_inline)) float fast_log1pf_unit(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return d == 0.0f ? u : fast_logf(w) * (u / d);
}

static inline double fast_exp(double x) { return std::exp(x); }
static inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace fitclip
