#include "backends/avx/quant_tiles.h"

#include <cstring>

#include "opencamp/error.h"

namespace opencamp::avx {
namespace {

// Where a row-major block of each format keeps its parts (quant_blocks.h); d is always first.
struct RowBlockLayout {
  int min;    // offset of m, or -1
  int fifth;  // offset of qh, or -1
  int qs;     // offset of the levels
  bool q8;    // int8 levels (else nibbles)
};

RowBlockLayout row_block_layout(DType dtype) {
  switch (dtype) {
    case DType::Q8_0: return {-1, -1, 2, true};
    case DType::Q4_0: return {-1, -1, 2, false};
    case DType::Q4_1: return {2, -1, 4, false};
    case DType::Q5_0: return {-1, 2, 6, false};
    case DType::Q5_1: return {2, 4, 8, false};
    default: fail(ErrorKind::Internal, "no tile layout for ", dtype_name(dtype));
  }
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

// Where value k of row r lives in a tile block: its pair vector p and lane word j.
struct Lane {
  int p, j;
};
Lane lane_of(int r, int k) { return {k / 2, 2 * r + k % 2}; }

}  // namespace

bool has_tile_layout(DType dtype) {
  return dtype == DType::Q8_0 || dtype == DType::Q4_0 || dtype == DType::Q4_1 || dtype == DType::Q5_0 ||
         dtype == DType::Q5_1;
}


static_assert(tile_block_layout(DType::Q5_1).levels == 2 * kTileRows + 2 * kTileRows + 4 * kTileRows);

void tile_rows(DType dtype, const uint8_t* source, int rows, int64_t k, uint8_t* tile) {
  const RowBlockLayout row = row_block_layout(dtype);
  const TileBlockLayout layout = tile_block_layout(dtype);
  const size_t block_bytes = dtype_traits(dtype).block_bytes, row_bytes = dtype_bytes(dtype, k);
  const int64_t blocks = k / 32;
  std::memset(tile, 0, static_cast<size_t>(blocks * layout.bytes));
  for (int r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = source + r * row_bytes + b * block_bytes;
      uint8_t* out = tile + b * layout.bytes;
      std::memcpy(out + 2 * r, block, 2);
      if (row.min >= 0) std::memcpy(out + layout.min + 2 * r, block + row.min, 2);
      const uint32_t fifth = row.fifth >= 0 ? load_u32(block + row.fifth) : 0;
      for (int i = 0; i < 32; ++i) {
        const Lane lane = lane_of(r, i);
        if (row.q8) {
          out[layout.levels + 32 * lane.p + lane.j] = block[row.qs + i];
          continue;
        }
        const int nibble = i < 16 ? block[row.qs + i] & 15 : block[row.qs + i - 16] >> 4;
        uint8_t& byte = out[layout.levels + 32 * (lane.p % 8) + lane.j];
        byte = static_cast<uint8_t>(byte | (i < 16 ? nibble : nibble << 4));
        if ((fifth >> i) & 1u) {
          uint8_t* word = out + layout.fifth + 4 * lane.p;
          store_u32(word, load_u32(word) | (1u << lane.j));
        }
      }
    }
  }
}

void untile_row(DType dtype, const uint8_t* tile, int64_t k, int r, uint8_t* row_out) {
  const RowBlockLayout row = row_block_layout(dtype);
  const TileBlockLayout layout = tile_block_layout(dtype);
  const size_t block_bytes = dtype_traits(dtype).block_bytes;
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* in = tile + b * layout.bytes;
    uint8_t* block = row_out + b * block_bytes;
    std::memset(block, 0, block_bytes);
    std::memcpy(block, in + 2 * r, 2);
    if (row.min >= 0) std::memcpy(block + row.min, in + layout.min + 2 * r, 2);
    uint32_t fifth = 0;
    for (int i = 0; i < 32; ++i) {
      const Lane lane = lane_of(r, i);
      if (row.q8) {
        block[row.qs + i] = in[layout.levels + 32 * lane.p + lane.j];
        continue;
      }
      const uint8_t byte = in[layout.levels + 32 * (lane.p % 8) + lane.j];
      if (i < 16) {
        block[row.qs + i] = static_cast<uint8_t>(block[row.qs + i] | (byte & 15));
      } else {
        block[row.qs + i - 16] = static_cast<uint8_t>(block[row.qs + i - 16] | (byte & 0xf0));
      }
      if (row.fifth >= 0 && ((load_u32(in + layout.fifth + 4 * lane.p) >> lane.j) & 1u)) fifth |= 1u << i;
    }
    if (row.fifth >= 0) store_u32(block + row.fifth, fifth);
  }
}

}  // namespace opencamp::avx
