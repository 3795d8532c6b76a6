// Chunked SigLIP (pairwise sigmoid) loss for CPU tensors, loss and gradient in one pass.
//
// With L = scale * Q @ K^T + bias (n x m) and z_ij = +1 at the positive j = offset + i, -1
// elsewhere, row i's loss is sum_j softplus(-z_ij L_ij) and its logit gradient is
// G_ij = w_i (sigmoid(L_ij) - [j = offset + i]). No normalisation couples a row's entries, so
// each row block of S = Q @ K^T (GEMM 1) is turned in place into G while its loss is summed,
// and G @ K, G^T @ Q (GEMMs 2 and 3) follow on the same block: 6 * n * m * D FLOPs for the
// loss and both feature gradients, where an autograd composition also does 6 and moves the
// n x m matrices through memory several times, and a recompute-in-backward design does 8.
// Without a gradient only GEMM 1 runs. Memory: O((n + m) * D) plus one block of rows x m.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "lse_tiles.h"
#include "ops.h"

namespace fitclip {
namespace {

struct RowSums {
  double loss, g_dot_s, g_sum;
};

// Negatives x[0, n): loss += softplus(l), G = w * sigmoid(l) written over x (when grad), with
// l = scale * x + bias. Returns (sum softplus, sum G * x, sum G).
template <typename T>
FITCLIP_INLINE void negatives(T* x, int64_t n, T scale, T bias, T w, bool grad, T* out) {
  T loss = 0, gs = 0, gsum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T l = scale * x[j] + bias;
    const T e = std::exp(-std::abs(l));
    loss += (l > 0 ? l : T(0)) + std::log1p(e);
    if (grad) {
      const T g = w * (l >= 0 ? T(1) : e) / (T(1) + e);
      gs += g * x[j];
      gsum += g;
      x[j] = g;
    }
  }
  out[0] += loss, out[1] += gs, out[2] += gsum;
}

// float: 16 partial sums per quantity so that GCC keeps them in vectors; fast exp and log.
template <bool kGrad>
FITCLIP_INLINE void negatives_f_impl(float* x, int64_t n, float scale, float bias, float w, float* out) {
  float loss[16] = {0}, gs[16] = {0}, gsum[16] = {0};
  auto one = [&](int64_t j, int l16) {
    const float v = x[j];
    const float l = scale * v + bias;
    const float a = l < 0 ? -l : l;
    const float e = fast_expf(-a);
    const float sp = (l > 0 ? l : 0.0f) + fast_log1pf_unit(e);
    loss[l16] += l != l ? l : sp;  // (NaN in, NaN out)
    if (kGrad) {
      const float g = w * (l >= 0 ? 1.0f : e) / (1.0f + e);
      gs[l16] += g * v;
      gsum[l16] += g;
      x[j] = g;
    }
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l16 = 0; l16 < 16; ++l16) one(j + l16, l16);
  for (int l16 = 0; j < n; ++j, ++l16) one(j, l16);
  for (int l16 = 0; l16 < 16; ++l16) out[0] += loss[l16], out[1] += gs[l16], out[2] += gsum[l16];
}

static FITCLIP_CLONES void negatives_f_grad(float* x, int64_t n, float s, float b, float w, float* out) {
  negatives_f_impl<true>(x, n, s, b, w, out);
}
static FITCLIP_CLONES void negatives_f_loss(float* x, int64_t n, float s, float b, float w, float* out) {
  negatives_f_impl<false>(x, n, s, b, w, out);
}

template <typename T>
inline void neg(T* x, int64_t n, T s, T b, T w, bool grad, T* out) { negatives<T>(x, n, s, b, w, grad, out); }
template <>
inline void neg<float>(float* x, int64_t n, float s, float b, float w, bool grad, float* out) {
  if (grad) negatives_f_grad(x, n, s, b, w, out);
  else negatives_f_loss(x, n, s, b, w, out);
}

// One row of S in place (G when grad): the negatives around the positive column p (p < 0: none),
// then the positive, loss softplus(-l) and G = -w * sigmoid(-l), both computed without cancellation.
template <typename T>
FITCLIP_INLINE RowSums row(T* x, int64_t m, int64_t p, T scale, T bias, T w, bool grad) {
  T acc[3] = {0, 0, 0};
  if (p < 0) {
    neg<T>(x, m, scale, bias, w, grad, acc);
    return {double(acc[0]), double(acc[1]), double(acc[2])};
  }
  neg<T>(x, p, scale, bias, w, grad, acc);
  neg<T>(x + p + 1, m - p - 1, scale, bias, w, grad, acc);
  const T v = x[p];
  const T l = scale * v + bias;
  const T e = std::exp(-std::abs(l));
  acc[0] += (l < 0 ? -l : T(0)) + std::log1p(e);
  if (grad) {
    const T g = -w * (l <= 0 ? T(1) : e) / (T(1) + e);
    acc[1] += g * v;
    acc[2] += g;
    x[p] = g;
  }
  return {double(acc[0]), double(acc[1]), double(acc[2])};
}

// loss [n]; (dQ, dK) += (G @ K, G^T @ Q); stats [2, n] = (sum_j G_ij S_ij, sum_j G_ij) per row.
template <typename T>
void sigmoid_impl(const at::Tensor& Q, const at::Tensor& K, T scale, T bias, int64_t offset, const T* rw,
                  bool grad, at::Tensor& loss, at::Tensor& dQ, at::Tensor& dK, at::Tensor& stats) {
  const int64_t n = Q.size(0), m = K.size(0);
  // About 2^23 products per block (32 MB of fp32): half InfoNCE's, since the block is the largest
  // part of this op's memory beside the saved gradients (B = 16384: 512-row blocks).
  const int64_t bm = rows_per_block(n, m, int64_t(1) << 23, 32);
  auto S = at::empty({bm, m}, Q.options());
  T* lp = loss.data_ptr<T>();
  T* st = grad ? stats.data_ptr<T>() : nullptr;
  const at::Tensor Kt = K.t();
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Sb = S.narrow(0, 0, rows);
    auto Qb = Q.narrow(0, r0, rows);
    at::mm_out(Sb, Qb, Kt);
    T* sp = Sb.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r0 + r;
        const RowSums s = row<T>(sp + r * m, m, offset < 0 ? -1 : offset + i, scale, bias, rw ? rw[i] : T(1), grad);
        lp[i] = T(s.loss);
        if (grad) st[i] = T(s.g_dot_s), st[n + i] = T(s.g_sum);
      }
    });
    if (grad) {
      auto dQb = dQ.narrow(0, r0, rows);
      at::mm_out(dQb, Sb, K);
      dK.addmm_(Sb.t(), Qb);
    }
  }
}

}  // namespace

// Returns (loss [n], G @ keys [n, D], G^T @ query [m, D], stats [2, n]) in the compute dtype
// (float64 for float64 inputs, else float32), G = diag(row_weight or 1) (sigmoid(L) - P) and P the
// positives (j = offset + i; offset < 0: none). Without with_grad only the loss is computed
// (the other three are empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_loss_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale, const at::Tensor& bias, int64_t offset,
    const std::optional<at::Tensor>& row_weight, bool with_grad) {
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu(), "fitclip_ext C++ ops take CPU tensors");
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2, "query and keys must be 2-D, got ", query.sizes(), " and ", keys.sizes());
  TORCH_CHECK(query.size(1) == keys.size(1), "query and keys must have the same feature size, got ", query.size(1),
              " and ", keys.size(1));
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "query and keys must have the same dtype");
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), "query and keys must be floating point");
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, "scale and bias must have one element");
  const auto ct = compute_type(query);
  const auto Q = query.to(ct).contiguous();
  const auto K = keys.to(ct).contiguous();
  const int64_t n = Q.size(0), m = K.size(0), D = Q.size(1);
  TORCH_CHECK(offset < 0 || offset + n <= m, "offset + n must be at most m, got offset ", offset, ", n ", n, ", m ", m);
  at::Tensor rw;
  if (row_weight.has_value()) {
    TORCH_CHECK(row_weight->numel() == n, "row_weight must have ", n, " elements");
    rw = row_weight->to(ct).contiguous();
  }
  auto loss = at::zeros({n}, Q.options());
  auto dQ = with_grad ? at::zeros({n, D}, Q.options()) : at::empty({0, D}, Q.options());
  auto dK = with_grad ? at::zeros({m, D}, Q.options()) : at::empty({0, D}, Q.options());
  auto stats = with_grad ? at::zeros({2, n}, Q.options()) : at::empty({2, 0}, Q.options());
  if (n == 0 || m == 0) return {loss, dQ, dK, stats};
  const double s = scale.item<double>(), b = bias.item<double>();
  if (ct == at::kDouble) {
    sigmoid_impl<double>(Q, K, s, b, offset, rw.defined() ? rw.data_ptr<double>() : nullptr, with_grad, loss, dQ, dK,
                         stats);
  } else {
    sigmoid_impl<float>(Q, K, float(s), float(b), offset, rw.defined() ? rw.data_ptr<float>() : nullptr, with_grad,
                        loss, dQ, dK, stats);
  }
  return {loss, dQ, dK, stats};
}

}  // namespace fitclip
