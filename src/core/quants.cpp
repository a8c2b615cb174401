// Reference dequantisers and quantisers of the block formats (layouts in quant_blocks.h). The
// dequantisers compute each value with the same float operations, in the same order, as the
// `gguf` package's numpy dequantiser (d * q, d * q + m, (d * scale) * q - dmin * min), so the
// tests can compare them bit for bit. The quantisers round to nearest with one pass of scale
// search per block: simple, deterministic, and within the format's usual error.
#include "core/quants.h"

#include <algorithm>
#include <cmath>

#include "core/quant_blocks.h"
#include "opencamp/dtype.h"

namespace opencamp::quant {
namespace {

float half(uint16_t bits) { return f16_to_f32(bits); }

template <class Block>
const Block* blocks_of(const void* source) { return static_cast<const Block*>(source); }
template <class Block>
Block* blocks_of(void* target) { return static_cast<Block*>(target); }

// The value of largest magnitude, with its sign (the Q*_0 formats map it to the most negative
// level, which has one more step than the positive side).
float signed_absmax(const float* x, int n) {
  float best = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > std::fabs(best)) best = x[i];
  }
  return best;
}

int clamp_round(float v, int lo, int hi) {
  return std::clamp(static_cast<int>(std::lround(v)), lo, hi);
}

// Packs the 6-bit scales and mins of 8 sub-blocks as scale_min_k4 unpacks them.
void pack_scales_k4(const uint8_t* scale, const uint8_t* min, uint8_t* packed) {
  for (int j = 0; j < 12; ++j) packed[j] = 0;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      packed[j] = scale[j];
      packed[j + 4] = min[j];
    } else {
      packed[j + 4] = static_cast<uint8_t>((scale[j] & 0x0f) | ((min[j] & 0x0f) << 4));
      packed[j - 4] |= static_cast<uint8_t>((scale[j] >> 4) << 6);
      packed[j] |= static_cast<uint8_t>((min[j] >> 4) << 6);
    }
  }
}

// The shared part of the Q4_K / Q5_K quantisers: per sub-block of 32 a scale and a min (x ~
// scale * q - min, q in [0, levels]), both quantised to 6 bits against the super-block's d and
// dmin; returns the integer levels in `q`.
void quantize_k_scaled(const float* x, int levels, uint16_t& d_bits, uint16_t& dmin_bits,
                       uint8_t* packed_scales, uint8_t* q) {
  float scales[8], mins[8], max_scale = 0.0f, max_min = 0.0f;
  for (int j = 0; j < 8; ++j) {
    const float* s = x + 32 * j;
    float lo = 0.0f, hi = s[0];  // the min is clamped to <= 0 (stored as a subtracted min)
    for (int i = 0; i < 32; ++i) {
      lo = std::min(lo, s[i]);
      hi = std::max(hi, s[i]);
    }
    scales[j] = std::max(hi - lo, 0.0f) / static_cast<float>(levels);
    mins[j] = -lo;
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  uint8_t scale6[8], min6[8];
  for (int j = 0; j < 8; ++j) {
    scale6[j] = max_scale > 0 ? static_cast<uint8_t>(clamp_round(scales[j] / max_scale * 63.0f, 0, 63)) : 0;
    min6[j] = max_min > 0 ? static_cast<uint8_t>(clamp_round(mins[j] / max_min * 63.0f, 0, 63)) : 0;
  }
  d_bits = f32_to_f16(max_scale / 63.0f);
  dmin_bits = f32_to_f16(max_min / 63.0f);
  pack_scales_k4(scale6, min6, packed_scales);
  const float d = half(d_bits), dmin = half(dmin_bits);
  for (int j = 0; j < 8; ++j) {
    const float step = d * scale6[j], offset = dmin * min6[j];
    for (int i = 0; i < 32; ++i) {
      q[32 * j + i] = step > 0 ? static_cast<uint8_t>(clamp_round((x[32 * j + i] + offset) / step, 0, levels)) : 0;
    }
  }
}

}  // namespace

// ---- dequantisers ------------------------------------------------------------------------

void dequantize_q8_0(const void* source, float* out, int64_t count) {
  const BlockQ8_0* b = blocks_of<BlockQ8_0>(source);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, out += kBlock) {
    const float d = half(b->d);
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(b->qs[j]);
  }
}

void dequantize_q4_0(const void* source, float* out, int64_t count) {
  const BlockQ4_0* b = blocks_of<BlockQ4_0>(source);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, out += kBlock) {
    const float d = half(b->d);
    for (int j = 0; j < kBlock / 2; ++j) {
      out[j] = d * static_cast<float>((b->qs[j] & 0x0f) - 8);
      out[j + kBlock / 2] = d * static_cast<float>((b->qs[j] >> 4) - 8);
    }
  }
}

void dequantize_q4_1(const void* source, float* out, int64_t count) {
  const BlockQ4_1* b = blocks_of<BlockQ4_1>(source);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, out += kBlock) {
    const float d = half(b->d), m = half(b->m);
    for (int j = 0; j < kBlock / 2; ++j) {
      out[j] = d * static_cast<float>(b->qs[j] & 0x0f) + m;
      out[j + kBlock / 2] = d * static_cast<float>(b->qs[j] >> 4) + m;
    }
  }
}

namespace {
uint32_t high_bits(const uint8_t* qh) {
  return static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 |
         static_cast<uint32_t>(qh[2]) << 16 | static_cast<uint32_t>(qh[3]) << 24;
}
}  // namespace

void dequantize_q5_0(const void* source, float* out, int64_t count) {
  const BlockQ5_0* b = blocks_of<BlockQ5_0>(source);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, out += kBlock) {
    const float d = half(b->d);
    const uint32_t qh = high_bits(b->qh);
    for (int j = 0; j < kBlock / 2; ++j) {
      const int lo = (b->qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (b->qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      out[j] = d * static_cast<float>(lo - 16);
      out[j + kBlock / 2] = d * static_cast<float>(hi - 16);
    }
  }
}

void dequantize_q5_1(const void* source, float* out, int64_t count) {
  const BlockQ5_1* b = blocks_of<BlockQ5_1>(source);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, out += kBlock) {
    const float d = half(b->d), m = half(b->m);
    const uint32_t qh = high_bits(b->qh);
    for (int j = 0; j < kBlock / 2; ++j) {
      const int lo = (b->qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (b->qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      out[j] = d * static_cast<float>(lo) + m;
      out[j + kBlock / 2] = d * static_cast<float>(hi) + m;
    }
  }
}

void dequantize_q4_k(const void* source, float* out, int64_t count) {
  const BlockQ4_K* b = blocks_of<BlockQ4_K>(source);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b) {
    const float d = half(b->d), dmin = half(b->dmin);
    const uint8_t* q = b->qs;
    for (int group = 0; group < 4; ++group, q += 32) {
      uint8_t sc, m;
      scale_min_k4(2 * group, b->scales, sc, m);
      const float d1 = d * sc, m1 = dmin * m;
      scale_min_k4(2 * group + 1, b->scales, sc, m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *out++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void dequantize_q5_k(const void* source, float* out, int64_t count) {
  const BlockQ5_K* b = blocks_of<BlockQ5_K>(source);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b) {
    const float d = half(b->d), dmin = half(b->dmin);
    const uint8_t* ql = b->qs;
    for (int group = 0; group < 4; ++group, ql += 32) {
      uint8_t sc, m;
      scale_min_k4(2 * group, b->scales, sc, m);
      const float d1 = d * sc, m1 = dmin * m;
      scale_min_k4(2 * group + 1, b->scales, sc, m);
      const float d2 = d * sc, m2 = dmin * m;
      const uint8_t low_bit = static_cast<uint8_t>(1u << (2 * group)), high_bit = static_cast<uint8_t>(2u << (2 * group));
      for (int l = 0; l < 32; ++l) {
        *out++ = d1 * static_cast<float>((ql[l] & 0x0f) + ((b->qh[l] & low_bit) ? 16 : 0)) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        *out++ = d2 * static_cast<float>((ql[l] >> 4) + ((b->qh[l] & high_bit) ? 16 : 0)) - m2;
      }
    }
  }
}

void dequantize_q6_k(const void* source, float* out, int64_t count) {
  const BlockQ6_K* b = blocks_of<BlockQ6_K>(source);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b) {
    const float d = half(b->d);
    const uint8_t* ql = b->ql;
    const uint8_t* qh = b->qh;
    const int8_t* sc = b->scales;
    for (int half_block = 0; half_block < 2; ++half_block, ql += 64, qh += 32, sc += 8, out += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        out[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        out[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        out[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

// ---- quantisers --------------------------------------------------------------------------

void quantize_q8_0(const float* x, void* target, int64_t count) {
  BlockQ8_0* b = blocks_of<BlockQ8_0>(target);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, x += kBlock) {
    float amax = 0.0f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    b->d = f32_to_f16(d);
    for (int j = 0; j < kBlock; ++j) b->qs[j] = static_cast<int8_t>(clamp_round(x[j] * id, -127, 127));
  }
}

void quantize_q4_0(const float* x, void* target, int64_t count) {
  BlockQ4_0* b = blocks_of<BlockQ4_0>(target);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, x += kBlock) {
    const float d = signed_absmax(x, kBlock) / -8.0f, id = d != 0 ? 1.0f / d : 0.0f;
    b->d = f32_to_f16(d);
    for (int j = 0; j < kBlock / 2; ++j) {
      const int lo = clamp_round(x[j] * id + 8.0f, 0, 15), hi = clamp_round(x[j + 16] * id + 8.0f, 0, 15);
      b->qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

void quantize_q4_1(const float* x, void* target, int64_t count) {
  BlockQ4_1* b = blocks_of<BlockQ4_1>(target);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, x += kBlock) {
    const float lo = *std::min_element(x, x + kBlock), hi = *std::max_element(x, x + kBlock);
    const float d = (hi - lo) / 15.0f, id = d > 0 ? 1.0f / d : 0.0f;
    b->d = f32_to_f16(d);
    b->m = f32_to_f16(lo);
    for (int j = 0; j < kBlock / 2; ++j) {
      const int q0 = clamp_round((x[j] - lo) * id, 0, 15), q1 = clamp_round((x[j + 16] - lo) * id, 0, 15);
      b->qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

namespace {
void store_5bit(const int* q, uint8_t* qs, uint8_t* qh_bytes) {
  uint32_t qh = 0;
  for (int j = 0; j < kBlock / 2; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) qh_bytes[k] = static_cast<uint8_t>(qh >> (8 * k));
}
}  // namespace

void quantize_q5_0(const float* x, void* target, int64_t count) {
  BlockQ5_0* b = blocks_of<BlockQ5_0>(target);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, x += kBlock) {
    const float d = signed_absmax(x, kBlock) / -16.0f, id = d != 0 ? 1.0f / d : 0.0f;
    b->d = f32_to_f16(d);
    int q[kBlock];
    for (int j = 0; j < kBlock; ++j) q[j] = clamp_round(x[j] * id + 16.0f, 0, 31);
    store_5bit(q, b->qs, b->qh);
  }
}

void quantize_q5_1(const float* x, void* target, int64_t count) {
  BlockQ5_1* b = blocks_of<BlockQ5_1>(target);
  for (int64_t i = 0; i < count / kBlock; ++i, ++b, x += kBlock) {
    const float lo = *std::min_element(x, x + kBlock), hi = *std::max_element(x, x + kBlock);
    const float d = (hi - lo) / 31.0f, id = d > 0 ? 1.0f / d : 0.0f;
    b->d = f32_to_f16(d);
    b->m = f32_to_f16(lo);
    int q[kBlock];
    for (int j = 0; j < kBlock; ++j) q[j] = clamp_round((x[j] - lo) * id, 0, 31);
    store_5bit(q, b->qs, b->qh);
  }
}

void quantize_q4_k(const float* x, void* target, int64_t count) {
  BlockQ4_K* b = blocks_of<BlockQ4_K>(target);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b, x += kSuperBlock) {
    uint8_t q[kSuperBlock];
    quantize_k_scaled(x, 15, b->d, b->dmin, b->scales, q);
    for (int group = 0; group < 4; ++group) {
      for (int l = 0; l < 32; ++l) {
        b->qs[32 * group + l] = static_cast<uint8_t>(q[64 * group + l] | (q[64 * group + 32 + l] << 4));
      }
    }
  }
}

void quantize_q5_k(const float* x, void* target, int64_t count) {
  BlockQ5_K* b = blocks_of<BlockQ5_K>(target);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b, x += kSuperBlock) {
    uint8_t q[kSuperBlock];
    quantize_k_scaled(x, 31, b->d, b->dmin, b->scales, q);
    for (int l = 0; l < 32; ++l) b->qh[l] = 0;
    for (int group = 0; group < 4; ++group) {
      for (int l = 0; l < 32; ++l) {
        const int lo = q[64 * group + l], hi = q[64 * group + 32 + l];
        b->qs[32 * group + l] = static_cast<uint8_t>((lo & 0x0f) | ((hi & 0x0f) << 4));
        b->qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * group)) | ((hi >> 4) << (2 * group + 1)));
      }
    }
  }
}

void quantize_q6_k(const float* x, void* target, int64_t count) {
  BlockQ6_K* b = blocks_of<BlockQ6_K>(target);
  for (int64_t i = 0; i < count / kSuperBlock; ++i, ++b, x += kSuperBlock) {
    float scales[16], max_scale = 0.0f;
    for (int j = 0; j < 16; ++j) {
      scales[j] = signed_absmax(x + 16 * j, 16) / -32.0f;
      if (std::fabs(scales[j]) > std::fabs(max_scale)) max_scale = scales[j];
    }
    const float iscale = max_scale != 0 ? -128.0f / max_scale : 0.0f;
    b->d = f32_to_f16(iscale != 0 ? 1.0f / iscale : 0.0f);
    const float d = half(b->d);
    int q[kSuperBlock];
    for (int j = 0; j < 16; ++j) {
      b->scales[j] = static_cast<int8_t>(clamp_round(iscale * scales[j], -128, 127));
      const float step = d * b->scales[j];
      for (int l = 0; l < 16; ++l) {
        q[16 * j + l] = step != 0 ? clamp_round(x[16 * j + l] / step, -32, 31) + 32 : 32;
      }
    }
    for (int half_block = 0; half_block < 2; ++half_block) {
      const int* qq = q + 128 * half_block;
      uint8_t* ql = b->ql + 64 * half_block;
      uint8_t* qh = b->qh + 32 * half_block;
      for (int l = 0; l < 32; ++l) {
        ql[l] = static_cast<uint8_t>((qq[l] & 0x0f) | ((qq[l + 64] & 0x0f) << 4));
        ql[l + 32] = static_cast<uint8_t>((qq[l + 32] & 0x0f) | ((qq[l + 96] & 0x0f) << 4));
        qh[l] = static_cast<uint8_t>((qq[l] >> 4) | ((qq[l + 32] >> 4) << 2) | ((qq[l + 64] >> 4) << 4) |
                                     ((qq[l + 96] >> 4) << 6));
      }
    }
  }
}

}  // namespace opencamp::quant
