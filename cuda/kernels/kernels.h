// Launchers of the cuda backend's kernels. The arguments are plain structs of device pointers,
// element strides and sizes (no opencamp types), so the .cu files compile without the library's
// headers. Every launcher enqueues its kernels on `stream` and returns cudaGetLastError(), which
// the backend turns into an opencamp::Error naming the launcher (never a silent failure).
//
// Strides are in elements. "[T, K]" comments give the logical shape, outermost first.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace opencamp::cuda {

// Element type of a weight or table (activations are always f32).
enum class ElementType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---- embedding, norms, elementwise -------------------------------------------------------

struct EmbeddingArgs {
  float* out;  // [T, D]
  int64_t out_row, out_col;
  const void* table;  // [V, D] F32, BF16 or F16
  int64_t table_row, table_col;
  ElementType table_type;
  const int32_t* ids;  // [T] device, already checked against V
  int64_t tokens, dim;
};
cudaError_t launch_embedding(const EmbeddingArgs& args, cudaStream_t stream);

// out[r, h, :] = x[r, h, :] / sqrt(mean(x[r, h, :]^2) + eps) * weight; 2-d tensors have heads = 1.
struct RmsNormArgs {
  float* out;  // [R, H, D]
  int64_t out_s0, out_s1, out_s2;
  const float* x;  // [R, H, D], may be out
  int64_t x_s0, x_s1, x_s2;
  const float* weight;  // [D]
  int64_t weight_stride;
  int64_t rows, heads, dim;
  float eps;
};
cudaError_t launch_rmsnorm(const RmsNormArgs& args, cudaStream_t stream);

// out = a + b, or out = silu(a) * b (a is the gate); out may alias a or b.
struct ElementwiseArgs {
  float* out;  // [T, F]
  int64_t out_row, out_col;
  const float* a;  // [T, F]
  int64_t a_row, a_col;
  const float* b;  // [T, F]
  int64_t b_row, b_col;
  int64_t rows, cols;
};
cudaError_t launch_add(const ElementwiseArgs& args, cudaStream_t stream);
cudaError_t launch_silu_mul(const ElementwiseArgs& args, cudaStream_t stream);
// out = gelu_tanh(a) * b (PyTorch's gelu(approximate="tanh"); Gemma's MLP).
cudaError_t launch_gelu_tanh_mul(const ElementwiseArgs& args, cudaStream_t stream);
// out = a * factor (b unused).
cudaError_t launch_scale(const ElementwiseArgs& args, float factor, cudaStream_t stream);

// ---- the per-pass batch description on the device ------------------------------------------

// Where each token of a batch reads and writes the paged KV cache, as uploaded by the backend:
// token t's block table starts at tables[table_offsets[t]]; it attends to [0, positions[t]].
// A block table entry a sliding-window layer group has released (opencamp::kReleasedBlock): it
// lies before every row's window, attention skips it.
inline constexpr int32_t kReleasedBlock = -1;

struct DeviceSlots {
  const int32_t* positions;      // [T]
  const int32_t* table_offsets;  // [T]
  const int32_t* tables;         // concatenated block tables of the batch's sequences
  int block_size;
};

// The types a KV cache holds (KVLayerView::dtype): q8_0 is int8 quants with one f16 scale per
// 32 dims of a head, the scales apart.
enum class KVType : int { F32 = 0, BF16 = 1, F16 = 2, Q8_0 = 3 };
constexpr int kKVQuantGroup = 32;

// One layer of the cache: keys and values [n_blocks, block_size, Hkv, hd] of `type`, with these
// strides (elements); q8_0's scales [n_blocks, block_size, Hkv, hd / 32] with theirs.
struct DeviceCache {
  void* keys;
  void* values;
  int64_t s0, s1, s2, s3;
  KVType type = KVType::F32;
  uint16_t* key_scales = nullptr;
  uint16_t* value_scales = nullptr;
  int64_t ss0 = 0, ss1 = 0, ss2 = 0;  // scale strides; groups contiguous
};

// Rotary embedding (rotate-half, angle = f32(position) * inv_freq[i]) of up to two tensors in
// place, optionally followed by the KV store, in one launch. When `store_keys_rotated`, the keys
// stored are rotated[1] after its rotation (the thread that rotates a pair writes it to the
// cache too); otherwise keys are copied as they are.
struct RopeStoreArgs {
  float* rotated[2];  // [T, H_i, hd] each; nullptr: absent
  int64_t rot_s0[2], rot_s1[2], rot_s2[2];
  int64_t rot_heads[2];
  const int32_t* positions;  // [T] rope positions
  const float* inv_freq;     // [hd / 2]
  int64_t inv_freq_stride;

  bool store;  // write keys / values into the cache
  bool store_keys_rotated;
  const float* keys;  // [T, Hkv, hd]
  int64_t k_s0, k_s1, k_s2;
  const float* values;  // [T, Hkv, hd]
  int64_t v_s0, v_s1, v_s2;
  int64_t kv_heads;
  DeviceCache cache;
  DeviceSlots slots;

  int64_t tokens, head_dim;
};
cudaError_t launch_rope_store(const RopeStoreArgs& args, cudaStream_t stream);

// ---- attention --------------------------------------------------------------------------------

constexpr int kMaxHeadDim = 256;
constexpr int kAttentionRows = 16;  // query rows (token, head) one block takes

// Causal attention over the paged cache, flash style (online softmax over tiles of keys held in
// shared memory; no score matrix in global memory). A block takes up to 16 query rows that share
// one KV head and one sequence, and one split of the keys; with splits > 1 the partial results
// (max, sum, weighted values) go to `partial` and a second kernel combines them (split-K,
// flash-decoding). Work items: items == nullptr: one token per item (decode layout, computed
// from the block index); otherwise n_items (first token, token count) pairs of consecutive
// tokens of one sequence (prefill).
struct AttentionArgs {
  const float* queries;  // [T, Hq, hd]
  int64_t q_s0, q_s1, q_s2;
  float* out;  // [T, Hq, hd]
  int64_t o_s0, o_s1, o_s2;
  DeviceCache cache;
  DeviceSlots slots;
  const int32_t* items;  // [n_items, 2] or nullptr
  int n_items;           // work items (the token count when items == nullptr)
  int tokens, heads, kv_heads, head_dim;
  int heads_per_item;  // query heads of one KV head per block, <= 16
  int keys_per_split, splits;
  float scale;
  int window;      // > 0: a row at position p sees keys [p - window + 1, p] only (sliding window)
  float* partial;  // [T * Hq, splits, hd + 2] when splits > 1
};
cudaError_t launch_attention(const AttentionArgs& args, cudaStream_t stream);
// Dynamic shared memory the attention kernel needs for this head_dim (may exceed 48 KiB).
size_t attention_shared_bytes(int head_dim);
cudaError_t set_attention_shared_limit(size_t bytes);

// ---- matrix products --------------------------------------------------------------------------

// out = x @ weight^T (+ bias). The fast kernels want weight rows contiguous (w_col == 1), 16-byte
// aligned (w_row % 8 == 0, aligned base); the generic kernel takes any strides.
struct MatmulArgs {
  const float* x;  // [T, K]
  int64_t x_row, x_col;
  const void* weight;  // [N, K] F32 or BF16
  int64_t w_row, w_col;
  ElementType weight_type;
  float* out;  // [T, N]
  int64_t out_row, out_col;
  const float* bias;  // [N] or nullptr
  int64_t bias_stride;
  int64_t tokens, k, n;
  bool bf16_activations;  // round x to bf16 before multiplying (bf16 weights)

  // Decode fusions (gemv only):
  // x is RMS-normalised first (norm_weight != nullptr): x' = x / rms(x) * norm_weight, also
  // written to norm_out (by the first block) when that is not nullptr.
  const float* norm_weight;  // [K]
  int64_t norm_weight_stride;
  float norm_eps;
  float* norm_out;  // [T, K]
  int64_t norm_out_row, norm_out_col;
  // residual += out, after out is written (residual != nullptr).
  float* residual;  // [T, N]
  int64_t residual_row, residual_col;
  // silu_pair > 0: rows n and n + silu_pair are gate and up (n < silu_pair);
  // out[:, n] = silu(gate) * up and out[:, n + silu_pair] = up.
  int64_t silu_pair;
  int multiprocessors;  // of the GPU: the decode kernel sizes its blocks to keep every SM busy
};
constexpr int kGemvMaxTokens = 8;
cudaError_t launch_gemv(const MatmulArgs& args, cudaStream_t stream);            // T <= 8
cudaError_t launch_gemm_bf16_mma(const MatmulArgs& args, cudaStream_t stream);   // tensor cores
cudaError_t launch_gemm_f32(const MatmulArgs& args, cudaStream_t stream);        // f32 FMA tiles
cudaError_t launch_matmul_generic(const MatmulArgs& args, cudaStream_t stream);  // any strides

// ---- sampling -----------------------------------------------------------------------------------

// One row's parameters, as the host Sampler applies them after the penalties: temperature 0 is
// greedy; top_k 0 and top_p 1 and min_p 0 are off; draw in [0, 1) picks the token.
struct SampleRowParams {
  float temperature;
  int top_k;
  float top_p;
  float min_p;
  double draw;
};

// ids[r] = argmax of row r (ties: lowest id; NaN never wins; all NaN: 0).
cudaError_t launch_argmax(const float* logits, int64_t row_stride, int64_t vocab, int rows,
                          int32_t* ids, cudaStream_t stream);
// ids[r] = the token the host Sampler's stages 3-7 pick for row r with params[r]; -1 when every
// logit of the row is NaN.
cudaError_t launch_sample(const float* logits, int64_t row_stride, int64_t vocab, int rows,
                          const SampleRowParams* params, int32_t* ids, cudaStream_t stream);
// The penalties stage for one row: tokens[i] (distinct) occurred counts[i] times.
cudaError_t launch_penalties(float* logits, const int32_t* tokens, const int32_t* counts, int n,
                             float repetition, float presence, float frequency,
                             cudaStream_t stream);

}  // namespace opencamp::cuda
