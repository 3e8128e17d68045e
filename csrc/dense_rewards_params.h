// Plain-C++ description of one dense_rewards call, shared by the CPU kernel and the torch-free CUDA kernel.
#pragma once

#include <cstdint>

namespace dense_rlhf {

// Per-row status codes; the Python reference (dense_rlhf/reference.py) uses the same values. A row gets the
// first that applies, in this order.
enum RowStatus : int32_t {
  kStatusOk = 0,
  kStatusEmptyMask = 1,          // no completion token: the row is all zeros
  kStatusBadScore = 2,           // score is NaN or Inf: the row is all zeros
  kStatusBadRewardIndex = 3,     // reward index outside [0, R): the row falls back to the sparse reward
  kStatusBadAttention = 4,       // NaN or Inf among the attention values used: sparse fallback
  kStatusNegativeAttention = 5,  // values finite, but a completion token's head sum is < 0: sparse fallback
};

enum class AttnDtype : int32_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

// attn is a [B, H, R, L] strided view (R == L for full maps, or a stride-0 row dimension for row layouts).
struct DenseRewardsParams {
  const void* attn;
  AttnDtype attn_dtype;
  int64_t batch, heads, rows, length;
  int64_t attn_stride[4];  // in elements
  const float* score;      // [B]
  int64_t score_stride;
  const bool* mask;  // [B, L]
  int64_t mask_stride[2];
  const int64_t* reward_index;  // [B], or nullptr to use the last completion token
  int64_t reward_index_stride;
  float beta;
  float* out;       // contiguous [B, L]
  int32_t* status;  // contiguous [B]
};

}  // namespace dense_rlhf
