// Host interface of the CUDA kernel; free of torch headers so that the .cu compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "../dense_rewards_params.h"

namespace dense_rlhf {

// Bytes of scratch device memory one call needs (row bounds, per-chunk partial sums and negative flags).
size_t dense_rewards_cuda_workspace_bytes(const DenseRewardsParams& p, int num_sms);

// Enqueues the three kernels on `stream`; no host-device synchronisation, so it can be graph-captured.
cudaError_t dense_rewards_cuda_launch(const DenseRewardsParams& p, void* workspace, int num_sms,
                                      cudaStream_t stream);

}  // namespace dense_rlhf
