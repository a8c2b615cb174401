#include "backends/avx/quant_tiles.h"

#include <cstring>

#include "opencamp/error.h"

namespace opencamp::avx {
namespace {

// Where a row-major block of each format (quant_blocks.h) keeps its header fields, and how its
// value i's level is read and written. Levels are unsigned (the fifth / top bits included), or
// Q8_0's int8 as a byte.
struct RowFormat {
  int d;              // offset of the f16 d
  int min;            // offset of the f16 m / dmin, or -1
  int scales;         // offset of the K formats' sub-block scale bytes, or -1
  int scale_bytes;    // how many
};

template <DType D>
constexpr RowFormat row_format() {
  if constexpr (D == DType::Q8_0 || D == DType::Q4_0 || D == DType::Q5_0) return {0, -1, -1, 0};
  if constexpr (D == DType::Q4_1 || D == DType::Q5_1) return {0, 2, -1, 0};
  if constexpr (D == DType::Q4_K || D == DType::Q5_K) return {0, 2, 4, 12};
  if constexpr (D == DType::Q6_K) return {208, -1, 192, 16};
  return {0, -1, -1, 0};
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

// Level of value i (0 .. block_elements - 1) of a row-major block.
template <DType D>
unsigned level(const uint8_t* block, int i) {
  if constexpr (D == DType::Q8_0) return block[2 + i];
  if constexpr (D == DType::Q4_0 || D == DType::Q4_1 || D == DType::Q5_0 || D == DType::Q5_1) {
    constexpr int qs = D == DType::Q4_0 ? 2 : D == DType::Q4_1 ? 4 : D == DType::Q5_0 ? 6 : 8;
    unsigned u = i < 16 ? block[qs + i] & 15u : block[qs + i - 16] >> 4;
    if constexpr (D == DType::Q5_0 || D == DType::Q5_1) u |= ((load_u32(block + qs - 4) >> i) & 1u) << 4;
    return u;
  }
  if constexpr (D == DType::Q4_K || D == DType::Q5_K) {
    constexpr int qs = D == DType::Q4_K ? 16 : 48;
    const int group = i / 64, within = i % 64;
    const uint8_t byte = block[qs + 32 * group + within % 32];
    unsigned u = within < 32 ? byte & 15u : byte >> 4;
    if constexpr (D == DType::Q5_K) u |= ((block[16 + i % 32] >> (i / 32)) & 1u) << 4;
    return u;
  }
  // Q6_K (dequantize_q6_k): half h of 128 values, l < 32, quarter q: value 128 h + 32 q + l.
  const int h = i / 128, q = (i % 128) / 32, l = i % 32;
  const uint8_t low = block[64 * h + l + 32 * (q % 2)];
  const unsigned nibble = q < 2 ? low & 15u : low >> 4;
  return nibble | (((block[128 + 32 * h + l] >> (2 * q)) & 3u) << 4);
}

template <DType D>
void set_level(uint8_t* block, int i, unsigned u) {  // block zeroed beforehand
  if constexpr (D == DType::Q8_0) {
    block[2 + i] = static_cast<uint8_t>(u);
  } else if constexpr (D == DType::Q4_0 || D == DType::Q4_1 || D == DType::Q5_0 || D == DType::Q5_1) {
    constexpr int qs = D == DType::Q4_0 ? 2 : D == DType::Q4_1 ? 4 : D == DType::Q5_0 ? 6 : 8;
    if (i < 16) {
      block[qs + i] = static_cast<uint8_t>(block[qs + i] | (u & 15u));
    } else {
      block[qs + i - 16] = static_cast<uint8_t>(block[qs + i - 16] | ((u & 15u) << 4));
    }
    if constexpr (D == DType::Q5_0 || D == DType::Q5_1) {
      store_u32(block + qs - 4, load_u32(block + qs - 4) | (((u >> 4) & 1u) << i));
    }
  } else if constexpr (D == DType::Q4_K || D == DType::Q5_K) {
    constexpr int qs = D == DType::Q4_K ? 16 : 48;
    const int group = i / 64, within = i % 64;
    uint8_t& byte = block[qs + 32 * group + within % 32];
    byte = static_cast<uint8_t>(byte | (within < 32 ? u & 15u : (u & 15u) << 4));
    if constexpr (D == DType::Q5_K) block[16 + i % 32] = static_cast<uint8_t>(block[16 + i % 32] | (((u >> 4) & 1u) << (i / 32)));
  } else {
    const int h = i / 128, q = (i % 128) / 32, l = i % 32;
    uint8_t& low = block[64 * h + l + 32 * (q % 2)];
    low = static_cast<uint8_t>(low | (q < 2 ? u & 15u : (u & 15u) << 4));
    block[128 + 32 * h + l] = static_cast<uint8_t>(block[128 + 32 * h + l] | (((u >> 4) & 3u) << (2 * q)));
  }
}

// Where value k (0..31) of group g of row r lives in a tile block.
struct Lane {
  int p, j;
};
Lane lane_of(int r, int k) { return {k / 2, 2 * r + k % 2}; }

template <DType D>
void tile_rows_of(const uint8_t* source, int rows, int64_t k, uint8_t* tile) {
  constexpr RowFormat row = row_format<D>();
  constexpr TileBlockLayout layout = tile_block_layout(D);
  const size_t block_bytes = dtype_traits(D).block_bytes, row_bytes = dtype_bytes(D, k);
  const int64_t blocks = k / dtype_traits(D).block_elements;
  std::memset(tile, 0, static_cast<size_t>(blocks * layout.bytes));
  for (int r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = source + r * row_bytes + b * block_bytes;
      uint8_t* out = tile + b * layout.bytes;
      std::memcpy(out + 2 * r, block + row.d, 2);
      if (row.min >= 0) std::memcpy(out + layout.min + 2 * r, block + row.min, 2);
      for (int e = 0; e < row.scale_bytes; ++e) out[layout.scales + kTileRows * e + r] = block[row.scales + e];
      for (int g = 0; g < layout.groups; ++g) {
        for (int i = 0; i < 32; ++i) {
          const unsigned u = level<D>(block, 32 * g + i);
          const Lane lane = lane_of(r, i);
          if constexpr (D == DType::Q8_0) {
            out[layout.levels + 32 * lane.p + lane.j] = static_cast<uint8_t>(u);
            continue;
          }
          uint8_t& byte = out[layout.levels + 256 * g + 32 * (lane.p % 8) + lane.j];
          byte = static_cast<uint8_t>(byte | (i < 16 ? u & 15u : (u & 15u) << 4));
          if (layout.fifth >= 0 && ((u >> 4) & 1u)) {
            uint8_t* word = out + layout.fifth + 64 * g + 4 * lane.p;
            store_u32(word, load_u32(word) | (1u << lane.j));
          }
          if (layout.high2 >= 0) {
            uint8_t& high = out[layout.high2 + 128 * g + 32 * (lane.p % 4) + lane.j];
            high = static_cast<uint8_t>(high | (((u >> 4) & 3u) << (2 * (lane.p / 4))));
          }
        }
      }
    }
  }
}

template <DType D>
void untile_row_of(const uint8_t* tile, int64_t k, int r, uint8_t* row_out) {
  constexpr RowFormat row = row_format<D>();
  constexpr TileBlockLayout layout = tile_block_layout(D);
  const size_t block_bytes = dtype_traits(D).block_bytes;
  for (int64_t b = 0; b < k / dtype_traits(D).block_elements; ++b) {
    const uint8_t* in = tile + b * layout.bytes;
    uint8_t* block = row_out + b * block_bytes;
    std::memset(block, 0, block_bytes);
    std::memcpy(block + row.d, in + 2 * r, 2);
    if (row.min >= 0) std::memcpy(block + row.min, in + layout.min + 2 * r, 2);
    for (int e = 0; e < row.scale_bytes; ++e) block[row.scales + e] = in[layout.scales + kTileRows * e + r];
    for (int g = 0; g < layout.groups; ++g) {
      for (int i = 0; i < 32; ++i) {
        const Lane lane = lane_of(r, i);
        unsigned u;
        if constexpr (D == DType::Q8_0) {
          u = in[layout.levels + 32 * lane.p + lane.j];
        } else {
          const uint8_t byte = in[layout.levels + 256 * g + 32 * (lane.p % 8) + lane.j];
          u = i < 16 ? byte & 15u : byte >> 4;
          if (layout.fifth >= 0) u |= ((load_u32(in + layout.fifth + 64 * g + 4 * lane.p) >> lane.j) & 1u) << 4;
          if (layout.high2 >= 0) u |= ((in[layout.high2 + 128 * g + 32 * (lane.p % 4) + lane.j] >> (2 * (lane.p / 4))) & 3u) << 4;
        }
        set_level<D>(block, 32 * g + i, u);
      }
    }
  }
}

template <template <DType> class Op, class... Args>
void for_format(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::Q8_0: return Op<DType::Q8_0>::run(args...);
    case DType::Q4_0: return Op<DType::Q4_0>::run(args...);
    case DType::Q4_1: return Op<DType::Q4_1>::run(args...);
    case DType::Q5_0: return Op<DType::Q5_0>::run(args...);
    case DType::Q5_1: return Op<DType::Q5_1>::run(args...);
    case DType::Q4_K: return Op<DType::Q4_K>::run(args...);
    case DType::Q5_K: return Op<DType::Q5_K>::run(args...);
    case DType::Q6_K: return Op<DType::Q6_K>::run(args...);
    default: fail(ErrorKind::Internal, "no tile layout for ", dtype_name(dtype));
  }
}
template <DType D> struct TileOp {
  static void run(const uint8_t* source, int rows, int64_t k, uint8_t* tile) { tile_rows_of<D>(source, rows, k, tile); }
};
template <DType D> struct UntileOp {
  static void run(const uint8_t* tile, int64_t k, int r, uint8_t* row) { untile_row_of<D>(tile, k, r, row); }
};

}  // namespace

static_assert(tile_block_layout(DType::Q6_K).high2 + 8 * 128 == tile_block_layout(DType::Q6_K).bytes);
static_assert(tile_block_layout(DType::Q5_K).levels + 8 * 256 == tile_block_layout(DType::Q5_K).bytes);
static_assert(tile_block_layout(DType::Q4_K).scales + 12 * kTileRows == tile_block_layout(DType::Q4_K).levels);

bool has_tile_layout(DType dtype) { return tile_block_layout(dtype).bytes > 0; }

void tile_rows(DType dtype, const uint8_t* source, int rows, int64_t k, uint8_t* tile) {
  for_format<TileOp>(dtype, source, rows, k, tile);
}

void untile_row(DType dtype, const uint8_t* tile, int64_t k, int r, uint8_t* row) {
  for_format<UntileOp>(dtype, tile, k, r, row);
}

}  // namespace opencamp::avx
