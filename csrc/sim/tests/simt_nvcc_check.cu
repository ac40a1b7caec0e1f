// Compiled (never run) by nvcc in the emulator tests: the test kernels and the host side of
// kcompat.cuh must build for the real GPU targets too, so nothing emulator-only slips into them.
#include "simt_test_kernels.cuh"

void launch_test_kernels(float* floats, int* ints, double* doubles, unsigned* words,
                         unsigned char* bytes, cudaStream_t stream) {
  using namespace simt_tests;
  KLAUNCH(block_sum_tree<true>, 4, 64, 0, stream, floats, floats);
  KLAUNCH(block_sum_tree<false>, 4, 64, 0, stream, floats, floats);
  KLAUNCH(block_sum_warps, 2, 1024, 0, stream, floats, floats);
  KLAUNCH(read_before_write, 3, 32, 64, stream, floats, floats);
  KLAUNCH(barrier_votes, 1, 100, 0, stream, ints);
  KLAUNCH(arrival_order, 4, 8, 0, stream, ints, ints);
  KLAUNCH(warp_semantics, 1, 64, 0, stream, doubles);
  KLAUNCH(partial_warp, 1, 48, 0, stream, words);
  KLAUNCH(thread_numbering, 1, dim3(5, 3, 3), 0, stream, ints);
  KLAUNCH((scale_items<float, 4>), 2, 8, 0, stream, floats, 3.0f);
  KLAUNCH(count_threads, dim3(2, 3), dim3(4, 1, 2), 0, stream);
  KLAUNCH(atomics_and_math, 1, 256, 0, stream, floats, ints, floats, bytes);
  KLAUNCH(lane_outside_mask, 2, 64, 0, stream, floats);
  KLAUNCH(divergent_barrier, 1, 64, 0, stream, floats);
  KLAUNCH(early_exit_before_barrier, 1, 64, 0, stream, floats, 40);
  KLAUNCH(warp_block_deadlock, 1, 64, 0, stream, floats);
  KLAUNCH(disagreeing_masks, 1, 32, 0, stream, floats);
  KLAUNCH(kassert_negative, 3, 16, 0, stream, floats);
  kset_max_dynamic_smem(uses_dynamic_shared, 64 * 1024);
  KLAUNCH(uses_dynamic_shared, 2, 128, 64 * 1024, stream, floats);
  KLAUNCH(out_of_bounds_read, 2, 32, 0, stream, floats, floats, 64);
  KLAUNCH(shared_out_of_bounds, 1, 32, 0, stream, floats);
  KLAUNCH(signed_overflow, 1, 32, 0, stream, ints, ints);
  KLAUNCH(sync_heavy, 64, 128, 0, stream, floats);
  kmemcpy_async(floats, floats + 1, sizeof(float) * knum_sms(), stream);
}
