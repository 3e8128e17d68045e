// Registers the CUDA kernel of dense_rewards; compiled only when the extension is built with CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../dense_rewards.h"
#include "dense_rewards_kernel.h"

namespace dense_rlhf {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_rewards_cuda(const at::Tensor& attn, const at::Tensor& score,
                                                      const at::Tensor& mask, double beta,
                                                      const c10::optional<at::Tensor>& reward_index) {
  const c10::cuda::CUDAGuard guard(attn.device());
  at::Tensor out, status;
  const DenseRewardsParams p = prepare(attn, score, mask, beta, reward_index, out, status);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Scratch from the caching allocator: no cudaMalloc, so the call stays graph-capturable.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(dense_rewards_cuda_workspace_bytes(p, num_sms))},
                                         attn.options().dtype(at::kByte));
  C10_CUDA_CHECK(dense_rewards_cuda_launch(p, workspace.data_ptr(), num_sms, at::cuda::getCurrentCUDAStream()));
  return {out, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_rlhf, CUDA, m) { m.impl("dense_rewards", &dense_rewards_cuda); }

}  // namespace dense_rlhf
