// The C++ (CPU) implementations of fitclip_ext's ops, one per schema in ops.cpp: each file
// (contrastive.cpp, sigmoid.cpp, distill.cpp, frames.cpp) defines its op's functions, ops.cpp
// registers them all with torch and holds the pybind11 module.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fitclip {

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                   const at::Tensor& scale, bool with_col);

std::tuple<at::Tensor, at::Tensor> contrastive_grad_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                    const at::Tensor& scale, const at::Tensor& row_lse,
                                                    const at::Tensor& row_weight,
                                                    const std::optional<at::Tensor>& col_lse,
                                                    const std::optional<at::Tensor>& col_weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_loss_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale, const at::Tensor& bias, int64_t offset,
    const std::optional<at::Tensor>& row_weight, bool with_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_stats_cpu(
    const at::Tensor& sv, const at::Tensor& st, const at::Tensor& tv, const at::Tensor& tt, const at::Tensor& s_scale,
    const at::Tensor& t_scale);

std::tuple<at::Tensor, at::Tensor> distill_grad_cpu(const at::Tensor& sv, const at::Tensor& st, const at::Tensor& tv,
                                                    const at::Tensor& tt, const at::Tensor& s_scale,
                                                    const at::Tensor& t_scale, const at::Tensor& row_stats_s,
                                                    const at::Tensor& row_stats_t, const at::Tensor& row_w,
                                                    const at::Tensor& col_stats_s, const at::Tensor& col_stats_t,
                                                    const at::Tensor& col_w);

std::tuple<at::Tensor, at::Tensor> topk_sim_cpu(const at::Tensor& text, const at::Tensor& frames, int64_t k,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& text_norm,
                                                const std::optional<at::Tensor>& frames_norm);

std::tuple<at::Tensor, at::Tensor> topk_sim_bwd_cpu(const at::Tensor& text, const at::Tensor& frames,
                                                    const at::Tensor& bits, const at::Tensor& grad, int64_t k,
                                                    const std::optional<at::Tensor>& text_norm,
                                                    const std::optional<at::Tensor>& frames_norm);

at::Tensor topk_sim_bwd_acc_cpu(const at::Tensor& text, const at::Tensor& frames, const at::Tensor& bits,
                                const at::Tensor& grad, int64_t k, at::Tensor& dtext_acc,
                                const std::optional<at::Tensor>& text_norm,
                                const std::optional<at::Tensor>& frames_norm);

void unit_grad_cpu(at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm);

at::Tensor select_frames_cpu(const at::Tensor& frames, const at::Tensor& text, int64_t k,
                             const std::optional<at::Tensor>& mask);

}  // namespace fitclip
