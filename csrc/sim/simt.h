// The SIMT emulator in one include: the scheduler (launches, barriers, warp exchanges, shared
// memory) and the device intrinsics. Kernels do not include this directly; they include
// csrc/kernels/kcompat.cuh, which includes it when compiled by a host compiler.
#pragma once

#include "simt_intrinsics.h"
#include "simt_scheduler.h"
