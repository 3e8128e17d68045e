// CUDA kernels of dense_rewards. Three launches, no host synchronisation:
//   1. row_bounds:  one block per row; first/last completion token, reward position, row state.
//   2. accumulate:  a (row, chunk) grid; sums heads at the reward position for completion tokens of the chunk
//                   into out (fp32) and writes the chunk's partial sum, and whether a head sum was negative.
//                   Chunks give small batches with long rows enough blocks to fill the GPU.
//   3. finalize:    same grid; adds the chunk partials (in a fixed order, so results are deterministic),
//                   normalises and adds the sparse part, or falls back to the sparse reward.
// All offsets are 64-bit: B * H * L * L passes 2^31 for real models.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dense_rewards_kernel.h"

// <<<...>>> is not C++: launches are spelled through this macro, so that the CPU emulation the tests use
// (csrc/cuda_emu) can build this file with the host compiler; it defines its own.
#ifndef DENSE_RLHF_LAUNCH
#define DENSE_RLHF_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

namespace dense_rlhf {
namespace {

constexpr int kThreads = 256;
constexpr int kMinChunk = kThreads;  // positions per block at least: one per thread

struct RowInfo {
  int64_t first;   // first completion token
  int64_t last;    // last completion token (T_b), -1 if the row has none
  int64_t reward;  // row of the attention maps to read
  int32_t state;   // kStatusOk, or the reason the row is zeroed or falls back to sparse
};

struct Layout {
  int64_t chunks;  // chunks per row
  int64_t chunk;   // positions per chunk
};

Layout layout_for(const DenseRewardsParams& p, int num_sms) {
  const int64_t target_blocks = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  const int64_t max_chunks = (p.length + kMinChunk - 1) / kMinChunk;
  int64_t chunks = (target_blocks + p.batch - 1) / (p.batch > 0 ? p.batch : 1);
  chunks = chunks < 1 ? 1 : (chunks > max_chunks ? max_chunks : chunks);
  if (chunks > 65535) chunks = 65535;  // gridDim.y limit
  const int64_t chunk = (p.length + chunks - 1) / chunks;
  return {chunks, chunk};
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }

// Block-wide sum; every thread gets the result. `shared` holds kThreads / 32 floats.
__device__ float block_sum(float value, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

__global__ void row_bounds_kernel(DenseRewardsParams p, RowInfo* rows) {
  const int64_t b = blockIdx.x;
  const bool* mask = p.mask + b * p.mask_stride[0];
  long long first = p.length, last = -1;
  for (int64_t t = threadIdx.x; t < p.length; t += kThreads) {
    if (mask[t * p.mask_stride[1]]) {
      if (t < first) first = t;
      last = t;  // t increases within a thread
    }
  }
  __shared__ long long shared_first[kThreads], shared_last[kThreads];
  shared_first[threadIdx.x] = first;
  shared_last[threadIdx.x] = last;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const long long f = shared_first[threadIdx.x + stride], l = shared_last[threadIdx.x + stride];
      if (f < shared_first[threadIdx.x]) shared_first[threadIdx.x] = f;
      if (l > shared_last[threadIdx.x]) shared_last[threadIdx.x] = l;
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  RowInfo info;
  info.first = shared_first[0];
  info.last = shared_last[0];
  info.reward = info.last;
  info.state = kStatusOk;
  if (info.last < 0) {
    info.state = kStatusEmptyMask;
  } else if (!is_finite(p.score[b * p.score_stride])) {
    info.state = kStatusBadScore;
  } else if (p.reward_index != nullptr) {
    info.reward = p.reward_index[b * p.reward_index_stride];
    if (info.reward < 0 || info.reward >= p.rows) info.state = kStatusBadRewardIndex;
  }
  rows[b] = info;
}

template <typename T>
__global__ void accumulate_kernel(DenseRewardsParams p, Layout layout, const RowInfo* rows, float* partial,
                                  int32_t* negative) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const RowInfo info = rows[b];
  const int64_t begin = c * layout.chunk;
  const int64_t end = begin + layout.chunk < p.length ? begin + layout.chunk : p.length;
  const bool read = info.state == kStatusOk;
  const bool* mask = p.mask + b * p.mask_stride[0];
  const T* base = static_cast<const T*>(p.attn) + b * p.attn_stride[0] + (read ? info.reward : 0) * p.attn_stride[2];
  float* out = p.out + b * p.length;

  float local = 0.0f;
  bool any_negative = false;  // -0.0 is not negative, nor is NaN (that is status 4)
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    float acc = 0.0f;
    if (read && t >= info.first && t <= info.last && mask[t * p.mask_stride[1]]) {
      const T* column = base + t * p.attn_stride[3];
#pragma unroll 8
      for (int64_t h = 0; h < p.heads; ++h) acc += to_float(column[h * p.attn_stride[1]]);
    }
    out[t] = acc;
    local += acc;
    any_negative |= acc < 0.0f;
  }
  const float total = block_sum(local, shared);
  const int chunk_negative = __syncthreads_or(any_negative);
  if (threadIdx.x == 0) {
    partial[b * layout.chunks + c] = total;
    negative[b * layout.chunks + c] = chunk_negative;
  }
}

__global__ void finalize_kernel(DenseRewardsParams p, Layout layout, const RowInfo* rows, const float* partial,
                                const int32_t* negative) {
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const RowInfo info = rows[b];
  float total = 0.0f;
  int32_t any_negative = 0;
  for (int64_t i = 0; i < layout.chunks; ++i) {
    total += partial[b * layout.chunks + i];
    any_negative |= negative[b * layout.chunks + i];
  }
  const bool finite = is_finite(total);
  int32_t state = info.state;
  if (state == kStatusOk && !finite) {
    state = kStatusBadAttention;
  } else if (state == kStatusOk && any_negative) {
    state = kStatusNegativeAttention;
  }
  if (c == 0 && threadIdx.x == 0) p.status[b] = state;
  const float score = p.score[b * p.score_stride];
  const bool usable = state == kStatusOk && total != 0.0f;
  // A bad reward index, bad or negative attention, or a zero total give the sparse reward; an empty mask or a
  // bad score a zero row.
  const bool fallback = !usable && state != kStatusEmptyMask && state != kStatusBadScore;
  const float beta_score = p.beta * score;

  const int64_t begin = c * layout.chunk;
  const int64_t end = begin + layout.chunk < p.length ? begin + layout.chunk : p.length;
  float* out = p.out + b * p.length;
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    // One division per token, never beta * score / total once: with a tiny but positive total (the mass next
    // to an attention sink) that overflows, and a masked token's 0 times it is NaN. "+ 0.0f" turns the -0.0 of
    // a masked token (0 times a negative score) into +0.0, as on the CPU.
    float value = usable ? beta_score * (out[t] / total) + 0.0f : 0.0f;
    if (t == info.last) {
      if (usable) value += (1.0f - p.beta) * score;
      if (fallback) value = score;
    }
    out[t] = value;
  }
}

template <typename T>
void launch_accumulate(const DenseRewardsParams& p, Layout layout, const RowInfo* rows, float* partial,
                       int32_t* negative, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(layout.chunks));
  DENSE_RLHF_LAUNCH(accumulate_kernel<T>, grid, kThreads, stream)(p, layout, rows, partial, negative);
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

size_t dense_rewards_cuda_workspace_bytes(const DenseRewardsParams& p, int num_sms) {
  const Layout layout = layout_for(p, num_sms);
  return align_up(sizeof(RowInfo) * p.batch) + align_up(sizeof(float) * p.batch * layout.chunks) +
         align_up(sizeof(int32_t) * p.batch * layout.chunks);
}

cudaError_t dense_rewards_cuda_launch(const DenseRewardsParams& p, void* workspace, int num_sms,
                                      cudaStream_t stream) {
  if (p.batch == 0 || p.length == 0) return cudaSuccess;
  if (p.batch > 2147483647LL) return cudaErrorInvalidValue;  // gridDim.x limit
  const Layout layout = layout_for(p, num_sms);
  RowInfo* rows = static_cast<RowInfo*>(workspace);
  char* scratch = static_cast<char*>(workspace) + align_up(sizeof(RowInfo) * p.batch);
  float* partial = reinterpret_cast<float*>(scratch);
  int32_t* negative = reinterpret_cast<int32_t*>(scratch + align_up(sizeof(float) * p.batch * layout.chunks));

  DENSE_RLHF_LAUNCH(row_bounds_kernel, static_cast<unsigned>(p.batch), kThreads, stream)(p, rows);
  switch (p.attn_dtype) {
    case AttnDtype::kFloat32: launch_accumulate<float>(p, layout, rows, partial, negative, stream); break;
    case AttnDtype::kFloat16: launch_accumulate<__half>(p, layout, rows, partial, negative, stream); break;
    case AttnDtype::kBFloat16: launch_accumulate<__nv_bfloat16>(p, layout, rows, partial, negative, stream); break;
    case AttnDtype::kFloat64: launch_accumulate<double>(p, layout, rows, partial, negative, stream); break;
  }
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(layout.chunks));
  DENSE_RLHF_LAUNCH(finalize_kernel, grid, kThreads, stream)(p, layout, rows, partial, negative);
  return cudaGetLastError();
}

}  // namespace dense_rlhf
