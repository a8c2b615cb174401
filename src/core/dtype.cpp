#include "opencamp/dtype.h"

#include "opencamp/error.h"

namespace opencamp {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
  }
  return "?";
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

void convert_dtype(const void* source, DType source_dtype, void* target, DType target_dtype,
                   int64_t count) {
  if (source_dtype == DType::I32 || target_dtype == DType::I32 || target_dtype == DType::F16) {
    fail(ErrorKind::Unsupported, "cannot convert ", dtype_name(source_dtype), " to ",
         dtype_name(target_dtype));
  }
  if (source_dtype == target_dtype) {
    std::memcpy(target, source, static_cast<size_t>(count) * dtype_size(source_dtype));
    return;
  }
  // Typed loops per pair of dtypes (a dtype switch per element costs more than the work).
  auto convert = [&](auto load, auto* out, auto store) {
    for (int64_t i = 0; i < count; ++i) out[i] = store(load(i));
  };
  auto identity = [](float v) { return v; };
  auto to_bf16 = [](float v) { return f32_to_bf16(v); };
  const auto* f32_in = static_cast<const float*>(source);
  const auto* u16_in = static_cast<const uint16_t*>(source);
  auto load_f32 = [&](int64_t i) { return f32_in[i]; };
  auto load_bf16 = [&](int64_t i) { return bf16_to_f32(u16_in[i]); };
  auto load_f16 = [&](int64_t i) { return f16_to_f32(u16_in[i]); };
  if (target_dtype == DType::F32) {
    float* out = static_cast<float*>(target);
    if (source_dtype == DType::BF16) convert(load_bf16, out, identity);
    else convert(load_f16, out, identity);
  } else {  // BF16
    uint16_t* out = static_cast<uint16_t*>(target);
    if (source_dtype == DType::F32) convert(load_f32, out, to_bf16);
    else convert(load_f16, out, to_bf16);
  }
}

}  // namespace opencamp
