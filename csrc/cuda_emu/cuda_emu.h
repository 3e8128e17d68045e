// CUDA on the CPU, for tests only: with this header (through the cuda_runtime.h, cuda_fp16.h and cuda_bf16.h in
// include/, which forward here) the host C++ compiler builds CUDA kernel sources unmodified, and the kernels run
// on the CPU. The package never compiles it; tests/cuda_emu.py builds it.
//
// What is emulated, and how:
// - __global__, __device__, __host__, __forceinline__: plain (inline) C++ functions.
// - __shared__: a static variable, one per kernel; blocks run one after another, so each block has it alone.
// - threadIdx, blockIdx, blockDim, gridDim, warpSize: the running thread's values.
// - A launch runs the grid's blocks one after another, in an order shuffled by a seed. The threads of a block
//   run concurrently: as fibers on one OS thread (the default; each runs until its next synchronisation point,
//   in an order shuffled by the seed at every point), or as one OS thread each (Backend::kThreads).
// - __syncthreads(): a barrier among the block's threads; __syncthreads_or(p) also returns whether p was non-zero
//   in any of them. With fibers, a barrier that cannot complete (a thread exited or waits elsewhere) fails the
//   launch instead of hanging.
// - __shfl_down_sync: an exchange among the 32 lanes of a warp, which wait for each other; between
//   synchronisation points lanes run independently, as under Volta's independent thread scheduling. Only masks
//   naming every lane the warp has are emulated; any other mask fails the launch.
// - __half and __nv_bfloat16: 16-bit storage types with torch's bit-exact conversions and, as in torch's own
//   CUDA builds (-D__CUDA_NO_HALF_CONVERSIONS__, -D__CUDA_NO_BFLOAT16_CONVERSIONS__), no implicit ones.
// - <<<grid, block, shared, stream>>> is not C++: a launch is written CUDA_EMU_LAUNCH(kernel, grid, block,
//   stream)(args...), which the kernel source reaches through its own launch macro.
// What it cannot tell: the memory model (blocks never overlap, stores are seen at once), real warp scheduling,
// fused multiply-adds that nvcc may contract (results can differ in the last bit), reads of shared memory before
// any write (a block sees what the previous block left, not garbage), and speed.
#pragma once

#include <math.h>  // isfinite and the other math functions, unqualified as in device code

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

constexpr int warpSize = 32;

using cudaStream_t = struct CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace cuda_emu {

enum class Backend : int { kFibers = 0, kThreads = 1 };

// How the following launches run: the block backend, and the seed of the block and thread orders. Also clears
// the failure state: after a kernel fails, later launches fail at once, as on a device, until this is called.
void configure(Backend backend, uint64_t seed);

// What went wrong first since configure(), in words ("" if nothing).
const char* last_error_message();

namespace detail {

struct Block;

// One emulated CUDA thread.
struct Thread {
  uint3 idx;
  Block* block;
  unsigned int linear, warp, lane;
  unsigned int shfl_calls;  // parity picks the exchange buffer of the next warp-wide exchange
  unsigned int vote_calls;  // parity picks the vote buffer of the next block-wide vote
};

// What a block's threads share, besides the kernels' __shared__ statics.
struct Block {
  uint3 idx;
  dim3 dim, grid;
  struct Warp {
    unsigned int lane_mask;  // lanes this warp has (the last warp of a block may be partial)
    uint64_t slots[2][32];   // exchange buffers, alternating, so one exchange needs one wait
  };
  Warp* warps;
  unsigned char* votes[2];  // one per thread, alternating like the warps' exchange buffers
  void (*sync_block)(Block&);
  void (*sync_warp)(Block&, unsigned int warp);
  void* backend;
};

Thread& current();

// Fails the running launch: the calling thread stops, and the launch returns cudaErrorLaunchFailure.
[[noreturn]] void fault(const char* what);

// Writes this lane's value into its warp's exchange buffer, waits for all lanes of `mask`, returns the buffer.
const uint64_t* warp_exchange(unsigned int mask, uint64_t bits);

// A barrier that also tells whether `predicate` was non-zero in any thread of the block.
int block_vote_or(int predicate);

cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);
void set_last_error(cudaError_t error);
cudaError_t take_last_error();

}  // namespace detail

// A kernel launch: the arguments are copied once, then every thread of the grid runs the kernel on them.
template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block) : kernel_(kernel), grid_(grid), block_(block) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    detail::set_last_error(detail::run_grid(grid_, block_, [&] { std::apply(kernel_, params); }));
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t) {
  return Launch<Params...>(kernel, grid, block);
}

}  // namespace cuda_emu

#define CUDA_EMU_LAUNCH(kernel, grid, block, stream) ::cuda_emu::launch(kernel, grid, block, stream)

#define threadIdx (::cuda_emu::detail::current().idx)
#define blockIdx (::cuda_emu::detail::current().block->idx)
#define blockDim (::cuda_emu::detail::current().block->dim)
#define gridDim (::cuda_emu::detail::current().block->grid)

inline void __syncthreads() {
  ::cuda_emu::detail::Block& block = *::cuda_emu::detail::current().block;
  block.sync_block(block);
}

inline int __syncthreads_or(int predicate) { return ::cuda_emu::detail::block_vote_or(predicate); }

template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_down_sync: a value of at most 8 bytes");
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0) {
    ::cuda_emu::detail::fault("__shfl_down_sync: width must be a power of 2 in [1, 32]");
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  const uint64_t* slots = ::cuda_emu::detail::warp_exchange(mask, bits);
  const unsigned int lane = ::cuda_emu::detail::current().lane;
  if (lane % static_cast<unsigned int>(width) + delta >= static_cast<unsigned int>(width)) return var;
  const unsigned int source = lane + delta;
  if (((mask >> source) & 1u) == 0) ::cuda_emu::detail::fault("__shfl_down_sync: source lane not in mask");
  std::memcpy(&var, &slots[source], sizeof(T));
  return var;
}

inline cudaError_t cudaGetLastError() { return ::cuda_emu::detail::take_last_error(); }

const char* cudaGetErrorString(cudaError_t error);

// 16-bit floating-point storage types. Conversions are bit-exact with torch's (c10::Half, c10::BFloat16),
// round-to-nearest-even; from 16 to 32 bits a NaN keeps its payload and is made quiet (the device may return a
// canonical NaN instead; only a value's NaN-ness can matter to a kernel).
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes, like at::Half");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");

namespace cuda_emu {
float half_bits_to_float(uint16_t bits);
uint16_t float_to_half_bits(float value);
float bfloat16_bits_to_float(uint16_t bits);
uint16_t float_to_bfloat16_bits(float value);
}  // namespace cuda_emu

inline float __half2float(__half h) { return ::cuda_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{::cuda_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::cuda_emu::bfloat16_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::cuda_emu::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
