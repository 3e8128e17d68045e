// Op registration helpers shared by the CPU and CUDA implementations.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "dense_rewards_params.h"

namespace dense_rlhf {

// Checks the canonical inputs of torch.ops.dense_rlhf.dense_rewards (the Python wrapper produces them) and
// allocates the outputs; returns the kernel parameters pointing at them.
DenseRewardsParams prepare(const at::Tensor& attn, const at::Tensor& score, const at::Tensor& mask,
                           double beta, const c10::optional<at::Tensor>& reward_index, at::Tensor& out,
                           at::Tensor& status);

}  // namespace dense_rlhf
