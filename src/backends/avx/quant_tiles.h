// The 16-row tiles the AVX-512 BF16 kernels read the block formats in (Q8_0, Q4_0, Q4_1, Q5_0,
// Q5_1, Q4_K, Q5_K, Q6_K), made once at load from GGUF's row-major blocks and taking the same
// bytes.
//
// Why: a row-major block holds one row's values, so a matrix-vector product must reduce every
// row horizontally and convert its scales one row at a time; for the short rows of small models
// (K = 576) that per-row work, not the weights' bytes, bounded decode. In a tile the 16 lanes of
// a vector are 16 rows: one dot product takes a pair of ks of all 16 rows against one broadcast
// activation pair, the 16 rows' scales convert together, and the outputs leave as one vector
// store. It is also exactly the bf16 panel layout the prefill kernels multiply ([K/2][16][2]), so
// prefill dequantises a tile straight into its panel.
//
// A matrix [N, K] is ceil(N / 16) tiles, each K / block_elements tile blocks of 16 * block_bytes
// bytes (rows past N are zero). Tile block b of rows r = 0..15 holds the blocks b of those rows,
// their values in groups of 32 (one group per block; 8 per K-format super-block):
//   d       [16] f16              row r's scale (d of the super-block for the K formats)
//   min     [16] f16              m (Q4_1, Q5_1) or dmin (Q4_K, Q5_K)
//   scales  [n][16] u8            K formats: byte e of the row's packed sub-block scales at
//                                 [e][r] (Q4_K/Q5_K: the 12 bytes of 6-bit scales and mins;
//                                 Q6_K: its 16 int8 scales)
//   fifth   [groups][16] u32      Q5 formats: bit j of word p is the fifth bit of (r, k)
//   levels  [groups][8][32]       byte j of chunk c: low nibble u(r, 2c + e), high u(r, 16 + 2c + e)
//           Q8_0: [16][32] i8     byte j of vector p: q(r, k)
//   high2   [groups][4][32]       Q6_K: bits 2q, 2q + 1 of byte j of chunk c: the top two bits
//                                 of u(r, k) for pair vector p = c + 4 q
// where j = 2r + e (e = 0, 1), k = 2p + e (p = 0..15) indexes a group's 32 values: lane word j of
// the dot product's pair vector p. Levels are the format's unsigned levels u, or Q8_0's int8 q.
#pragma once

#include <cstdint>

#include "opencamp/dtype.h"

namespace opencamp::avx {

constexpr int kTileRows = 16;

// The block formats with a tile layout (all of opencamp's).
bool has_tile_layout(DType dtype);

// Byte offsets within a tile block of one format (see above); -1 where it has none. constexpr,
// so the kernels (compiled per instruction set) take the very offsets the tiling writes.
struct TileBlockLayout {
  int bytes;   // 16 * block_bytes
  int groups;  // 32-value groups per block
  int min;
  int scales;
  int fifth;
  int levels;
  int high2;
};
constexpr TileBlockLayout tile_block_layout(DType dtype) {
  switch (dtype) {
    case DType::Q8_0: return {kTileRows * 34, 1, -1, -1, -1, 32, -1};
    case DType::Q4_0: return {kTileRows * 18, 1, -1, -1, -1, 32, -1};
    case DType::Q4_1: return {kTileRows * 20, 1, 32, -1, -1, 64, -1};
    case DType::Q5_0: return {kTileRows * 22, 1, -1, -1, 32, 96, -1};
    case DType::Q5_1: return {kTileRows * 24, 1, 32, -1, 64, 128, -1};
    case DType::Q4_K: return {kTileRows * 144, 8, 32, 64, -1, 256, -1};
    case DType::Q5_K: return {kTileRows * 176, 8, 32, 64, 256, 768, -1};
    case DType::Q6_K: return {kTileRows * 210, 8, -1, 32, -1, 288, 2336};
    default: return {0, 0, -1, -1, -1, 0, -1};
  }
}

// Tile `rows` (<= 16) consecutive rows of K values in `dtype`'s row-major blocks (row i at
// source + i * dtype_bytes(dtype, K)) into one tile of K / block_elements tile blocks (rows past
// `rows`: 0).
void tile_rows(DType dtype, const uint8_t* source, int rows, int64_t k, uint8_t* tile);
// Row r of a tile back in the format's row-major blocks (dtype_bytes(dtype, K) bytes).
void untile_row(DType dtype, const uint8_t* tile, int64_t k, int r, uint8_t* row);

}  // namespace opencamp::avx
