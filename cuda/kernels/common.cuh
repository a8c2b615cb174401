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

// Element `at` of a KV cache's keys or values as f32 (q8_0: times the scale at `scale_at`).
__device__ __forceinline__ float load_kv(const DeviceCache& c, const void* data, const uint16_t* scales,
                                         int64_t at, int64_t scale_at) {
  switch (c.type) {
    case KVType::F32: return static_cast<const float*>(data)[at];
    case KVType::BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(data)[at]);
    case KVType::F16: return __half2float(static_cast<const __half*>(data)[at]);
    case KVType::Q8_0:
      return __half2float(__ushort_as_half(scales[scale_at])) * static_cast<float>(static_cast<const int8_t*>(data)[at]);
  }
  return 0.0f;
}

// Stores x rounded to an f32 / bf16 / f16 cache (q8_0 stores whole groups: store_kv_group).
__device__ __forceinline__ void store_kv(const DeviceCache& c, void* data, int64_t at, float x) {
  switch (c.type) {
    case KVType::F32: static_cast<float*>(data)[at] = x; break;
    case KVType::BF16: static_cast<uint16_t*>(data)[at] = __bfloat16_as_ushort(__float2bfloat16_rn(x)); break;
    case KVType::F16: static_cast<uint16_t*>(data)[at] = __half_as_ushort(__float2half_rn(x)); break;
    default: break;
  }
}

// Quantises 32 values x[0], x[stride], ... as GGUF's quantize_q8_0: d = max|x| / 127 (stored as
// f16), q = round(x / d) (half away from zero), written at quants[at + i * dim_stride].
__device__ __forceinline__ void store_kv_group(int8_t* quants, int64_t at, int64_t dim_stride, uint16_t* scale,
                                               const float* x, int64_t stride) {
  float amax = 0.0f;
  for (int i = 0; i < kKVQuantGroup; ++i) amax = fmaxf(amax, fabsf(x[i * stride]));
  const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
  *scale = __half_as_ushort(__float2half_rn(d));
  for (int i = 0; i < kKVQuantGroup; ++i) {
    const float q = fminf(fmaxf(roundf(x[i * stride] * id), -127.0f), 127.0f);
    quants[at + i * dim_stride] = static_cast<int8_t>(q);
  }
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
