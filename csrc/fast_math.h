// Branch-free float helpers written so that GCC vectorises the loops that call them
// (AVX2/AVX-512 clones are picked at load time through target_clones, see infonce.cpp).
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

static inline double fast_exp(double x) { return std::exp(x); }
static inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace fitclip
