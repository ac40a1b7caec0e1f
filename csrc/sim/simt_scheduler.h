// The SIMT emulator's scheduler: runs a CUDA kernel launch on the calling CPU thread.
//
// Blocks run one at a time. Every CUDA thread of the block is a fiber (simt_fiber.h) that runs
// until it waits at a sync point (__syncthreads, a warp intrinsic) or returns; then the next ready
// fiber runs. A sync point completes when the last thread it waits for arrives; the released
// threads are queued in the order SIMT_ORDER asks for (forward, reverse or a seeded random
// permutation), which is what makes a missing barrier change results.
//
// Misuse is reported instead of being undefined behaviour: a divergent barrier, a warp intrinsic
// called by a lane outside its own mask or with masks that disagree, a deadlock, a failed
// KASSERT, an exception escaping the kernel. The report names the kernel, block, thread and
// file:line, and launch() throws it as simt::SimtError (a std::runtime_error).
//
// All state is per OS thread (thread_local), so independent launches may run on several threads.
#pragma once

#include <cuda_runtime.h>  // dim3, uint3, cudaStream_t; the host compiler needs no CUDA library
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simt_definitions.h"
#include "simt_fiber.h"

// The CUDA built-in variables. The scheduler rewrites threadIdx at every fiber switch and the
// others at every block start, so kernels read them exactly as on a GPU.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace simt {

enum class ThreadState : std::uint8_t { kReady, kAtBarrier, kAtWarpOp, kExited };

// Everything the scheduler knows about one CUDA thread of the running block. A switch reads the
// context and index of the thread it resumes, so they share the first cache line with the fields
// the thread's own warp exchange writes and reads back.
struct alignas(64) ThreadSlot {
  FiberContext context;
  uint3 index{};
  ThreadState state = ThreadState::kReady;
  // The warp intrinsic it waits in: its value, and the result filled in by the lane that
  // completes the exchange.
  WarpOp warp_op = WarpOp::kSyncwarp;
  std::uint8_t value_bytes = 0;
  std::uint8_t width = 32;
  unsigned mask = 0;
  int arg = 0;
  std::uint64_t result = 0;
  std::uint64_t value = 0;
  const char* site_file = "?";  // the sync point it waits at
  int site_line = 0;
  unsigned linear = 0;

  Site site() const { return Site{site_file, site_line}; }
  void wait_at(Site where, ThreadState waiting) {
    site_file = where.file;
    site_line = where.line;
    state = waiting;
  }
};

// Per warp of the running block: lanes waiting in a warp intrinsic, and lanes that exited
// (including lanes that do not exist because the block size is not a multiple of 32).
struct WarpState {
  unsigned arrived = 0;
  unsigned exited = 0;
};

// FIFO of runnable threads. A thread is queued at most once, so a ring as large as the block
// (rounded up to a power of two, to wrap with a mask rather than a division) never overflows.
class ReadyQueue {
 public:
  void reset(unsigned block_threads) {
    unsigned capacity = 1;
    while (capacity < block_threads) capacity *= 2;
    ring_.assign(capacity, 0);
    wrap_mask_ = capacity - 1;
    head_ = 0;
    count_ = 0;
  }
  bool empty() const { return count_ == 0; }
  void push(unsigned thread) { ring_[(head_ + count_++) & wrap_mask_] = thread; }
  unsigned pop() {
    const unsigned thread = ring_[head_];
    head_ = (head_ + 1) & wrap_mask_;
    --count_;
    return thread;
  }

 private:
  std::vector<unsigned> ring_;
  unsigned wrap_mask_ = 0;
  unsigned head_ = 0;
  unsigned count_ = 0;
};

class Scheduler;
// The scheduler running a launch on this OS thread, or null outside launches.
inline thread_local Scheduler* t_running = nullptr;

class Scheduler {
 public:
  Scheduler() : static_arena_(new StaticArena) {}
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  static Scheduler& for_this_thread() {
    static thread_local Scheduler scheduler;
    return scheduler;
  }

  void launch(const KernelLaunch& launch);

  // --- operations called by the running CUDA thread (through the intrinsics) ---
  int barrier(BarrierOp op, int predicate, Site site);
  std::uint64_t warp_exchange(WarpOp op, unsigned mask, std::uint64_t value, unsigned bytes,
                              int arg, int width, Site site);
  unsigned active_mask() const { return ~warps_[current_ / 32].exited; }
  void* static_shared(const void* tag, std::size_t bytes, std::size_t alignment, const char* name,
                      Site site);
  void* dynamic_shared() const { return dynamic_shared_.get(); }
  // Abandon the block with the report build_message() returns. The message is built and its
  // temporaries destroyed before the switch: the failing fiber's stack is never unwound.
  // Kept out of line and cold so the hot paths that may fail keep small stack frames: every
  // suspended thread's frames compete for the cache.
  template <typename BuildMessage>
  [[noreturn, gnu::noinline, gnu::cold]] void fail(BuildMessage build_message) {
    record_failure(build_message());
    abandon_block();
  }
  std::string current_thread_description() const { return where() + ", " + thread_name(current_); }
  void record_failure(const std::string& what);
  [[noreturn]] void abandon_block();

 private:
  static constexpr std::size_t kStaticArenaBytes = 2 * kMaxStaticSharedBytes;
  static constexpr std::size_t kMaxSharedAlignment = 64;

  // Room for 48 KiB of KSHARED buffers plus the ASan redzones between them.
  struct alignas(kMaxSharedAlignment) StaticArena {
    unsigned char bytes[kStaticArenaBytes];
  };
  static constexpr std::size_t kSharedRedzoneBytes = SIMT_ASAN ? 64 : 0;

  struct StaticSharedSlot {
    const void* tag;
    std::size_t offset;
  };

  void validate(const KernelLaunch& launch) const;
  void prepare_launch(const KernelLaunch& launch);
  std::vector<std::uint64_t> block_order(std::uint64_t block_count);
  void run_block(std::uint64_t linear_block);
  static void thread_main(void* slot);
  [[noreturn]] void exit_current_thread();
  void try_complete_exchange(unsigned warp, unsigned mask);
  void complete_exchange(unsigned warp, unsigned participants);
  void release(const unsigned* ascending_threads, unsigned count);
  void wait_for_release();
  [[noreturn]] void finish_current_thread();
  void resume(unsigned thread, bool current_finished);
  std::string thread_name(unsigned linear) const;
  std::string where() const;
  std::string deadlock_report() const;
  std::string waiting_description(const ThreadSlot& slot) const;
  std::string missing_lane_description(const ThreadSlot& slot) const;

  ThreadSlot& slot_of(unsigned warp, unsigned lane) { return slots_[warp * 32 + lane]; }

  // Launch-wide state.
  const KernelLaunch* launch_ = nullptr;
  OrderSetting order_;
  ScheduleRandom random_;
  unsigned thread_count_ = 0;
  std::vector<FiberStack> stacks_;
  std::vector<ThreadSlot> slots_;
  std::vector<WarpState> warps_;
  std::vector<unsigned> all_threads_;
  std::vector<unsigned> scratch_;
  std::unique_ptr<unsigned char[]> dynamic_shared_;
  std::unique_ptr<StaticArena> static_arena_;
  FiberContext scheduler_context_;

  // Block-wide state.
  std::vector<StaticSharedSlot> static_slots_;
  std::size_t static_arena_used_ = 0;
  std::size_t static_shared_bytes_ = 0;
  ReadyQueue ready_;
  unsigned current_ = 0;
  unsigned exited_count_ = 0;
  unsigned first_exited_ = 0;
  unsigned barrier_arrivals_ = 0;
  unsigned barrier_first_ = 0;
  unsigned barrier_true_count_ = 0;
  int barrier_result_ = 0;
  BarrierOp barrier_op_ = BarrierOp::kPlain;
  Site barrier_site_;
  std::string error_;
};

// ------------------------------------------------------------------------------------------------
// Launch and blocks

inline void Scheduler::validate(const KernelLaunch& launch) const {
  const dim3 b = launch.block;
  const dim3 g = launch.grid;
  const std::uint64_t threads = std::uint64_t{b.x} * b.y * b.z;
  std::string problem;
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > kMaxBlockDimXY ||
      b.y > kMaxBlockDimXY || b.z > kMaxBlockDimZ) {
    problem = format("block (%u,%u,%u) is not a valid block shape (at most %u threads, z <= %u)",
                     b.x, b.y, b.z, kMaxThreadsPerBlock, kMaxBlockDimZ);
  } else if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > kMaxGridDimYZ ||
             g.z > kMaxGridDimYZ) {
    problem = format("grid (%u,%u,%u) is not a valid grid shape", g.x, g.y, g.z);
  } else if (std::uint64_t{g.x} * g.y * g.z > kMaxEmulatedBlocks) {
    problem = format("grid (%u,%u,%u) has more blocks than the emulator runs", g.x, g.y, g.z);
  } else if (launch.dynamic_shared_bytes > kMaxSharedBytesOptIn) {
    problem = format("%zu bytes of dynamic shared memory exceed the %zu-byte device maximum",
                     launch.dynamic_shared_bytes, kMaxSharedBytesOptIn);
  } else if (launch.dynamic_shared_bytes >
             DynamicSharedLimits::instance().get(launch.address)) {
    problem = format(
        "%zu bytes of dynamic shared memory exceed this kernel's limit of %zu; raise it with "
        "kset_max_dynamic_smem",
        launch.dynamic_shared_bytes, DynamicSharedLimits::instance().get(launch.address));
  }
  if (!problem.empty()) {
    throw SimtError(format("simt: invalid launch of kernel '%s' at %s: %s",
                           kernel_display_name(launch).c_str(), describe(launch.site).c_str(),
                           problem.c_str()));
  }
}

inline void Scheduler::prepare_launch(const KernelLaunch& launch) {
  launch_ = &launch;
  forget_stack_bounds(scheduler_context_);
  order_ = order_from_environment();
  random_.seed(order_.seed);
  thread_count_ = launch.block.x * launch.block.y * launch.block.z;
  while (stacks_.size() < thread_count_) stacks_.emplace_back(stacks_.size());
  if (slots_.size() < thread_count_) slots_.resize(thread_count_);
  warps_.assign((thread_count_ + 31) / 32, WarpState{});
  all_threads_.resize(thread_count_);
  for (unsigned t = 0; t < thread_count_; ++t) all_threads_[t] = t;
  scratch_.reserve(thread_count_);
  dynamic_shared_.reset(new unsigned char[launch.dynamic_shared_bytes]);
  ::gridDim = launch.grid;
  ::blockDim = launch.block;
}

// Linear block ids in the order SIMT_ORDER asks for (x fastest, as CUDA numbers them).
inline std::vector<std::uint64_t> Scheduler::block_order(std::uint64_t block_count) {
  std::vector<std::uint64_t> order(block_count);
  for (std::uint64_t b = 0; b < block_count; ++b) order[b] = b;
  if (order_.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (order_.order == Order::kRandom) random_.shuffle(order);
  return order;
}

// Sanitizer reports show host stack frames only; this adds the CUDA coordinates of the thread
// that was running when a fatal ASan or UBSan report was printed.
inline void print_sanitizer_context() {
  if (t_running != nullptr) {
    std::fprintf(stderr, "simt: the sanitizer error above happened in %s\n",
                 t_running->current_thread_description().c_str());
  }
}

// GCC loads UBSan as a runtime of its own (libubsan) with its own copy of the death callback, so
// the hook is registered with each sanitizer runtime present in the process.
inline void install_sanitizer_hooks() {
#if SIMT_ASAN
  __sanitizer_set_death_callback(&print_sanitizer_context);
#endif
  if (void* ubsan = dlopen("libubsan.so.1", RTLD_LAZY | RTLD_NOLOAD)) {
    using SetDeathCallback = void (*)(void (*)());
    if (auto set_callback = reinterpret_cast<SetDeathCallback>(
            dlsym(ubsan, "__sanitizer_set_death_callback"))) {
      set_callback(&print_sanitizer_context);
    }
    dlclose(ubsan);
  }
}

inline void Scheduler::launch(const KernelLaunch& launch) {
  static std::once_flag hooks_installed;
  std::call_once(hooks_installed, install_sanitizer_hooks);
  if (t_running != nullptr) {
    throw SimtError(format("simt: kernel '%s' launched at %s from inside another kernel",
                           launch.written_name, describe(launch.site).c_str()));
  }
  validate(launch);
  prepare_launch(launch);
  struct RunningGuard {
    explicit RunningGuard(Scheduler* s) { t_running = s; }
    ~RunningGuard() { t_running = nullptr; }
  } running(this);
  const dim3 g = launch.grid;
  for (std::uint64_t linear_block : block_order(std::uint64_t{g.x} * g.y * g.z)) {
    run_block(linear_block);
  }
}

inline void Scheduler::run_block(std::uint64_t linear_block) {
  const dim3 g = launch_->grid;
  ::blockIdx = uint3{static_cast<unsigned>(linear_block % g.x),
                     static_cast<unsigned>(linear_block / g.x % g.y),
                     static_cast<unsigned>(linear_block / (std::uint64_t{g.x} * g.y))};

  // Shared memory is poison (all bytes 0xFF: NaN for floating point types) at every block start.
  std::memset(dynamic_shared_.get(), 0xFF, launch_->dynamic_shared_bytes);
  static_slots_.clear();
  static_arena_used_ = 0;
  static_shared_bytes_ = 0;
#if SIMT_ASAN
  __asan_poison_memory_region(static_arena_->bytes, kStaticArenaBytes);
#endif

  // Threads are numbered x fastest; warp w holds linear threads [32w, 32w + 32).
  const dim3 b = launch_->block;
  for (unsigned t = 0; t < thread_count_; ++t) {
    ThreadSlot& slot = slots_[t];
    slot.index = uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
    slot.linear = t;
    slot.state = ThreadState::kReady;
    forget_stack_contents(stacks_[t]);
    fiber_prepare(slot.context, stacks_[t], &Scheduler::thread_main, &slot);
  }
  for (WarpState& warp : warps_) warp = WarpState{};
  if (const unsigned tail = thread_count_ % 32; tail != 0) warps_.back().exited = ~0u << tail;

  exited_count_ = 0;
  barrier_arrivals_ = 0;
  error_.clear();
  ready_.reset(thread_count_);
  release(all_threads_.data(), thread_count_);

  const unsigned first = ready_.pop();
  current_ = first;
  ::threadIdx = slots_[first].index;
  fiber_switch(scheduler_context_, slots_[first].context);

  // Back on the scheduler's stack: every thread exited, one failed, or none can move.
  if (!error_.empty()) throw SimtError(error_);
  if (exited_count_ != thread_count_) throw SimtError(deadlock_report());
}

inline void Scheduler::thread_main(void* slot_address) {
  auto& slot = *static_cast<ThreadSlot*>(slot_address);
  fiber_resumed(slot.context);
  Scheduler& scheduler = *t_running;
  // The report is recorded outside the catch block (switching fibers inside a handler would
  // leave the C++ runtime's per-OS-thread list of caught exceptions pointing into an abandoned
  // stack) and before the switch (nothing on this stack is ever destroyed after it).
  bool threw = false;
  {
    std::string escaped;
    try {
      scheduler.launch_->run_thread(scheduler.launch_->closure);
    } catch (const std::exception& error) {
      escaped = error.what();
      threw = true;
    } catch (...) {
      escaped = "an exception not derived from std::exception";
      threw = true;
    }
    if (threw) scheduler.record_failure("the kernel threw: " + escaped);
  }
  if (threw) scheduler.abandon_block();
  scheduler.exit_current_thread();
}

// ------------------------------------------------------------------------------------------------
// Switching between threads

// Queue released threads (given in ascending order) in the order SIMT_ORDER asks for.
inline void Scheduler::release(const unsigned* ascending_threads, unsigned count) {
  auto make_ready = [this](unsigned thread) {
    slots_[thread].state = ThreadState::kReady;
    ready_.push(thread);
  };
  switch (order_.order) {
    case Order::kForward:
      for (unsigned i = 0; i < count; ++i) make_ready(ascending_threads[i]);
      break;
    case Order::kReverse:
      for (unsigned i = count; i > 0; --i) make_ready(ascending_threads[i - 1]);
      break;
    case Order::kRandom:
      scratch_.assign(ascending_threads, ascending_threads + count);
      random_.shuffle(scratch_);
      for (unsigned thread : scratch_) make_ready(thread);
      break;
  }
}

inline void Scheduler::resume(unsigned thread, bool current_finished) {
  FiberContext& from = slots_[current_].context;
  current_ = thread;
  ::threadIdx = slots_[thread].index;
  if (current_finished) fiber_exit_to(from, slots_[thread].context);
  fiber_switch(from, slots_[thread].context);
}

// The current thread waits: run the next ready thread (possibly itself, if its own arrival
// released it), or hand control back to the scheduler when nobody can run.
inline void Scheduler::wait_for_release() {
  if (ready_.empty()) {
    fiber_switch(slots_[current_].context, scheduler_context_);
    return;
  }
  const unsigned next = ready_.pop();
  if (next != current_) resume(next, /*current_finished=*/false);
}

inline void Scheduler::finish_current_thread() {
  if (ready_.empty()) fiber_exit_to(slots_[current_].context, scheduler_context_);
  resume(ready_.pop(), /*current_finished=*/true);
  __builtin_trap();
}

// ------------------------------------------------------------------------------------------------
// Errors

inline std::string Scheduler::thread_name(unsigned linear) const {
  return format("thread %s [warp %u lane %u]", describe(slots_[linear].index).c_str(), linear / 32,
                linear % 32);
}

inline std::string Scheduler::where() const {
  return format("kernel '%s' (launched at %s), block %s", kernel_display_name(*launch_).c_str(),
                describe(launch_->site).c_str(), describe(::blockIdx).c_str());
}

inline void Scheduler::record_failure(const std::string& what) {
  error_ = format("simt: error in %s, %s: ", where().c_str(), thread_name(current_).c_str()) + what;
}

// Return to the scheduler, which throws the recorded report. The failing fiber is never resumed
// (its stack is re-prepared for the next block).
inline void Scheduler::abandon_block() {
  fiber_exit_to(slots_[current_].context, scheduler_context_);
}

// ------------------------------------------------------------------------------------------------
// Shared memory

// The buffer behind one KSHARED declaration for the running block, found by the address of a
// static tag unique to the declaration. The first thread to execute the declaration allocates it
// from the block's arena, filled with 0xFF; under ASan the gaps between buffers stay poisoned.
inline void* Scheduler::static_shared(const void* tag, std::size_t bytes, std::size_t alignment,
                                      const char* name, Site site) {
  for (const StaticSharedSlot& slot : static_slots_) {
    if (slot.tag == tag) return static_arena_->bytes + slot.offset;
  }
  if (alignment > kMaxSharedAlignment) {
    fail([&] {
      return format("KSHARED %s at %s needs %zu-byte alignment; the emulator provides %zu", name,
                    describe(site).c_str(), alignment, kMaxSharedAlignment);
    });
  }
  alignment = std::max<std::size_t>(alignment, 16);
  auto align_up = [alignment](std::size_t n) {
    return (n + alignment - 1) / alignment * alignment;
  };
  const std::size_t offset = align_up(static_arena_used_);
  const std::size_t device_bytes = align_up(static_shared_bytes_) + bytes;
  if (device_bytes > kMaxStaticSharedBytes ||
      device_bytes + launch_->dynamic_shared_bytes > kMaxSharedBytesOptIn ||
      offset + bytes > kStaticArenaBytes) {
    fail([&] {
      return format(
          "KSHARED %s at %s brings the block's static shared memory to %zu bytes (limit %zu, "
          "plus %zu dynamic within %zu)",
          name, describe(site).c_str(), device_bytes, kMaxStaticSharedBytes,
          launch_->dynamic_shared_bytes, kMaxSharedBytesOptIn);
    });
  }
  unsigned char* buffer = static_arena_->bytes + offset;
#if SIMT_ASAN
  __asan_unpoison_memory_region(buffer, bytes);
#endif
  std::memset(buffer, 0xFF, bytes);
  static_slots_.push_back(StaticSharedSlot{tag, offset});
  static_arena_used_ = offset + bytes + kSharedRedzoneBytes;
  static_shared_bytes_ = device_bytes;
  return buffer;
}

// ------------------------------------------------------------------------------------------------
// Entry points used by kcompat.cuh and the intrinsics

// The scheduler of the launch running on this OS thread; `what` names the caller for the error
// raised when there is none (an intrinsic called from host code).
inline Scheduler& running_scheduler(const char* what, Site site) {
  if (t_running == nullptr) {
    throw SimtError(format("simt: %s called at %s outside a kernel launch", what,
                           describe(site).c_str()));
  }
  return *t_running;
}

[[noreturn]] inline void assertion_failed(const char* condition, Site site) {
  auto message = [&] {
    return format("KASSERT(%s) failed at %s", condition, describe(site).c_str());
  };
  if (t_running == nullptr) throw SimtError("simt: " + message());
  t_running->fail(message);
}

inline void set_max_dynamic_shared(const void* kernel, std::size_t bytes) {
  if (bytes > kMaxSharedBytesOptIn) {
    throw SimtError(format("simt: kset_max_dynamic_smem(%zu) exceeds the %zu-byte device maximum",
                           bytes, kMaxSharedBytesOptIn));
  }
  DynamicSharedLimits::instance().set(kernel, bytes);
}

// Launch `kernel` with `args` converted to its parameter types once, as a GPU launch copies them;
// every CUDA thread then receives its own copy of each parameter.
template <typename... Params, typename... Args>
void launch_kernel(const char* written_name, Site site, void (*kernel)(Params...), dim3 grid,
                   dim3 block, std::size_t dynamic_shared_bytes, cudaStream_t /*stream*/,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "KLAUNCH: wrong number of kernel arguments");
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  const Closure closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  const KernelLaunch launch{
      written_name,
      reinterpret_cast<const void*>(kernel),
      site,
      grid,
      block,
      dynamic_shared_bytes,
      [](const void* erased) {
        const auto& c = *static_cast<const Closure*>(erased);
        std::apply(c.kernel, c.params);
      },
      &closure,
  };
  Scheduler::for_this_thread().launch(launch);
}

}  // namespace simt

// The sync points (barriers, warp exchanges, thread exit) are defined in their own file.
#include "simt_sync_points.h"
