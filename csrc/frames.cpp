// Frame-caption cosine similarity fused with top-k selection, for CPU tensors (the kernels of
// topk_frame_similarity, video_contrastive_loss and select_frames): the C++ side of
// the frame-op contract in fitclip_ext/backends/__init__.py (the Triton kernels in
// kernels/frames.py have the same schemas).
//
// With the row norms given (text_norm [C], frames_norm [V, T]; what the public ops pass) the
// inputs are raw embeddings and the cosine normalisation is folded in, as
// torch.nn.functional.normalize does it (norms clamped at 1e-12): a unit copy of the captions
// (C x D, small), the frames used as given with their inverse norms applied to the
// similarities. Without norms the inputs are taken as unit length. For a tile of captions x
// videos, one GEMM per frame index gives the similarities (a [T, rows, videos] tile buffer, 16
// MB), a top-k per (caption, video) reduces them to [rows, videos] and records the chosen frames
// as bit sets (int32 [C, V, ceil(T / 32)], bit t % 32 of word t / 32). The backward applies the
// pooled gradient to the chosen frames only (sparse, k/T of the dense FLOPs, cache-blocked) and returns
// the gradients with respect to the unit vectors; `unit_grad` turns them into the raw inputs'
// ones, so no normalised copy of the V x T x D frames is ever made. The video InfoNCE is one
// Python block loop over these ops (fitclip_ext/frames.py), for this backend and Triton's.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "lse_tiles.h"
#include "ops.h"

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
// network of k compare-and-swap steps ordered by (value, earlier frame), so that of equal values
// the earlier frame is kept (frames in order with a strict > are not enough: a value displaced
// from slot j would stop above an equal value of a later frame in slot j + 1).
// best/bidx: scratch of k * L.
constexpr int64_t kLanes = 16;

template <typename T>
FITCLIP_INLINE void topk_lanes(const T* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl, int64_t nt,
                               int64_t k, const bool* mask_tm, const T* scale_tm, T* best, int32_t* bidx, T* out,
                               int32_t* bits_out, int64_t words) {
  constexpr int64_t L = kLanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < k * L; ++i) {
    best[i] = ninf;
    bidx[i] = -1;
  }
  int32_t nan[L] = {0};
  for (int64_t t = nt - 1; t >= 0; --t) {  // reverse order: see the comparison below
    T xv[L];
    int32_t xi[L];
    const T* x = sims + t * t_stride + v0;
    const T* sc = scale_tm ? scale_tm + t * V + v0 : nullptr;
    if (nl == L && !mask_tm && sc) {  // the common cases: straight vector loads (frames' inverse norms)
      for (int64_t l = 0; l < L; ++l) {
        xv[l] = x[l] * sc[l];
        nan[l] |= xv[l] != xv[l];
        xi[l] = static_cast<int32_t>(t);
      }
    } else if (nl == L && !mask_tm) {
      for (int64_t l = 0; l < L; ++l) {
        xv[l] = x[l];
        nan[l] |= x[l] != x[l];
        xi[l] = static_cast<int32_t>(t);
      }
    } else {
      for (int64_t l = 0; l < L; ++l) {
        T val = l < nl ? x[l < nl ? l : 0] * (sc ? sc[l < nl ? l : 0] : T(1)) : ninf;
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
        // >= with the frames in reverse order keeps the list in (value, earlier frame) order: a
        // new value, from the earliest frame so far, goes above equal ones, and a displaced one
        // stays above the equal ones below it. Masked frames (-inf) never enter.
        const bool sw = xv[l] >= bj[l] && xv[l] != ninf;
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
    if (bits_out) {
      int32_t* w = bits_out + l * words;
      std::fill(w, w + words, 0);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t t = bidx[j * L + l];
        if (t >= 0) w[t >> 5] |= static_cast<int32_t>(1u << (t & 31));  // (NaN rows may leave slots empty)
      }
    }
  }
}

// The same selection for float, a fixed k and 16 full unmasked lanes (the common case), in GCC
// vector registers: the k best values and frames stay in 2k registers across the T frames
// instead of going through memory every step (the loop above, which the compiler does not keep
// in registers for a runtime k). The same frames, and the same sum (the k values in the same
// descending order).
template <int K>
FITCLIP_INLINE void topk_lanes_fixed(const float* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nt,
                                     const float* scale_tm, float* out, int32_t* bits_out, int64_t words) {
  typedef float fv __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t iv __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const float ninf = -std::numeric_limits<float>::infinity();
  fv best[K];
  iv bidx[K];
  for (int j = 0; j < K; ++j) {
    best[j] = fv{} + ninf;
    bidx[j] = iv{} - 1;
  }
  iv nan = iv{};
  // frames in reverse order with >=, as above (no masked -inf here)
  for (int64_t t = nt - 1; t >= 0; --t) {
    fv x;
    __builtin_memcpy(&x, sims + t * t_stride + v0, sizeof(fv));
    if (scale_tm) {
      fv sc;
      __builtin_memcpy(&sc, scale_tm + t * V + v0, sizeof(fv));
      x *= sc;
    }
    nan |= x != x;
    iv xi = iv{} + static_cast<int32_t>(t);
    for (int j = 0; j < K; ++j) {
      const iv sw = x >= best[j];
      const fv b = best[j];
      const iv bi = bidx[j];
      best[j] = sw ? x : b;
      bidx[j] = sw ? xi : bi;
      x = sw ? b : x;
      xi = sw ? bi : xi;
    }
  }
  fv sum = fv{};
  for (int j = 0; j < K; ++j) sum += best[j];
  for (int64_t l = 0; l < kLanes; ++l) {
    out[l] = nan[l] ? std::numeric_limits<float>::quiet_NaN() : sum[l] / static_cast<float>(K);
    if (bits_out) {
      int32_t* w = bits_out + l * words;
      std::fill(w, w + words, 0);
      for (int j = 0; j < K; ++j) {
        const int32_t t = bidx[j][l];
        if (t >= 0) w[t >> 5] |= static_cast<int32_t>(1u << (t & 31));
      }
    }
  }
}

static FITCLIP_CLONES void topk_lanes_f(const float* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl,
                                        int64_t nt, int64_t k, const bool* mask_tm, const float* scale_tm,
                                        float* best, int32_t* bidx, float* out, int32_t* bits_out, int64_t words) {
  if (nl == kLanes && !mask_tm) {
    switch (k) {
#define FITCLIP_TOPK_CASE(K) \
  case K:                    \
    return topk_lanes_fixed<K>(sims, t_stride, V, v0, nt, scale_tm, out, bits_out, words);
      FITCLIP_TOPK_CASE(1)
      FITCLIP_TOPK_CASE(2)
      FITCLIP_TOPK_CASE(3)
      FITCLIP_TOPK_CASE(4)
      FITCLIP_TOPK_CASE(5)
      FITCLIP_TOPK_CASE(6)
      FITCLIP_TOPK_CASE(7)
      FITCLIP_TOPK_CASE(8)
#undef FITCLIP_TOPK_CASE
      default:
        break;
    }
  }
  topk_lanes<float>(sims, t_stride, V, v0, nl, nt, k, mask_tm, scale_tm, best, bidx, out, bits_out, words);
}
template <typename T>
inline void topk_lanes_any(const T* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl, int64_t nt,
                           int64_t k, const bool* mask_tm, const T* scale_tm, T* best, int32_t* bidx, T* out,
                           int32_t* bits_out, int64_t words) {
  topk_lanes<T>(sims, t_stride, V, v0, nl, nt, k, mask_tm, scale_tm, best, bidx, out, bits_out, words);
}
template <>
inline void topk_lanes_any<float>(const float* sims, int64_t t_stride, int64_t V, int64_t v0, int64_t nl,
                                  int64_t nt, int64_t k, const bool* mask_tm, const float* scale_tm, float* best,
                                  int32_t* bidx, float* out, int32_t* bits_out, int64_t words) {
  topk_lanes_f(sims, t_stride, V, v0, nl, nt, k, mask_tm, scale_tm, best, bidx, out, bits_out, words);
}

// sims [T][rows][nv] (frame t of row r, video v of the tile at sims + t * t_stride + r * nv),
// times scale_tm[t * V + v] when given (the frames' inverse norms, applied as the values are read
// instead of in a pass of their own over the block; scale_tm and mask_tm point at the tile's
// first video of [T, V] arrays) -> out[r * ld_out + v] = mean of the top k of video v; the chosen
// frames go to bits[(r * ld_out + v) * words ...].
template <typename T>
void topk_pool_tile(const T* sims, int64_t t_stride, int64_t rows, int64_t nv, int64_t V, int64_t nt, int64_t k,
                    const bool* mask_tm, const T* scale_tm, T* out, int64_t ld_out, int32_t* bits, int64_t words) {
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    std::vector<T> best(k * kLanes);
    std::vector<int32_t> bidx(k * kLanes);
    for (int64_t r = b; r < e; ++r) {
      for (int64_t v0 = 0; v0 < nv; v0 += kLanes) {
        const int64_t nl = std::min(kLanes, nv - v0);
        topk_lanes_any<T>(sims + r * nv, t_stride, V, v0, nl, nt, k, mask_tm, scale_tm, best.data(), bidx.data(),
                          out + r * ld_out + v0, bits + (r * ld_out + v0) * words, words);
      }
    }
  });
}

// The frames set in a pair's bit set, ascending, into id (at most k); returns how many.
FITCLIP_INLINE int64_t chosen_frames(const int32_t* w, int64_t words, int64_t k, int16_t* id) {
  int64_t n = 0;
  for (int64_t i = 0; i < words && n < k; ++i) {
    uint32_t b = static_cast<uint32_t>(w[i]);
    while (b && n < k) {
      id[n++] = static_cast<int16_t>(i * 32 + __builtin_ctz(b));
      b &= b - 1;
    }
  }
  return n;
}

// y[0..n) += a * x[0..n); inlined into the cloned block loops below so that it is compiled
// for AVX-512/AVX2 without a dispatch per call.
template <typename T>
FITCLIP_INLINE void axpy(int64_t n, T a, const T* x, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The backward only touches the k chosen of every T frames, so it runs sparse: k/T of the
// dense GEMMs' FLOPs, in blocks whose accumulators stay in L2 while the other operand streams.
// dtext[c] = sum_v grad[c, v] / k * sum_{t chosen} frames[v, t] for captions [c0, c1)
// (fscale: per-frame factors [V * T], the frames' inverse norms when normalising, or null.)
template <typename T>
FITCLIP_INLINE void dtext_block(const T* grad, const int32_t* bits, int64_t words, const T* frames, const T* fscale,
                                int64_t c0, int64_t c1, int64_t V, int64_t nt, int64_t D, int64_t k, T* dtext) {
  std::fill(dtext + c0 * D, dtext + c1 * D, T(0));
  const T inv_k = T(1) / static_cast<T>(k);
  std::vector<int16_t> ids(k);
  int16_t* id = ids.data();
  for (int64_t v = 0; v < V; ++v) {
    const T* fv = frames + v * nt * D;
    const T* sv = fscale ? fscale + v * nt : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      const T w = grad[c * V + v] * inv_k;
      if (w == T(0)) continue;
      const int64_t n = chosen_frames(bits + (c * V + v) * words, words, k, id);
      T* y = dtext + c * D;
      if (n == 4 && !sv) {  // FitCLIP's k: one pass over the accumulator row instead of four
        const T *x0 = fv + id[0] * D, *x1 = fv + id[1] * D, *x2 = fv + id[2] * D, *x3 = fv + id[3] * D;
        for (int64_t i = 0; i < D; ++i) y[i] += w * ((x0[i] + x1[i]) + (x2[i] + x3[i]));
      } else if (n == 4) {
        const T *x0 = fv + id[0] * D, *x1 = fv + id[1] * D, *x2 = fv + id[2] * D, *x3 = fv + id[3] * D;
        const T w0 = w * sv[id[0]], w1 = w * sv[id[1]], w2 = w * sv[id[2]], w3 = w * sv[id[3]];
        for (int64_t i = 0; i < D; ++i) y[i] += (w0 * x0[i] + w1 * x1[i]) + (w2 * x2[i] + w3 * x3[i]);
      } else {
        for (int64_t j = 0; j < n; ++j) axpy<T>(D, sv ? w * sv[id[j]] : w, fv + id[j] * D, y);
      }
    }
  }
}
static FITCLIP_CLONES void dtext_block_f(const float* grad, const int32_t* bits, int64_t words, const float* frames,
                                         const float* fscale, int64_t c0, int64_t c1, int64_t V, int64_t nt,
                                         int64_t D, int64_t k, float* dtext) {
  dtext_block<float>(grad, bits, words, frames, fscale, c0, c1, V, nt, D, k, dtext);
}

// dframes[v, t] = sum_c grad[c, v] / k * text[c] over the captions that chose frame t of video
// v, for videos [v0, v1) (no zero-filled buffer needed). Gathered per output row: the block's
// (caption, weight) pairs are bucketed by chosen frame (captions ascending within a bucket), then
// each row is summed in registers, DC features at a time, and stored once per caption block.
// The captions go in blocks of 256 KB of rows (128 at D = 512 fp32) that stay in L2 while the
// block's T x (v1 - v0) rows take them; each row's bucket is caption-ascending, so a cursor per
// row walks the blocks. One L2 read per vector FMA, where scattering axpys into the rows (the
// first form of this op) read and wrote a gradient row through L2 per FMA: 1.3x faster here.
// Captions [c0, c1) at a time (the sums of several chunks add up in the rows; the first chunk
// zeroes them first). cnt: scratch of (v1 - v0) * nt + 1 entries; cs, ws: of (c1 - c0) * (v1 - v0) * k.
template <typename T, int DC>
FITCLIP_INLINE void dframes_rows(const T* grad, const int32_t* bits, int64_t words, const T* text, int64_t c0,
                                 int64_t c1, int64_t v0, int64_t v1, int64_t V, int64_t nt, int64_t D, int64_t k,
                                 T* dframes, int32_t* cnt, int32_t* cs, T* ws) {
  const int64_t rows = (v1 - v0) * nt;
  const T inv_k = T(1) / static_cast<T>(k);
  // f(row of the block, caption, gradient) for every chosen frame of every pair with a gradient
  auto for_each_choice = [&](auto&& f) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t v = v0; v < v1; ++v) {
        const T g = grad[c * V + v];
        if (g == T(0)) continue;
        const int32_t* w = bits + (c * V + v) * words;
        const int64_t r0 = (v - v0) * nt;
        for (int64_t i = 0; i < words; ++i)
          for (uint32_t b = static_cast<uint32_t>(w[i]); b; b &= b - 1) f(r0 + i * 32 + __builtin_ctz(b), c, g);
      }
    }
  };
  std::fill(cnt, cnt + rows + 1, 0);
  for_each_choice([&](int64_t r, int64_t, T) { ++cnt[r + 1]; });
  for (int64_t r = 0; r < rows; ++r) cnt[r + 1] += cnt[r];
  std::vector<int32_t> cur(cnt, cnt + rows);
  for_each_choice([&](int64_t r, int64_t c, T g) {
    const int32_t e = cur[r]++;
    cs[e] = static_cast<int32_t>(c);
    ws[e] = g * inv_k;
  });
  if (c0 == 0) std::fill(dframes + v0 * nt * D, dframes + v1 * nt * D, T(0));
  std::copy(cnt, cnt + rows, cur.begin());
  // GCC vector extensions: explicit registers (a plain T[DC] accumulator is scalarised)
  typedef T vec __attribute__((vector_size(64)));
  constexpr int L = 64 / sizeof(T), NV = DC / L;
  static_assert(DC % L == 0, "DC must be a whole number of vectors");
  const int64_t kCB = std::max<int64_t>(16, (int64_t(1) << 18) / (D * int64_t(sizeof(T))));
  for (int64_t cb = c0; cb < c1; cb += kCB) {
    const int32_t cend = static_cast<int32_t>(std::min(c1, cb + kCB));
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t e0 = cur[r];
      int32_t e1 = e0;
      while (e1 < cnt[r + 1] && cs[e1] < cend) ++e1;
      cur[r] = e1;
      if (e1 == e0) continue;
      T* yr = dframes + (v0 * nt + r) * D;
      int64_t d0 = 0;
      for (; d0 + DC <= D; d0 += DC) {
        T* y = yr + d0;
        vec acc[NV];
        for (int i = 0; i < NV; ++i) __builtin_memcpy(&acc[i], y + i * L, sizeof(vec));
        for (int32_t e = e0; e < e1; ++e) {
          const T w = ws[e];
          const T* x = text + static_cast<int64_t>(cs[e]) * D + d0;
          for (int i = 0; i < NV; ++i) {
            vec xv;
            __builtin_memcpy(&xv, x + i * L, sizeof(vec));
            acc[i] += w * xv;
          }
        }
        for (int i = 0; i < NV; ++i) __builtin_memcpy(y + i * L, &acc[i], sizeof(vec));
      }
      if (d0 < D)
        for (int32_t e = e0; e < e1; ++e) axpy<T>(D - d0, ws[e], text + static_cast<int64_t>(cs[e]) * D + d0, yr + d0);
    }
  }
}
static FITCLIP_CLONES void dframes_rows_f(const float* grad, const int32_t* bits, int64_t words, const float* text,
                                          int64_t c0, int64_t c1, int64_t v0, int64_t v1, int64_t V, int64_t nt,
                                          int64_t D, int64_t k, float* dframes, int32_t* cnt, int32_t* cs,
                                          float* ws) {
  dframes_rows<float, 128>(grad, bits, words, text, c0, c1, v0, v1, V, nt, D, k, dframes, cnt, cs, ws);
}

template <typename T>
void sparse_dtext(const T* grad, const int32_t* bits, int64_t words, const T* frames, const T* fscale, int64_t C,
                  int64_t V, int64_t nt, int64_t D, int64_t k, T* dtext) {
  // Caption blocks whose D-wide accumulator rows fill half of a 1 MB L2 (256 rows at D = 512):
  // the frames (V x T x D, larger than L3 at real sizes) stream from memory once per block, so
  // the block is as large as L2 allows (32 rows streamed them 8x more often); video v's T x D
  // frames stay in L1 while the block's rows take them.
  const int64_t kCaptions = std::max<int64_t>(32, (int64_t(1) << 19) / (D * int64_t(sizeof(T))));
  at::parallel_for(0, (C + kCaptions - 1) / kCaptions, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCaptions, c1 = std::min(C, c0 + kCaptions);
      if constexpr (std::is_same_v<T, float>) dtext_block_f(grad, bits, words, frames, fscale, c0, c1, V, nt, D, k, dtext);
      else dtext_block<T>(grad, bits, words, frames, fscale, c0, c1, V, nt, D, k, dtext);
    }
  });
}

// Writes dframes (every row: rows no caption chose get zeros).
template <typename T>
void sparse_dframes(const T* grad, const int32_t* bits, int64_t words, const T* text, int64_t C, int64_t V,
                    int64_t nt, int64_t D, int64_t k, T* dframes) {
  constexpr int64_t kVideos = 8;  // 128 rows at T = 16 share each caption block (4-32 ran alike)
  // Captions in chunks of at most 2^16 bucketed pairs (512 KB of scratch a thread, whatever C;
  // all 2048 captions at once at k = 4), at least 256 captions.
  const int64_t chunk = std::min(C, std::max<int64_t>(256, (int64_t(1) << 16) / (kVideos * k)));
  at::parallel_for(0, (V + kVideos - 1) / kVideos, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cnt(kVideos * nt + 1), cs(chunk * kVideos * k);
    std::vector<T> ws(chunk * kVideos * k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * kVideos, v1 = std::min(V, v0 + kVideos);
      for (int64_t c0 = 0; c0 < C; c0 += chunk) {
        const int64_t c1 = std::min(C, c0 + chunk);
        if constexpr (std::is_same_v<T, float>)
          dframes_rows_f(grad, bits, words, text, c0, c1, v0, v1, V, nt, D, k, dframes, cnt.data(), cs.data(),
                         ws.data());
        else
          dframes_rows<T, 64>(grad, bits, words, text, c0, c1, v0, v1, V, nt, D, k, dframes, cnt.data(), cs.data(),
                              ws.data());
      }
    }
  });
}

// When k is a large share of T (k = T is FitCLIP's mean pooling) the dense form is faster:
// W [rows, V*T] holds grad / k on the chosen frames, then two GEMMs (MKL).
inline bool use_dense_backward(int64_t k, int64_t nt) { return 2 * k >= nt; }

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's clamp of the norm

struct FrameInputs {
  at::Tensor text, frames, mask_tm;  // text: unit rows; frames: [V, T, D] contiguous; mask_tm: [T, V]
  // normalize: the frames' norms [V * T] and inverse norms [V * T] (video-major) and [T * V]
  // (time-major)
  bool normalize = false;
  at::Tensor norm_f, inv_f, inv_f_tm;
  int64_t C, V, nt, D, words;
  template <typename T>
  const T* fscale() const { return normalize ? inv_f.data_ptr<T>() : nullptr; }
};

int64_t bit_words(int64_t nt) { return (nt + 31) / 32; }

FrameInputs prepare(const at::Tensor& text, const at::Tensor& frames, int64_t k, const std::optional<at::Tensor>& mask,
                    const std::optional<at::Tensor>& text_norm, const std::optional<at::Tensor>& frames_norm) {
  TORCH_CHECK(text.device().is_cpu() && frames.device().is_cpu(), "fitclip_ext C++ ops take CPU tensors");
  TORCH_CHECK(text.dim() == 2 && frames.dim() == 3, "text must be [C, D] and frames [V, T, D]");
  TORCH_CHECK(text.size(1) == frames.size(2), "text and frames must have the same D");
  TORCH_CHECK(frames.size(1) <= 32767, "at most 32767 frames per video");
  TORCH_CHECK(k >= 1 && k <= frames.size(1), "k must be in [1, T]");
  TORCH_CHECK(text_norm.has_value() == frames_norm.has_value(), "give both text_norm and frames_norm, or neither");
  const auto ct = compute_type(text);
  FrameInputs in;
  in.C = text.size(0);
  in.V = frames.size(0);
  in.nt = frames.size(1);
  in.D = frames.size(2);
  in.words = bit_words(in.nt);
  in.text = text.to(ct).contiguous();
  in.frames = frames.to(ct).contiguous();
  in.normalize = text_norm.has_value();
  if (in.normalize) {
    TORCH_CHECK(text_norm->numel() == in.C && frames_norm->numel() == in.V * in.nt,
                "text_norm must have C and frames_norm V * T elements");
    in.text = in.text / text_norm->to(ct).clamp_min(kNormEps).reshape({in.C, 1});  // C x D: a small copy
    in.norm_f = frames_norm->to(ct).contiguous().reshape({-1});
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

// Similarities of captions [r0, r0 + rows) with the frames of videos [v0, v0 + nv), time-major:
// S[t][r][v] (S is a [T, rows, nv] buffer), one GEMM per frame index straight from the strided
// frames[v0:v0 + nv, t] (no transposed copy of the frames): each frame's videos are then
// contiguous, the SIMD lanes of the top-k. The frames' inverse norms are applied by the top-k
// as it reads S.
template <typename T>
void similarity_tile(const FrameInputs& in, int64_t r0, int64_t rows, int64_t v0, int64_t nv, at::Tensor& S) {
  const auto text = in.text.narrow(0, r0, rows);
  const auto frames = in.frames.narrow(0, v0, nv);
  for (int64_t t = 0; t < in.nt; ++t) {
    auto out = S.select(0, t);
    at::mm_out(out, text, frames.select(1, t).t());
  }
}

// The forward's tiles: captions x videos with about 2^22 similarities each (16 MB of fp32;
// FITCLIP_CPU_BLOCK_ELEMS overrides), tall (up to 1024 captions, at least 256 videos wide where
// there are that many) because MKL packs each GEMM's [D, videos] operand, the strided frames,
// once per call: the more caption rows share a packing the faster the products (1024 x 256
// tiles ran 1.15-1.3x faster than 128 x 2048 ones at C = V = 2048, T = 16, D = 512 here).
void forward_tile(int64_t C, int64_t V, int64_t nt, int64_t& rows, int64_t& vids) {
  const int64_t target = block_elems(int64_t(1) << 22);
  rows = std::min(C, std::clamp<int64_t>(target / (nt * std::min<int64_t>(V, 256)), 1, 1024));
  vids = std::min(V, std::max<int64_t>(1, target / (nt * rows)));
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

// Applies dLoss/dsim of captions [r0, r0 + rows) (grad [rows, V], chosen frames bits [rows, V, words]):
// writes the unit captions' gradient rows of dtext and the unit frames' gradient dframes [V*T, D]
// (video-major): the sparse form takes every caption in one block, the dense one writes with
// the first block and adds the others.
template <typename T>
void backward_block(const FrameInputs& in, int64_t k, int64_t r0, int64_t rows, const T* grad, const int32_t* bits,
                    at::Tensor& dtext, at::Tensor& dframes, at::Tensor& scratch) {
  const int64_t V = in.V, nt = in.nt, D = in.D, words = in.words;
  const T* fs = in.fscale<T>();
  if (!use_dense_backward(k, nt)) {
    sparse_dtext<T>(grad, bits, words, in.frames.data_ptr<T>(), fs, rows, V, nt, D, k, dtext.data_ptr<T>() + r0 * D);
    sparse_dframes<T>(grad, bits, words, in.text.data_ptr<T>() + r0 * D, rows, V, nt, D, k, dframes.data_ptr<T>());
    return;
  }
  auto W = scratch.view({-1}).narrow(0, 0, rows * V * nt).view({rows, V * nt});
  T* w = W.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    std::vector<int16_t> id(k);
    for (int64_t r = b; r < e; ++r) {
      T* wr = w + r * V * nt;
      std::fill(wr, wr + V * nt, T(0));
      for (int64_t v = 0; v < V; ++v) {
        const T g = grad[r * V + v] / static_cast<T>(k);
        const int64_t n = chosen_frames(bits + (r * V + v) * words, words, k, id.data());
        for (int64_t j = 0; j < n; ++j) wr[v * nt + id[j]] = g;
      }
    }
  });
  // W^T @ unit captions; the first caption block writes (beta = 0 ignores the empty buffer)
  at::addmm_out(dframes, dframes, W.t(), in.text.narrow(0, r0, rows), r0 == 0 ? 0 : 1);
  if (fs) {  // W @ unit frames = (W / frame norms) @ raw frames
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t i = 0; i < V * nt; ++i) w[r * V * nt + i] *= fs[i];
    });
  }
  auto dtb = dtext.narrow(0, r0, rows);
  at::mm_out(dtb, W, in.frames.view({V * nt, D}));
}

// A block buffer of at least `numel` elements, kept per thread and per purpose across calls: the
// video loss calls these ops once per caption block, and a fresh 16 MB buffer each time costs
// its page faults again (about 10% of the loss at B = 2048 on 2 cores).
at::Tensor block_buffer(int slot, int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[2];
  at::Tensor& b = buffers[slot];
  if (!b.defined() || b.numel() < numel || b.scalar_type() != options.dtype().toScalarType())
    b = at::empty({numel}, options);
  return b.narrow(0, 0, numel);
}

template <typename T>
void topk_sim_impl(const FrameInputs& in, int64_t k, at::Tensor& sim, at::Tensor& bits) {
  int64_t bc, bv;
  forward_tile(in.C, in.V, in.nt, bc, bv);
  auto buf = block_buffer(0, in.nt * bc * bv, in.text.options());
  const bool* mk = in.mask_tm.defined() ? in.mask_tm.data_ptr<bool>() : nullptr;
  const T* scale = in.normalize ? in.inv_f_tm.data_ptr<T>() : nullptr;
  for (int64_t v0 = 0; v0 < in.V; v0 += bv) {
    const int64_t nv = std::min(bv, in.V - v0);
    for (int64_t r0 = 0; r0 < in.C; r0 += bc) {
      const int64_t rows = std::min(bc, in.C - r0);
      auto S = buf.narrow(0, 0, in.nt * rows * nv).view({in.nt, rows, nv});
      similarity_tile<T>(in, r0, rows, v0, nv, S);
      topk_pool_tile<T>(S.data_ptr<T>(), rows * nv, rows, nv, in.V, in.nt, k, mk ? mk + v0 : nullptr,
                        scale ? scale + v0 : nullptr, sim.data_ptr<T>() + r0 * in.V + v0, in.V,
                        bits.data_ptr<int32_t>() + (r0 * in.V + v0) * in.words, in.words);
    }
  }
}

template <typename T>
void topk_sim_bwd_impl(const FrameInputs& in, int64_t k, const at::Tensor& bits, const at::Tensor& grad,
                       at::Tensor& dtext, at::Tensor& dframes_flat) {
  const int64_t cols = in.V * in.nt;
  const int64_t bc = use_dense_backward(k, in.nt) ? frame_block_rows(in.C, cols) : in.C;
  auto scratch = use_dense_backward(k, in.nt) ? block_buffer(1, bc * cols, in.text.options()).view({bc, cols})
                                              : at::Tensor();
  for (int64_t r0 = 0; r0 < in.C; r0 += bc) {
    const int64_t rows = std::min(bc, in.C - r0);
    backward_block<T>(in, k, r0, rows, grad.data_ptr<T>() + r0 * in.V,
                      bits.data_ptr<int32_t>() + r0 * in.V * in.words, dtext, dframes_flat, scratch);
  }
}

// dtext (returned) and dframes_out (written) for the unit vectors.
at::Tensor backward(const at::Tensor& text, const at::Tensor& frames, const at::Tensor& bits, const at::Tensor& grad,
                    int64_t k, at::Tensor& dframes_out, const std::optional<at::Tensor>& text_norm,
                    const std::optional<at::Tensor>& frames_norm) {
  auto in = prepare(text, frames, k, std::nullopt, text_norm, frames_norm);
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 3 && bits.size(0) == in.C && bits.size(1) == in.V &&
                  bits.size(2) == in.words,
              "bits must be int32 [C, V, ceil(T / 32)]");
  const auto ct = in.text.scalar_type();
  TORCH_CHECK(dframes_out.scalar_type() == ct && dframes_out.is_contiguous() &&
                  dframes_out.sizes() == frames.sizes(),
              "dframes_out must be a contiguous tensor of the frames' shape in the compute dtype");
  auto g = grad.to(ct).contiguous();
  TORCH_CHECK(g.dim() == 2 && g.size(0) == in.C && g.size(1) == in.V, "grad must be [C, V]");
  auto dtext = at::empty_like(in.text);
  auto dframes = dframes_out.view({in.V * in.nt, in.D});
  if (in.C == 0) dframes.zero_();  // no caption block writes it
  auto b = bits.contiguous();
  if (ct == at::kDouble) topk_sim_bwd_impl<double>(in, k, b, g, dtext, dframes);
  else topk_sim_bwd_impl<float>(in, k, b, g, dtext, dframes);
  return dtext;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_sim_cpu(const at::Tensor& text, const at::Tensor& frames, int64_t k,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& text_norm,
                                                const std::optional<at::Tensor>& frames_norm) {
  auto in = prepare(text, frames, k, mask, text_norm, frames_norm);
  auto sim = at::empty({in.C, in.V}, in.text.options());
  auto bits = at::empty({in.C, in.V, in.words}, in.text.options().dtype(at::kInt));
  if (in.text.scalar_type() == at::kDouble) topk_sim_impl<double>(in, k, sim, bits);
  else topk_sim_impl<float>(in, k, sim, bits);
  return {sim, bits};
}

std::tuple<at::Tensor, at::Tensor> topk_sim_bwd_cpu(const at::Tensor& text, const at::Tensor& frames,
                                                    const at::Tensor& bits, const at::Tensor& grad, int64_t k,
                                                    const std::optional<at::Tensor>& text_norm,
                                                    const std::optional<at::Tensor>& frames_norm) {
  auto dframes = at::empty(frames.sizes(), frames.options().dtype(compute_type(text)));
  auto dtext = backward(text, frames, bits, grad, k, dframes, text_norm, frames_norm);
  return {dtext, dframes};
}

// The video loss's per-video-block backward: adds dtext into dtext_acc (C x D, a small
// read-modify-write per block) and returns the block's dframes (written once).
at::Tensor topk_sim_bwd_acc_cpu(const at::Tensor& text, const at::Tensor& frames, const at::Tensor& bits,
                                const at::Tensor& grad, int64_t k, at::Tensor& dtext_acc,
                                const std::optional<at::Tensor>& text_norm,
                                const std::optional<at::Tensor>& frames_norm) {
  const auto ct = compute_type(text);
  TORCH_CHECK(dtext_acc.scalar_type() == ct && dtext_acc.sizes() == text.sizes(),
              "dtext_acc must be a tensor of the text's shape in the compute dtype");
  auto dframes = at::empty(frames.sizes(), frames.options().dtype(ct));
  dtext_acc.add_(backward(text, frames, bits, grad, k, dframes, text_norm, frames_norm));
  return dframes;
}

// In place: grad (the gradient with respect to x / max(|x|, eps), compute dtype, contiguous,
// x's shape) becomes the gradient with respect to the raw x (F.normalize's backward).
void unit_grad_cpu(at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm) {
  const auto ct = compute_type(x);
  TORCH_CHECK(grad.scalar_type() == ct && grad.is_contiguous() && grad.sizes() == x.sizes(),
              "grad must be a contiguous tensor of x's shape in the compute dtype");
  const int64_t D = x.size(-1), n = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(norm.numel() == n, "norm must have one entry per row of x");
  auto xc = x.to(ct).contiguous();
  auto nc = norm.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "unit_grad", [&] {
    unnormalize_grad<scalar_t>(xc.data_ptr<scalar_t>(), nc.data_ptr<scalar_t>(), n, D, false,
                               grad.data_ptr<scalar_t>());
  });
}

// For each b, the k frames of video b most similar (cosine) to caption b, in ascending time
// order (raw or unit captions: a caption's norm does not change its frames' ranking).
at::Tensor select_frames_cpu(const at::Tensor& frames, const at::Tensor& text, int64_t k,
                             const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(frames.dim() == 3 && text.dim() == 2 && frames.size(0) == text.size(0) && frames.size(2) == text.size(1),
              "frames must be [B, T, D] and text [B, D]");
  TORCH_CHECK(k >= 1 && k <= frames.size(1) && frames.size(1) <= 32767, "k must be in [1, T]");
  const auto ct = compute_type(text);
  const int64_t B = frames.size(0), nt = frames.size(1);
  // Cosine similarity of raw frames with the captions, times the caption's norm:
  // [B, T, D] @ [B, D, 1] / |frame| (F.normalize's clamp of the norm at 1e-12).
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
