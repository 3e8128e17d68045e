// Small CUDA kernels that test the CPU emulation itself (tests/test_cuda_emu.py): barriers that are real, a
// missing barrier that shows, divergent barriers and bad warp masks that fail the launch, warp shuffles, the
// grid's indices, block-wide votes, and a read past a buffer for the sanitizer build to catch.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_emu.h"

namespace {

constexpr int kThreads = 128;

// Sum of 1..kThreads through shared memory, each thread reading every partial: right only if the barriers hold.
__global__ void block_sum_kernel(float* out, bool second_barrier) {
  __shared__ float partial[kThreads];
  __shared__ float total[kThreads];
  partial[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  __syncthreads();
  float sum = 0.0f;
  for (int i = 0; i < kThreads; ++i) sum += partial[i];
  total[threadIdx.x] = sum;
  if (second_barrier) __syncthreads();
  partial[threadIdx.x] = 0.0f;  // overwrites what a thread still summing would read without the barrier above
  out[blockIdx.x * kThreads + threadIdx.x] = total[threadIdx.x];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Every lane reads its value `delta` lanes down, in segments of `width`; blocks may end in a partial warp.
__global__ void shfl_down_kernel(float* out, unsigned int delta, int width) {
  const unsigned int lanes = blockDim.x - threadIdx.x / 32 * 32;  // lanes of this thread's warp
  const unsigned int mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
  out[threadIdx.x] = __shfl_down_sync(mask, static_cast<float>(threadIdx.x), delta, width);
}

__global__ void half_warp_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);
}

// out[linear block, linear thread] = a code of the indices and dimensions the thread sees.
__global__ void indices_kernel(float* out) {
  const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned int threads = blockDim.x * blockDim.y * blockDim.z;
  out[block * threads + thread] = static_cast<float>(block * 10000 + thread);
}

// Every thread gets whether thread `voter` (none if out of range) voted 1, twice in a row.
__global__ void syncthreads_or_kernel(float* out, int voter) {
  const int first = __syncthreads_or(static_cast<int>(threadIdx.x) == voter);
  const int second = __syncthreads_or(static_cast<int>(threadIdx.x) == voter + 1);
  out[threadIdx.x] = static_cast<float>(first * 10 + second);
}

__global__ void read_past_end_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[n + threadIdx.x];  // thread 0 reads the element just past the end
}

}  // namespace

// Runs the self-test kernel `name` into `out` (`size` floats); returns the launch's cudaError_t.
extern "C" int dense_rlhf_emu_selftest(const char* name, int32_t backend, uint64_t seed, float* out, int64_t size,
                                       char* error, size_t error_size) {
  cuda_emu::configure(static_cast<cuda_emu::Backend>(backend), seed);
  const std::string test = name;
  if (test == "block_sum" || test == "block_sum_missing_barrier") {
    CUDA_EMU_LAUNCH(block_sum_kernel, static_cast<unsigned int>(size / kThreads), kThreads, nullptr)
    (out, test == "block_sum");
  } else if (test == "divergent_barrier") {
    CUDA_EMU_LAUNCH(divergent_barrier_kernel, 1, kThreads, nullptr)(out);
  } else if (test.rfind("shfl_down:", 0) == 0) {  // shfl_down:<delta>:<width>, one block of `size` threads
    unsigned int delta = 0;
    int width = 0;
    std::sscanf(name, "shfl_down:%u:%d", &delta, &width);
    CUDA_EMU_LAUNCH(shfl_down_kernel, 1, static_cast<unsigned int>(size), nullptr)(out, delta, width);
  } else if (test.rfind("syncthreads_or:", 0) == 0) {  // syncthreads_or:<voter>, one block of `size` threads
    int voter = 0;
    std::sscanf(name, "syncthreads_or:%d", &voter);
    CUDA_EMU_LAUNCH(syncthreads_or_kernel, 1, static_cast<unsigned int>(size), nullptr)(out, voter);
  } else if (test == "half_warp_mask") {
    CUDA_EMU_LAUNCH(half_warp_mask_kernel, 1, 32, nullptr)(out);
  } else if (test == "indices") {  // grid (3, 2, 2), block (4, 3, 2): 12 blocks of 24 threads
    CUDA_EMU_LAUNCH(indices_kernel, dim3(3, 2, 2), dim3(4, 3, 2), nullptr)(out);
  } else if (test == "too_many_threads") {
    CUDA_EMU_LAUNCH(indices_kernel, 1, 2048, nullptr)(out);
  } else if (test == "read_past_end") {
    float* in = static_cast<float*>(std::malloc(sizeof(float) * static_cast<size_t>(size)));
    std::memset(in, 0, sizeof(float) * static_cast<size_t>(size));
    CUDA_EMU_LAUNCH(read_past_end_kernel, 1, 1, nullptr)(in, out, static_cast<int>(size));
    std::free(in);
  } else {
    std::snprintf(error, error_size, "no self-test named %s", name);
    return cudaErrorInvalidValue;
  }
  const cudaError_t result = cudaGetLastError();
  if (result != cudaSuccess) {
    std::snprintf(error, error_size, "%s: %s", cudaGetErrorString(result), cuda_emu::last_error_message());
  }
  return result;
}
