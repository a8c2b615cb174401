// Causal attention over the paged KV cache, optionally over a sliding window of keys (see
// AttentionArgs in kernels.h).
//
// A block takes up to 16 query rows (token, head) sharing one KV head and one sequence: one
// token's query heads in decode, a few consecutive tokens times their heads in prefill. It walks
// the keys of its split in tiles of 32: the tile's keys and values go to shared memory once for
// all 16 rows; lane j of a warp scores key j, the warp keeps the online-softmax state (max, sum,
// weighted values with head_dim / 32 values per lane) of its 4 rows. No score matrix is stored.
// With several splits each block writes (max, sum, values) and attention_combine_kernel merges
// them: long contexts spread over many blocks even for a single decoded token.
#include "kernels/common.cuh"

namespace opencamp::cuda {
namespace {

constexpr int kKeysPerTile = 32;
constexpr int kRowsPerWarp = 4;
constexpr int kAttentionThreads = kAttentionRows / kRowsPerWarp * 32;  // 128
constexpr int kValuesPerLane = kMaxHeadDim / 32;

__global__ void __launch_bounds__(kAttentionThreads) attention_kernel(AttentionArgs a) {
  extern __shared__ float shared[];
  const int hd = a.head_dim, tile_stride = hd + 1;  // +1: lane j reads row j conflict-free
  float* query_tile = shared;                              // [16][hd]
  float* key_tile = query_tile + kAttentionRows * hd;      // [32][hd + 1]
  float* value_tile = key_tile + kKeysPerTile * tile_stride;  // [32][hd + 1]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Which rows: work item, KV head, chunk of that KV head's query heads.
  const int group = a.heads / a.kv_heads;
  const int head_chunks = (group + a.heads_per_item - 1) / a.heads_per_item;
  const int per_item = a.kv_heads * head_chunks;
  const int item = blockIdx.x / per_item, rest = blockIdx.x % per_item;
  const int kv_head = rest / head_chunks;
  const int first_head = kv_head * group + (rest % head_chunks) * a.heads_per_item;
  const int n_heads = min(a.heads_per_item, (kv_head + 1) * group - first_head);
  int first_token = item, n_tokens = 1;
  if (a.items != nullptr) {
    first_token = a.items[2 * item];
    n_tokens = a.items[2 * item + 1];
  }
  const int n_rows = min(n_tokens * n_heads, kAttentionRows);

  int max_position = 0;
  for (int t = first_token; t < first_token + n_tokens; ++t) max_position = max(max_position, a.slots.positions[t]);
  const int key_begin = blockIdx.y * a.keys_per_split;
  const int key_end = min(max_position + 1, key_begin + a.keys_per_split);
  const int32_t* table = a.slots.tables + a.slots.table_offsets[first_token];

  for (int i = threadIdx.x; i < kAttentionRows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    float q = 0.0f;
    if (r < n_rows) {
      const int64_t t = first_token + r / n_heads, h = first_head + r % n_heads;
      q = a.queries[t * a.q_s0 + h * a.q_s1 + d * a.q_s2];
    }
    query_tile[i] = q;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kValuesPerLane];
  int row_position[kRowsPerWarp], row_first[kRowsPerWarp];  // keys [row_first, row_position]
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    row_position[i] = r < n_rows ? a.slots.positions[first_token + r / n_heads] : -1;
    row_first[i] = a.window > 0 ? max(0, row_position[i] - a.window + 1) : 0;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kValuesPerLane; ++c) acc[i][c] = 0.0f;
  }

  for (int tile = key_begin; tile < key_end; tile += kKeysPerTile) {
    __syncthreads();  // the previous tile is consumed (and the queries are in place)
    for (int i = threadIdx.x; i < kKeysPerTile * hd; i += blockDim.x) {
      const int j = i / hd, d = i % hd, key = tile + j;
      float k = 0.0f, v = 0.0f;
      const int64_t block = key < key_end ? table[key / a.slots.block_size] : kReleasedBlock;
      if (block != kReleasedBlock) {  // released blocks lie before every row's window
        const int64_t slot = key % a.slots.block_size;
        const int64_t at = block * a.cache.s0 + slot * a.cache.s1 + kv_head * a.cache.s2 + d * a.cache.s3;
        const int64_t scale_at = block * a.cache.ss0 + slot * a.cache.ss1 + kv_head * a.cache.ss2 + d / kKVQuantGroup;
        k = load_kv(a.cache, a.cache.keys, a.cache.key_scales, at, scale_at);  // the stored type, in the tile as f32
        v = load_kv(a.cache, a.cache.values, a.cache.value_scales, at, scale_at);
      }
      key_tile[j * tile_stride + d] = k;
      value_tile[j * tile_stride + d] = v;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (row_position[i] < 0) continue;  // the same for the whole warp
      const int r = warp * kRowsPerWarp + i, key = tile + lane;
      const bool visible = key < key_end && key <= row_position[i] && key >= row_first[i];
      float score = -INFINITY;
      if (visible) {
        const float* q = query_tile + r * hd;
        const float* k = key_tile + lane * tile_stride;
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot += q[d] * k[d];
        score = dot * a.scale;
      }
      const float new_max = fmaxf(m[i], warp_max(score));
      if (new_max == -INFINITY) continue;  // no visible key yet
      const float p = visible ? expf(score - new_max) : 0.0f;
      const float rescale = expf(m[i] - new_max);  // 0 while m is still -inf
      l[i] = l[i] * rescale + warp_sum(p);
#pragma unroll
      for (int c = 0; c < kValuesPerLane; ++c) acc[i][c] *= rescale;
      for (int j = 0; j < kKeysPerTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
        if (pj == 0.0f) continue;
        const float* v = value_tile + j * tile_stride;
#pragma unroll
        for (int c = 0; c < kValuesPerLane; ++c) {
          const int d = lane + 32 * c;
          if (d < hd) acc[i][c] += pj * v[d];
        }
      }
      m[i] = new_max;
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    if (row_position[i] < 0) continue;
    const int r = warp * kRowsPerWarp + i;
    const int64_t t = first_token + r / n_heads, h = first_head + r % n_heads;
    if (a.splits == 1) {  // the one split holds the row's own key: l > 0
      const float inverse = 1.0f / l[i];
#pragma unroll
      for (int c = 0; c < kValuesPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) a.out[t * a.o_s0 + h * a.o_s1 + d * a.o_s2] = acc[i][c] * inverse;
      }
    } else {
      float* partial = a.partial + ((t * a.heads + h) * a.splits + blockIdx.y) * (hd + 2);
      if (lane == 0) {
        partial[0] = m[i];
        partial[1] = l[i];
      }
#pragma unroll
      for (int c = 0; c < kValuesPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) partial[2 + d] = acc[i][c];
      }
    }
  }
}

// One block per (token, head): merges the splits' (max, sum, values).
__global__ void attention_combine_kernel(AttentionArgs a) {
  const int64_t row = blockIdx.x, t = row / a.heads, h = row % a.heads;
  const int hd = a.head_dim, stride = hd + 2;
  const float* partial = a.partial + row * a.splits * stride;
  float max_score = -INFINITY;
  for (int s = 0; s < a.splits; ++s) max_score = fmaxf(max_score, partial[s * stride]);
  float total = 0.0f;
  for (int s = 0; s < a.splits; ++s) {
    const float m = partial[s * stride];
    if (m != -INFINITY) total += partial[s * stride + 1] * expf(m - max_score);
  }
  const float inverse = 1.0f / total;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float m = partial[s * stride];
      if (m != -INFINITY) sum += partial[s * stride + 2 + d] * expf(m - max_score);
    }
    a.out[t * a.o_s0 + h * a.o_s1 + d * a.o_s2] = sum * inverse;
  }
}

}  // namespace

size_t attention_shared_bytes(int head_dim) {
  return sizeof(float) * (static_cast<size_t>(kAttentionRows) * head_dim +
                          2 * static_cast<size_t>(kKeysPerTile) * (head_dim + 1));
}

cudaError_t set_attention_shared_limit(size_t bytes) {
  return cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

cudaError_t launch_attention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.head_dim < 1 || args.head_dim > kMaxHeadDim || args.heads_per_item < 1 ||
      args.heads_per_item > kAttentionRows || args.splits < 1 || args.kv_heads < 1 ||
      args.heads % args.kv_heads != 0 || (args.splits > 1 && args.partial == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.n_items == 0) return cudaSuccess;
  const int group = args.heads / args.kv_heads;
  const int64_t blocks = static_cast<int64_t>(args.n_items) * args.kv_heads *
                         ((group + args.heads_per_item - 1) / args.heads_per_item);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(args.splits));
  attention_kernel<<<grid, kAttentionThreads, attention_shared_bytes(args.head_dim), stream>>>(args);
  if (args.splits > 1) {
    attention_combine_kernel<<<static_cast<unsigned>(static_cast<int64_t>(args.tokens) * args.heads), 64, 0,
                               stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace opencamp::cuda
