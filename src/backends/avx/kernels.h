// The avx backend's kernels, compiled once per instruction set (kernels_avx2.cpp,
// kernels_avx512.cpp, kernels_avx512_bf16.cpp all include kernels.inc with different flags) and
// picked at run time from what the CPU supports. Each kernel works on a range of the problem
// on one thread; the backend splits work over the thread pool.
#pragma once

#include <cstdint>

namespace opencamp::avx {

// Matmul weights are packed in panels of kPanel output features so one vector load brings the
// weights of 16 outputs for one k (f32: [K][16]) or one pair of ks (bf16: [ceil(K/2)][16][2]).
constexpr int kPanel = 16;
constexpr int kMaxHeadDim = 256;

struct MatmulArgs {
  const void* x;        // [T, K] f32 rows; for matmul_bf16_dot: [T, ceil(K/2)] bf16 pairs
  int64_t x_stride;     // elements (f32) or pairs (u32) between rows of x
  int64_t tokens;       // T
  int64_t k;            // K
  int64_t n;            // N
  const void* panels;   // packed weights
  int64_t panel_stride; // elements (f32 or bf16) per panel
  float* out;           // [T, N]
  int64_t out_stride;   // elements between rows of out
  const float* bias;    // [N] or nullptr
};

// The KV cache types the attention kernels read directly (KVLayerView::dtype).
enum KVType : int { kKVF32, kKVBF16, kKVF16, kKVQ8_0 };

// One group of query rows that share a sequence and a KV head: each row is one (token, head).
struct AttentionArgs {
  int kv_type = kKVF32;            // the element type of keys and values
  int rows;                        // <= lanes of the ISA
  const float* const* queries;     // [rows] -> [head_dim]
  float* const* outputs;           // [rows] -> [head_dim]
  const int32_t* positions;        // [rows]: row r attends to keys [0, positions[r]] (see window)
  const int32_t* block_table;      // the sequence's blocks
  // Key (position j, dim d) of this KV head: keys + block(j) * key_block_stride +
  // (j % block_size) * key_position_stride + key_head_offset + d * key_dim_stride. Keys stored
  // [head][dim][position] (key_position_stride 1) let few-row groups run lanes over positions.
  // Strides in elements of the KV type (f32, bf16, f16, or the int8 quants of q8_0).
  const void* keys;
  int64_t key_block_stride, key_position_stride, key_dim_stride, key_head_offset;
  // Values: [position][head][dim] within a block (dims contiguous).
  const void* values;
  int64_t value_block_stride, value_position_stride, value_head_offset;
  // q8_0: the f16 scale of dims [32 g, 32 g + 32) of key (j, head) at key_scales + block(j) *
  // key_scale_block_stride + (j % block_size) * key_scale_position_stride + key_scale_head_offset
  // + g * key_scale_group_stride; the values' scales likewise, groups contiguous.
  const uint16_t* key_scales = nullptr;
  int64_t key_scale_block_stride = 0, key_scale_position_stride = 0, key_scale_group_stride = 0,
          key_scale_head_offset = 0;
  const uint16_t* value_scales = nullptr;
  int64_t value_scale_block_stride = 0, value_scale_position_stride = 0, value_scale_head_offset = 0;
  int head_dim;                    // <= kMaxHeadDim
  int block_size;
  float scale;
  // Keys [key_begin, key_end) only (split-K: several calls cover one group's keys). With
  // partial_out set, the unnormalised outputs [rows][head_dim], each row's running max and sum
  // of exponentials go there, for the caller to merge; otherwise outputs get the result.
  int key_begin = 0;
  int key_end = 1 << 30;
  // > 0: row r attends to keys [positions[r] - window + 1, positions[r]] only (sliding window).
  int window = 0;
  float* partial_out = nullptr;    // [rows][head_dim] or nullptr
  float* partial_max = nullptr;    // [rows]
  float* partial_sum = nullptr;    // [rows]
};

// A matmul with weights in a GGUF block format, rows as the file stores them.
struct QuantMatmulArgs {
  const void* x;        // [T, K] f32 rows, or bf16 rows for the kernels that take them
  int64_t x_stride;     // elements (f32 or bf16) between rows of x
  int64_t tokens;       // T
  int64_t k;            // K: a multiple of the format's block length
  int64_t n;            // N
  const void* weight;   // [N] rows of K / block_elements blocks
  int64_t row_bytes;    // bytes per weight row
  float* out;           // [T, N]
  int64_t out_stride;   // elements between rows of out
  const float* bias;    // [N] or nullptr
};

// The block formats with kernels, in this order (kQuantFormats entries of KernelTable::quant).
constexpr int kQuantFormats = 8;  // Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K

struct QuantKernels {
  // Decode / few tokens: weight rows [row_begin, row_end) (tiles, when `tiled`), each streamed
  // once per 4 tokens.
  void (*matvec)(const QuantMatmulArgs& args, int64_t row_begin, int64_t row_end);
  bool matvec_bf16;  // takes bf16 activations (rounded as to_bf16_row does)
  // Prefill: output panels of kPanel rows [panel_begin, panel_end), each dequantised once.
  void (*matmul)(const QuantMatmulArgs& args, int64_t panel_begin, int64_t panel_end);
  bool matmul_bf16;
  // Both read the weights in 16-row tiles (quant_tiles.h; args.weight: the tiles, row_bytes:
  // bytes per row as in the file) instead of the file's row-major blocks.
  bool tiled;
};

struct KernelTable {
  const char* isa;  // "avx2", "avx512", "avx512_bf16"
  int lanes;        // f32 lanes per vector: query rows per attention group
  // Output panels [panel_begin, panel_end) for every token.
  void (*matmul_f32)(const MatmulArgs& args, int64_t panel_begin, int64_t panel_end);
  void (*matmul_bf16)(const MatmulArgs& args, int64_t panel_begin, int64_t panel_end);
  // bf16 weights times bf16-rounded activations (AVX512_BF16 dot products); nullptr elsewhere.
  void (*matmul_bf16_dot)(const MatmulArgs& args, int64_t panel_begin, int64_t panel_end);
  // Rounds a row of K floats to bf16 (round to nearest even), zero-padded to an even count.
  void (*to_bf16_row)(uint16_t* out, const float* x, int64_t k);
  void (*bf16_to_f32_row)(float* out, const uint16_t* x, int64_t n);
  float (*sum_squares)(const float* x, int64_t n);
  void (*scale_mul)(float* out, const float* x, float scale, const float* weight, int64_t n);
  void (*silu_mul)(float* out, const float* gate, const float* up, int64_t n);
  // out = gelu_tanh(gate) * up, as gate * sigmoid(2 sqrt(2/pi) (gate + 0.044715 gate^3)) * up.
  void (*gelu_tanh_mul)(float* out, const float* gate, const float* up, int64_t n);
  void (*add)(float* out, const float* a, const float* b, int64_t n);
  // x[h * head_stride + i] rotated with cos/sin[i] (pairs i and i + half) for every head.
  void (*rope)(float* x, int64_t heads, int64_t head_stride, int64_t half, const float* cos,
               const float* sin);
  void (*attention)(const AttentionArgs& args);
  QuantKernels quant[kQuantFormats];
};

const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_amx_bf16();  // avx512_bf16 with AMX tile multiplies for prefills

}  // namespace opencamp::avx
