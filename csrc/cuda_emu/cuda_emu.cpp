// The CPU emulation's runtime (see cuda_emu.h): grid launches, the two block backends, warp exchanges, and the
// 16-bit float conversions.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif
#endif

namespace cuda_emu {
namespace detail {
namespace {

// What a faulting thread throws; caught where the thread started.
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

thread_local Thread* running_thread = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

struct State {
  std::mutex launch_mutex;  // one launch at a time: __shared__ statics belong to the running block
  Backend backend = Backend::kFibers;
  std::mt19937_64 rng{0};
  std::mutex fault_mutex;
  std::string fault;    // the first fault since configure()
  bool sticky = false;  // a kernel failed since configure()
};

State& state() {
  static State s;
  return s;
}

void record_fault(const std::string& what) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.fault_mutex);
  if (s.fault.empty()) s.fault = what;
}

std::string describe(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

// ---- Fibers: the block's threads on the calling OS thread, switched at synchronisation points. ----

constexpr size_t kStackBytes = 256 * 1024;  // the kernels' frames are small; sanitizers make them larger

// An mmap'd stack with an inaccessible guard page below it; kept for reuse across blocks.
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(memory, page, PROT_NONE);
    base = static_cast<char*>(memory) + page;
    size = kStackBytes;
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
};

// A point where threads wait for each other: __syncthreads, or one warp's exchange.
struct WaitPoint {
  unsigned int expected = 0, arrived = 0;
};

class FiberBlock {
 public:
  FiberBlock(Block& block, unsigned int threads, const std::function<void()>& body, std::mt19937_64& rng)
      : block_(block), body_(body), rng_(rng), fibers_(threads), warp_points_((threads + 31) / 32) {
    block_point_.expected = threads;
    for (unsigned int w = 0; w < warp_points_.size(); ++w) {
      warp_points_[w].expected = std::min(32u, threads - 32 * w);
    }
  }

  // Runs the block to its end; false (with the fault recorded) if a thread faulted or the threads deadlocked.
  bool run(std::vector<Thread>& threads) {
    static std::vector<std::unique_ptr<Stack>> stacks;  // reused: the launch mutex is held
    while (stacks.size() < fibers_.size()) stacks.push_back(std::make_unique<Stack>());
    for (size_t i = 0; i < fibers_.size(); ++i) {
      Fiber& f = fibers_[i];
      f.thread = &threads[i];
      f.stack = stacks[i].get();
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack->base;
      f.context.uc_stack.ss_size = f.stack->size;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &FiberBlock::entry, 0);
    }
    std::vector<size_t> ready;
    for (;;) {
      ready.clear();
      for (size_t i = 0; i < fibers_.size(); ++i) {
        if (fibers_[i].state == Fiber::kReady) ready.push_back(i);
      }
      if (ready.empty()) break;
      std::shuffle(ready.begin(), ready.end(), rng_);
      for (size_t i : ready) {
        resume(fibers_[i]);
        if (faulted_) return false;
      }
    }
    const auto done = std::count_if(fibers_.begin(), fibers_.end(), [](const Fiber& f) { return f.state == Fiber::kDone; });
    if (static_cast<size_t>(done) == fibers_.size()) return true;
    record_fault(deadlock_message(static_cast<size_t>(done)));
    return false;
  }

  static void sync_block(Block& block) { static_cast<FiberBlock*>(block.backend)->wait(block_point_of(block)); }
  static void sync_warp(Block& block, unsigned int warp) {
    static_cast<FiberBlock*>(block.backend)->wait(static_cast<FiberBlock*>(block.backend)->warp_points_[warp]);
  }

 private:
  struct Fiber {
    enum StateCode { kReady, kWaiting, kDone };
    ucontext_t context;
    Thread* thread = nullptr;
    Stack* stack = nullptr;
    StateCode state = kReady;
    WaitPoint* waiting_on = nullptr;
    void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping while switched out
  };

  static WaitPoint& block_point_of(Block& block) { return static_cast<FiberBlock*>(block.backend)->block_point_; }

  void wait(WaitPoint& point) {
    Fiber& f = *running_;
    if (++point.arrived == point.expected) {
      point.arrived = 0;
      for (Fiber& other : fibers_) {
        if (other.state == Fiber::kWaiting && other.waiting_on == &point) {
          other.state = Fiber::kReady;
          other.waiting_on = nullptr;
        }
      }
    } else {
      f.state = Fiber::kWaiting;
      f.waiting_on = &point;
    }
    switch_out(f);  // the last to arrive yields as well: who runs first after a barrier is the seed's choice
  }

  void resume(Fiber& f) {
    running_ = &f;
    running_thread = f.thread;
#ifdef CUDA_EMU_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, f.stack->base, f.stack->size);
#endif
    swapcontext(&scheduler_, &f.context);
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
    running_ = nullptr;
    running_thread = nullptr;
  }

  void switch_out(Fiber& f) {
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(f.state == Fiber::kDone ? nullptr : &f.fake_stack, scheduler_stack_,
                                   scheduler_stack_size_);
#endif
    swapcontext(&f.context, &scheduler_);
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  }

  static void entry() {
    FiberBlock& self = *starting_;
    Fiber& f = *self.running_;
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &self.scheduler_stack_, &self.scheduler_stack_size_);
#endif
    try {
      self.body_();
    } catch (const KernelFault& e) {
      record_fault(std::string(e.what()) + " (thread " + describe(f.thread->idx) + " of block " +
                   describe(self.block_.idx) + ")");
      self.faulted_ = true;
    } catch (const std::exception& e) {
      record_fault(e.what());
      self.faulted_ = true;
    }
    f.state = Fiber::kDone;
    self.switch_out(f);  // never resumed
  }

  std::string deadlock_message(size_t done) const {
    size_t at_block = 0;
    std::vector<size_t> at_warp(warp_points_.size(), 0);
    for (const Fiber& f : fibers_) {
      if (f.state != Fiber::kWaiting) continue;
      if (f.waiting_on == &block_point_) {
        ++at_block;
      } else {
        ++at_warp[static_cast<size_t>(f.waiting_on - warp_points_.data())];
      }
    }
    std::string message = "deadlock in block " + describe(block_.idx) + ": " + std::to_string(done) + " of " +
                          std::to_string(fibers_.size()) + " threads exited, " + std::to_string(at_block) +
                          " wait at __syncthreads()";
    for (size_t w = 0; w < at_warp.size(); ++w) {
      if (at_warp[w] > 0) {
        message += ", " + std::to_string(at_warp[w]) + " of warp " + std::to_string(w) + "'s " +
                   std::to_string(warp_points_[w].expected) + " lanes wait in a warp-wide exchange";
      }
    }
    return message;
  }

 public:
  static thread_local FiberBlock* starting_;

 private:
  Block& block_;
  const std::function<void()>& body_;
  std::mt19937_64& rng_;
  std::vector<Fiber> fibers_;
  WaitPoint block_point_;
  std::vector<WaitPoint> warp_points_;
  ucontext_t scheduler_;
  Fiber* running_ = nullptr;
  bool faulted_ = false;
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_size_ = 0;
};

thread_local FiberBlock* FiberBlock::starting_ = nullptr;

bool run_block_fibers(Block& block, std::vector<Thread>& threads, const std::function<void()>& body,
                      std::mt19937_64& rng) {
  FiberBlock runner(block, static_cast<unsigned int>(threads.size()), body, rng);
  block.backend = &runner;
  block.sync_block = &FiberBlock::sync_block;
  block.sync_warp = &FiberBlock::sync_warp;
  FiberBlock::starting_ = &runner;
  const bool ok = runner.run(threads);
  FiberBlock::starting_ = nullptr;
  return ok;
}

// ---- OS threads: one std::thread per CUDA thread, std::barrier for __syncthreads and for each warp. ----
// A thread that exits drops out of its barriers, so the others are not held; a real deadlock hangs.

struct ThreadBarriers {
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  explicit ThreadBarriers(unsigned int threads) : block(threads) {
    for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    }
  }
};

bool run_block_threads(Block& block, std::vector<Thread>& threads, const std::function<void()>& body,
                       std::mt19937_64& rng) {
  ThreadBarriers barriers(static_cast<unsigned int>(threads.size()));
  block.backend = &barriers;
  block.sync_block = [](Block& b) { static_cast<ThreadBarriers*>(b.backend)->block.arrive_and_wait(); };
  block.sync_warp = [](Block& b, unsigned int warp) {
    static_cast<ThreadBarriers*>(b.backend)->warps[warp]->arrive_and_wait();
  };
  std::vector<size_t> order(threads.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  bool faulted = false;
  std::mutex faulted_mutex;
  std::vector<std::thread> workers;
  workers.reserve(threads.size());
  for (size_t i : order) {
    workers.emplace_back([&, i] {
      Thread& t = threads[i];
      running_thread = &t;
      try {
        body();
      } catch (const std::exception& e) {
        record_fault(std::string(e.what()) + " (thread " + describe(t.idx) + " of block " + describe(block.idx) + ")");
        const std::lock_guard<std::mutex> lock(faulted_mutex);
        faulted = true;
      }
      barriers.block.arrive_and_drop();
      barriers.warps[t.warp]->arrive_and_drop();
    });
  }
  for (std::thread& w : workers) w.join();
  return !faulted;
}

bool valid_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  return grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 && block.z >= 1 &&
         block.z <= 64 && threads <= 1024;
}

}  // namespace

Thread& current() {
  if (running_thread == nullptr) throw std::logic_error("cuda_emu: a device builtin used outside a kernel");
  return *running_thread;
}

void fault(const char* what) { throw KernelFault(what); }

const uint64_t* warp_exchange(unsigned int mask, uint64_t bits) {
  Thread& t = current();
  Block& b = *t.block;
  Block::Warp& w = b.warps[t.warp];
  if (mask != w.lane_mask) {
    char message[160];
    std::snprintf(message, sizeof message,
                  "warp-wide exchange with mask 0x%08x, but the warp's lanes are 0x%08x (only full-warp masks are "
                  "emulated)",
                  mask, w.lane_mask);
    fault(message);
  }
  const unsigned int buffer = t.shfl_calls++ & 1u;
  w.slots[buffer][t.lane] = bits;
  b.sync_warp(b, t.warp);
  return w.slots[buffer];
}

int block_vote_or(int predicate) {
  Thread& t = current();
  Block& b = *t.block;
  unsigned char* votes = b.votes[t.vote_calls++ & 1u];
  votes[t.linear] = predicate != 0;
  b.sync_block(b);
  const unsigned int threads = b.dim.x * b.dim.y * b.dim.z;
  return std::any_of(votes, votes + threads, [](unsigned char vote) { return vote != 0; }) ? 1 : 0;
}

cudaError_t run_grid(dim3 grid, dim3 block_dim, const std::function<void()>& thread_body) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.launch_mutex);
  if (s.sticky) return cudaErrorLaunchFailure;  // as on a device: after a failed kernel, nothing more runs
  if (!valid_config(grid, block_dim)) {
    record_fault("invalid launch configuration: grid " + describe({grid.x, grid.y, grid.z}) + ", block " +
                 describe({block_dim.x, block_dim.y, block_dim.z}));
    return cudaErrorInvalidConfiguration;
  }
  const unsigned int threads = block_dim.x * block_dim.y * block_dim.z;
  const unsigned int warps = (threads + 31) / 32;
  std::vector<Block::Warp> warp_state(warps);
  for (unsigned int w = 0; w < warps; ++w) {
    const unsigned int lanes = std::min(32u, threads - 32 * w);
    warp_state[w].lane_mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  }
  // Blocks in a shuffled order: a kernel must not depend on the order of its blocks.
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  std::shuffle(order.begin(), order.end(), s.rng);
  std::vector<unsigned char> votes(2 * size_t{threads});
  std::vector<Thread> thread_state(threads);
  for (uint64_t linear : order) {
    Block block{};
    block.idx = {static_cast<unsigned int>(linear % grid.x), static_cast<unsigned int>(linear / grid.x % grid.y),
                 static_cast<unsigned int>(linear / (uint64_t{grid.x} * grid.y))};
    block.dim = block_dim;
    block.grid = grid;
    block.warps = warp_state.data();
    block.votes[0] = votes.data();
    block.votes[1] = votes.data() + threads;
    for (unsigned int i = 0; i < threads; ++i) {
      thread_state[i] = Thread{{i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y)},
                               &block, i, i / 32, i % 32, 0, 0};
    }
    const bool ok = s.backend == Backend::kFibers ? run_block_fibers(block, thread_state, thread_body, s.rng)
                                                  : run_block_threads(block, thread_state, thread_body, s.rng);
    if (!ok) {
      s.sticky = true;
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

void set_last_error(cudaError_t error) {
  if (error != cudaSuccess) last_error = error;
}

cudaError_t take_last_error() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

}  // namespace detail

void configure(Backend backend, uint64_t seed) {
  detail::State& s = detail::state();
  const std::lock_guard<std::mutex> lock(s.launch_mutex);
  s.backend = backend;
  s.rng.seed(seed);
  s.fault.clear();
  s.sticky = false;
}

const char* last_error_message() { return detail::state().fault.c_str(); }

// ---- 16-bit floats ----

namespace {
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) {  // Inf; a NaN keeps its payload and is made quiet, as torch's conversion does
    return float_of(sign | 0x7f800000u | (mantissa != 0 ? 0x400000u : 0u) | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return float_of(sign);
    exponent = 113;  // subnormal: normalise, 2^-14 scaled down one binade per shift
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    return float_of(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
  }
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half_bits(float value) {
  const uint32_t x = bits_of(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to Inf
  uint32_t result, rest, halfway;
  if (a >= 0x38800000u) {  // normal: drop 13 mantissa bits
    result = ((a >> 23) - 112) << 10 | ((a & 0x7fffffu) >> 13);
    rest = a & 0x1fffu;
    halfway = 0x1000u;
  } else {  // subnormal result: the value in units of 2^-24
    const uint32_t exponent = a >> 23;
    if (exponent < 102) return sign;  // below 2^-25 (a tie at 2^-25 itself goes to 0, the even neighbour)
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14..24
    result = mantissa >> shift;
    rest = mantissa & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  }
  if (rest > halfway || (rest == halfway && (result & 1u))) ++result;  // may carry into the exponent: correct
  return static_cast<uint16_t>(sign | result);
}

float bfloat16_bits_to_float(uint16_t bits) { return float_of(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t x = bits_of(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace cuda_emu

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
