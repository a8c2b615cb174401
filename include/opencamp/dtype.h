// Element types, weight formats, and the conversions between them. Activations and
// accumulation are always f32. A format is either per element (f32, bf16, f16, i32) or in
// blocks (GGUF's quantised formats: Q8_0, Q4_0, ..., Q6_K), where `block_elements` consecutive
// values of a row are stored together in `block_bytes` bytes (scales + packed integers). A new
// format is one entry in the table (dtype.cpp) plus its dequantiser (quants.cpp) and kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace opencamp {

enum class DType : uint8_t {
  F32, BF16, F16, I32,
  I8,  // the quants of a q8_0 KV cache (their scales are stored apart, see KVLayerView)
  // Block formats, with GGUF's layouts (ggml-common.h): 32 values per block ...
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
  // ... and the K formats: 256 values per super-block of 8 or 16 scaled sub-blocks.
  Q4_K, Q5_K, Q6_K,
};
inline constexpr int kDTypeCount = static_cast<int>(DType::Q6_K) + 1;

struct DTypeTraits {
  const char* name;          // "f32", "bf16", "q4_k", ...
  int64_t block_elements;    // 1 for per-element types
  size_t block_bytes;        // bytes of one block (of one element for per-element types)
  bool is_float;             // f32 / bf16 / f16 (i32 is neither float nor a weight format)
  // count values (a multiple of block_elements) of this format -> f32; null for i32.
  void (*to_f32)(const void* source, float* out, int64_t count);
  // f32 -> count values of this format (round to nearest); null where opencamp cannot write it.
  void (*from_f32)(const float* source, void* out, int64_t count);
};

const DTypeTraits& dtype_traits(DType dtype);
inline const char* dtype_name(DType dtype) { return dtype_traits(dtype).name; }
inline bool is_block_format(DType dtype) { return dtype_traits(dtype).block_elements > 1; }
// The dtype with this name (as dtype_name prints it, any case), or nullopt.
std::optional<DType> dtype_from_name(std::string_view name);

// Bytes of one element; only for per-element types (a block format throws: use dtype_bytes).
size_t dtype_size(DType dtype);
// Bytes that `count` consecutive values take; for a block format, count must be a multiple of
// its block length (throws Error(InvalidArgument) otherwise).
size_t dtype_bytes(DType dtype, int64_t count);

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
uint16_t f32_to_f16(float value);  // round to nearest even, as numpy's astype(float16)

// Element `index` of a block-format array, dequantised (slow: a whole block per call).
float load_block_element(const void* data, DType dtype, int64_t index);

// Reads element `index` of a contiguous array as f32.
inline float load_as_f32(const void* data, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[index];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[index]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[index]);
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(data)[index]);
    case DType::I8: return static_cast<float>(static_cast<const int8_t*>(data)[index]);
    default: return load_block_element(data, dtype, index);
  }
}

// Converts `count` contiguous values between formats: any float or block format to f32, bf16
// or any format with a quantiser (through f32). Block formats need whole blocks.
void convert_dtype(const void* source, DType source_dtype, void* target, DType target_dtype,
                   int64_t count);

}  // namespace opencamp
