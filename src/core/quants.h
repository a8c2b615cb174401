// Reference dequantisers (block format -> f32) and quantisers (f32 -> block format) of the
// block formats, `count` values at a time (a multiple of the block length). The dtype table
// (dtype.cpp) points at these; kernels of other backends are tested against them.
#pragma once

#include <cstdint>

namespace opencamp::quant {

void dequantize_q8_0(const void* source, float* out, int64_t count);
void dequantize_q4_0(const void* source, float* out, int64_t count);
void dequantize_q4_1(const void* source, float* out, int64_t count);
void dequantize_q5_0(const void* source, float* out, int64_t count);
void dequantize_q5_1(const void* source, float* out, int64_t count);
void dequantize_q4_k(const void* source, float* out, int64_t count);
void dequantize_q5_k(const void* source, float* out, int64_t count);
void dequantize_q6_k(const void* source, float* out, int64_t count);

void quantize_q8_0(const float* source, void* out, int64_t count);
void quantize_q4_0(const float* source, void* out, int64_t count);
void quantize_q4_1(const float* source, void* out, int64_t count);
void quantize_q5_0(const float* source, void* out, int64_t count);
void quantize_q5_1(const float* source, void* out, int64_t count);
void quantize_q4_k(const float* source, void* out, int64_t count);
void quantize_q5_k(const float* source, void* out, int64_t count);
void quantize_q6_k(const float* source, void* out, int64_t count);

}  // namespace opencamp::quant
