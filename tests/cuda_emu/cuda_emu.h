// A small CUDA execution emulator for the CPU, so that the kernels of csrc/cuda/*.cu can be run and
// compared with the other backends on a machine without a GPU (tests/test_cuda_emulated.py).
//
// tests/cuda_emu/build.py compiles each .cu file as C++ with this header in place of the c10/cuda
// headers, after rewriting `kernel<<<grid, block, smem, stream>>>(args)` into
// `::cuda_emu::launch(kernel, grid, block, smem, stream)(args)` and `extern __shared__ T name[];` into a
// pointer to the block's dynamic shared memory.
//
// Execution model. A launch runs its blocks one after the other; the threads of a block are fibers on
// the calling OS thread. A fiber runs until it reaches a synchronisation point, then the next fiber
// runs:
//   * __syncthreads(): waits until every thread of the block that has not exited waits there;
//   * __syncwarp(mask), __shfl_*_sync(mask, ...): wait until every lane of `mask` waits with the same
//     mask. A lane of the mask that has exited, a mask naming lanes the block does not have, or a
//     shuffle reading a lane outside its mask is an error (undefined behaviour on a GPU), as is a
//     deadlock (threads of a block waiting at different kinds of barrier).
// Fibers are resumed in thread order, or in reverse order (set_schedule(1)): a kernel whose result
// depends on the order in which threads run between two barriers has a race. Dynamic shared memory
// starts filled with 0xff bytes (NaN for floating point), so reading shared memory that no thread
// wrote shows up in the results; so do the tensors the host code allocates with at::empty and
// at::empty_like (build.py routes them through empty_poisoned), so that an output element no kernel
// writes, or a read of one before it is written, shows up too.
#pragma once

#include <ATen/ATen.h>

#include <math.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

// With ThreadSanitizer every thread of a block is a TSan fiber and the emulator tells TSan which
// events order memory: __syncthreads and __syncwarp order the accesses of the threads taking part
// (warp shuffles do not: they exchange registers), consecutive blocks and launches are ordered (they
// run one after the other here, so races between the blocks of a launch go unreported). TSan then
// reports two threads of a block that access the same shared or global memory, one of them writing,
// with no barrier between: a race on a GPU, whatever order the emulator happens to run them in. The
// emulator's own code is not instrumented (CUDA_EMU_RT). With AddressSanitizer the fiber switches are
// announced to it (asan_leave / asan_arrive), so that it follows the stacks.
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CUDA_EMU_TSAN 1
#define CUDA_EMU_RT inline __attribute__((noinline, no_sanitize("thread")))
#else
#define CUDA_EMU_RT inline
#endif

// ---- CUDA types and qualifiers ----------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_emu*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace cuda_emu {

constexpr int kStackBytes = 256 * 1024;
constexpr int64_t kMaxDynamicSmem = 227 * 1024;  // an H100's opt-in shared memory per block
constexpr int64_t kSmemPerSm = 228 * 1024;       // and per SM
// Few SMs, so that kernels whose grid is sized to the resident blocks loop over their work several
// times at test sizes.
constexpr int kSmCount = 2;

enum class Wait { kNone, kBlock, kMask, kDone };

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  bool started = false;
  Wait wait = Wait::kNone;
  unsigned mask = 0;
  std::exception_ptr error;
  void* asan_fake = nullptr;  // AddressSanitizer's fake stack of the fiber while it is switched out
  void* tsan = nullptr;       // ThreadSanitizer's fiber
  int barriers = 0;           // __syncthreads passed (ThreadSanitizer's sync object: its parity)
  unsigned sync_masks[8] = {};  // __syncwarp masks used and how often (no STL: fibers call this)
  int sync_counts[8] = {};
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, block_barriers = 0, warp_syncs = 0;
};

struct State {
  // the launch being run
  dim3 grid, block_dim, block_idx;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  jmp_buf sched_jb;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> slots;  // one exchange slot per thread (shuffles)
  const void* sched_stack = nullptr;  // the scheduler's stack (for AddressSanitizer's fiber switches)
  size_t sched_stack_size = 0;
  void* sched_fake = nullptr;
  // ThreadSanitizer: the scheduler's fiber, one fiber per thread index (reused by every block), and the
  // sync objects (their addresses) of block starts and ends, barriers and warp syncs
  void* sched_tsan = nullptr;
  std::vector<void*> tsan_fibers;
  char block_start = 0, block_end = 0, barrier[2] = {0, 0};
  char warp_sync[32][32][33][2] = {};  // [warp][first lane of the mask][lanes in the mask][parity]
  bool running = false;
  // settings and counters
  int order = 0;  // 0: thread order, 1: reverse
  Stats stats;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) {
  State& s = state();
  std::ostringstream os;
  os << "cuda_emu: " << what;
  if (s.cur != nullptr) {
    os << " (block " << s.block_idx.x << "," << s.block_idx.y << "," << s.block_idx.z << ", thread "
       << s.cur->tid.x << "," << s.cur->tid.y << "," << s.cur->tid.z << ")";
  }
  throw std::runtime_error(os.str());
}

CUDA_EMU_RT dim3 thread_idx() { return state().cur->tid; }
CUDA_EMU_RT int lane_id() { return state().cur->linear % 32; }
CUDA_EMU_RT dim3 block_idx() { return state().block_idx; }
CUDA_EMU_RT dim3 block_dim() { return state().block_dim; }
CUDA_EMU_RT dim3 grid_dim() { return state().grid; }

// Stack switches, announced to AddressSanitizer when it is on (a no-op otherwise).
inline void asan_leave(void** fake, const void* to, size_t size) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, to, size);
#else
  (void)fake, (void)to, (void)size;
#endif
}
inline void asan_arrive(void* fake, const void** from = nullptr, size_t* size = nullptr) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, from, size);
#else
  (void)fake, (void)from, (void)size;
#endif
}

// ThreadSanitizer's happens-before edges and fiber switches (no-ops without it).
CUDA_EMU_RT void tsan_release(void* sync) {
#ifdef CUDA_EMU_TSAN
  __tsan_release(sync);
#else
  (void)sync;
#endif
}
CUDA_EMU_RT void tsan_acquire(void* sync) {
#ifdef CUDA_EMU_TSAN
  __tsan_acquire(sync);
#else
  (void)sync;
#endif
}
CUDA_EMU_RT void tsan_switch(void* fiber) {
#ifdef CUDA_EMU_TSAN
  __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync);
#else
  (void)fiber;
#endif
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
CUDA_EMU_RT void yield_to_scheduler() {
  State& s = state();
  Fiber* f = s.cur;
  if (!_setjmp(f->jb)) {
    asan_leave(&f->asan_fake, s.sched_stack, s.sched_stack_size);
    tsan_switch(s.sched_tsan);
    _longjmp(s.sched_jb, 1);
  }
  asan_arrive(f->asan_fake);
}

CUDA_EMU_RT void fiber_entry() {
  State& s = state();
  Fiber* f = s.cur;
  asan_arrive(nullptr, &s.sched_stack, &s.sched_stack_size);
  tsan_acquire(&s.block_start);  // the launch's set-up comes before its threads
  try {
    s.body(s.body_arg);
  } catch (...) {
    f->error = std::current_exception();
  }
  f->wait = Wait::kDone;
  tsan_release(&s.block_end);  // and every thread of a block before the next block
  asan_leave(nullptr, s.sched_stack, s.sched_stack_size);  // (null: this fiber's stack is done with)
  tsan_switch(s.sched_tsan);
  _longjmp(s.sched_jb, 1);
}

// Runs fiber f until it waits or finishes. Kept out of line with no locals that change after _setjmp.
__attribute__((noinline)) CUDA_EMU_RT void resume(Fiber* f) {
  State& s = state();
  s.cur = f;
  if (!_setjmp(s.sched_jb)) {
    asan_leave(&s.sched_fake, f->stack, kStackBytes);
    tsan_switch(f->tsan);
    if (!f->started) {
      f->started = true;
      setcontext(&f->uc);
    }
    _longjmp(f->jb, 1);
  }
  asan_arrive(s.sched_fake);
  s.cur = nullptr;
}

inline int warp_of(int linear) { return linear / 32; }

inline std::string describe_waits(const State& s) {
  std::ostringstream os;
  int shown = 0, waiting = 0;
  for (const Fiber& f : s.fibers) {
    if (f.wait != Wait::kBlock && f.wait != Wait::kMask) continue;
    if (++waiting > 8 && f.linear % 32 != 0) continue;  // the first 8, then the first lane of each warp
    ++shown;
    if (f.wait == Wait::kBlock) os << " t" << f.linear << ":syncthreads";
    if (f.wait == Wait::kMask) os << " t" << f.linear << ":warp(0x" << std::hex << f.mask << std::dec << ")";
  }
  if (shown < waiting) os << " (" << waiting << " threads waiting)";
  return os.str();
}

// Releases the fibers whose barrier is complete; returns whether any was released.
CUDA_EMU_RT bool release(State& s) {
  const int n = static_cast<int>(s.fibers.size());
  bool released = false;
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    if (f.wait != Wait::kMask) continue;
    const int base = warp_of(t) * 32;
    bool complete = true;
    for (int l = 0; l < 32; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      const int u = base + l;
      if (u >= n) fail("warp-synchronous call with a mask naming lanes the block does not have");
      const Fiber& g = s.fibers[u];
      if (g.wait == Wait::kDone) {
        std::ostringstream os;
        os << "thread " << t << " waits in a warp-synchronous call with mask 0x" << std::hex << f.mask << std::dec
           << " but lane " << l << " of its warp has exited";
        fail(os.str());
      }
      if (g.wait != Wait::kMask || g.mask != f.mask) complete = false;
    }
    if (!complete) continue;
    for (int l = 0; l < 32; ++l) {
      if (f.mask >> l & 1u) s.fibers[base + l].wait = Wait::kNone;
    }
    ++s.stats.warp_syncs;
    released = true;
  }
  if (released) return true;
  bool any_block = false, all_block = true;
  for (const Fiber& f : s.fibers) {
    if (f.wait == Wait::kBlock) any_block = true;
    if (f.wait != Wait::kBlock && f.wait != Wait::kDone) all_block = false;
  }
  if (any_block && all_block) {
    for (Fiber& f : s.fibers) {
      if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
    }
    ++s.stats.block_barriers;
    return true;
  }
  return false;
}

struct StackPool {
  std::vector<char*> stacks;
  ~StackPool() {
    for (char* p : stacks) munmap(p, kStackBytes + 4096);
  }
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot allocate a fiber stack");
      mprotect(p, 4096, PROT_NONE);  // guard page below the stack
      stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i] + 4096;
  }
};

inline StackPool& stack_pool() {
  static StackPool pool;
  return pool;
}

// Runs `body(arg)` on every thread of every block of the grid.
CUDA_EMU_RT void run_grid(dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* arg) {
  State& s = state();
  if (s.running) fail("a kernel launch from inside a kernel");
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024) fail("block of " + std::to_string(threads) + " threads (1..1024 allowed)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) fail("invalid grid");
  if (static_cast<int64_t>(smem_bytes) > kMaxDynamicSmem) {
    fail("dynamic shared memory of " + std::to_string(smem_bytes) + " bytes (at most " +
         std::to_string(kMaxDynamicSmem) + ")");
  }
#ifdef CUDA_EMU_TSAN
  s.sched_tsan = __tsan_get_current_fiber();
  while (static_cast<int64_t>(s.tsan_fibers.size()) < threads) s.tsan_fibers.push_back(__tsan_create_fiber(0));
#endif
  s.running = true;
  s.grid = grid;
  s.block_dim = block;
  s.body = body;
  s.body_arg = arg;
  ++s.stats.launches;
  struct Reset {
    State& s;
    ~Reset() {
#ifdef CUDA_EMU_TSAN
      // A launch stopped by an error leaves threads that never finished: their accesses come before
      // whatever the host does next, as with a finished block.
      for (Fiber& f : s.fibers) {
        if (f.tsan == nullptr || f.wait == Wait::kDone) continue;
        tsan_switch(f.tsan);
        tsan_release(&s.block_end);
        tsan_switch(s.sched_tsan);
      }
      tsan_acquire(&s.block_end);
#endif
      s.running = false;
      s.cur = nullptr;
      s.fibers.clear();
    }
  } reset{s};
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        s.smem.assign(smem_bytes + 16, 0xff);
        s.slots.assign(static_cast<size_t>(threads), 0);
        s.fibers.assign(static_cast<size_t>(threads), Fiber{});
        for (int64_t t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[t];
          f.linear = static_cast<int>(t);
          f.tid = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                       static_cast<unsigned>(t / (static_cast<int64_t>(block.x) * block.y)));
          f.stack = stack_pool().get(static_cast<size_t>(t));
#ifdef CUDA_EMU_TSAN
          f.tsan = s.tsan_fibers[static_cast<size_t>(t)];
#endif
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = f.stack;
          f.uc.uc_stack.ss_size = kStackBytes;
          f.uc.uc_link = nullptr;
          makecontext(&f.uc, fiber_entry, 0);
        }
        ++s.stats.blocks;
        s.stats.threads += threads;
        tsan_release(&s.block_start);
        for (;;) {
          bool all_done = true;
          for (int64_t k = 0; k < threads; ++k) {
            Fiber& f = s.fibers[s.order == 1 ? threads - 1 - k : k];
            if (f.wait == Wait::kNone) {
              resume(&f);
              if (f.error) std::rethrow_exception(f.error);
            }
            if (f.wait != Wait::kDone) all_done = false;
          }
          if (all_done) break;
          if (!release(s)) fail("deadlock: threads wait at different barriers:" + describe_waits(s));
        }
        tsan_acquire(&s.block_end);
      }
    }
  }
}

CUDA_EMU_RT unsigned char* dynamic_smem() {
  State& s = state();
  return s.smem.data();
}

CUDA_EMU_RT void sync_threads() {
  State& s = state();
  Fiber* f = s.cur;
  char* sync = &s.barrier[f->barriers++ & 1];  // (by parity: a fast thread's next barrier is not this one)
  tsan_release(sync);
  f->wait = Wait::kBlock;
  yield_to_scheduler();
  tsan_acquire(sync);
}

// Waits until every lane of `mask` waits with the same mask; with orders_memory (__syncwarp) their
// accesses before it come before their accesses after it.
CUDA_EMU_RT void sync_mask(unsigned mask, bool orders_memory) {
  State& s = state();
  Fiber* f = s.cur;
  const int lane = f->linear % 32;
  if (!(mask >> lane & 1u)) fail("warp-synchronous call by a lane outside its mask");
  char* sync = nullptr;
  if (orders_memory) {
    int k = 0;  // this lane's earlier __syncwarp calls with this mask
    while (k < 8 && f->sync_masks[k] != 0 && f->sync_masks[k] != mask) ++k;
    if (k == 8) fail("more than 8 different __syncwarp masks in one thread");
    f->sync_masks[k] = mask;
    const int count = f->sync_counts[k]++;
    sync = &s.warp_sync[f->linear / 32][__builtin_ctz(mask)][__builtin_popcount(mask)][count & 1];
    tsan_release(sync);
  }
  f->wait = Wait::kMask;
  f->mask = mask;
  yield_to_scheduler();
  if (sync != nullptr) tsan_acquire(sync);
}

template <typename T>
CUDA_EMU_RT T shuffle(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle type");
  State& s = state();
  const int me = s.cur->linear, base = me / 32 * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  s.slots[me] = bits;
  sync_mask(mask, false);
  if (src_lane < 0 || src_lane >= 32 || !(mask >> src_lane & 1u)) {
    fail("shuffle reads lane " + std::to_string(src_lane) + ", outside its mask");
  }
  T out;
  bits = s.slots[base + src_lane];
  std::memcpy(&out, &bits, sizeof(T));
  sync_mask(mask, false);  // nobody overwrites its slot before every lane has read
  return out;
}

// ---- launches ---------------------------------------------------------------------------------------

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(P), "wrong number of kernel arguments");
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<Args>(args)...)};
    run_grid(grid, block, smem, [](void* c) {
      Call* cl = static_cast<Call*>(c);
      std::apply(cl->kernel, cl->params);  // every thread gets its own copies of the parameters
    }, &call);
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace cuda_emu

// ---- CUDA built-ins ---------------------------------------------------------------------------------

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { ::cuda_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::sync_mask(mask, true); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cuda_emu::lane_id();
  if (width != 32) ::cuda_emu::fail("shuffle width other than 32 is not emulated");
  return ::cuda_emu::shuffle(mask, v, lane ^ lane_mask);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuda_emu::lane_id();
  if (width != 32) ::cuda_emu::fail("shuffle width other than 32 is not emulated");
  const int src = lane + static_cast<int>(delta);
  // a source past the warp returns the caller's own value (the caller still takes part)
  const T got = ::cuda_emu::shuffle(mask, v, src < 32 ? src : lane);
  return src < 32 ? got : v;
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  if (width != 32) ::cuda_emu::fail("shuffle width other than 32 is not emulated");
  return ::cuda_emu::shuffle(mask, v, src_lane & 31);
}

// Device-side min/max of mixed integer types, as CUDA's overloads allow.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// ---- the host API the kernels' launch code uses -----------------------------------------------------

namespace cuda_emu {
inline at::Tensor poisoned(at::Tensor t) {
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.numel() * t.element_size());
  return t;
}
inline at::Tensor empty_poisoned(at::IntArrayRef size, at::TensorOptions options = {},
                                 std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(at::empty(size, options, format));
}
inline at::Tensor empty_like_poisoned(const at::Tensor& t, at::TensorOptions options = {},
                                      std::optional<at::MemoryFormat> format = std::nullopt) {
  return poisoned(at::empty_like(t, options, format));
}
}  // namespace cuda_emu

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int bytes) {
  if (bytes > ::cuda_emu::kMaxDynamicSmem) ::cuda_emu::fail("cudaFuncSetAttribute above the device's limit");
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(::cuda_emu::kMaxDynamicSmem); break;
    case cudaDevAttrMultiProcessorCount: *value = ::cuda_emu::kSmCount; break;
    default: ::cuda_emu::fail("cudaDeviceGetAttribute: attribute not emulated");
  }
  return cudaSuccess;
}

// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that fit one SM of an H100
// (registers are not modelled).
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int threads, size_t smem) {
  const int64_t by_smem = smem == 0 ? 32 : ::cuda_emu::kSmemPerSm / static_cast<int64_t>(smem + 1024);
  const int64_t by_threads = 2048 / threads;
  *blocks = static_cast<int>(std::min<int64_t>(std::min<int64_t>(by_smem, by_threads), 32));
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline int current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace cuda
}  // namespace c10
