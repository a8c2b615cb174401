// Memory-bound kernels: embedding rows, RMSNorm, residual add, SiLU / GELU * up, scale, and rope fused with
// the KV-cache store. Each honours the strides it is given, as the cpu oracle does.
#include "kernels/common.cuh"

namespace opencamp::cuda {
namespace {

// One block per token: out[t, :] = table[ids[t], :].
__global__ void embedding_kernel(EmbeddingArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(a.ids[t]) * a.table_row;
  for (int64_t d = threadIdx.x; d < a.dim; d += blockDim.x) {
    a.out[t * a.out_row + d * a.out_col] = load_element(a.table, a.table_type, row + d * a.table_col);
  }
}

// One warp per (row, head): the sum of squares, then the scaled row. The sum is taken in the
// same order as the decode matmul's fused norm (lanes stride 32, then a butterfly), so fused and
// separate norms give identical bits.
__global__ void rmsnorm_kernel(RmsNormArgs a) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= a.rows * a.heads) return;
  const int64_t r = item / a.heads, h = item % a.heads;
  const float* in = a.x + r * a.x_s0 + h * a.x_s1;
  float* result = a.out + r * a.out_s0 + h * a.out_s1;
  float sum_squares = 0.0f;
  for (int64_t d = lane; d < a.dim; d += 32) {
    const float v = in[d * a.x_s2];
    sum_squares += v * v;
  }
  sum_squares = warp_sum(sum_squares);  // every lane has read its values before any writes
  const float inverse_rms = 1.0f / sqrtf(sum_squares / static_cast<float>(a.dim) + a.eps);
  for (int64_t d = lane; d < a.dim; d += 32) {
    result[d * a.out_s2] = in[d * a.x_s2] * inverse_rms * a.weight[d * a.weight_stride];
  }
}

__global__ void add_kernel(ElementwiseArgs a) {
  const int64_t total = a.rows * a.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.cols, c = i % a.cols;
    a.out[r * a.out_row + c * a.out_col] = a.a[r * a.a_row + c * a.a_col] + a.b[r * a.b_row + c * a.b_col];
  }
}

__global__ void silu_mul_kernel(ElementwiseArgs a) {
  const int64_t total = a.rows * a.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.cols, c = i % a.cols;
    const float g = a.a[r * a.a_row + c * a.a_col];
    a.out[r * a.out_row + c * a.out_col] = g / (1.0f + expf(-g)) * a.b[r * a.b_row + c * a.b_col];
  }
}

__global__ void gelu_tanh_mul_kernel(ElementwiseArgs a) {
  const int64_t total = a.rows * a.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.cols, c = i % a.cols;
    const float g = a.a[r * a.a_row + c * a.a_col];
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    a.out[r * a.out_row + c * a.out_col] = 0.5f * g * (1.0f + tanhf(inner)) * a.b[r * a.b_row + c * a.b_col];
  }
}

__global__ void scale_kernel(ElementwiseArgs a, float factor) {
  const int64_t total = a.rows * a.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.cols, c = i % a.cols;
    a.out[r * a.out_row + c * a.out_col] = a.a[r * a.a_row + c * a.a_col] * factor;
  }
}

// Element offset of (token t, kv head h, dim d) in the cache.
__device__ __forceinline__ int64_t cache_offset(const DeviceCache& cache, const DeviceSlots& slots,
                                                int64_t t, int64_t h, int64_t d) {
  const int32_t position = slots.positions[t];
  const int64_t block = slots.tables[slots.table_offsets[t] + position / slots.block_size];
  return block * cache.s0 + (position % slots.block_size) * cache.s1 + h * cache.s2 + d * cache.s3;
}

// One block per token: rotate up to two tensors, then store keys and values.
__global__ void rope_store_kernel(RopeStoreArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t half = a.head_dim / 2;
  if (a.positions != nullptr) {
    const float position = static_cast<float>(a.positions[t]);
    for (int s = 0; s < 2; ++s) {
      if (a.rotated[s] == nullptr) continue;
      float* base = a.rotated[s] + t * a.rot_s0[s];
      // q8_0 stores whole groups after the rotation: the keys are read back below.
      const bool also_store = a.store && a.store_keys_rotated && s == 1 && a.cache.type != KVType::Q8_0;
      for (int64_t item = threadIdx.x; item < a.rot_heads[s] * half; item += blockDim.x) {
        const int64_t h = item / half, i = item % half;
        // f32 angle, as transformers and the cpu oracle compute it.
        const float angle = position * a.inv_freq[i * a.inv_freq_stride];
        const float c = cosf(angle), sn = sinf(angle);
        float* first = base + h * a.rot_s1[s] + i * a.rot_s2[s];
        float* second = base + h * a.rot_s1[s] + (i + half) * a.rot_s2[s];
        const float x0 = *first, x1 = *second;
        const float y0 = x0 * c - x1 * sn, y1 = x1 * c + x0 * sn;
        *first = y0;
        *second = y1;
        if (also_store) {
          store_kv(a.cache, a.cache.keys, cache_offset(a.cache, a.slots, t, h, i), y0);
          store_kv(a.cache, a.cache.keys, cache_offset(a.cache, a.slots, t, h, i + half), y1);
        }
      }
    }
  }
  if (!a.store) return;
  __syncthreads();  // values (or unrotated keys) are read after every rotation, as in sequence
  if (a.cache.type == KVType::Q8_0) {  // one thread per 32-dim group of a head's keys or values
    const int64_t groups = a.head_dim / kKVQuantGroup;
    for (int64_t item = threadIdx.x; item < 2 * a.kv_heads * groups; item += blockDim.x) {
      const bool is_key = item < a.kv_heads * groups;
      const int64_t h = (item % (a.kv_heads * groups)) / groups, g = item % groups;
      const int64_t at = cache_offset(a.cache, a.slots, t, h, g * kKVQuantGroup);
      const int32_t position = a.slots.positions[t];
      const int64_t block = a.slots.tables[a.slots.table_offsets[t] + position / a.slots.block_size];
      const int64_t scale_at = block * a.cache.ss0 + (position % a.slots.block_size) * a.cache.ss1 + h * a.cache.ss2 + g;
      const float* x = is_key ? a.keys + t * a.k_s0 + h * a.k_s1 + g * kKVQuantGroup * a.k_s2
                              : a.values + t * a.v_s0 + h * a.v_s1 + g * kKVQuantGroup * a.v_s2;
      store_kv_group(static_cast<int8_t*>(is_key ? a.cache.keys : a.cache.values), at, a.cache.s3,
                     (is_key ? a.cache.key_scales : a.cache.value_scales) + scale_at, x, is_key ? a.k_s2 : a.v_s2);
    }
    return;
  }
  for (int64_t item = threadIdx.x; item < a.kv_heads * a.head_dim; item += blockDim.x) {
    const int64_t h = item / a.head_dim, d = item % a.head_dim;
    const int64_t at = cache_offset(a.cache, a.slots, t, h, d);
    if (!a.store_keys_rotated) store_kv(a.cache, a.cache.keys, at, a.keys[t * a.k_s0 + h * a.k_s1 + d * a.k_s2]);
    store_kv(a.cache, a.cache.values, at, a.values[t * a.v_s0 + h * a.v_s1 + d * a.v_s2]);
  }
}

}  // namespace

cudaError_t launch_embedding(const EmbeddingArgs& args, cudaStream_t stream) {
  if (args.tokens > 0) embedding_kernel<<<static_cast<unsigned>(args.tokens), 256, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_rmsnorm(const RmsNormArgs& args, cudaStream_t stream) {
  const int64_t items = args.rows * args.heads;  // four per block of 128 threads
  if (items > 0) rmsnorm_kernel<<<static_cast<unsigned>((items + 3) / 4), 128, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_add(const ElementwiseArgs& args, cudaStream_t stream) {
  if (args.rows * args.cols > 0) {
    add_kernel<<<blocks_for(args.rows * args.cols, 256, 4096), 256, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

cudaError_t launch_silu_mul(const ElementwiseArgs& args, cudaStream_t stream) {
  if (args.rows * args.cols > 0) {
    silu_mul_kernel<<<blocks_for(args.rows * args.cols, 256, 4096), 256, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

cudaError_t launch_gelu_tanh_mul(const ElementwiseArgs& args, cudaStream_t stream) {
  if (args.rows * args.cols > 0) {
    gelu_tanh_mul_kernel<<<blocks_for(args.rows * args.cols, 256, 4096), 256, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

cudaError_t launch_scale(const ElementwiseArgs& args, float factor, cudaStream_t stream) {
  if (args.rows * args.cols > 0) {
    scale_kernel<<<blocks_for(args.rows * args.cols, 256, 4096), 256, 0, stream>>>(args, factor);
  }
  return cudaGetLastError();
}

cudaError_t launch_rope_store(const RopeStoreArgs& args, cudaStream_t stream) {
  if (args.tokens > 0) rope_store_kernel<<<static_cast<unsigned>(args.tokens), 128, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace opencamp::cuda
