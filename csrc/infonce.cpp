// Chunked InfoNCE (CLIP contrastive loss) for CPU tensors.
//
// The loss only needs, per row and per column of L = scale * Q @ K^T, a log-sum-exp; the
// positive logits and the label-smoothing terms are O(B*D) and are computed in Python.
// Forward streams row blocks of S = Q @ K^T once (one GEMM) and keeps O(n + m) statistics.
// Backward recomputes each block (GEMM 2), turns it in place into the softmax part of the
// logit gradient G = diag(w) P_row + P_col diag(v), and accumulates G @ K and G^T @ Q
// (GEMMs 3 and 4). Memory: O((n + m) * D) plus one block of `block_rows` x m.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "fast_math.h"

namespace fitclip {
namespace {

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

FITCLIP_CLONES float row_max_f(const float* x, int64_t n, float scale) {
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

FITCLIP_CLONES float row_sum_exp_f(const float* x, int64_t n, float scale, float shift) {
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

FITCLIP_CLONES void merge_col_stats_f(const float* S, int64_t rows, int64_t ld, int64_t c0,
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

FITCLIP_CLONES void softmax_grad_row_f(float* x, int64_t n, float scale, float w, float rlse,
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

// Rows per block: about `target` elements (64 MB of fp32), at most 1024 rows, at least 32.
// Fewer, larger GEMMs are faster: fwd+bwd at B=16384, D=512 on 2 cores took 6.1-6.4 s with
// 1024-row blocks, 6.6 s with 512, 6.9 s with 256, 8.0 s with 128. The 1024 cap keeps the
// block a fraction of B x B from B = 2048 up. FITCLIP_CPU_BLOCK_ELEMS overrides the target.
int64_t block_rows(int64_t n, int64_t m) {
  int64_t target = int64_t(1) << 24;
  if (const char* env = std::getenv("FITCLIP_CPU_BLOCK_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) target = v;
  }
  const int64_t rows = std::clamp<int64_t>(target / std::max<int64_t>(m, 1), 32, 1024);
  return std::min(rows, n);
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "fitclip_ext C++ ops take CPU tensors");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "query and keys must be 2-D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "query and keys must have the same feature size, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "query and keys must have the same dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "query and keys must be floating point");
  TORCH_CHECK(scale.numel() == 1, "scale must have one element");
}

template <typename T>
void lse_impl(const at::Tensor& Q, const at::Tensor& K, T scale, at::Tensor& row_lse, at::Tensor* col_lse) {
  const int64_t n = Q.size(0), m = K.size(0);
  const int64_t bm = block_rows(n, m);
  auto S = at::empty({bm, m}, Q.options());
  at::Tensor cmax, csum;
  if (col_lse) {
    cmax = at::full({m}, -std::numeric_limits<T>::infinity(), Q.options());
    csum = at::zeros({m}, Q.options());
  }
  T* rl = row_lse.data_ptr<T>();
  const at::Tensor Kt = K.t();
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Sb = S.narrow(0, 0, rows);
    at::mm_out(Sb, Q.narrow(0, r0, rows), Kt);
    const T* sp = Sb.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* x = sp + r * m;
        const T mx = rmax<T>(x, m, scale);
        rl[r0 + r] = mx + std::log(rsumexp<T>(x, m, scale, mx));
      }
    });
    if (col_lse) {
      T* cm = cmax.data_ptr<T>();
      T* cs = csum.data_ptr<T>();
      const int64_t nchunks = (m + kColChunk - 1) / kColChunk;
      at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
        std::vector<T> tmp(kColChunk);
        for (int64_t c = b; c < e; ++c) {
          const int64_t c0 = c * kColChunk, c1 = std::min(m, c0 + kColChunk);
          colmerge<T>(sp, rows, m, c0, c1, scale, cm, cs, tmp.data());
        }
      });
    }
  }
  if (col_lse) *col_lse = cmax + csum.log();
}

template <typename T>
void grad_impl(const at::Tensor& Q, const at::Tensor& K, T scale, const at::Tensor& row_lse,
               const at::Tensor& row_w, const at::Tensor* col_lse, const at::Tensor* col_w,
               at::Tensor& dQ, at::Tensor& dK) {
  const int64_t n = Q.size(0), m = K.size(0);
  const int64_t bm = block_rows(n, m);
  auto S = at::empty({bm, m}, Q.options());
  const T* rl = row_lse.data_ptr<T>();
  const T* rw = row_w.data_ptr<T>();
  const T* cl = col_lse ? col_lse->data_ptr<T>() : nullptr;
  const T* cw = col_w ? col_w->data_ptr<T>() : nullptr;
  const at::Tensor Kt = K.t();
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Sb = S.narrow(0, 0, rows);
    auto Qb = Q.narrow(0, r0, rows);
    at::mm_out(Sb, Qb, Kt);
    T* sp = Sb.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        sgrad<T>(sp + r * m, m, scale, rw[r0 + r], rl[r0 + r], cl, cw);
    });
    auto dQb = dQ.narrow(0, r0, rows);
    at::mm_out(dQb, Sb, K);
    dK.addmm_(Sb.t(), Qb);
  }
}

}  // namespace

// Returns (row_lse [n], col_lse [m] or empty) of L = scale * query @ keys^T in the compute
// dtype (float64 for float64 inputs, else float32).
std::tuple<at::Tensor, at::Tensor> infonce_lse_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                   const at::Tensor& scale, bool with_col) {
  check_inputs(query, keys, scale);
  const auto ct = compute_type(query);
  const auto Q = query.to(ct).contiguous();
  const auto K = keys.to(ct).contiguous();
  auto row_lse = at::empty({Q.size(0)}, Q.options());
  at::Tensor col_lse = at::empty({0}, Q.options());
  if (Q.size(0) == 0 || K.size(0) == 0) {
    row_lse.fill_(-std::numeric_limits<double>::infinity());
    if (with_col) col_lse = at::full({K.size(0)}, -std::numeric_limits<double>::infinity(), Q.options());
    return {row_lse, col_lse};
  }
  const double s = scale.item<double>();
  if (ct == at::kDouble) {
    lse_impl<double>(Q, K, s, row_lse, with_col ? &col_lse : nullptr);
  } else {
    lse_impl<float>(Q, K, static_cast<float>(s), row_lse, with_col ? &col_lse : nullptr);
  }
  return {row_lse, col_lse};
}

// Returns (G @ keys, G^T @ query) in the compute dtype for the softmax part of the logit
// gradient G = diag(row_weight) softmax_rows(L) [+ softmax_cols(L) diag(col_weight)].
std::tuple<at::Tensor, at::Tensor> infonce_grad_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                    const at::Tensor& scale, const at::Tensor& row_lse,
                                                    const at::Tensor& row_weight,
                                                    const std::optional<at::Tensor>& col_lse,
                                                    const std::optional<at::Tensor>& col_weight) {
  check_inputs(query, keys, scale);
  const auto ct = compute_type(query);
  const auto Q = query.to(ct).contiguous();
  const auto K = keys.to(ct).contiguous();
  const int64_t n = Q.size(0), m = K.size(0);
  TORCH_CHECK(row_lse.numel() == n && row_weight.numel() == n, "row_lse and row_weight must have ", n, " elements");
  TORCH_CHECK(col_lse.has_value() == col_weight.has_value(), "col_lse and col_weight go together");
  const auto rl = row_lse.to(ct).contiguous();
  const auto rw = row_weight.to(ct).contiguous();
  at::Tensor cl, cw;
  if (col_lse.has_value()) {
    TORCH_CHECK(col_lse->numel() == m && col_weight->numel() == m, "col_lse and col_weight must have ", m, " elements");
    cl = col_lse->to(ct).contiguous();
    cw = col_weight->to(ct).contiguous();
  }
  auto dQ = at::empty_like(Q);
  auto dK = at::zeros_like(K);
  if (n == 0 || m == 0) {
    dQ.zero_();
    return {dQ, dK};
  }
  const double s = scale.item<double>();
  if (ct == at::kDouble) {
    grad_impl<double>(Q, K, s, rl, rw, col_lse ? &cl : nullptr, col_lse ? &cw : nullptr, dQ, dK);
  } else {
    grad_impl<float>(Q, K, static_cast<float>(s), rl, rw, col_lse ? &cl : nullptr, col_lse ? &cw : nullptr, dQ, dK);
  }
  return {dQ, dK};
}

}  // namespace fitclip

TORCH_LIBRARY(fitclip_ext, m) {
  m.def("infonce_lse(Tensor query, Tensor keys, Tensor scale, bool with_col) -> (Tensor, Tensor)");
  m.def(
      "infonce_grad(Tensor query, Tensor keys, Tensor scale, Tensor row_lse, Tensor row_weight, "
      "Tensor? col_lse, Tensor? col_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fitclip_ext, CPU, m) {
  m.impl("infonce_lse", &fitclip::infonce_lse_cpu);
  m.impl("infonce_grad", &fitclip::infonce_grad_cpu);
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fitclip_ext C++ CPU kernels; the ops are registered as torch.ops.fitclip_ext.*";
}
