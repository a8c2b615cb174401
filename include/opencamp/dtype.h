// Element types and the conversions between them. Activations and accumulation are always
// f32; weights may be held as f32 or bf16; checkpoints may store f32, bf16 or f16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace opencamp {

enum class DType : uint8_t { F32, BF16, F16, I32 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // "f32", "bf16", "f16", "i32"

inline float bf16_to_f32(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
inline uint16_t f32_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float f16_to_f32(uint16_t bits);

// Reads element `index` of a contiguous array of f32 / bf16 / f16 values as f32.
inline float load_as_f32(const void* data, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[index];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[index]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[index]);
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(data)[index]);
  }
  return 0.0f;
}

// Converts `count` contiguous values between float dtypes (f32/bf16/f16 -> f32/bf16).
void convert_dtype(const void* source, DType source_dtype, void* target, DType target_dtype,
                   int64_t count);

}  // namespace opencamp
