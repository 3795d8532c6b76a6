// Chunked distillation loss (`distillation_loss`, FitCLIP's unlabeled loss) for CPU tensors.
//
// Student logits Y = s * A @ B^T and teacher logits X = t * C @ E^T (rows: videos, columns:
// captions). Per row i (and likewise per column) the KL(softmax(X_i) || softmax(Y_i)) is
//   KL_i = sum_j p_ij (X_ij - Y_ij) - lseX_i + lseY_i,   p_ij = exp(X_ij - lseX_i),
// computed with both logits shifted by their maxima (mx, my), so that 0 comes out as 0:
//   KL_i = sum_j e^(X_ij - mx) ((X_ij - mx) - (Y_ij - my)) / a - log a + log c,
// so the forward only needs, per row and per column, the two log-sum-exps and the p-weighted
// mean of X - Y. Each log-sum-exp is kept as its two parts, (max, log of the sum of exp relative
// to it), the max taken on the unscaled products (see Scale): the backward's exponent
// scale * (raw - max) - log_sum is then exactly -log_sum for the dominant entry of a peaked row,
// as in torch's log_softmax. One rounded lse = max + log_sum carries an error of the logits'
// magnitude (4e-6 at FitCLIP's teacher scale 66.7) that every probability of the row shares and
// that the difference q - p does not cancel (30x the naive scale-gradient error at n = 2, m = 3).
// The forward streams row blocks of both products once (two GEMMs per block),
// row statistics exactly, column statistics merged online across blocks. The backward
// recomputes the blocks, turns the student block in place into
//   G_ij = w_i (q_ij - p_ij) + v_j (q'_ij - p'_ij)   (q: student softmax, ' : over columns),
// and accumulates G @ B and G^T @ A (GEMMs 3 and 4). Memory: O((n + m) * D) plus two blocks.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "lse_tiles.h"
#include "ops.h"

namespace fitclip {
namespace {

// Rows per block: two block buffers (student and teacher) of about 2^23 elements each.
int64_t distill_block_rows(int64_t n, int64_t m) { return rows_per_block(n, m, int64_t(1) << 23, 16); }

// A logit scale as sign and magnitude: logit = mag * (sign * raw), with sign * raw ("oriented":
// larger means a larger logit) the quantity whose maxima are kept. Differences are taken before
// scaling, mag * (u - u_max), so that the dominant entry's exponent is exactly 0 however the
// compiler contracts the arithmetic (a product folded into an FMA with the subtraction would
// otherwise leave the product's rounding, 4e-6 at logits of 66.7).
template <typename T>
struct Scale {
  T sign, mag;
  explicit Scale(double s) : sign(s < 0 ? T(-1) : T(1)), mag(static_cast<T>(s < 0 ? -s : s)) {}
};

// One full row of raw products X (teacher) and Y (student). Writes (max, log-sum) of the oriented
// student and teacher rows, and KL.
template <typename T>
FITCLIP_INLINE void kl_row(const T* X, const T* Y, int64_t m, Scale<T> ts, Scale<T> ss, T* max_y, T* lsum_y, T* max_x,
                           T* lsum_x, T* kl) {
  T mx = -std::numeric_limits<T>::infinity(), my = mx;
  for (int64_t j = 0; j < m; ++j) {
    const T x = ts.sign * X[j], y = ss.sign * Y[j];
    mx = x > mx ? x : mx;
    my = y > my ? y : my;
  }
  T a = 0, b = 0, c = 0;
  for (int64_t j = 0; j < m; ++j) {
    const T dx = ts.mag * (ts.sign * X[j] - mx), dy = ss.mag * (ss.sign * Y[j] - my);
    const T p = fast_exp(dx);
    a += p;
    b += p * (dx - dy);  // shifted: the dominant terms are differences of small numbers
    c += fast_exp(dy);
  }
  *max_x = mx;
  *lsum_x = std::log(a);
  *max_y = my;
  *lsum_y = std::log(c);
  *kl = b / a - std::log(a) + std::log(c);
}

static FITCLIP_CLONES void kl_row_f(const float* X, const float* Y, int64_t m, Scale<float> ts, Scale<float> ss,
                                    float* max_y, float* lsum_y, float* max_x, float* lsum_x, float* kl) {
  kl_row<float>(X, Y, m, ts, ss, max_y, lsum_y, max_x, lsum_x, kl);
}

// Running column statistics: max of the oriented products and sum of exp for both logits, and
// sum p (dx - dy) with p = exp(dx), all relative to the running maxima. Merges rows [0, rows) of
// a block for columns [c0, c1).
template <typename T>
FITCLIP_INLINE void kl_cols(const T* X, const T* Y, int64_t rows, int64_t ld, int64_t c0, int64_t c1, Scale<T> ts,
                            Scale<T> ss, T* mx, T* ax, T* bx, T* my, T* cy, T* tx, T* ty) {
  const int64_t w = c1 - c0;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < w; ++c) tx[c] = ty[c] = ninf;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = X + r * ld + c0;
    const T* yr = Y + r * ld + c0;
    for (int64_t c = 0; c < w; ++c) {
      const T x = ts.sign * xr[c], y = ss.sign * yr[c];
      tx[c] = x > tx[c] ? x : tx[c];
      ty[c] = y > ty[c] ? y : ty[c];
    }
  }
  for (int64_t c = 0; c < w; ++c) {
    const int64_t j = c0 + c;
    const T nx = tx[c] > mx[j] ? tx[c] : mx[j];
    const T ny = ty[c] > my[j] ? ty[c] : my[j];
    if (mx[j] == ninf || my[j] == ninf) {  // nothing merged yet
      ax[j] = bx[j] = cy[j] = 0;
    } else {
      // bx holds sum p (dx - dy): moving the maxima shifts every term by the change of dy - dx.
      const T fx = fast_exp(ts.mag * (mx[j] - nx));
      bx[j] = fx * (bx[j] + ax[j] * (ss.mag * (ny - my[j]) - ts.mag * (nx - mx[j])));
      ax[j] *= fx;
      cy[j] *= fast_exp(ss.mag * (my[j] - ny));
    }
    mx[j] = nx;
    my[j] = ny;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = X + r * ld + c0;
    const T* yr = Y + r * ld + c0;
    for (int64_t c = 0; c < w; ++c) {
      const int64_t j = c0 + c;
      const T dx = ts.mag * (ts.sign * xr[c] - mx[j]), dy = ss.mag * (ss.sign * yr[c] - my[j]);
      const T p = fast_exp(dx);
      ax[j] += p;
      bx[j] += p * (dx - dy);
      cy[j] += fast_exp(dy);
    }
  }
}

static FITCLIP_CLONES void kl_cols_f(const float* X, const float* Y, int64_t rows, int64_t ld, int64_t c0,
                                     int64_t c1, Scale<float> ts, Scale<float> ss, float* mx, float* ax, float* bx,
                                     float* my, float* cy, float* tx, float* ty) {
  kl_cols<float>(X, Y, rows, ld, c0, c1, ts, ss, mx, ax, bx, my, cy, tx, ty);
}

// A log-sum-exp in its two parts, for one row (max[0], lsum[0]) or for every column (max[j], lsum[j]).
template <typename T>
struct Lse {
  const T* max;
  const T* lsum;
};

// In place: Y[j] <- w (q_j - p_j) + v_j (q'_j - p'_j) for one row; r: the row's statistics, c: the columns'.
template <typename T>
FITCLIP_INLINE void kl_grad_row(T* Y, const T* X, int64_t m, Scale<T> ts, Scale<T> ss, T w, Lse<T> ry, Lse<T> rx,
                                Lse<T> cy, Lse<T> cx, const T* v) {
  const T rmy = *ry.max, rly = *ry.lsum, rmx = *rx.max, rlx = *rx.lsum;
  for (int64_t j = 0; j < m; ++j) {
    const T x = ts.sign * X[j], y = ss.sign * Y[j];
    Y[j] = w * (fast_exp(ss.mag * (y - rmy) - rly) - fast_exp(ts.mag * (x - rmx) - rlx)) +
           v[j] * (fast_exp(ss.mag * (y - cy.max[j]) - cy.lsum[j]) - fast_exp(ts.mag * (x - cx.max[j]) - cx.lsum[j]));
  }
}

static FITCLIP_CLONES void kl_grad_row_f(float* Y, const float* X, int64_t m, Scale<float> ts, Scale<float> ss,
                                         float w, Lse<float> ry, Lse<float> rx, Lse<float> cy, Lse<float> cx,
                                         const float* v) {
  kl_grad_row<float>(Y, X, m, ts, ss, w, ry, rx, cy, cx, v);
}

template <typename T>
inline void klrow(const T* X, const T* Y, int64_t m, Scale<T> ts, Scale<T> ss, T* my, T* ly, T* mx, T* lx, T* kl) {
  if constexpr (std::is_same_v<T, float>) kl_row_f(X, Y, m, ts, ss, my, ly, mx, lx, kl);
  else kl_row<T>(X, Y, m, ts, ss, my, ly, mx, lx, kl);
}

template <typename T>
inline void klcols(const T* X, const T* Y, int64_t rows, int64_t ld, int64_t c0, int64_t c1, Scale<T> ts, Scale<T> ss, T* mx,
                   T* ax, T* bx, T* my, T* cy, T* tx, T* ty) {
  if constexpr (std::is_same_v<T, float>) kl_cols_f(X, Y, rows, ld, c0, c1, ts, ss, mx, ax, bx, my, cy, tx, ty);
  else kl_cols<T>(X, Y, rows, ld, c0, c1, ts, ss, mx, ax, bx, my, cy, tx, ty);
}

template <typename T>
inline void klgrad(T* Y, const T* X, int64_t m, Scale<T> ts, Scale<T> ss, T w, Lse<T> ry, Lse<T> rx, Lse<T> cy, Lse<T> cx,
                   const T* v) {
  if constexpr (std::is_same_v<T, float>) kl_grad_row_f(Y, X, m, ts, ss, w, ry, rx, cy, cx, v);
  else kl_grad_row<T>(Y, X, m, ts, ss, w, ry, rx, cy, cx, v);
}

struct Inputs {
  at::Tensor A, B, C, E;  // student video, student text, teacher video, teacher text (compute dtype)
};

Inputs prepare(const at::Tensor& sv, const at::Tensor& st, const at::Tensor& tv, const at::Tensor& tt,
               const at::Tensor& s_scale, const at::Tensor& t_scale) {
  for (const auto* t : {&sv, &st, &tv, &tt}) {
    TORCH_CHECK(t->device().is_cpu(), "fitclip_ext C++ ops take CPU tensors");
    TORCH_CHECK(t->dim() == 2, "distillation features must be 2-D, got ", t->sizes());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "distillation features must be floating point");
  }
  TORCH_CHECK(sv.size(1) == st.size(1), "student features must share D, got ", sv.size(1), " and ", st.size(1));
  TORCH_CHECK(tv.size(1) == tt.size(1), "teacher features must share D, got ", tv.size(1), " and ", tt.size(1));
  TORCH_CHECK(sv.size(0) == tv.size(0) && st.size(0) == tt.size(0),
              "student and teacher must score the same videos and captions");
  TORCH_CHECK(s_scale.numel() == 1 && t_scale.numel() == 1, "scales must have one element");
  const auto ct = compute_type(sv);
  return {sv.to(ct).contiguous(), st.to(ct).contiguous(), tv.to(ct).contiguous(), tt.to(ct).contiguous()};
}

template <typename T>
void stats_impl(const Inputs& in, Scale<T> ss, Scale<T> ts, std::vector<at::Tensor>& out) {
  const int64_t n = in.A.size(0), m = in.B.size(0);
  const int64_t bm = distill_block_rows(n, m);
  auto Yb = at::empty({bm, m}, in.A.options());
  auto Xb = at::empty({bm, m}, in.A.options());
  // out[0], out[1]: [2, n] (max, log-sum) of the student and teacher rows
  T* rmy = out[0].data_ptr<T>();
  T* rly = rmy + n;
  T* rmx = out[1].data_ptr<T>();
  T* rlx = rmx + n;
  T* rkl = out[2].data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  at::Tensor mx = at::full({m}, ninf, in.A.options()), my = at::full({m}, ninf, in.A.options());
  at::Tensor ax = at::zeros({m}, in.A.options()), bx = at::zeros({m}, in.A.options()), cy = at::zeros({m}, in.A.options());
  T *pmx = mx.data_ptr<T>(), *pmy = my.data_ptr<T>(), *pax = ax.data_ptr<T>(), *pbx = bx.data_ptr<T>(),
    *pcy = cy.data_ptr<T>();
  const at::Tensor Bt = in.B.t(), Et = in.E.t();
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Y = Yb.narrow(0, 0, rows), X = Xb.narrow(0, 0, rows);
    at::mm_out(Y, in.A.narrow(0, r0, rows), Bt);
    at::mm_out(X, in.C.narrow(0, r0, rows), Et);
    const T* yp = Y.data_ptr<T>();
    const T* xp = X.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r0 + r;
        klrow<T>(xp + r * m, yp + r * m, m, ts, ss, rmy + i, rly + i, rmx + i, rlx + i, rkl + i);
      }
    });
    const int64_t nchunks = (m + kColChunk - 1) / kColChunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<T> tx(kColChunk), ty(kColChunk);
      for (int64_t c = b; c < e; ++c) {
        const int64_t c0 = c * kColChunk, c1 = std::min(m, c0 + kColChunk);
        klcols<T>(xp, yp, rows, m, c0, c1, ts, ss, pmx, pax, pbx, pmy, pcy, tx.data(), ty.data());
      }
    });
  }
  out[3] = at::stack({my, cy.log()});
  out[4] = at::stack({mx, ax.log()});
  out[5] = bx / ax - ax.log() + cy.log();
}

template <typename T>
void grad_impl(const Inputs& in, Scale<T> ss, Scale<T> ts, const at::Tensor& rsy, const at::Tensor& rsx, const at::Tensor& rw,
               const at::Tensor& csy, const at::Tensor& csx, const at::Tensor& cw, at::Tensor& dA, at::Tensor& dB) {
  const int64_t n = in.A.size(0), m = in.B.size(0);
  const int64_t bm = distill_block_rows(n, m);
  auto Yb = at::empty({bm, m}, in.A.options());
  auto Xb = at::empty({bm, m}, in.A.options());
  auto parts = [](const at::Tensor& s) { return Lse<T>{s.data_ptr<T>(), s.data_ptr<T>() + s.size(1)}; };
  const Lse<T> ry = parts(rsy), rx = parts(rsx), cy = parts(csy), cx = parts(csx);
  const T *w = rw.data_ptr<T>(), *v = cw.data_ptr<T>();
  const at::Tensor Bt = in.B.t(), Et = in.E.t();
  for (int64_t r0 = 0; r0 < n; r0 += bm) {
    const int64_t rows = std::min(bm, n - r0);
    auto Y = Yb.narrow(0, 0, rows), X = Xb.narrow(0, 0, rows);
    auto Ab = in.A.narrow(0, r0, rows);
    at::mm_out(Y, Ab, Bt);
    at::mm_out(X, in.C.narrow(0, r0, rows), Et);
    T* yp = Y.data_ptr<T>();
    const T* xp = X.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r0 + r;
        klgrad<T>(yp + r * m, xp + r * m, m, ts, ss, w[i], {ry.max + i, ry.lsum + i}, {rx.max + i, rx.lsum + i}, cy,
                  cx, v);
      }
    });
    auto dAb = dA.narrow(0, r0, rows);
    at::mm_out(dAb, Y, in.B);
    dB.addmm_(Y.t(), Ab);
  }
}

}  // namespace

// (row_stats_student, row_stats_teacher [2, n], row_kl [n], col_stats_student, col_stats_teacher
// [2, m], col_kl [m]) in the compute dtype (float64 for float64 inputs, else float32); a stats
// tensor holds each log-sum-exp as (max of sign(scale) * raw product, log of the sum of exp of the
// logits relative to their max), natural log.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_stats_cpu(
    const at::Tensor& sv, const at::Tensor& st, const at::Tensor& tv, const at::Tensor& tt, const at::Tensor& s_scale,
    const at::Tensor& t_scale) {
  const Inputs in = prepare(sv, st, tv, tt, s_scale, t_scale);
  const int64_t n = in.A.size(0), m = in.B.size(0);
  TORCH_CHECK(n > 0 && m > 0, "distillation needs at least one video and one caption");
  std::vector<at::Tensor> out = {at::empty({2, n}, in.A.options()), at::empty({2, n}, in.A.options()),
                                 at::empty({n}, in.A.options()), at::Tensor(), at::Tensor(), at::Tensor()};
  const double ss = s_scale.item<double>(), ts = t_scale.item<double>();
  if (in.A.scalar_type() == at::kDouble) stats_impl<double>(in, Scale<double>(ss), Scale<double>(ts), out);
  else stats_impl<float>(in, Scale<float>(ss), Scale<float>(ts), out);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// (G @ student_text, G^T @ student_video) in the compute dtype, G the gradient of
// sum_i w_i KL_i + sum_j v_j KL'_j with respect to the student logits.
std::tuple<at::Tensor, at::Tensor> distill_grad_cpu(const at::Tensor& sv, const at::Tensor& st, const at::Tensor& tv,
                                                    const at::Tensor& tt, const at::Tensor& s_scale,
                                                    const at::Tensor& t_scale, const at::Tensor& row_stats_s,
                                                    const at::Tensor& row_stats_t, const at::Tensor& row_w,
                                                    const at::Tensor& col_stats_s, const at::Tensor& col_stats_t,
                                                    const at::Tensor& col_w) {
  const Inputs in = prepare(sv, st, tv, tt, s_scale, t_scale);
  const int64_t n = in.A.size(0), m = in.B.size(0);
  TORCH_CHECK(n > 0 && m > 0, "distillation needs at least one video and one caption");
  const auto ct = in.A.scalar_type();
  for (const auto* t : {&row_stats_s, &row_stats_t})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 2 && t->size(1) == n, "row statistics must have shape [2, ", n, "]");
  for (const auto* t : {&col_stats_s, &col_stats_t})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 2 && t->size(1) == m, "column statistics must have shape [2, ", m, "]");
  TORCH_CHECK(row_w.numel() == n, "row weights must have ", n, " elements");
  TORCH_CHECK(col_w.numel() == m, "column weights must have ", m, " elements");
  auto c = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  auto dA = at::empty_like(in.A);
  auto dB = at::zeros_like(in.B);
  const double ss = s_scale.item<double>(), ts = t_scale.item<double>();
  if (ct == at::kDouble)
    grad_impl<double>(in, Scale<double>(ss), Scale<double>(ts), c(row_stats_s), c(row_stats_t), c(row_w), c(col_stats_s), c(col_stats_t), c(col_w), dA,
                      dB);
  else
    grad_impl<float>(in, Scale<float>(ss), Scale<float>(ts), c(row_stats_s), c(row_stats_t), c(row_w),
                     c(col_stats_s), c(col_stats_t), c(col_w), dA, dB);
  return {dA, dB};
}

}  // namespace fitclip
