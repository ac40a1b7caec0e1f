// The CPU kernels' element types for the shared dtype switches of core/dtype_dispatch.h.
//
// The storage types are c10's 16- and 8-bit float classes (header-only, no ATen): their float
// conversions are the ones PyTorch itself uses, so a kernel that writes through them rounds
// exactly as `tensor.to(dtype)` does.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include "core/dtype_dispatch.h"

namespace paged_attn::cpu {

using Half = c10::Half;
using BFloat16 = c10::BFloat16;
using Float8 = c10::Float8_e4m3fn;

// The CPU kernels' element types, for the switches of core/dtype_dispatch.h.
using CpuElementTypes = ElementTypes<float, Half, BFloat16, Float8>;

}  // namespace paged_attn::cpu
