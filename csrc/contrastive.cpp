// Chunked InfoNCE (`contrastive_loss` / `infonce`, CLIP's contrastive loss) for CPU tensors.
//
// The loss only needs, per row and per column of L = scale * Q @ K^T, a log-sum-exp; the
// positive logits and the label-smoothing terms are O(B*D) and are computed in Python.
// Forward streams row blocks of S = Q @ K^T once (one GEMM) and keeps O(n + m) statistics.
// Backward recomputes each block (GEMM 2), turns it in place into the softmax part of the
// logit gradient G = diag(w) P_row + P_col diag(v), and accumulates G @ K and G^T @ Q
// (GEMMs 3 and 4). Memory: O((n + m) * D) plus one block of `block_rows` x m (forward) or
// `block_rows` x `block_cols` (backward).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "lse_tiles.h"
#include "ops.h"

namespace fitclip {
namespace {


// Rows per block: about `target` elements (64 MB of fp32), at most 1024 rows, at least 32.
// Fewer, larger GEMMs are faster: fwd+bwd at B=16384, D=512 on 2 cores took 6.1-6.4 s with
// 1024-row blocks, 6.6 s with 512, 6.9 s with 256, 8.0 s with 128. The 1024 cap keeps the
// block a fraction of B x B from B = 2048 up. FITCLIP_CPU_BLOCK_ELEMS overrides the target.
int64_t block_rows(int64_t n, int64_t m) { return rows_per_block(n, m, int64_t(1) << 24, 32); }

// Columns per block of the backward: a quarter of the forward's block (16 MB of fp32), since
// the backward's peak also holds both gradients. The rows stay those of the forward (up to
// 1024), so dK's read-modify-write per row block and the GEMMs' inner dimensions are unchanged;
// at B = 16384 this cut the peak extra RSS of forward+backward from 161-169 to 113-121 MB
// (benchmarks/memprobe.py, 3 runs each) and took 7.7-8.1 s against 8.3-9.1 s on 2 cores.
int64_t block_cols(int64_t m, int64_t rows) {
  int64_t target = int64_t(1) << 22;
  if (const char* env = std::getenv("FITCLIP_CPU_BLOCK_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) target = std::max<long long>(v / 4, 1);
  }
  return std::min(m, std::max<int64_t>(256, target / std::max<int64_t>(rows, 1)));
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
    if (col_lse) merge_block_col_stats<T>(sp, rows, m, scale, cmax.data_ptr<T>(), csum.data_ptr<T>());
  }
  if (col_lse) *col_lse = cmax + csum.log();
}

template <typename T>
void grad_impl(const at::Tensor& Q, const at::Tensor& K, T scale, const at::Tensor& row_lse,
               const at::Tensor& row_w, const at::Tensor* col_lse, const at::Tensor* col_w,
               at::Tensor& dQ, at::Tensor& dK) {
  const int64_t n = Q.size(0), m = K.size(0);
  const int64_t bm = block_rows(n, m);
  const int64_t bc = block_cols(m, bm);
  auto S = at::empty({bm * bc}, Q.options());  // (flat: each block is a contiguous rows x cols view)
  const T* rl = row_lse.data_ptr<T>();
  const T* rw = row_w.data_ptr<T>();
  const T* cl = col_lse ? col_lse->data_ptr<T>() : nullptr;
  const T* cw = col_w ? col_w->data_ptr<T>() : nullptr;
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Qb = Q.narrow(0, r0, rows);
    auto dQb = dQ.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < m; c0 += bc) {
      const int64_t cols = std::min(bc, m - c0);
      auto Sb = S.narrow(0, 0, rows * cols).view({rows, cols});
      auto Kb = K.narrow(0, c0, cols);
      at::mm_out(Sb, Qb, Kb.t());
      T* sp = Sb.data_ptr<T>();
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          sgrad<T>(sp + r * cols, cols, scale, rw[r0 + r], rl[r0 + r], cl ? cl + c0 : nullptr, cw ? cw + c0 : nullptr);
      });
      if (c0 == 0) at::mm_out(dQb, Sb, Kb); else dQb.addmm_(Sb, Kb);
      dK.narrow(0, c0, cols).addmm_(Sb.t(), Qb);
    }
  }
}

}  // namespace

// Returns (row_lse [n], col_lse [m] or empty) of L = scale * query @ keys^T in the compute
// dtype (float64 for float64 inputs, else float32).
std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& query, const at::Tensor& keys,
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
std::tuple<at::Tensor, at::Tensor> contrastive_grad_cpu(const at::Tensor& query, const at::Tensor& keys,
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
