// Compiles the CUDA decode launcher and kernels (csrc/cuda/decode_attention.cu) with the host
// compiler against the SIMT emulator, for the paged_attn._sim test extension. No code of its own:
// the emulator must run the very source nvcc compiles.
#include "cuda/decode_attention.cu"
