#include "opencamp/dtype.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <vector>

#include "core/quant_blocks.h"
#include "core/quants.h"
#include "opencamp/error.h"

namespace opencamp {
namespace {

void f32_to_f32_values(const void* source, float* out, int64_t count) {
  std::memcpy(out, source, static_cast<size_t>(count) * sizeof(float));
}
void f32_from_f32_values(const float* source, void* out, int64_t count) {
  std::memcpy(out, source, static_cast<size_t>(count) * sizeof(float));
}
void bf16_to_f32_values(const void* source, float* out, int64_t count) {
  const auto* in = static_cast<const uint16_t*>(source);
  for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(in[i]);
}
void bf16_from_f32_values(const float* source, void* out, int64_t count) {
  auto* target = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < count; ++i) target[i] = f32_to_bf16(source[i]);
}
void f16_to_f32_values(const void* source, float* out, int64_t count) {
  const auto* in = static_cast<const uint16_t*>(source);
  for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(in[i]);
}
void f16_from_f32_values(const float* source, void* out, int64_t count) {
  auto* target = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < count; ++i) target[i] = f32_to_f16(source[i]);
}

using namespace quant;

// Indexed by DType.
constexpr std::array<DTypeTraits, kDTypeCount> kTraits{{
    {"f32", 1, 4, true, f32_to_f32_values, f32_from_f32_values},
    {"bf16", 1, 2, true, bf16_to_f32_values, bf16_from_f32_values},
    {"f16", 1, 2, true, f16_to_f32_values, f16_from_f32_values},
    {"i32", 1, 4, false, nullptr, nullptr},
    {"i8", 1, 1, false, nullptr, nullptr},
    {"q8_0", kBlock, sizeof(BlockQ8_0), false, dequantize_q8_0, quantize_q8_0},
    {"q4_0", kBlock, sizeof(BlockQ4_0), false, dequantize_q4_0, quantize_q4_0},
    {"q4_1", kBlock, sizeof(BlockQ4_1), false, dequantize_q4_1, quantize_q4_1},
    {"q5_0", kBlock, sizeof(BlockQ5_0), false, dequantize_q5_0, quantize_q5_0},
    {"q5_1", kBlock, sizeof(BlockQ5_1), false, dequantize_q5_1, quantize_q5_1},
    {"q4_k", kSuperBlock, sizeof(BlockQ4_K), false, dequantize_q4_k, quantize_q4_k},
    {"q5_k", kSuperBlock, sizeof(BlockQ5_K), false, dequantize_q5_k, quantize_q5_k},
    {"q6_k", kSuperBlock, sizeof(BlockQ6_K), false, dequantize_q6_k, quantize_q6_k},
}};

void check_whole_blocks(DType dtype, int64_t count) {
  const int64_t block = dtype_traits(dtype).block_elements;
  if (count < 0 || count % block != 0) {
    fail(ErrorKind::InvalidArgument, dtype_name(dtype), " stores values in blocks of ", block,
         "; ", count, " values are not a whole number of blocks");
  }
}

}  // namespace

const DTypeTraits& dtype_traits(DType dtype) {
  const auto index = static_cast<size_t>(dtype);
  if (index >= kTraits.size()) fail(ErrorKind::Internal, "unknown dtype ", index);
  return kTraits[index];
}

std::optional<DType> dtype_from_name(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (size_t i = 0; i < kTraits.size(); ++i) {
    if (lower == kTraits[i].name) return static_cast<DType>(i);
  }
  return std::nullopt;
}

size_t dtype_size(DType dtype) {
  const DTypeTraits& traits = dtype_traits(dtype);
  if (traits.block_elements != 1) {
    fail(ErrorKind::Internal, dtype_name(dtype), " is a block format: it has no size per element");
  }
  return traits.block_bytes;
}

size_t dtype_bytes(DType dtype, int64_t count) {
  check_whole_blocks(dtype, count);
  const DTypeTraits& traits = dtype_traits(dtype);
  return static_cast<size_t>(count / traits.block_elements) * traits.block_bytes;
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t result;
  if (exponent == 0x1f) {  // inf / nan
    result = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    result = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // zero
    result = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    result = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  std::memcpy(&value, &result, sizeof value);
  return value;
}

uint16_t f32_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (magnitude < 0x38800000u) {  // below the smallest normal f16: subnormal or zero
    if (magnitude < 0x33000000u) return sign;  // under half the smallest subnormal
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(magnitude >> 23);  // 14 + (113 - exponent) + ...
    const uint32_t shifted = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    uint32_t result = shifted;
    if (remainder > halfway || (remainder == halfway && (shifted & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t result = ((magnitude >> 13) - (112u << 10));
  const uint32_t dropped = magnitude & 0x1fffu;
  if (dropped > 0x1000u || (dropped == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}

float load_block_element(const void* data, DType dtype, int64_t index) {
  const DTypeTraits& traits = dtype_traits(dtype);
  if (traits.to_f32 == nullptr) fail(ErrorKind::Internal, "cannot read ", traits.name, " as f32");
  const int64_t block = index / traits.block_elements;
  std::vector<float> values(static_cast<size_t>(traits.block_elements));
  traits.to_f32(static_cast<const char*>(data) + static_cast<size_t>(block) * traits.block_bytes,
                values.data(), traits.block_elements);
  return values[static_cast<size_t>(index % traits.block_elements)];
}

void convert_dtype(const void* source, DType source_dtype, void* target, DType target_dtype,
                   int64_t count) {
  const DTypeTraits& from = dtype_traits(source_dtype);
  const DTypeTraits& to = dtype_traits(target_dtype);
  if (from.to_f32 == nullptr || to.from_f32 == nullptr) {
    fail(ErrorKind::Unsupported, "cannot convert ", from.name, " to ", to.name);
  }
  check_whole_blocks(source_dtype, count);
  check_whole_blocks(target_dtype, count);
  if (source_dtype == target_dtype) {
    std::memcpy(target, source, dtype_bytes(source_dtype, count));
  } else if (target_dtype == DType::F32) {
    from.to_f32(source, static_cast<float*>(target), count);
  } else if (source_dtype == DType::F32) {
    to.from_f32(static_cast<const float*>(source), target, count);
  } else {
    // Through f32, a few super-blocks at a time (every block length divides the chunk).
    constexpr int64_t kChunk = 16 * quant::kSuperBlock;
    std::vector<float> staging(static_cast<size_t>(std::min(count, kChunk)));
    for (int64_t done = 0; done < count; done += kChunk) {
      const int64_t n = std::min(kChunk, count - done);
      from.to_f32(static_cast<const char*>(source) + dtype_bytes(source_dtype, done), staging.data(), n);
      to.from_f32(staging.data(), static_cast<char*>(target) + dtype_bytes(target_dtype, done), n);
    }
  }
}

}  // namespace opencamp
