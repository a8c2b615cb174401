// The 16-row tiles the AVX-512 BF16 kernels read the 32-value block formats (Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1) in, made once at load from GGUF's row-major blocks and taking the same bytes.
//
// Why: a row-major block holds one row's 32 values, so a matrix-vector product must reduce
// every row horizontally and convert its scales one row at a time; for the short rows of small
// models (K = 576) that per-row work, not the weights' bytes, bounded decode. In a tile the 16
// lanes of a vector are 16 rows: one bf16 dot product takes a pair of ks of all 16 rows against
// one broadcast activation pair, the 16 rows' f16 scales convert in one instruction, and the
// outputs leave as one vector store. It is also exactly the bf16 panel layout the prefill tiles
// multiply ([K/2][16][2]), so prefill dequantises a tile straight into its panel.
//
// A matrix [N, K] is ceil(N / 16) tiles, each K / 32 tile blocks of 16 * block_bytes bytes
// (rows past N are zero). Tile block b of rows r = 0..15 holds the blocks b of those rows:
//   d      [16] f16           row r's scale
//   m      [16] f16           row r's min (Q4_1, Q5_1)
//   fifth  [16] u32           Q5_0 / Q5_1: bit j of word p is the fifth bit of (r, k) below
//   levels Q8_0: [16][32] i8  byte j of vector p is q(r, k)
//          4/5-bit: [8][32]   byte j of chunk c: low nibble u(r, 2c + e), high u(r, 16 + 2c + e)
// where j = 2r + e (e = 0, 1), k = 2p + e (p = 0..15): lane word j of the dot product's pair
// vector p. Levels are the format's unsigned levels u (the fifth bit apart) or Q8_0's int8 q.
#pragma once

#include <cstdint>

#include "opencamp/dtype.h"

namespace opencamp::avx {

constexpr int kTileRows = 16;

// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the formats with a tile layout.
bool has_tile_layout(DType dtype);

// Byte offsets within a tile block of one format (see above); -1 where it has none. constexpr,
// so the kernels (compiled per instruction set) take the very offsets the tiling writes.
struct TileBlockLayout {
  int bytes;   // 16 * block_bytes
  int min;     // offset of m, or -1
  int fifth;   // offset of the fifth bits, or -1
  int levels;  // offset of the levels
};
constexpr TileBlockLayout tile_block_layout(DType dtype) {
  switch (dtype) {
    case DType::Q8_0: return {kTileRows * 34, -1, -1, 32};
    case DType::Q4_0: return {kTileRows * 18, -1, -1, 32};
    case DType::Q4_1: return {kTileRows * 20, 32, -1, 64};
    case DType::Q5_0: return {kTileRows * 22, -1, 32, 96};
    case DType::Q5_1: return {kTileRows * 24, 32, 64, 128};
    default: return {0, -1, -1, 0};
  }
}

// Tile `rows` (<= 16) consecutive rows of K values in `dtype`'s row-major blocks (row i at
// source + i * dtype_bytes(dtype, K)) into one tile of K / 32 tile blocks (rows past `rows`: 0).
void tile_rows(DType dtype, const uint8_t* source, int rows, int64_t k, uint8_t* tile);
// Row r of a tile back in the format's row-major blocks (dtype_bytes(dtype, K) bytes).
void untile_row(DType dtype, const uint8_t* tile, int64_t k, int r, uint8_t* row);

}  // namespace opencamp::avx
