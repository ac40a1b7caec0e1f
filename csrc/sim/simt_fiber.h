// Fibers for the SIMT emulator: one fiber per emulated CUDA thread.
//
// Two backends behind one interface (FiberContext, fiber_prepare, fiber_switch, fiber_exit_to):
//   * x86-64: a 15-instruction hand-written context switch that pushes the callee-saved registers
//     on the fiber's own stack and swaps stack pointers (no syscalls). MXCSR and the x87 control
//     word are not switched (saving them doubled the cost): all fibers share the OS thread's
//     floating point environment, so kernels must not change rounding modes.
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

// A suspended execution context: with the assembly switch just a stack pointer. The OS thread's
// own stack (the scheduler) is a context too; under ASan its stack bounds are unknown until ASan
// reports them on the first switch away from it.
struct FiberContext {
#if defined(SIMT_FIBER_UCONTEXT)
  ucontext_t ucontext;
#else
  void* stack_pointer = nullptr;
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

// simt_x86_switch_context(save_sp, load_sp): push the SysV callee-saved registers, store rsp to
// *save_sp, load rsp from load_sp, pop the same frame and return into the other context.
// simt_x86_fiber_trampoline is where a new fiber's first "return" lands: it calls entry(arg) with
// entry in r13 and arg in r12; entry never returns.
// Both live in a COMDAT group so every translation unit can carry the definition.
extern "C" void simt_x86_switch_context(void** save_sp, void* load_sp);
extern "C" void simt_x86_fiber_trampoline();

asm(R"(
    .pushsection .text.simt_x86_switch_context,"axG",@progbits,simt_x86_switch_context,comdat
    .weak simt_x86_switch_context
    .hidden simt_x86_switch_context
    .type simt_x86_switch_context,@function
    .p2align 4
simt_x86_switch_context:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size simt_x86_switch_context, .-simt_x86_switch_context
    .popsection

    .pushsection .text.simt_x86_fiber_trampoline,"axG",@progbits,simt_x86_fiber_trampoline,comdat
    .weak simt_x86_fiber_trampoline
    .hidden simt_x86_fiber_trampoline
    .type simt_x86_fiber_trampoline,@function
    .p2align 4
simt_x86_fiber_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size simt_x86_fiber_trampoline, .-simt_x86_fiber_trampoline
    .popsection
)");

namespace simt {

// Lay out the frame simt_x86_switch_context pops, so that switching to the new context "returns"
// into the trampoline. From the saved stack pointer upwards:
//   [+0] r15  [+8] r14  [+16] r13 = entry  [+24] r12 = arg  [+32] rbx  [+40] rbp = 0
//   [+48] return address = trampoline
// After the 6 pops and ret, rsp = saved + 56. The trampoline's `call` needs rsp % 16 == 0, so
// the saved pointer is 8 mod 16 and 16 spare bytes sit above the frame. rbp = 0 ends
// frame-pointer stack walks (ASan's unwinder) at the fiber's first frame.
inline void fiber_prepare(FiberContext& context, const FiberStack& stack, FiberEntry entry,
                          void* arg) {
  const std::uintptr_t top = stack.top() & ~std::uintptr_t{15};
  auto* frame = reinterpret_cast<std::uint64_t*>(top - 56 - 16);
  frame[0] = 0;
  frame[1] = 0;
  frame[2] = reinterpret_cast<std::uint64_t>(entry);
  frame[3] = reinterpret_cast<std::uint64_t>(arg);
  frame[4] = 0;
  frame[5] = 0;
  frame[6] = reinterpret_cast<std::uint64_t>(&simt_x86_fiber_trampoline);
  context.stack_pointer = frame;
  remember_stack(context, stack);
}

inline void raw_switch(FiberContext& from, FiberContext& to) {
  simt_x86_switch_context(&from.stack_pointer, to.stack_pointer);
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
