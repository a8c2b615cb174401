// Device helpers shared by the kernels: bf16 conversions that round as the host does, warp
// reductions.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/kernels.h"

namespace opencamp::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// Round to nearest even, as opencamp::f32_to_bf16 and torch do.
__device__ __forceinline__ float round_to_bf16(float value) {
  return __bfloat162float(__float2bfloat16_rn(value));
}

__device__ __forceinline__ float load_element(const void* data, ElementType type, int64_t index) {
  switch (type) {
    case ElementType::F32: return static_cast<const float*>(data)[index];
    case ElementType::BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(data)[index]);
    case ElementType::F16: return __half2float(static_cast<const __half*>(data)[index]);
  }
  return 0.0f;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

inline unsigned blocks_for(int64_t work, int threads, int64_t cap = 65535) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace opencamp::cuda
