// Compiles the CUDA cache-op launchers and kernels (csrc/cuda/cache_ops.cu) with the host
// compiler against the SIMT emulator, for the paged_attn._sim test extension. No code of its own:
// the emulator must run the very source nvcc compiles.
#include "cuda/cache_ops.cu"
