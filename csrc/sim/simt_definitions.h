// The SIMT emulator's vocabulary, shared by its scheduler and intrinsics: device limits, the error
// type and how sites are described, the schedule order (SIMT_ORDER, SIMT_SEED), the warp and
// barrier operations with the PTX rule for shuffle sources, the type-erased kernel launch and the
// per-kernel dynamic shared memory limits. No state of a running launch lives here.
#pragma once

#include <cuda_runtime.h>  // uint3; the host compiler needs no CUDA library
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace simt {

// Device limits of the architectures the project targets (sm_80 and sm_90). Where they differ the
// smaller one is used, so a launch the emulator accepts also launches on both GPUs.
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr unsigned kMaxBlockDimXY = 1024;
inline constexpr unsigned kMaxBlockDimZ = 64;
inline constexpr unsigned kMaxGridDimYZ = 65535;
inline constexpr std::size_t kMaxStaticSharedBytes = 48 * 1024;
inline constexpr std::size_t kDefaultDynamicSharedLimit = 48 * 1024;
inline constexpr std::size_t kMaxSharedBytesOptIn = 163 * 1024;  // sm_80's per-block maximum
// The emulator runs every block, so it refuses grids it could never finish.
inline constexpr std::uint64_t kMaxEmulatedBlocks = std::uint64_t{1} << 20;

class SimtError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A source position, captured at the call site through __builtin_FILE()/__builtin_LINE().
struct Site {
  const char* file = "?";
  int line = 0;
};

inline bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

inline std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* pattern, ...) {
  va_list args;
  va_start(args, pattern);
  va_list measure;
  va_copy(measure, args);
  const int length = std::vsnprintf(nullptr, 0, pattern, measure);
  va_end(measure);
  std::string text(length > 0 ? static_cast<std::size_t>(length) : 0, '\0');
  std::vsnprintf(text.data(), text.size() + 1, pattern, args);
  va_end(args);
  return text;
}

inline std::string describe(Site site) { return format("%s:%d", site.file, site.line); }
inline std::string describe(uint3 v) { return format("(%u,%u,%u)", v.x, v.y, v.z); }

enum class Order { kForward, kReverse, kRandom };

struct OrderSetting {
  Order order = Order::kForward;
  std::uint64_t seed = 0;
};

// SIMT_ORDER=forward|reverse|random and SIMT_SEED=<integer>, read at every launch so a test can
// change them between launches.
inline OrderSetting order_from_environment() {
  OrderSetting setting;
  const char* order = std::getenv("SIMT_ORDER");
  if (order == nullptr || *order == '\0' || std::strcmp(order, "forward") == 0) {
    setting.order = Order::kForward;
  } else if (std::strcmp(order, "reverse") == 0) {
    setting.order = Order::kReverse;
  } else if (std::strcmp(order, "random") == 0) {
    setting.order = Order::kRandom;
  } else {
    throw SimtError(format("simt: SIMT_ORDER=%s is not one of forward, reverse, random", order));
  }
  if (const char* seed = std::getenv("SIMT_SEED"); seed != nullptr && *seed != '\0') {
    char* end = nullptr;
    setting.seed = std::strtoull(seed, &end, 0);
    if (*end != '\0') throw SimtError(format("simt: SIMT_SEED=%s is not an integer", seed));
  }
  return setting;
}

// SplitMix64 with a Fisher-Yates shuffle: unlike std::shuffle, the permutation for a given
// SIMT_SEED is the same with every standard library.
class ScheduleRandom {
 public:
  void seed(std::uint64_t seed) { state_ = seed; }
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  template <typename T>
  void shuffle(std::vector<T>& items) {
    for (std::size_t i = items.size(); i > 1; --i) std::swap(items[i - 1], items[next() % i]);
  }

 private:
  std::uint64_t state_ = 0;
};

enum class WarpOp : std::uint8_t {
  kSyncwarp,
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
};

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

inline bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShfl || op == WarpOp::kShflUp || op == WarpOp::kShflDown ||
         op == WarpOp::kShflXor;
}

// The lane a shuffle reads from, following the PTX definition of shfl.sync. The warp is cut into
// segments of `width` lanes; segment_mask keeps the lane bits that select the segment. A source
// outside the caller's segment (or below it, for up) means "keep your own value".
inline unsigned shuffle_source_lane(WarpOp op, unsigned lane, int arg, int width) {
  const unsigned segment_mask = ~static_cast<unsigned>(width - 1) & 31u;
  const unsigned offset = static_cast<unsigned>(arg) & 31u;
  const int first_lane = static_cast<int>(lane & segment_mask);
  const int last_lane = first_lane | static_cast<int>(31u & ~segment_mask);
  int source = static_cast<int>(lane);
  bool valid = true;
  switch (op) {
    case WarpOp::kShfl:
      source = first_lane | static_cast<int>(offset & ~segment_mask);
      break;
    case WarpOp::kShflUp:
      source = static_cast<int>(lane) - static_cast<int>(offset);
      valid = source >= first_lane;
      break;
    case WarpOp::kShflDown:
      source = static_cast<int>(lane + offset);
      valid = source <= last_lane;
      break;
    case WarpOp::kShflXor:
      source = static_cast<int>(lane ^ offset);
      valid = source <= last_lane;
      break;
    default:
      break;
  }
  return valid ? static_cast<unsigned>(source) : lane;
}

enum class BarrierOp : std::uint8_t { kPlain, kCount, kAnd, kOr };

inline const char* barrier_op_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::kPlain: return "__syncthreads";
    case BarrierOp::kCount: return "__syncthreads_count";
    case BarrierOp::kAnd: return "__syncthreads_and";
    case BarrierOp::kOr: return "__syncthreads_or";
  }
  return "?";
}

// A kernel launch with its arguments type-erased: run_thread(closure) runs the kernel body once,
// as the current CUDA thread.
struct KernelLaunch {
  const char* written_name;  // the kernel expression as written in KLAUNCH
  const void* address;       // the kernel function, for a readable symbol name in reports
  Site site;
  dim3 grid;
  dim3 block;
  std::size_t dynamic_shared_bytes;
  void (*run_thread)(const void* closure);
  const void* closure;
};

// The demangled symbol when the kernel is exported (e.g. from a Python extension), otherwise the
// expression written in KLAUNCH.
inline std::string kernel_display_name(const KernelLaunch& launch) {
  Dl_info info{};
  if (dladdr(launch.address, &info) != 0 && info.dli_sname != nullptr &&
      info.dli_saddr == launch.address) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> demangled(
        abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), std::free);
    if (status == 0 && demangled) return demangled.get();
  }
  return launch.written_name;
}

// Per-kernel opt-in above 48 KiB of dynamic shared memory (cudaFuncSetAttribute on a GPU).
class DynamicSharedLimits {
 public:
  static DynamicSharedLimits& instance() {
    static DynamicSharedLimits limits;
    return limits;
  }
  void set(const void* kernel, std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limits_[kernel] = bytes;
  }
  std::size_t get(const void* kernel) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = limits_.find(kernel);
    return found == limits_.end() ? kDefaultDynamicSharedLimit : found->second;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const void*, std::size_t> limits_;
};

}  // namespace simt
