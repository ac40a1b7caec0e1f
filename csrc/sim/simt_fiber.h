// Fibers for the SIMT emulator: one fiber per emulated CUDA thread.
//
// Two backends behind one interface (FiberContext, fiber_prepare, fiber_switch, fiber_exit_to):
//   * x86-64: an 8-instruction inline-assembly switch (no syscalls, ~3 ns). See raw_switch.
//     MXCSR and the x87 control word are not switched: all fibers share the OS thread's floating
//     point environment, so kernels must not change rounding modes.
//   * ucontext: portable fallback, used on other architectures or when SIMT_FIBER_UCONTEXT is
//     defined. swapcontext() saves the signal mask with a syscall, so it is ~15x slower.
// Under AddressSanitizer every switch is announced with __sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber, otherwise ASan reports false stack errors.
// Stacks are mmap'ed once per OS thread with a PROT_NONE guard page below them and reused.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define SIMT_ASAN 0
#endif

#if !defined(__x86_64__) && !defined(SIMT_FIBER_UCONTEXT)
#define SIMT_FIBER_UCONTEXT 1
#endif

#if defined(SIMT_FIBER_UCONTEXT)
#include <ucontext.h>
#endif

namespace simt {

// Sanitizer frames carry redzones and the ASan report itself runs on the faulting fiber's stack,
// so sanitized builds get bigger stacks. Pages are committed lazily, so the size is nearly free.
inline constexpr std::size_t kFiberStackBytes = (SIMT_ASAN ? 512 : 128) * 1024;

inline const char* fiber_backend_name() {
#if defined(SIMT_FIBER_UCONTEXT)
  return "ucontext";
#else
  return "x86_64-asm";
#endif
}

// One mmap'ed fiber stack: [guard page][usable bytes]. Stacks grow down towards the guard page,
// so an overflow faults instead of silently corrupting the neighbouring stack.
// Stacks start at the same offset within a page, so the hot top frames of all fibers would fall
// into the same few L1 cache sets; `color` shifts the top of stack number i by i % 16 cache-line
// quads (256 bytes) to spread them over the 4 KiB the L1 sets cover.
class FiberStack {
 public:
  explicit FiberStack(std::size_t color = 0) : top_offset_((color % 16) * 256) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    mapping_bytes_ = kFiberStackBytes + page;
    void* mapping = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) throw std::runtime_error("simt: mmap of a fiber stack failed");
    mprotect(mapping, page, PROT_NONE);
    mapping_ = static_cast<char*>(mapping);
    bottom_ = mapping_ + page;
  }
  ~FiberStack() {
    if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
  }
  FiberStack(FiberStack&& other) noexcept
      : mapping_(other.mapping_),
        bottom_(other.bottom_),
        mapping_bytes_(other.mapping_bytes_),
        top_offset_(other.top_offset_) {
    other.mapping_ = nullptr;
  }
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  FiberStack& operator=(FiberStack&&) = delete;

  char* bottom() const { return bottom_; }
  std::size_t size() const { return kFiberStackBytes; }
  // Where the fiber's first frame goes: the end of the stack, less the cache colour offset.
  std::uintptr_t top() const {
    return reinterpret_cast<std::uintptr_t>(bottom_) + kFiberStackBytes - top_offset_;
  }

 private:
  char* mapping_ = nullptr;
  char* bottom_ = nullptr;
  std::size_t mapping_bytes_ = 0;
  std::size_t top_offset_ = 0;
};

// A suspended execution context. With the assembly switch: where to resume (stack pointer,
// frame pointer, instruction) and, for a fiber that has not started yet, its entry's argument.
// The OS thread's own stack (the scheduler) is a context too; under ASan its stack bounds are
// unknown until ASan reports them on the first switch away from it.
struct FiberContext {
#if defined(SIMT_FIBER_UCONTEXT)
  ucontext_t ucontext;
#else
  void* stack_pointer = nullptr;
  void* frame_pointer = nullptr;
  const void* resume_address = nullptr;
  void* start_argument = nullptr;
#endif
#if SIMT_ASAN
  const void* stack_bottom = nullptr;
  std::size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
#endif
};

// For the scheduler's context before each launch: the caller's stack may differ from last time.
inline void forget_stack_bounds([[maybe_unused]] FiberContext& context) {
#if SIMT_ASAN
  context.stack_bottom = nullptr;
#endif
}

inline void remember_stack([[maybe_unused]] FiberContext& context,
                           [[maybe_unused]] const FiberStack& stack) {
#if SIMT_ASAN
  context.stack_bottom = stack.bottom();
  context.stack_size = stack.size();
  context.asan_fake_stack = nullptr;
#endif
}

using FiberEntry = void (*)(void*);

// The context being switched away from, so the resumed side can learn the scheduler stack's
// bounds from ASan (see fiber_resumed).
inline thread_local FiberContext* t_switching_from = nullptr;

// Must run first in a freshly started fiber and after every return from a switch.
inline void fiber_resumed([[maybe_unused]] FiberContext& self) {
#if SIMT_ASAN
  const void* from_bottom = nullptr;
  std::size_t from_size = 0;
  __sanitizer_finish_switch_fiber(self.asan_fake_stack, &from_bottom, &from_size);
  if (t_switching_from != nullptr && t_switching_from->stack_bottom == nullptr) {
    t_switching_from->stack_bottom = from_bottom;
    t_switching_from->stack_size = from_size;
  }
#endif
}

inline void announce_switch([[maybe_unused]] FiberContext& from, [[maybe_unused]] FiberContext& to,
                            [[maybe_unused]] bool from_finished) {
#if SIMT_ASAN
  t_switching_from = &from;
  __sanitizer_start_switch_fiber(from_finished ? nullptr : &from.asan_fake_stack, to.stack_bottom,
                                 to.stack_size);
#endif
}

}  // namespace simt

#if !defined(SIMT_FIBER_UCONTEXT)

namespace simt {

// A new fiber starts as if its entry had been called: rsp % 16 == 8 with a zero return address on
// top (entry never returns), rbp = 0 so frame-pointer walks (ASan's unwinder) stop there, and the
// argument arrives in rdi.
inline void fiber_prepare(FiberContext& context, const FiberStack& stack, FiberEntry entry,
                          void* arg) {
  const std::uintptr_t top = stack.top() & ~std::uintptr_t{15};
  auto* fake_return_address = reinterpret_cast<std::uint64_t*>(top - 8);
  *fake_return_address = 0;
  context.stack_pointer = fake_return_address;
  context.frame_pointer = nullptr;
  context.resume_address = reinterpret_cast<const void*>(entry);
  context.start_argument = arg;
  remember_stack(context, stack);
}

// Save where `from` resumes (rsp, rbp and the address of label 1), load `to`'s, put its start
// argument in rdi and jump. Being inline assembly rather than a called function is the point:
// the switch is a jump, so the CPU's return-address predictor stays in step even though every
// fiber stops at a different call depth (a call/ret switch mispredicted nearly every switch,
// 19 ns instead of 3 ns), and the compiler saves only the registers live across the switch. To
// the compiler the statement preserves rsp and rbp and clobbers every other register, so nothing
// it keeps in registers survives; the frame pointer is restored by hand because it may not be
// declared clobbered. The asm writes nothing below rsp, so a red-zone leaf frame stays intact.
__attribute__((always_inline)) inline void raw_switch(FiberContext& from, FiberContext& to) {
  FiberContext* saving = &from;
  FiberContext* loading = &to;
  asm volatile(
      "leaq 1f(%%rip), %%rax\n\t"
      "movq %%rsp, %c[sp](%%rdi)\n\t"
      "movq %%rbp, %c[fp](%%rdi)\n\t"
      "movq %%rax, %c[pc](%%rdi)\n\t"
      "movq %c[sp](%%rsi), %%rsp\n\t"
      "movq %c[fp](%%rsi), %%rbp\n\t"
      "movq %c[arg](%%rsi), %%rdi\n\t"
      "jmpq *%c[pc](%%rsi)\n\t"
      "1:\n\t"
      : "+D"(saving), "+S"(loading)
      : [sp] "i"(offsetof(FiberContext, stack_pointer)),
        [fp] "i"(offsetof(FiberContext, frame_pointer)),
        [pc] "i"(offsetof(FiberContext, resume_address)),
        [arg] "i"(offsetof(FiberContext, start_argument))
      : "rax", "rbx", "rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "cc",
        "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
#if defined(__AVX512F__)
        "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",
        "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "k1", "k2", "k3", "k4", "k5", "k6",
        "k7",
#endif
        "st", "st(1)", "st(2)", "st(3)", "st(4)", "st(5)", "st(6)", "st(7)");
}

}  // namespace simt

#else  // SIMT_FIBER_UCONTEXT

namespace simt {

// makecontext passes only int arguments, so the entry and its argument travel as 32-bit halves.
inline void ucontext_trampoline(unsigned entry_hi, unsigned entry_lo, unsigned arg_hi,
                                unsigned arg_lo) {
  auto join = [](unsigned hi, unsigned lo) {
    return (static_cast<std::uintptr_t>(hi) << 32) | static_cast<std::uintptr_t>(lo);
  };
  auto entry = reinterpret_cast<FiberEntry>(join(entry_hi, entry_lo));
  entry(reinterpret_cast<void*>(join(arg_hi, arg_lo)));
}

inline void fiber_prepare(FiberContext& context, const FiberStack& stack, FiberEntry entry,
                          void* arg) {
  if (getcontext(&context.ucontext) != 0) throw std::runtime_error("simt: getcontext failed");
  context.ucontext.uc_stack.ss_sp = stack.bottom();
  context.ucontext.uc_stack.ss_size =
      stack.top() - reinterpret_cast<std::uintptr_t>(stack.bottom());
  context.ucontext.uc_link = nullptr;
  const auto entry_bits = reinterpret_cast<std::uintptr_t>(entry);
  const auto arg_bits = reinterpret_cast<std::uintptr_t>(arg);
  makecontext(&context.ucontext, reinterpret_cast<void (*)()>(&ucontext_trampoline), 4,
              static_cast<unsigned>(entry_bits >> 32), static_cast<unsigned>(entry_bits),
              static_cast<unsigned>(arg_bits >> 32), static_cast<unsigned>(arg_bits));
  remember_stack(context, stack);
}

inline void raw_switch(FiberContext& from, FiberContext& to) {
  swapcontext(&from.ucontext, &to.ucontext);
}

}  // namespace simt

#endif  // SIMT_FIBER_UCONTEXT

namespace simt {

// Suspend `from` and resume `to`; returns when some context switches back to `from`.
inline void fiber_switch(FiberContext& from, FiberContext& to) {
  announce_switch(from, to, /*from_finished=*/false);
  raw_switch(from, to);
  fiber_resumed(from);
}

// Leave `from` for good (its thread exited or was abandoned after an error); it will be
// re-prepared before it runs again.
[[noreturn]] inline void fiber_exit_to(FiberContext& from, FiberContext& to) {
  announce_switch(from, to, /*from_finished=*/true);
  raw_switch(from, to);
  __builtin_trap();
}

// A reused stack may still carry ASan poison from frames of a fiber that was abandoned mid-way.
inline void forget_stack_contents([[maybe_unused]] const FiberStack& stack) {
#if SIMT_ASAN
  __asan_unpoison_memory_region(stack.bottom(), stack.size());
#endif
}

}  // namespace simt
