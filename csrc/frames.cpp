// Frame-caption cosine similarity fused with top-k selection, for CPU tensors.
//
// With normalize=true (what the public ops use) the inputs are raw embeddings and the cosine
// normalisation is folded in, as torch.nn.functional.normalize does it (norms clamped at 1e-12):
// a unit copy of the captions (C x D, small), the frames used as given with their inverse norms
// applied to the similarities, and the backward returns gradients of the raw inputs, so no
// normalised copy of the V x T x D frames (nor its autograd temporaries) is ever made.
// With normalize=false the inputs are taken as already unit length. For a block of
// captions, one GEMM gives the similarities to every frame of every video ([rows, V*T], the
// block only), a top-k per (caption, video) reduces them to [rows, V] and remembers the chosen
// frames (int16). The backward applies the pooled gradient to the chosen frames only (sparse,
// k/T of the dense FLOPs, cache-blocked). The video InfoNCE runs the
// chunked loss of infonce.cpp over these pooled similarities, so neither C x V x T nor the
// B x B logits are stored.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "lse_tiles.h"

namespace fitclip {
namespace {

// Rows of a caption block: about 2^22 similarities (16 MB of fp32) per block.
int64_t frame_block_rows(int64_t n, int64_t cols) { return rows_per_block(n, cols, int64_t(1) << 22, 16); }

// Sum of the k largest of x[0..T) among unmasked entries, ties to the earlier index; the chosen
// indices go to idx (in order of decreasing value). NaN anywhere makes the sum NaN, as a sort
// that ranks NaN first would. best/bidx are scratch of size k.
template <typename T>
T topk_sum(const T* x, const bool* mask, int64_t nt, int64_t k, int16_t* idx, T* best, int16_t* bidx) {
  int64_t cnt = 0;
  bool nan = false;
  for (int64_t t = 0; t < nt; ++t) {
    if (mask && !mask[t]) continue;
    const T v = x[t];
    if (v != v) {
      nan = true;
      continue;
    }
    if (cnt == k && !(v > best[k - 1])) continue;  // equal values keep the earlier frame
    int64_t pos = cnt < k ? cnt++ : k - 1;
    while (pos > 0 && v > best[pos - 1]) {
      best[pos] = best[pos - 1];
      bidx[pos] = bidx[pos - 1];
      --pos;
    }
    best[pos] = v;
    bidx[pos] = static_cast<int16_t>(t);
  }
  T sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += best[j];
  if (idx)
    for (int64_t j = 0; j < k; ++j) idx[j] = bidx[j];
  return nan ? std::numeric_limits<T>::quiet_NaN() : sum;
}

// Top-k pooling of one row of similarities laid out time-major (sims[t * V + v]) for videos
// [v0, v0 + L): the L videos are SIMD lanes and each frame goes through a branch-free insertion
// network of k compare-and-swap steps (strict >, so an equal later frame never displaces an
// earlier one). best/bidx: scratch of k * L.
constexpr int64_t kLanes = 16;

template <typename T>
FITCLIP_INLINE void topk_lanes(const T* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl, int64_t nt,
                               int64_t k, const bool* mask_tm, T* best, int32_t* bidx, T* out, int16_t* idx_out) {
  constexpr int64_t L = kLanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < k * L; ++i) {
    best[i] = ninf;
    bidx[i] = -1;
  }
  int32_t nan[L] = {0};
  for (int64_t t = 0; t < nt; ++t) {
    T xv[L];
    int32_t xi[L];
    const T* x = sims + t * t_stride + v0;
    if (nl == L && !mask_tm) {  // the common case: one straight vector load
      for (int64_t l = 0; l < L; ++l) {
        xv[l] = x[l];
        nan[l] |= x[l] != x[l];
        xi[l] = static_cast<int32_t>(t);
      }
    } else {
      for (int64_t l = 0; l < L; ++l) {
        T val = l < nl ? x[l < nl ? l : 0] : ninf;
        if (mask_tm) val = (l < nl && mask_tm[t * V + v0 + (l < nl ? l : 0)]) ? val : ninf;
        nan[l] |= val != val;
        xv[l] = val;
        xi[l] = static_cast<int32_t>(t);
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      T* bj = best + j * L;
      int32_t* ij = bidx + j * L;
      for (int64_t l = 0; l < L; ++l) {
        const bool sw = xv[l] > bj[l];
        const T b = bj[l];
        const int32_t bi = ij[l];
        bj[l] = sw ? xv[l] : b;
        ij[l] = sw ? xi[l] : bi;
        xv[l] = sw ? b : xv[l];
        xi[l] = sw ? bi : xi[l];
      }
    }
  }
  for (int64_t l = 0; l < nl; ++l) {
    T sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += best[j * L + l];
    out[l] = nan[l] ? std::numeric_limits<T>::quiet_NaN() : sum / static_cast<T>(k);
    if (idx_out)
      for (int64_t j = 0; j < k; ++j) idx_out[l * k + j] = static_cast<int16_t>(bidx[j * L + l]);
  }
}

static FITCLIP_CLONES void topk_lanes_f(const float* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl,
                                        int64_t nt, int64_t k, const bool* mask_tm, float* best, int32_t* bidx,
                                        float* out, int16_t* idx_out) {
  topk_lanes<float>(sims, t_stride, V, v0, nl, nt, k, mask_tm, best, bidx, out, idx_out);
}
template <typename T>
inline void topk_lanes_any(const T* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl, int64_t nt,
                           int64_t k, const bool* mask_tm, T* best, int32_t* bidx, T* out, int16_t* idx_out) {
  topk_lanes<T>(sims, t_stride, V, v0, nl, nt, k, mask_tm, best, bidx, out, idx_out);
}
template <>
inline void topk_lanes_any<float>(const float* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl,
                                  int64_t nt, int64_t k, const bool* mask_tm, float* best, int32_t* bidx,
                                  float* out, int16_t* idx_out) {
  topk_lanes_f(sims, t_stride, V, v0, nl, nt, k, mask_tm, best, bidx, out, idx_out);
}

// sims [T][rows][V] (frame t of row r at sims + t * t_stride + r * V) -> out[r * ld_out + v] =
// mean of the top k of video v; the chosen frames go to idx [rows, V, k] when given.
template <typename T>
void topk_pool_tile(const T* sims, int64_t t_stride, int64_t rows, int64_t V, int64_t nt, int64_t k,
                    const bool* mask_tm, T* out, int64_t ld_out, int16_t* idx) {
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    std::vector<T> best(k * kLanes);
    std::vector<int32_t> bidx(k * kLanes);
    for (int64_t r = b; r < e; ++r) {
      for (int64_t v0 = 0; v0 < V; v0 += kLanes) {
        const int64_t nl = std::min(kLanes, V - v0);
        topk_lanes_any<T>(sims + r * V, t_stride, V, v0, nl, nt, k, mask_tm, best.data(), bidx.data(),
                          out + r * ld_out + v0, idx ? idx + (r * V + v0) * k : nullptr);
      }
    }
  });
}

// y[0..n) += a * x[0..n); inlined into the cloned block loops below so that it is compiled
// for AVX-512/AVX2 without a dispatch per call.
template <typename T>
FITCLIP_INLINE void axpy(int64_t n, T a, const T* x, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The backward only touches the k chosen of every T frames, so it runs sparse: k/T of the
// dense GEMMs' FLOPs, in blocks whose accumulators stay in L2 while the other operand streams.
// dtext[c] = sum_v grad[c, v] / k * sum_j frames[v, idx[c, v, j]] for captions [c0, c1)
// (fscale: per-frame factors [V * T], the frames' inverse norms when normalising, or null.)
template <typename T>
FITCLIP_INLINE void dtext_block(const T* grad, const int16_t* idx, const T* frames, const T* fscale, int64_t c0,
                                int64_t c1, int64_t V, int64_t nt, int64_t D, int64_t k, T* dtext) {
  std::fill(dtext + c0 * D, dtext + c1 * D, T(0));
  const T inv_k = T(1) / static_cast<T>(k);
  for (int64_t v = 0; v < V; ++v) {
    const T* fv = frames + v * nt * D;
    const T* sv = fscale ? fscale + v * nt : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      const T w = grad[c * V + v] * inv_k;
      if (w == T(0)) continue;
      const int16_t* id = idx + (c * V + v) * k;
      T* y = dtext + c * D;
      if (k == 4 && !sv) {  // FitCLIP's k: one pass over the accumulator row instead of four
        const T *x0 = fv + id[0] * D, *x1 = fv + id[1] * D, *x2 = fv + id[2] * D, *x3 = fv + id[3] * D;
        for (int64_t i = 0; i < D; ++i) y[i] += w * ((x0[i] + x1[i]) + (x2[i] + x3[i]));
      } else if (k == 4) {
        const T *x0 = fv + id[0] * D, *x1 = fv + id[1] * D, *x2 = fv + id[2] * D, *x3 = fv + id[3] * D;
        const T w0 = w * sv[id[0]], w1 = w * sv[id[1]], w2 = w * sv[id[2]], w3 = w * sv[id[3]];
        for (int64_t i = 0; i < D; ++i) y[i] += (w0 * x0[i] + w1 * x1[i]) + (w2 * x2[i] + w3 * x3[i]);
      } else {
        for (int64_t j = 0; j < k; ++j) axpy<T>(D, sv ? w * sv[id[j]] : w, fv + id[j] * D, y);
      }
    }
  }
}
static FITCLIP_CLONES void dtext_block_f(const float* grad, const int16_t* idx, const float* frames,
                                         const float* fscale, int64_t c0, int64_t c1, int64_t V, int64_t nt,
                                         int64_t D, int64_t k, float* dtext) {
  dtext_block<float>(grad, idx, frames, fscale, c0, c1, V, nt, D, k, dtext);
}

// dframes[v, idx[c, v, j]] += grad[c, v] / k * text[c] for videos [v0, v1) (accumulates)
template <typename T>
FITCLIP_INLINE void dframes_block(const T* grad, const int16_t* idx, const T* text, const T* fscale, int64_t C,
                                  int64_t v0, int64_t v1, int64_t V, int64_t nt, int64_t D, int64_t k, T* dframes) {
  const T inv_k = T(1) / static_cast<T>(k);
  for (int64_t c = 0; c < C; ++c) {
    const T* tc = text + c * D;
    for (int64_t v = v0; v < v1; ++v) {
      const T w = grad[c * V + v] * inv_k;
      if (w == T(0)) continue;
      const int16_t* id = idx + (c * V + v) * k;
      for (int64_t j = 0; j < k; ++j)
        axpy<T>(D, fscale ? w * fscale[v * nt + id[j]] : w, tc, dframes + (v * nt + id[j]) * D);
    }
  }
}
static FITCLIP_CLONES void dframes_block_f(const float* grad, const int16_t* idx, const float* text,
                                           const float* fscale, int64_t C, int64_t v0, int64_t v1, int64_t V,
                                           int64_t nt, int64_t D, int64_t k, float* dframes) {
  dframes_block<float>(grad, idx, text, fscale, C, v0, v1, V, nt, D, k, dframes);
}

template <typename T>
void sparse_dtext(const T* grad, const int16_t* idx, const T* frames, const T* fscale, int64_t C, int64_t V,
                  int64_t nt, int64_t D, int64_t k, T* dtext) {
  constexpr int64_t kCaptions = 32;  // 32 rows of D accumulators; video v's T x D frames stay hot
  at::parallel_for(0, (C + kCaptions - 1) / kCaptions, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCaptions, c1 = std::min(C, c0 + kCaptions);
      if constexpr (std::is_same_v<T, float>) dtext_block_f(grad, idx, frames, fscale, c0, c1, V, nt, D, k, dtext);
      else dtext_block<T>(grad, idx, frames, fscale, c0, c1, V, nt, D, k, dtext);
    }
  });
}

template <typename T>
void sparse_dframes(const T* grad, const int16_t* idx, const T* text, const T* fscale, int64_t C, int64_t V,
                    int64_t nt, int64_t D, int64_t k, T* dframes) {
  constexpr int64_t kVideos = 8;  // 8 videos' T x D gradients stay in L2 while captions stream
  at::parallel_for(0, (V + kVideos - 1) / kVideos, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * kVideos, v1 = std::min(V, v0 + kVideos);
      if constexpr (std::is_same_v<T, float>) dframes_block_f(grad, idx, text, fscale, C, v0, v1, V, nt, D, k, dframes);
      else dframes_block<T>(grad, idx, text, fscale, C, v0, v1, V, nt, D, k, dframes);
    }
  });
}

// When k is a large share of T (k = T is FitCLIP's mean pooling) the dense form is faster:
// W [rows, V*T] holds grad / k on the chosen frames, then two GEMMs (MKL).
inline bool use_dense_backward(int64_t k, int64_t nt) { return 2 * k >= nt; }

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's clamp of the norm

struct FrameInputs {
  at::Tensor text, frames, mask_tm;  // text: unit rows; frames: [V, T, D] contiguous; mask_tm: [T, V]
  // normalize: the raw text's norms [C], the frames' norms [V * T] and inverse norms [V * T]
  // (video-major) and [T * V] (time-major)
  bool normalize = false;
  at::Tensor norm_t, norm_f, inv_f, inv_f_tm;
  int64_t C, V, nt, D;
  int64_t row(int64_t v, int64_t t) const { return t * V + v; }
  template <typename T>
  const T* fscale() const { return normalize ? inv_f.data_ptr<T>() : nullptr; }
};

FrameInputs prepare(const at::Tensor& text, const at::Tensor& frames, int64_t k, const std::optional<at::Tensor>& mask,
                    bool normalize = false) {
  TORCH_CHECK(text.device().is_cpu() && frames.device().is_cpu(), "fitclip_ext C++ ops take CPU tensors");
  TORCH_CHECK(text.dim() == 2 && frames.dim() == 3, "text must be [C, D] and frames [V, T, D]");
  TORCH_CHECK(text.size(1) == frames.size(2), "text and frames must have the same D");
  TORCH_CHECK(frames.size(1) <= 32767, "at most 32767 frames per video");
  TORCH_CHECK(k >= 1 && k <= frames.size(1), "k must be in [1, T]");
  const auto ct = compute_type(text);
  FrameInputs in;
  in.C = text.size(0);
  in.V = frames.size(0);
  in.nt = frames.size(1);
  in.D = frames.size(2);
  in.text = text.to(ct).contiguous();
  in.frames = frames.to(ct).contiguous();
  in.normalize = normalize;
  if (normalize) {
    in.norm_t = at::linalg_vector_norm(in.text, 2, {1});
    in.text = in.text / in.norm_t.clamp_min(kNormEps).unsqueeze(1);  // C x D: a small copy
    in.norm_f = at::linalg_vector_norm(in.frames, 2, {2}).reshape({-1});
    in.inv_f = in.norm_f.clamp_min(kNormEps).reciprocal();
    in.inv_f_tm = in.inv_f.view({in.V, in.nt}).t().contiguous().view({-1});
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == in.V && mask->size(1) == in.nt,
                "mask must be a bool [V, T] tensor");
    in.mask_tm = mask->t().contiguous();
  }
  return in;
}

// Similarities of captions [r0, r0 + rows) with every frame, time-major: S[t][r][v] (S is a
// [T, block rows, V] buffer), one GEMM per frame index straight from the strided frames[:, t]
// (no transposed copy of the frames): each frame's V videos are then contiguous, the SIMD
// lanes of the top-k.
template <typename T>
void similarity_block(const FrameInputs& in, int64_t r0, int64_t rows, at::Tensor& S) {
  const auto text = in.text.narrow(0, r0, rows);
  for (int64_t t = 0; t < in.nt; ++t) {
    auto out = S.select(0, t).narrow(0, 0, rows);
    at::mm_out(out, text, in.frames.select(1, t).t());
    if (in.normalize) {  // cosine: divide by the frames' norms (the captions are unit already)
      T* o = out.data_ptr<T>();
      const T* sc = in.inv_f_tm.data_ptr<T>() + t * in.V;
      const int64_t V = in.V;
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          for (int64_t v = 0; v < V; ++v) o[r * V + v] *= sc[v];
      });
    }
  }
}

// Gradients of the unit rows y = x / max(|x|, eps) -> gradients of the raw rows x, in place.
// pre_scaled: g holds dL/dy already multiplied by 1 / max(|x|, eps) (the frames' accumulation).
template <typename T>
void unnormalize_grad(const T* x, const T* norms, int64_t n, int64_t D, bool pre_scaled, T* g) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T nrm = norms[i];
      T* gi = g + i * D;
      const T* xi = x + i * D;
      const bool clamped = !(nrm > T(kNormEps));
      const T inv = clamped ? T(1) / T(kNormEps) : T(1) / nrm;
      if (clamped) {  // y = x / eps: no projection
        if (!pre_scaled)
          for (int64_t d = 0; d < D; ++d) gi[d] *= inv;
        continue;
      }
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += xi[d] * gi[d];
      // (g - y (y . g)) / |x| with y = x / |x|; for pre-scaled g the outer 1 / |x| is in g
      const T a = pre_scaled ? T(1) : inv;
      const T b = dot * inv * inv * a;
      for (int64_t d = 0; d < D; ++d) gi[d] = a * gi[d] - b * xi[d];
    }
  });
}

template <typename T>
void finish_raw_grads(const FrameInputs& in, const at::Tensor& text_raw, at::Tensor& dtext, at::Tensor& dframes_flat) {
  if (!in.normalize) return;
  unnormalize_grad<T>(text_raw.data_ptr<T>(), in.norm_t.data_ptr<T>(), in.C, in.D, false, dtext.data_ptr<T>());
  unnormalize_grad<T>(in.frames.data_ptr<T>(), in.norm_f.data_ptr<T>(), in.V * in.nt, in.D, true,
                      dframes_flat.data_ptr<T>());
}

// Applies dLoss/dsim of captions [r0, r0 + rows) (grad [rows, V], chosen frames idx [rows, V, k]):
// writes dtext rows, adds into dframes [V*T, D] (video-major).
template <typename T>
void backward_block(const FrameInputs& in, int64_t k, int64_t r0, int64_t rows, const T* grad, const int16_t* idx,
                    at::Tensor& dtext, at::Tensor& dframes, at::Tensor& scratch) {
  const int64_t V = in.V, nt = in.nt, D = in.D;
  const T* fs = in.fscale<T>();
  if (!use_dense_backward(k, nt)) {
    sparse_dtext<T>(grad, idx, in.frames.data_ptr<T>(), fs, rows, V, nt, D, k, dtext.data_ptr<T>() + r0 * D);
    sparse_dframes<T>(grad, idx, in.text.data_ptr<T>() + r0 * D, fs, rows, V, nt, D, k, dframes.data_ptr<T>());
    return;
  }
  auto W = scratch.view({-1}).narrow(0, 0, rows * V * nt).view({rows, V * nt});
  T* w = W.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* wr = w + r * V * nt;
      std::fill(wr, wr + V * nt, T(0));
      for (int64_t v = 0; v < V; ++v) {
        const T g = grad[r * V + v] / static_cast<T>(k);
        const int16_t* id = idx + (r * V + v) * k;
        for (int64_t j = 0; j < k; ++j) wr[v * nt + id[j]] += fs ? g * fs[v * nt + id[j]] : g;
      }
    }
  });
  const auto frames_flat = in.frames.view({V * nt, D});
  auto dtb = dtext.narrow(0, r0, rows);
  at::mm_out(dtb, W, frames_flat);
  dframes.addmm_(W.t(), in.text.narrow(0, r0, rows));
}

template <typename T>
void topk_sim_fwd_impl(const FrameInputs& in, int64_t k, at::Tensor& sim, at::Tensor& idx) {
  const int64_t cols = in.V * in.nt;
  const int64_t bc = frame_block_rows(in.C, cols);
  auto S = at::empty({in.nt, bc, in.V}, in.text.options());
  const bool* mk = in.mask_tm.defined() ? in.mask_tm.data_ptr<bool>() : nullptr;
  for (int64_t r0 = 0; r0 < in.C; r0 += bc) {
    const int64_t rows = std::min(bc, in.C - r0);
    similarity_block<T>(in, r0, rows, S);
    topk_pool_tile<T>(S.data_ptr<T>(), bc * in.V, rows, in.V, in.nt, k, mk, sim.data_ptr<T>() + r0 * in.V, in.V,
                      idx.data_ptr<int16_t>() + r0 * in.V * k);
  }
}

template <typename T>
void topk_sim_bwd_impl(const FrameInputs& in, int64_t k, const at::Tensor& idx, const at::Tensor& grad,
                       at::Tensor& dtext, at::Tensor& dframes_flat) {
  const int64_t cols = in.V * in.nt;
  const int64_t bc = use_dense_backward(k, in.nt) ? frame_block_rows(in.C, cols) : in.C;
  auto scratch = use_dense_backward(k, in.nt) ? at::empty({bc, cols}, in.text.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < in.C; r0 += bc) {
    const int64_t rows = std::min(bc, in.C - r0);
    backward_block<T>(in, k, r0, rows, grad.data_ptr<T>() + r0 * in.V, idx.data_ptr<int16_t>() + r0 * in.V * k,
                      dtext, dframes_flat, scratch);
  }
}

// Video InfoNCE over L[c, v] = scale * sim[c, v] (rows: captions, columns: videos, C == V).
template <typename T>
void video_lse_impl(const FrameInputs& in, int64_t k, T scale, at::Tensor& cap_lse, at::Tensor& vid_lse,
                    at::Tensor& cap_sum, at::Tensor& vid_sum, at::Tensor& diag) {
  const int64_t B = in.C, V = in.V, cols = V * in.nt;
  const int64_t bc = frame_block_rows(B, cols);
  auto S = at::empty({in.nt, bc, V}, in.text.options());
  auto P = at::empty({bc, V}, in.text.options());
  at::Tensor vid_max_run = at::full({V}, -std::numeric_limits<T>::infinity(), in.text.options());
  auto vid_sumexp_run = at::zeros({V}, in.text.options());
  const bool* mk = in.mask_tm.defined() ? in.mask_tm.data_ptr<bool>() : nullptr;
  T* cl = cap_lse.data_ptr<T>();
  T* cs = cap_sum.data_ptr<T>();
  T* dg = diag.data_ptr<T>();
  T* vs = vid_sum.data_ptr<T>();
  T* vm = vid_max_run.data_ptr<T>();
  T* ve = vid_sumexp_run.data_ptr<T>();
  for (int64_t r0 = 0; r0 < B; r0 += bc) {
    const int64_t rows = std::min(bc, B - r0);
    similarity_block<T>(in, r0, rows, S);
    T* p = P.data_ptr<T>();
    topk_pool_tile<T>(S.data_ptr<T>(), bc * V, rows, V, in.nt, k, mk, p, V, nullptr);
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* x = p + r * V;
        const T mx = rmax<T>(x, V, scale);
        cl[r0 + r] = mx + std::log(rsumexp<T>(x, V, scale, mx));
        T s = 0;
        for (int64_t v = 0; v < V; ++v) s += x[v];
        cs[r0 + r] = s;
        dg[r0 + r] = x[r0 + r];
      }
    });
    merge_block_col_stats<T>(p, rows, V, scale, vm, ve, vs);
  }
  vid_lse.copy_(vid_max_run + vid_sumexp_run.log());
}

template <typename T>
T video_grad_impl(const FrameInputs& in, int64_t k, T scale, const at::Tensor& cap_lse, const at::Tensor& vid_lse,
                  const at::Tensor& cap_w, const at::Tensor& vid_w, T eps, at::Tensor& dtext, at::Tensor& dframes_flat) {
  const int64_t B = in.C, V = in.V, nt = in.nt, cols = V * nt;
  const int64_t bc = frame_block_rows(B, cols);
  auto S = at::empty({nt, bc, V}, in.text.options());
  auto P = at::empty({bc, V}, in.text.options());
  auto idx = at::empty({bc, V, k}, in.text.options().dtype(at::kShort));
  const bool* mk = in.mask_tm.defined() ? in.mask_tm.data_ptr<bool>() : nullptr;
  const T* cl = cap_lse.data_ptr<T>();
  const T* vl = vid_lse.data_ptr<T>();
  const T* cw = cap_w.data_ptr<T>();
  const T* vw = vid_w.data_ptr<T>();
  const T eps_c = eps / static_cast<T>(V), eps_v = eps / static_cast<T>(B), one_m = T(1) - eps;
  std::vector<T> ds_rows(B, T(0));
  for (int64_t r0 = 0; r0 < B; r0 += bc) {
    const int64_t rows = std::min(bc, B - r0);
    similarity_block<T>(in, r0, rows, S);
    T* p = P.data_ptr<T>();
    int16_t* id = idx.data_ptr<int16_t>();
    topk_pool_tile<T>(S.data_ptr<T>(), bc * V, rows, V, nt, k, mk, p, V, id);
    // P <- dLoss/dsim = scale * G, with G the full logit gradient (softmax, positives, smoothing).
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r0 + r;
        T* x = p + r * V;
        T acc = 0;
        for (int64_t v = 0; v < V; ++v) {
          const T l = scale * x[v];
          const T pos = v == c ? one_m : T(0);
          const T g = cw[c] * (fast_exp(l - cl[c]) - pos - eps_c) + vw[v] * (fast_exp(l - vl[v]) - pos - eps_v);
          acc += g * x[v];
          x[v] = scale * g;
        }
        ds_rows[c] = acc;
      }
    });
    backward_block<T>(in, k, r0, rows, p, id, dtext, dframes_flat, S);  // S: the block's scratch now
  }
  T ds = 0;
  for (T v : ds_rows) ds += v;
  return ds;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_sim_fwd_cpu(const at::Tensor& text, const at::Tensor& frames, int64_t k,
                                                    const std::optional<at::Tensor>& mask, bool normalize) {
  auto in = prepare(text, frames, k, mask, normalize);
  auto sim = at::empty({in.C, in.V}, in.text.options());
  auto idx = at::empty({in.C, in.V, k}, in.text.options().dtype(at::kShort));
  if (in.text.scalar_type() == at::kDouble) topk_sim_fwd_impl<double>(in, k, sim, idx);
  else topk_sim_fwd_impl<float>(in, k, sim, idx);
  return {sim, idx};
}

std::tuple<at::Tensor, at::Tensor> topk_sim_bwd_cpu(const at::Tensor& text, const at::Tensor& frames,
                                                    const at::Tensor& idx, const at::Tensor& grad, bool normalize) {
  const int64_t k = idx.size(2);
  auto in = prepare(text, frames, k, std::nullopt, normalize);
  TORCH_CHECK(idx.scalar_type() == at::kShort && idx.size(0) == in.C && idx.size(1) == in.V, "idx must be int16 [C, V, k]");
  auto g = grad.to(in.text.scalar_type()).contiguous();
  TORCH_CHECK(g.size(0) == in.C && g.size(1) == in.V, "grad must be [C, V]");
  auto dtext = at::empty_like(in.text);
  auto dframes = at::zeros({in.V * in.nt, in.D}, in.text.options());
  auto id = idx.contiguous();
  if (in.text.scalar_type() == at::kDouble) {
    topk_sim_bwd_impl<double>(in, k, id, g, dtext, dframes);
    finish_raw_grads<double>(in, text.to(at::kDouble).contiguous(), dtext, dframes);
  } else {
    topk_sim_bwd_impl<float>(in, k, id, g, dtext, dframes);
    finish_raw_grads<float>(in, text.to(at::kFloat).contiguous(), dtext, dframes);
  }
  return {dtext, dframes.view({in.V, in.nt, in.D})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> video_infonce_lse_cpu(
    const at::Tensor& text, const at::Tensor& frames, int64_t k, const std::optional<at::Tensor>& mask,
    const at::Tensor& scale, bool normalize) {
  auto in = prepare(text, frames, k, mask, normalize);
  TORCH_CHECK(in.C == in.V, "video InfoNCE needs as many captions as videos");
  auto o = in.text.options();
  auto cap_lse = at::empty({in.C}, o), vid_lse = at::empty({in.V}, o), cap_sum = at::empty({in.C}, o),
       vid_sum = at::zeros({in.V}, o), diag = at::empty({in.C}, o);
  const double s = scale.item<double>();
  if (in.text.scalar_type() == at::kDouble) video_lse_impl<double>(in, k, s, cap_lse, vid_lse, cap_sum, vid_sum, diag);
  else video_lse_impl<float>(in, k, static_cast<float>(s), cap_lse, vid_lse, cap_sum, vid_sum, diag);
  return {cap_lse, vid_lse, cap_sum, vid_sum, diag};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> video_infonce_grad_cpu(
    const at::Tensor& text, const at::Tensor& frames, int64_t k, const std::optional<at::Tensor>& mask,
    const at::Tensor& scale, const at::Tensor& cap_lse, const at::Tensor& vid_lse, const at::Tensor& cap_w,
    const at::Tensor& vid_w, double eps, bool normalize) {
  auto in = prepare(text, frames, k, mask, normalize);
  TORCH_CHECK(in.C == in.V, "video InfoNCE needs as many captions as videos");
  const auto ct = in.text.scalar_type();
  auto c = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  auto dtext = at::empty_like(in.text);
  auto dframes = at::zeros({in.V * in.nt, in.D}, in.text.options());
  const double s = scale.item<double>();
  double ds;
  if (ct == at::kDouble) {
    ds = video_grad_impl<double>(in, k, s, c(cap_lse), c(vid_lse), c(cap_w), c(vid_w), eps, dtext, dframes);
    finish_raw_grads<double>(in, c(text), dtext, dframes);
  } else {
    ds = video_grad_impl<float>(in, k, static_cast<float>(s), c(cap_lse), c(vid_lse), c(cap_w), c(vid_w),
                                static_cast<float>(eps), dtext, dframes);
    finish_raw_grads<float>(in, c(text), dtext, dframes);
  }
  return {dtext, dframes.view({in.V, in.nt, in.D}), at::scalar_tensor(ds, in.text.options())};
}

// For each b, the k frames of video b most similar to caption b (text already unit length),
// in ascending time order.
at::Tensor select_frames_cpu(const at::Tensor& frames, const at::Tensor& text, int64_t k,
                             const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(frames.dim() == 3 && text.dim() == 2 && frames.size(0) == text.size(0) && frames.size(2) == text.size(1),
              "frames must be [B, T, D] and text [B, D]");
  TORCH_CHECK(k >= 1 && k <= frames.size(1) && frames.size(1) <= 32767, "k must be in [1, T]");
  const auto ct = compute_type(text);
  const int64_t B = frames.size(0), nt = frames.size(1);
  // Cosine similarity of raw frames with the unit captions: [B, T, D] @ [B, D, 1] / |frame|
  // (F.normalize's clamp of the norm at 1e-12).
  const auto f = frames.to(ct);
  auto sims = at::bmm(f, text.to(ct).unsqueeze(2)).squeeze(2).div_(at::linalg_vector_norm(f, 2, {2}).clamp_min_(1e-12)).contiguous();
  at::Tensor mk;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == sims.sizes(), "mask must be a bool [B, T] tensor");
    mk = mask->contiguous();
  }
  auto out = at::empty({B, k}, text.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(sims.scalar_type(), "select_frames", [&] {
    const scalar_t* sp = sims.data_ptr<scalar_t>();
    const bool* mp = mk.defined() ? mk.data_ptr<bool>() : nullptr;
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> best(k);
      std::vector<int16_t> bidx(k), chosen(k);
      for (int64_t b = b0; b < b1; ++b) {
        topk_sum<scalar_t>(sp + b * nt, mp ? mp + b * nt : nullptr, nt, k, chosen.data(), best.data(), bidx.data());
        std::sort(chosen.begin(), chosen.end());
        for (int64_t j = 0; j < k; ++j) op[b * k + j] = chosen[j];
      }
    });
  });
  return out;
}

}  // namespace fitclip

TORCH_LIBRARY_FRAGMENT(fitclip_ext, m) {
  m.def("topk_sim_fwd(Tensor text, Tensor frames, int k, Tensor? mask, bool normalize=False) -> (Tensor, Tensor)");
  m.def("topk_sim_bwd(Tensor text, Tensor frames, Tensor idx, Tensor grad, bool normalize=False) -> (Tensor, Tensor)");
  m.def(
      "video_infonce_lse(Tensor text, Tensor frames, int k, Tensor? mask, Tensor scale, bool normalize=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "video_infonce_grad(Tensor text, Tensor frames, int k, Tensor? mask, Tensor scale, Tensor cap_lse, "
      "Tensor vid_lse, Tensor cap_w, Tensor vid_w, float eps, bool normalize=False) -> (Tensor, Tensor, Tensor)");
  m.def("select_frames(Tensor frames, Tensor text, int k, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(fitclip_ext, CPU, m) {
  m.impl("topk_sim_fwd", &fitclip::topk_sim_fwd_cpu);
  m.impl("topk_sim_bwd", &fitclip::topk_sim_bwd_cpu);
  m.impl("video_infonce_lse", &fitclip::video_infonce_lse_cpu);
  m.impl("video_infonce_grad", &fitclip::video_infonce_grad_cpu);
  m.impl("select_frames", &fitclip::select_frames_cpu);
}
