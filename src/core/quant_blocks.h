// The byte layouts of the block formats, exactly as GGUF files store them (ggml-common.h), so
// weights are used straight from a memory-mapped file. f16 scales are raw uint16_t bits.
// Each value is scale * q (or scale * q + min); the K formats scale each sub-block by a small
// integer times a super-block scale. Kernels include this header; the API does not.
#pragma once

#include <cstdint>

namespace opencamp::quant {

inline constexpr int kBlock = 32;     // values per block of the Q*_0 / Q*_1 formats
inline constexpr int kSuperBlock = 256;  // values per super-block of the K formats

// x[i] = d * qs[i]
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kBlock];
};
// x[j] = d * ((qs[j] & 15) - 8), x[j + 16] = d * ((qs[j] >> 4) - 8), j < 16
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kBlock / 2];
};
// x[j] = d * (qs[j] & 15) + m, x[j + 16] = d * (qs[j] >> 4) + m
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[kBlock / 2];
};
// Q4_0's nibbles with a fifth bit from qh (bit j for x[j], bit j + 16 for x[j + 16]); q - 16.
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[kBlock / 2];
};
// Q4_1 with Q5_0's fifth bit: x = d * q + m.
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[kBlock / 2];
};
// 8 sub-blocks of 32 with 6-bit scales and mins packed in `scales` (see scale_min_k4):
// x = d * scale_j * q - dmin * min_j, q in [0, 15]. Each 64 values share 32 bytes of qs: the
// low nibbles are the first 32 values, the high nibbles the next 32.
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[kSuperBlock / 2];
};
// Q4_K with a fifth bit per value in qh: bit 2i of qh[l] for the low nibbles of 64-value group
// i, bit 2i + 1 for its high nibbles. q in [0, 31].
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[kSuperBlock / 8];
  uint8_t qs[kSuperBlock / 2];
};
// 16 sub-blocks of 16 with int8 scales: x = d * scales[j] * (q - 32), q in [0, 63]; 4 low bits
// in ql, 2 high bits in qh (layout in dequantize_q6_k).
struct BlockQ6_K {
  uint8_t ql[kSuperBlock / 2];
  uint8_t qh[kSuperBlock / 4];
  int8_t scales[kSuperBlock / 16];
  uint16_t d;
};

static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block.
inline void scale_min_k4(int j, const uint8_t* scales, uint8_t& scale, uint8_t& min) {
  if (j < 4) {
    scale = scales[j] & 63;
    min = scales[j + 4] & 63;
  } else {
    scale = static_cast<uint8_t>((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4));
    min = static_cast<uint8_t>((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
  }
}

}  // namespace opencamp::quant
