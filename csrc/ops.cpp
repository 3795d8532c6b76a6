// Every schema of the fitclip_ext library and its CPU implementation, in one place (the torch
// custom-op pattern of pytorch/extension-cpp's ops.cpp); the Triton launchers register the same
// schemas' CUDA forms from Python (kernels/*.py, fitclip_ext::triton_*).
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "ops.h"

TORCH_LIBRARY(fitclip_ext, m) {
  m.def("contrastive_lse(Tensor query, Tensor keys, Tensor scale, bool with_col) -> (Tensor, Tensor)");
  m.def(
      "contrastive_grad(Tensor query, Tensor keys, Tensor scale, Tensor row_lse, Tensor row_weight, "
      "Tensor? col_lse, Tensor? col_weight) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_loss(Tensor query, Tensor keys, Tensor scale, Tensor bias, int offset, Tensor? row_weight, "
      "bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "distill_stats(Tensor student_video, Tensor student_text, Tensor teacher_video, Tensor teacher_text, "
      "Tensor student_scale, Tensor teacher_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "distill_grad(Tensor student_video, Tensor student_text, Tensor teacher_video, Tensor teacher_text, "
      "Tensor student_scale, Tensor teacher_scale, Tensor row_stats_s, Tensor row_stats_t, Tensor row_weight, "
      "Tensor col_stats_s, Tensor col_stats_t, Tensor col_weight) -> (Tensor, Tensor)");
  m.def(
      "topk_sim(Tensor text, Tensor frames, int k, Tensor? mask, Tensor? text_norm=None, Tensor? frames_norm=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "topk_sim_bwd(Tensor text, Tensor frames, Tensor bits, Tensor grad, int k, Tensor? text_norm=None, "
      "Tensor? frames_norm=None) -> (Tensor, Tensor)");
  m.def(
      "topk_sim_bwd_acc(Tensor text, Tensor frames, Tensor bits, Tensor grad, int k, Tensor(a!) dtext_acc, "
      "Tensor? text_norm=None, Tensor? frames_norm=None) -> Tensor");
  m.def("unit_grad(Tensor(a!) grad, Tensor x, Tensor norm) -> ()");
  m.def("select_frames(Tensor frames, Tensor text, int k, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(fitclip_ext, CPU, m) {
  m.impl("contrastive_lse", &fitclip::contrastive_lse_cpu);
  m.impl("contrastive_grad", &fitclip::contrastive_grad_cpu);
  m.impl("sigmoid_loss", &fitclip::sigmoid_loss_cpu);
  m.impl("distill_stats", &fitclip::distill_stats_cpu);
  m.impl("distill_grad", &fitclip::distill_grad_cpu);
  m.impl("topk_sim", &fitclip::topk_sim_cpu);
  m.impl("topk_sim_bwd", &fitclip::topk_sim_bwd_cpu);
  m.impl("topk_sim_bwd_acc", &fitclip::topk_sim_bwd_acc_cpu);
  m.impl("unit_grad", &fitclip::unit_grad_cpu);
  m.impl("select_frames", &fitclip::select_frames_cpu);
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fitclip_ext C++ CPU kernels; the ops are registered as torch.ops.fitclip_ext.*";
}
