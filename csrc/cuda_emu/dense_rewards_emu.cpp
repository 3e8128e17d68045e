// The CUDA kernel of dense_rewards, csrc/cuda/dense_rewards_kernel.cu as nvcc builds it, built by the host
// compiler through the CPU emulation, behind one C function that the tests call with ctypes
// (tests/cuda_emu.py). Tensors are the CPU ones the op's Python wrapper produces; the function does what the
// CUDA registration (csrc/cuda/dense_rewards_cuda.cpp) does around the launch.
#include "cuda_emu.h"

#define DENSE_RLHF_LAUNCH(kernel, grid, block, stream) CUDA_EMU_LAUNCH(kernel, grid, block, stream)
#include "../cuda/dense_rewards_kernel.cu"

#include <cstdio>
#include <cstdlib>

// The AttnDtype code of a torch dtype's name ("float32", "float16", "bfloat16", "float64"), -1 for any other.
extern "C" int dense_rlhf_emu_attn_dtype(const char* name) {
  using dense_rlhf::AttnDtype;
  const struct {
    const char* name;
    AttnDtype code;
  } known[] = {{"float32", AttnDtype::kFloat32},
               {"float16", AttnDtype::kFloat16},
               {"bfloat16", AttnDtype::kBFloat16},
               {"float64", AttnDtype::kFloat64}};
  for (const auto& k : known) {
    if (std::strcmp(name, k.name) == 0) return static_cast<int>(k.code);
  }
  return -1;
}

// Half and bfloat16 conversions, elementwise over `count` values, for the bit-exactness tests.
extern "C" void dense_rlhf_emu_half_to_float(const uint16_t* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __half2float(__half{in[i]});
}
extern "C" void dense_rlhf_emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}
extern "C" void dense_rlhf_emu_float_to_half(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __float2half_rn(in[i]).__x;
}
extern "C" void dense_rlhf_emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}

// sizes: B, H, R, L; attn_strides: 4, in elements; mask_strides: 2. reward_index may be null. out ([B, L]) and
// status ([B]) are contiguous. Returns the cudaError_t of the launches; on failure `error` says why.
extern "C" int dense_rlhf_emu_dense_rewards(const void* attn, int32_t attn_dtype, const int64_t* sizes,
                                            const int64_t* attn_strides, const float* score, int64_t score_stride,
                                            const bool* mask, const int64_t* mask_strides,
                                            const int64_t* reward_index, int64_t reward_index_stride, float beta,
                                            float* out, int32_t* status, int32_t num_sms, int32_t backend,
                                            uint64_t seed, char* error, size_t error_size) {
  dense_rlhf::DenseRewardsParams p{};
  p.attn = attn;
  p.attn_dtype = static_cast<dense_rlhf::AttnDtype>(attn_dtype);
  p.batch = sizes[0];
  p.heads = sizes[1];
  p.rows = sizes[2];
  p.length = sizes[3];
  for (int i = 0; i < 4; ++i) p.attn_stride[i] = attn_strides[i];
  p.score = score;
  p.score_stride = score_stride;
  p.mask = mask;
  p.mask_stride[0] = mask_strides[0];
  p.mask_stride[1] = mask_strides[1];
  p.reward_index = reward_index;
  p.reward_index_stride = reward_index_stride;
  p.beta = beta;
  p.out = out;
  p.status = status;

  cuda_emu::configure(static_cast<cuda_emu::Backend>(backend), seed);
  // Exactly the bytes asked for (so a sanitizer sees a read past them), filled with 0xff as the caching
  // allocator's memory is never known to be zero: a kernel that reads scratch before writing it gets NaNs and -1.
  const size_t bytes = dense_rlhf::dense_rewards_cuda_workspace_bytes(p, num_sms);
  void* workspace = std::malloc(bytes > 0 ? bytes : 1);
  if (workspace == nullptr) {
    std::snprintf(error, error_size, "cannot allocate %zu bytes of workspace", bytes);
    return cudaErrorInvalidValue;
  }
  std::memset(workspace, 0xff, bytes);
  cudaError_t result = dense_rlhf::dense_rewards_cuda_launch(p, workspace, num_sms, nullptr);
  if (result == cudaSuccess) result = cudaGetLastError();
  std::free(workspace);
  if (result != cudaSuccess) {
    std::snprintf(error, error_size, "%s: %s", cudaGetErrorString(result), cuda_emu::last_error_message());
  }
  return result;
}
