// Runs the CUDA kernels of csrc/cuda on the CPU, to test their indexing, tiling and synchronisation
// where no GPU is at hand (tests/test_cuda_emulated.py). Included before a .cu file that
// tests/test_cuda_emulated.py has rewritten: `<<<...>>>` launches call emu::launch, the dynamic shared
// memory is emu::shared_memory and static __shared__ arrays are function statics.
//
// The model: the blocks of a grid run one after another; the threads of a block are fibers, each
// run as far as it goes before the next: the schedule under which a missing __syncthreads shows (a
// thread reads shared memory its neighbours have not written yet).
// __syncthreads waits for every thread of the block that has not returned, __shfl_down_sync
// exchanges through memory between two barriers of its warp (32 consecutive threads); a barrier no
// thread can pass (divergent __syncthreads) is an error. Shared memory starts filled with NaN bytes,
// as garbage does on a GPU. Launches over a GPU's limits (block size, 48 KiB of dynamic shared memory,
// grid size) are errors. Not modelled: the memory model beyond these barriers, registers, static
// shared memory, and timing.
#pragma once

// The fibers switch with _setjmp/_longjmp (no signal-mask system call per switch, unlike swapcontext),
// which the fortified longjmp would refuse to do across stacks.
#undef _FORTIFY_SOURCE

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <setjmp.h>
#include <ucontext.h>

#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(bytes)

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

alignas(16) inline unsigned char shared_memory[1 << 17];

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t start;  // its first entry
  jmp_buf resume;    // where it waits at a barrier
  bool started;
  std::vector<char> stack;
  State state;
};

inline jmp_buf scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<std::array<unsigned char, 16>> lanes;  // one shuffle slot per thread
inline unsigned current = 0;                               // the running thread's rank in its block
inline std::function<void()> kernel_call;

[[noreturn]] inline void fiber_main() {
  kernel_call();
  fibers[current].state = State::kDone;
  _longjmp(scheduler, 1);
}

inline void wait(State barrier) {
  fibers[current].state = barrier;
  if (!_setjmp(fibers[current].resume)) _longjmp(scheduler, 1);
}

// Runs thread i until it waits at a barrier or returns.
inline void run(unsigned i) {
  if (_setjmp(scheduler)) return;
  Fiber& f = fibers[i];
  if (!f.started) {
    f.started = true;
    setcontext(&f.start);
  }
  _longjmp(f.resume, 1);
}

// Ready again every thread waiting at a barrier that all live threads of its scope have reached.
inline bool release_barriers() {
  bool released = false;
  auto release = [&](size_t begin, size_t end, State barrier) {
    bool any = false;
    for (size_t i = begin; i < end; ++i) {
      if (fibers[i].state == State::kDone) continue;
      if (fibers[i].state != barrier) return;
      any = true;
    }
    for (size_t i = begin; i < end && any; ++i) {
      if (fibers[i].state == barrier) fibers[i].state = State::kReady;
    }
    released = released || any;
  };
  release(0, fibers.size(), State::kAtBlockBarrier);
  for (size_t w = 0; w < fibers.size(); w += 32) release(w, std::min(w + 32, fibers.size()), State::kAtWarpBarrier);
  return released;
}

struct Config {
  dim3 grid, block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

template <typename Kernel, typename... Args> void launch(Config c, Kernel kernel, Args... args) {
  gridDim = c.grid;
  blockDim = c.block;
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("emulated launch: bad block size");
  // A GPU's limits: 48 KiB of dynamic shared memory without opting in, grid.y and grid.z < 65536.
  if (c.shared_bytes > 48 * 1024) throw std::runtime_error("emulated launch: over 48 KiB of shared memory");
  if (c.grid.y > 65535 || c.grid.z > 65535) throw std::runtime_error("emulated launch: grid.y or grid.z over 65535");
  kernel_call = [&] { kernel(args...); };
  fibers.resize(threads);
  lanes.resize(threads);
  for (auto& f : fibers) f.stack.resize(1 << 16);
  for (unsigned bz = 0; bz < c.grid.z; ++bz) {
    for (unsigned by = 0; by < c.grid.y; ++by) {
      for (unsigned bx = 0; bx < c.grid.x; ++bx) {
        std::memset(shared_memory, 0xff, sizeof(shared_memory));
        blockIdx = uint3{bx, by, bz};
        for (auto& f : fibers) {
          getcontext(&f.start);
          f.start.uc_stack.ss_sp = f.stack.data();
          f.start.uc_stack.ss_size = f.stack.size();
          f.start.uc_link = nullptr;
          makecontext(&f.start, fiber_main, 0);
          f.started = false;
          f.state = State::kReady;
        }
        for (;;) {
          bool ran = false;
          for (unsigned i = 0; i < threads; ++i) {
            if (fibers[i].state != State::kReady) continue;
            current = i;
            threadIdx = uint3{i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y)};
            run(i);
            ran = true;
          }
          bool done = true;
          for (const auto& f : fibers) done = done && f.state == State::kDone;
          if (done) break;
          if (!release_barriers() && !ran) {
            throw std::runtime_error("emulated launch: threads wait at a barrier that others never reach");
          }
        }
      }
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::State::kAtBlockBarrier); }

template <typename T> T __shfl_down_sync(unsigned /*mask: the full warp here*/, T v, unsigned offset) {
  static_assert(sizeof(T) <= 16);
  const unsigned rank = emu::current, lane = rank % 32;
  std::memcpy(emu::lanes[rank].data(), &v, sizeof(T));
  emu::wait(emu::State::kAtWarpBarrier);
  T out = v;  // a lane past the warp's end keeps its own value
  if (lane + offset < 32 && rank + offset < emu::fibers.size()) {
    std::memcpy(&out, emu::lanes[rank + offset].data(), sizeof(T));
  }
  emu::wait(emu::State::kAtWarpBarrier);
  return out;
}

#define cudaGetLastError() cudaSuccess
