// What the C++ kernels share: the compute dtype, block sizing, multiversioning macros, and the
// vectorised row/column log-sum-exp helpers over row-major tiles of the InfoNCE kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "fast_math.h"

namespace fitclip {

// The dtype the kernels compute in: float64 for float64 inputs, float32 for every other type.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Elements per block buffer: `target`, or FITCLIP_CPU_BLOCK_ELEMS when set (tests use it to force
// many small blocks).
inline int64_t block_elems(int64_t target) {
  if (const char* env = std::getenv("FITCLIP_CPU_BLOCK_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return target;
}

// Rows per block of an n x m product streamed in row blocks: about block_elems(target) elements
// per block buffer, clamped to [min_rows, 1024] and to n.
inline int64_t rows_per_block(int64_t n, int64_t m, int64_t target, int64_t min_rows) {
  return std::min(std::clamp<int64_t>(block_elems(target) / std::max<int64_t>(m, 1), min_rows, 1024), n);
}

// Multiversioned hot loops: GCC emits AVX-512, AVX2+FMA and baseline clones and picks one
// at load time, so the extension runs on any x86-64 yet vectorises the exp.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FITCLIP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FITCLIP_CLONES
#endif
// The generic loops are inlined into each clone so that they are compiled for its ISA.
#define FITCLIP_INLINE inline __attribute__((always_inline))

template <typename T>
FITCLIP_INLINE T row_max(const T* x, int64_t n, T scale) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const T v = scale * x[j];
    m = v > m ? v : m;
  }
  return m;
}

template <typename T>
FITCLIP_INLINE T row_sum_exp(const T* x, int64_t n, T scale, T shift) {
  T s = 0;
  for (int64_t j = 0; j < n; ++j) s += fast_exp(scale * x[j] - shift);
  return s;
}

static FITCLIP_CLONES float row_max_f(const float* x, int64_t n, float scale) {
  // 8 independent partial maxima so the compiler can keep a vector of them.
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) {
      const float v = scale * x[j + l];
      m[l] = v > m[l] ? v : m[l];
    }
  float r = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < 16; ++l) r = m[l] > r ? m[l] : r;
  for (; j < n; ++j) {
    const float v = scale * x[j];
    r = v > r ? v : r;
  }
  return r;
}

static FITCLIP_CLONES float row_sum_exp_f(const float* x, int64_t n, float scale, float shift) {
  float s[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) s[l] += fast_expf(scale * x[j + l] - shift);
  float r = 0;
  for (int l = 0; l < 16; ++l) r += s[l];
  for (; j < n; ++j) r += fast_expf(scale * x[j] - shift);
  return r;
}

// Column statistics of one block: cmax/csum hold the running max and sum of exp(x - cmax)
// for columns [c0, c1); the block's rows are merged in (online softmax across blocks).
template <typename T>
FITCLIP_INLINE void merge_col_stats(const T* S, int64_t rows, int64_t ld, int64_t c0, int64_t c1, T scale,
                     T* cmax, T* csum, T* tmp) {
  const int64_t w = c1 - c0;
  for (int64_t c = 0; c < w; ++c) tmp[c] = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = S + r * ld + c0;
    for (int64_t c = 0; c < w; ++c) {
      const T v = scale * x[c];
      tmp[c] = v > tmp[c] ? v : tmp[c];
    }
  }
  for (int64_t c = 0; c < w; ++c) {
    const T old = cmax[c0 + c];
    const T neu = tmp[c] > old ? tmp[c] : old;
    // Rescale the running sum; a column with no finite max yet has an empty sum.
    csum[c0 + c] = old == -std::numeric_limits<T>::infinity() ? T(0) : csum[c0 + c] * fast_exp(old - neu);
    cmax[c0 + c] = neu;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = S + r * ld + c0;
    for (int64_t c = 0; c < w; ++c) csum[c0 + c] += fast_exp(scale * x[c] - cmax[c0 + c]);
  }
}

static FITCLIP_CLONES void merge_col_stats_f(const float* S, int64_t rows, int64_t ld, int64_t c0,
                                      int64_t c1, float scale, float* cmax, float* csum,
                                      float* tmp) {
  merge_col_stats<float>(S, rows, ld, c0, c1, scale, cmax, csum, tmp);
}

// In place: S[r, j] <- w_r exp(s S - row_lse_r) (+ v_j exp(s S - col_lse_j)).
template <typename T>
FITCLIP_INLINE void softmax_grad_row(T* x, int64_t n, T scale, T w, T rlse, const T* clse, const T* v) {
  if (clse == nullptr) {
    for (int64_t j = 0; j < n; ++j) x[j] = w * fast_exp(scale * x[j] - rlse);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T l = scale * x[j];
      x[j] = w * fast_exp(l - rlse) + v[j] * fast_exp(l - clse[j]);
    }
  }
}

static FITCLIP_CLONES void softmax_grad_row_f(float* x, int64_t n, float scale, float w, float rlse,
                                       const float* clse, const float* v) {
  softmax_grad_row<float>(x, n, scale, w, rlse, clse, v);
}

template <typename T>
inline T rmax(const T* x, int64_t n, T s) { return row_max<T>(x, n, s); }
template <>
inline float rmax<float>(const float* x, int64_t n, float s) { return row_max_f(x, n, s); }
template <typename T>
inline T rsumexp(const T* x, int64_t n, T s, T sh) { return row_sum_exp<T>(x, n, s, sh); }
template <>
inline float rsumexp<float>(const float* x, int64_t n, float s, float sh) { return row_sum_exp_f(x, n, s, sh); }
template <typename T>
inline void colmerge(const T* S, int64_t rows, int64_t ld, int64_t c0, int64_t c1, T s, T* cm, T* cs, T* tmp) {
  merge_col_stats<T>(S, rows, ld, c0, c1, s, cm, cs, tmp);
}
template <>
inline void colmerge<float>(const float* S, int64_t rows, int64_t ld, int64_t c0, int64_t c1, float s, float* cm, float* cs, float* tmp) {
  merge_col_stats_f(S, rows, ld, c0, c1, s, cm, cs, tmp);
}
template <typename T>
inline void sgrad(T* x, int64_t n, T s, T w, T rl, const T* cl, const T* v) { softmax_grad_row<T>(x, n, s, w, rl, cl, v); }
template <>
inline void sgrad<float>(float* x, int64_t n, float s, float w, float rl, const float* cl, const float* v) {
  softmax_grad_row_f(x, n, s, w, rl, cl, v);
}

constexpr int64_t kColChunk = 256;

// Merges the column statistics of one row-major block S [rows, m] (logits scale * S) into the
// running per-column max/sum of exp, in parallel over column chunks.
template <typename T>
void merge_block_col_stats(const T* S, int64_t rows, int64_t m, T scale, T* cmax, T* csum) {
  const int64_t nchunks = (m + kColChunk - 1) / kColChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> tmp(kColChunk);
    for (int64_t c = b; c < e; ++c) {
      const int64_t c0 = c * kColChunk, c1 = std::min(m, c0 + kColChunk);
      colmerge<T>(S, rows, m, c0, c1, scale, cmax, csum, tmp.data());
    }
  });
}

}  // namespace fitclip
