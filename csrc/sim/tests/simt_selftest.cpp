// Standalone driver for the SIMT emulator's tests (tests/test_simt_emulator.py builds and runs
// it). `simt_selftest <case>` launches the kernels of simt_test_kernels.cuh for one case and
// prints one JSON object on stdout:
//   {"ok": true,  "backend": ..., "outputs": {"name": [numbers...], ...}}
//   {"ok": false, "backend": ..., "error": "<the emulator's report>"}
// The tests compute the expected outputs themselves. SIMT_ORDER/SIMT_SEED come from the
// environment. Sanitizer cases simply crash with the sanitizer's report on stderr.
#include <time.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "simt_test_kernels.cuh"

namespace {

using Outputs = std::map<std::string, std::vector<double>>;

std::string json_number(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", x);
  return text;
}

std::string json_string(const std::string& text) {
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') {
      quoted += '\\';
      quoted += c;
    } else if (c == '\n') {
      quoted += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      quoted += ' ';
    } else {
      quoted += c;
    }
  }
  return quoted + "\"";
}

template <typename T>
std::vector<double> as_doubles(const std::vector<T>& values) {
  return std::vector<double>(values.begin(), values.end());
}

// Inputs whose sums are exact in float: small multiples of 1/4.
std::vector<float> ramp(int count) {
  std::vector<float> values(count);
  for (int i = 0; i < count; ++i) values[i] = static_cast<float>(i % 7) + 0.25f * (i % 3);
  return values;
}

Outputs block_sum(void (*kernel)(const float*, float*), int blocks, int threads) {
  const std::vector<float> in = ramp(blocks * threads);
  std::vector<float> out(blocks, -1.0f);
  KLAUNCH(kernel, blocks, threads, 0, nullptr, in.data(), out.data());
  return {{"sums", as_doubles(out)}};
}

Outputs read_before_write_case() {
  const int blocks = 3;
  std::vector<float> static_seen(blocks, 0.0f);
  std::vector<float> dynamic_seen(blocks, 0.0f);
  KLAUNCH(simt_tests::read_before_write, blocks, 32, 64, nullptr, static_seen.data(),
          dynamic_seen.data());
  return {{"static", as_doubles(static_seen)}, {"dynamic", as_doubles(dynamic_seen)}};
}

Outputs barrier_votes_case() {
  std::vector<int> out(4, -1);
  KLAUNCH(simt_tests::barrier_votes, 1, 100, 0, nullptr, out.data());
  return {{"votes", as_doubles(out)}};
}

Outputs arrival_order_case() {
  const int blocks = 4;
  const int threads = 8;
  int counter = 0;
  std::vector<int> order(blocks * threads, -1);
  KLAUNCH(simt_tests::arrival_order, blocks, threads, 0, nullptr, &counter, order.data());
  return {{"order", as_doubles(order)}};
}

Outputs warp_semantics_case() {
  const int threads = 64;
  std::vector<double> out(simt_tests::kShuffleCases * threads, -12345.0);
  KLAUNCH(simt_tests::warp_semantics, 1, threads, 0, nullptr, out.data());
  return {{"rows", out}};
}

Outputs partial_warp_case() {
  std::vector<unsigned> out(4, 0);
  KLAUNCH(simt_tests::partial_warp, 1, 48, 0, nullptr, out.data());
  return {{"masks", as_doubles(out)}};
}

Outputs thread_numbering_case() {
  const dim3 block(5, 3, 3);
  std::vector<int> out(2 * 45, -1);
  KLAUNCH(simt_tests::thread_numbering, 1, block, 0, nullptr, out.data());
  return {{"pairs", as_doubles(out)}};
}

Outputs launch_plumbing_case() {
  std::vector<float> data(2 * 8 * 4);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  KLAUNCH((simt_tests::scale_items<float, 4>), 2, 8, 0, nullptr, data.data(), 3);
  simt_tests::zero_argument_threads = 0;
  KLAUNCH(simt_tests::count_threads, dim3(2, 3), dim3(4, 1, 2), 0, nullptr);
  return {{"scaled", as_doubles(data)},
          {"counted", {static_cast<double>(simt_tests::zero_argument_threads)}}};
}

Outputs atomics_and_math_case() {
  float sum = 0.0f;
  int maximum = -1;
  std::vector<float> math(12, 0.0f);
  std::vector<unsigned char> fp8(4, 0);
  KLAUNCH(simt_tests::atomics_and_math, 1, 256, 0, nullptr, &sum, &maximum, math.data(),
          fp8.data());
  return {{"sum", {sum}}, {"maximum", {static_cast<double>(maximum)}}, {"math", as_doubles(math)},
          {"fp8", as_doubles(fp8)}};
}

Outputs float_kernel_case(void (*kernel)(float*), int blocks, int threads, std::size_t smem = 0) {
  std::vector<float> out(blocks * threads, 0.0f);
  KLAUNCH(kernel, blocks, threads, smem, nullptr, out.data());
  return {{"out", as_doubles(out)}};
}

Outputs early_exit_case() {
  std::vector<float> out(64, 0.0f);
  KLAUNCH(simt_tests::early_exit_before_barrier, 1, 64, 0, nullptr, out.data(), 40);
  return {{"out", as_doubles(out)}};
}

Outputs kassert_case() {
  std::vector<float> in(3 * 16, 1.0f);
  in[2 * 16 + 7] = -1.0f;
  KLAUNCH(simt_tests::kassert_negative, 3, 16, 0, nullptr, in.data());
  return {};
}

Outputs kernel_throws_case() {
  std::vector<float> in(2 * 8, 4.0f);
  std::vector<float> out(2 * 8, 0.0f);
  in[1 * 8 + 3] = -4.0f;
  KLAUNCH(simt_tests::kernel_throws, 2, 8, 0, nullptr, in.data(), out.data());
  return {{"out", as_doubles(out)}};
}

Outputs dynamic_shared_case(bool opt_in) {
  const std::size_t bytes = 64 * 1024;
  if (opt_in) kset_max_dynamic_smem(simt_tests::uses_dynamic_shared, bytes);
  return float_kernel_case(simt_tests::uses_dynamic_shared, 2, 128, bytes);
}

// A failed launch leaves the emulator ready for the next one.
Outputs recover_after_error_case() {
  double failed = 0;
  try {
    float_kernel_case(simt_tests::warp_block_deadlock, 1, 64);
  } catch (const std::runtime_error&) {
    failed = 1;
  }
  Outputs outputs = block_sum(simt_tests::block_sum_tree<true>, 4, 64);
  outputs["first_failed"] = {failed};
  return outputs;
}

// Independent launches on two OS threads at once: the scheduler state is per thread.
Outputs two_threads_case() {
  const int launches = 25;
  std::vector<double> sums[2];
  auto worker = [&](int which) {
    for (int i = 0; i < launches; ++i) {
      const std::vector<double> s = block_sum(simt_tests::block_sum_warps, 2, 256)["sums"];
      sums[which].insert(sums[which].end(), s.begin(), s.end());
    }
  };
  std::thread first(worker, 0);
  std::thread second(worker, 1);
  first.join();
  second.join();
  return {{"first", sums[0]}, {"second", sums[1]}};
}

Outputs outside_kernel_case() {
  __syncthreads();
  return {};
}

Outputs out_of_bounds_read_case() {
  const int n = 64;
  std::vector<float> in(n, 1.0f);
  std::vector<float> out(n, 0.0f);
  KLAUNCH(simt_tests::out_of_bounds_read, 2, 32, 0, nullptr, in.data(), out.data(), n);
  return {{"out", as_doubles(out)}};
}

Outputs signed_overflow_case() {
  std::vector<int> in(32, 1);
  std::vector<int> out(32, 0);
  in[9] = INT_MAX;
  KLAUNCH(simt_tests::signed_overflow, 1, 32, 0, nullptr, in.data(), out.data());
  return {{"out", as_doubles(out)}};
}

// CPU time of this OS thread: benchmarks stay meaningful on a machine shared with other jobs.
double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

// Round trips between two fibers that do nothing but switch: the raw cost of one switch.
struct PingPong {
  simt::FiberContext main_context, ping_context, pong_context;
  long rounds = 0;
};

void ping_main(void* state_address) {
  auto& state = *static_cast<PingPong*>(state_address);
  simt::fiber_resumed(state.ping_context);
  for (long i = 0; i < state.rounds; ++i) {
    simt::fiber_switch(state.ping_context, state.pong_context);
  }
  simt::fiber_exit_to(state.ping_context, state.main_context);
}

void pong_main(void* state_address) {
  auto& state = *static_cast<PingPong*>(state_address);
  simt::fiber_resumed(state.pong_context);
  for (;;) simt::fiber_switch(state.pong_context, state.ping_context);
}

double switch_nanoseconds() {
  PingPong state;
  state.rounds = 200000;
  simt::FiberStack ping_stack;
  simt::FiberStack pong_stack;
  simt::fiber_prepare(state.ping_context, ping_stack, &ping_main, &state);
  simt::fiber_prepare(state.pong_context, pong_stack, &pong_main, &state);
  const double start = thread_cpu_seconds();
  simt::fiber_switch(state.main_context, state.ping_context);
  return (thread_cpu_seconds() - start) * 1e9 / (2.0 * static_cast<double>(state.rounds));
}

// The prototype's reference load: 64 blocks x 128 threads, 10 barriers and 10 shuffles each.
Outputs benchmark_case() {
  const int blocks = 64;
  const int threads = 128;
  std::vector<float> out(blocks * threads, 0.0f);
  std::vector<double> milliseconds;
  for (int repeat = 0; repeat < 7; ++repeat) {
    const double start = thread_cpu_seconds();
    KLAUNCH(simt_tests::sync_heavy, blocks, threads, 0, nullptr, out.data());
    milliseconds.push_back((thread_cpu_seconds() - start) * 1e3);
  }
  std::sort(milliseconds.begin(), milliseconds.end());
  return {{"median_ms", {milliseconds[milliseconds.size() / 2]}},
          {"switch_ns", {switch_nanoseconds()}},
          {"out", as_doubles(out)}};
}

const std::map<std::string, std::function<Outputs()>>& cases() {
  using namespace simt_tests;
  static const std::map<std::string, std::function<Outputs()>> all = {
      {"block_sum_tree", [] { return block_sum(block_sum_tree<true>, 4, 64); }},
      {"block_sum_missing_barrier", [] { return block_sum(block_sum_tree<false>, 4, 64); }},
      {"block_sum_warps_1024", [] { return block_sum(block_sum_warps, 2, 1024); }},
      {"read_before_write", read_before_write_case},
      {"barrier_votes", barrier_votes_case},
      {"arrival_order", arrival_order_case},
      {"warp_semantics", warp_semantics_case},
      {"partial_warp", partial_warp_case},
      {"thread_numbering", thread_numbering_case},
      {"launch_plumbing", launch_plumbing_case},
      {"atomics_and_math", atomics_and_math_case},
      {"lane_outside_mask", [] { return float_kernel_case(lane_outside_mask, 2, 64); }},
      {"divergent_barrier", [] { return float_kernel_case(divergent_barrier, 1, 64); }},
      {"early_exit", early_exit_case},
      {"deadlock", [] { return float_kernel_case(warp_block_deadlock, 1, 64); }},
      {"disagreeing_masks", [] { return float_kernel_case(disagreeing_masks, 1, 32); }},
      {"kassert", kassert_case},
      {"kernel_throws", kernel_throws_case},
      {"too_much_shared", [] { return float_kernel_case(too_much_shared, 1, 32); }},
      {"invalid_block", [] { return float_kernel_case(uses_dynamic_shared, 1, 2048); }},
      {"dynamic_shared_without_opt_in", [] { return dynamic_shared_case(false); }},
      {"dynamic_shared_with_opt_in", [] { return dynamic_shared_case(true); }},
      {"recover_after_error", recover_after_error_case},
      {"two_threads", two_threads_case},
      {"outside_kernel", outside_kernel_case},
      {"out_of_bounds_read", out_of_bounds_read_case},
      {"shared_out_of_bounds", [] { return float_kernel_case(shared_out_of_bounds, 1, 32); }},
      {"signed_overflow", signed_overflow_case},
      {"benchmark", benchmark_case},
  };
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || cases().count(argv[1]) == 0) {
    std::fprintf(stderr, "usage: %s <case>\ncases:", argv[0]);
    for (const auto& entry : cases()) std::fprintf(stderr, " %s", entry.first.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  std::string json = std::string("{\"backend\": ") + json_string(simt::fiber_backend_name());
  try {
    const Outputs outputs = cases().at(argv[1])();
    json += ", \"ok\": true, \"outputs\": {";
    const char* separator = "";
    for (const auto& [name, values] : outputs) {
      json += separator + json_string(name) + ": [";
      for (std::size_t i = 0; i < values.size(); ++i) {
        json += (i ? ", " : "") + json_number(values[i]);
      }
      json += "]";
      separator = ", ";
    }
    json += "}}";
  } catch (const std::runtime_error& error) {
    json += ", \"ok\": false, \"error\": " + json_string(error.what()) + "}";
  }
  std::printf("%s\n", json.c_str());
  return 0;
}
