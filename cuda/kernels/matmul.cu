// Matrix products out = x @ weight^T (+ bias), weights [N, K] row-major as PyTorch stores them.
//
//   gemv            T <= 8 (decode): bandwidth bound; each warp streams two weight rows with
//                   16-byte loads, the block shares x (staged in shared memory, normalised and
//                   rounded once) across its 16 rows. Optional fusions: RMSNorm of x, residual
//                   add, SiLU(gate) * up over paired rows.
//   gemm_bf16_mma   T > 8 with bf16 weights: tensor cores (mma.sync m16n8k16, f32 accumulate),
//                   64 x 64 tiles, activations rounded to bf16 as they are staged.
//   gemm_f32        T > 8 with f32 weights: f32 FMA tiles (tensor cores would round to tf32).
//   generic         any strides, one thread per output; the fallback for unusual layouts.
#include "kernels/common.cuh"

namespace opencamp::cuda {
namespace {

__host__ __device__ __forceinline__ int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// ---- gemv ---------------------------------------------------------------------------------

constexpr int kGemvMaxThreads = 256;  // 8 warps; fewer when that leaves SMs idle
constexpr int kGemvChunk = 1024;      // activations per token staged in shared memory at a time

// Eight consecutive weights (16- or 32-byte aligned) as floats.
__device__ __forceinline__ void load8(const float* w, float out[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(w);
  const float4 hi = *reinterpret_cast<const float4*>(w + 4);
  out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
  out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
}
__device__ __forceinline__ void load8(const uint16_t* w, float out[8]) {
  const uint4 packed = *reinterpret_cast<const uint4*>(w);
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

template <class Weight, int kTokens>
__global__ void __launch_bounds__(kGemvMaxThreads) gemv_kernel(MatmulArgs a) {
  __shared__ __align__(16) float xs[kTokens][kGemvChunk];
  __shared__ float inverse_rms[kTokens];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t tokens = a.tokens;
  const Weight* weight = static_cast<const Weight*>(a.weight);

  // This warp's two rows: consecutive ones, or a gate row and its up row.
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * warps + warp;
  int64_t row[2];
  bool valid[2];
  if (a.silu_pair > 0) {
    row[0] = warp_id;
    row[1] = warp_id + a.silu_pair;
    valid[0] = valid[1] = warp_id < a.silu_pair;
  } else {
    row[0] = 2 * warp_id;
    row[1] = 2 * warp_id + 1;
    valid[0] = row[0] < a.n;
    valid[1] = row[1] < a.n;
  }

  if (a.norm_weight != nullptr) {  // every block computes the same 1 / rms per token
    for (int64_t t = warp; t < tokens; t += warps) {
      float sum_squares = 0.0f;
      for (int64_t k = lane; k < a.k; k += 32) {
        const float v = a.x[t * a.x_row + k * a.x_col];
        sum_squares += v * v;
      }
      sum_squares = warp_sum(sum_squares);
      if (lane == 0) inverse_rms[t] = 1.0f / sqrtf(sum_squares / static_cast<float>(a.k) + a.norm_eps);
    }
    __syncthreads();
    if (a.norm_out != nullptr && blockIdx.x == 0) {  // the normalised x, as rmsnorm would leave it
      for (int64_t i = threadIdx.x; i < tokens * a.k; i += blockDim.x) {
        const int64_t t = i / a.k, k = i % a.k;
        a.norm_out[t * a.norm_out_row + k * a.norm_out_col] =
            a.x[t * a.x_row + k * a.x_col] * inverse_rms[t] * a.norm_weight[k * a.norm_weight_stride];
      }
    }
  }

  const int64_t k_groups_end = round_up(a.k, 8);  // weights are read 8 at a time
  float acc[2][kTokens];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[r][t] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < a.k; k0 += kGemvChunk) {
    // Only what the weight groups read: through K rounded up to 8 (zeros past K).
    const int chunk_end = static_cast<int>(min(k_groups_end - k0, static_cast<int64_t>(kGemvChunk)));
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < kTokens * chunk_end; i += blockDim.x) {
      const int t = i / chunk_end, kk = i % chunk_end;
      const int64_t k = k0 + kk;
      float v = 0.0f;
      if (t < tokens && k < a.k) {
        v = a.x[t * a.x_row + k * a.x_col];
        if (a.norm_weight != nullptr) v = v * inverse_rms[t] * a.norm_weight[k * a.norm_weight_stride];
        if (a.bf16_activations) v = round_to_bf16(v);
      }
      xs[t][kk] = v;
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = lane * 8; kk < chunk_end; kk += 256) {
      float w[2][8];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (valid[r]) {
          load8(weight + row[r] * a.w_row + k0 + kk, w[r]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) w[r][e] = 0.0f;
        }
      }
      if (k0 + kk + 8 > a.k) {  // the row's last group: padding need not be zero
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (k0 + kk + e >= a.k) w[0][e] = w[1][e] = 0.0f;
        }
      }
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        const float4 x0 = *reinterpret_cast<const float4*>(&xs[t][kk]);
        const float4 x1 = *reinterpret_cast<const float4*>(&xs[t][kk + 4]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float sum = acc[r][t];
          sum += w[r][0] * x0.x;
          sum += w[r][1] * x0.y;
          sum += w[r][2] * x0.z;
          sum += w[r][3] * x0.w;
          sum += w[r][4] * x1.x;
          sum += w[r][5] * x1.y;
          sum += w[r][6] * x1.z;
          sum += w[r][7] * x1.w;
          acc[r][t] = sum;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int t = 0; t < kTokens; ++t) acc[r][t] = warp_sum(acc[r][t]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (t >= tokens) break;
    float v[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      v[r] = acc[r][t];
      if (valid[r] && a.bias != nullptr) v[r] += a.bias[row[r] * a.bias_stride];
    }
    if (a.silu_pair > 0) {
      if (!valid[0]) continue;
      const float gate = v[0], up = v[1];
      a.out[t * a.out_row + row[0] * a.out_col] = gate / (1.0f + expf(-gate)) * up;
      a.out[t * a.out_row + row[1] * a.out_col] = up;
      continue;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!valid[r]) continue;
      a.out[t * a.out_row + row[r] * a.out_col] = v[r];
      if (a.residual != nullptr) {
        float& target = a.residual[t * a.residual_row + row[r] * a.residual_col];
        target = target + v[r];
      }
    }
  }
}

template <class Weight>
cudaError_t launch_gemv_typed(const MatmulArgs& a, cudaStream_t stream) {
  const int64_t warps = a.silu_pair > 0 ? a.silu_pair : (a.n + 1) / 2;  // two rows per warp
  // Smaller blocks for small matrices, so that every SM streams some rows (memory parallelism).
  int threads = kGemvMaxThreads;
  while (threads > 64 && (warps * 32 + threads - 1) / threads < 2 * static_cast<int64_t>(a.multiprocessors)) {
    threads /= 2;
  }
  const int warps_per_block = threads / 32;
  const unsigned blocks = static_cast<unsigned>((warps + warps_per_block - 1) / warps_per_block);
  if (a.tokens <= 1) {
    gemv_kernel<Weight, 1><<<blocks, threads, 0, stream>>>(a);
  } else if (a.tokens <= 2) {
    gemv_kernel<Weight, 2><<<blocks, threads, 0, stream>>>(a);
  } else if (a.tokens <= 4) {
    gemv_kernel<Weight, 4><<<blocks, threads, 0, stream>>>(a);
  } else {
    gemv_kernel<Weight, 8><<<blocks, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// ---- bf16 tensor-core gemm ------------------------------------------------------------------

constexpr int kMmaTileM = 64;  // tokens
constexpr int kMmaTileN = 64;  // output features
constexpr int kMmaTileK = 32;
constexpr int kMmaPad = 8;  // bf16 per shared row: 40 (80 bytes) keeps fragment loads conflict-free
constexpr int kMmaThreads = 128;  // 2 x 2 warps of 32 x 32 outputs

__device__ __forceinline__ uint16_t bf16_bits(float value) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(value));
}

__device__ __forceinline__ void mma_bf16_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma needs sm_80; the backend refuses older GPUs before any launch
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__global__ void __launch_bounds__(kMmaThreads) gemm_bf16_mma_kernel(MatmulArgs a) {
  __shared__ __align__(16) uint16_t tile_x[kMmaTileM][kMmaTileK + kMmaPad];
  __shared__ __align__(16) uint16_t tile_w[kMmaTileN][kMmaTileK + kMmaPad];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, thread_in_group = lane % 4;  // the PTX fragment coordinates
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMmaTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmaTileN;
  const uint16_t* weight = static_cast<const uint16_t*>(a.weight);
  const int64_t k_groups_end = round_up(a.k, 8);

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
    }
  }

  // The next tile waits in registers while the current one is multiplied.
  float x_regs[kMmaTileM * kMmaTileK / kMmaThreads];  // 16
  uint4 w_regs[kMmaTileN * kMmaTileK / 8 / kMmaThreads];  // 2
  auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int e = tid + kMmaThreads * i;
      const int64_t m = m0 + e / kMmaTileK, k = k0 + e % kMmaTileK;
      x_regs[i] = (m < a.tokens && k < a.k) ? a.x[m * a.x_row + k * a.x_col] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + kMmaThreads * i;
      const int64_t n = n0 + v / 4, k = k0 + (v % 4) * 8;
      uint4 packed = make_uint4(0, 0, 0, 0);
      if (n < a.n && k < k_groups_end) {
        packed = *reinterpret_cast<const uint4*>(weight + n * a.w_row + k);
        if (k + 8 > a.k) {  // zero the columns past K (padding need not be zero)
          uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (k + e >= a.k) words[e / 2] &= (e % 2) ? 0x0000ffffu : 0xffff0000u;
          }
          packed = make_uint4(words[0], words[1], words[2], words[3]);
        }
      }
      w_regs[i] = packed;
    }
  };
  auto store_tile = [&]() {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int e = tid + kMmaThreads * i;
      tile_x[e / kMmaTileK][e % kMmaTileK] = bf16_bits(x_regs[i]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + kMmaThreads * i;
      *reinterpret_cast<uint4*>(&tile_w[v / 4][(v % 4) * 8]) = w_regs[i];
    }
  };

  load_tile(0);
  for (int64_t k0 = 0; k0 < a.k; k0 += kMmaTileK) {
    __syncthreads();  // the previous tile is consumed
    store_tile();
    __syncthreads();
    if (k0 + kMmaTileK < a.k) load_tile(k0 + kMmaTileK);
#pragma unroll
    for (int kk = 0; kk < kMmaTileK; kk += 16) {
      uint32_t frag_a[2][4], frag_b[4][2];
      const int col = kk + 2 * thread_in_group;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = warp_m * 32 + mi * 16 + group;
        frag_a[mi][0] = *reinterpret_cast<const uint32_t*>(&tile_x[r][col]);
        frag_a[mi][1] = *reinterpret_cast<const uint32_t*>(&tile_x[r + 8][col]);
        frag_a[mi][2] = *reinterpret_cast<const uint32_t*>(&tile_x[r][col + 8]);
        frag_a[mi][3] = *reinterpret_cast<const uint32_t*>(&tile_x[r + 8][col + 8]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int n = warp_n * 32 + ni * 8 + group;
        frag_b[ni][0] = *reinterpret_cast<const uint32_t*>(&tile_w[n][col]);
        frag_b[ni][1] = *reinterpret_cast<const uint32_t*>(&tile_w[n][col + 8]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_bf16_16x8x16(acc[mi][ni], frag_a[mi], frag_b[ni]);
      }
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t m = m0 + warp_m * 32 + mi * 16 + group + (c / 2) * 8;
        const int64_t n = n0 + warp_n * 32 + ni * 8 + 2 * thread_in_group + c % 2;
        if (m < a.tokens && n < a.n) {
          const float bias = a.bias != nullptr ? a.bias[n * a.bias_stride] : 0.0f;
          a.out[m * a.out_row + n * a.out_col] = acc[mi][ni][c] + bias;
        }
      }
    }
  }
}

// ---- f32 gemm -------------------------------------------------------------------------------

constexpr int kF32Tile = 64;
constexpr int kF32TileK = 16;
constexpr int kF32Threads = 256;  // 16 x 16 threads, 4 x 4 outputs each

__global__ void __launch_bounds__(kF32Threads) gemm_f32_kernel(MatmulArgs a) {
  __shared__ float tile_x[kF32TileK][kF32Tile + 1];
  __shared__ float tile_w[kF32TileK][kF32Tile + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kF32Tile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kF32Tile;
  const float* weight = static_cast<const float*>(a.weight);
  float acc[4][4] = {};
  float x_regs[4], w_regs[4];
  auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + kF32Threads * i;
      const int64_t row = e / kF32TileK, k = k0 + e % kF32TileK;
      x_regs[i] = (m0 + row < a.tokens && k < a.k) ? a.x[(m0 + row) * a.x_row + k * a.x_col] : 0.0f;
      w_regs[i] = (n0 + row < a.n && k < a.k) ? weight[(n0 + row) * a.w_row + k * a.w_col] : 0.0f;
    }
  };
  load_tile(0);
  for (int64_t k0 = 0; k0 < a.k; k0 += kF32TileK) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + kF32Threads * i;
      tile_x[e % kF32TileK][e / kF32TileK] = x_regs[i];
      tile_w[e % kF32TileK][e / kF32TileK] = w_regs[i];
    }
    __syncthreads();
    if (k0 + kF32TileK < a.k) load_tile(k0 + kF32TileK);
#pragma unroll
    for (int kk = 0; kk < kF32TileK; ++kk) {
      float xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xv[i] = tile_x[kk][ty + 16 * i];
        wv[i] = tile_w[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * wv[j];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (m < a.tokens && n < a.n) {
        const float bias = a.bias != nullptr ? a.bias[n * a.bias_stride] : 0.0f;
        a.out[m * a.out_row + n * a.out_col] = acc[i][j] + bias;
      }
    }
  }
}

// ---- generic --------------------------------------------------------------------------------

__global__ void matmul_generic_kernel(MatmulArgs a) {
  const int64_t total = a.tokens * a.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / a.n, n = i % a.n;
    float sum = 0.0f;
    for (int64_t k = 0; k < a.k; ++k) {
      float x = a.x[t * a.x_row + k * a.x_col];
      if (a.bf16_activations) x = round_to_bf16(x);
      sum += x * load_element(a.weight, a.weight_type, n * a.w_row + k * a.w_col);
    }
    if (a.bias != nullptr) sum += a.bias[n * a.bias_stride];
    a.out[t * a.out_row + n * a.out_col] = sum;
  }
}

}  // namespace

cudaError_t launch_gemv(const MatmulArgs& args, cudaStream_t stream) {
  if (args.tokens < 1 || args.tokens > kGemvMaxTokens) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  return args.weight_type == ElementType::BF16 ? launch_gemv_typed<uint16_t>(args, stream)
                                               : launch_gemv_typed<float>(args, stream);
}

cudaError_t launch_gemm_bf16_mma(const MatmulArgs& args, cudaStream_t stream) {
  if (args.weight_type != ElementType::BF16) return cudaErrorInvalidValue;
  if (args.tokens == 0 || args.n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((args.n + kMmaTileN - 1) / kMmaTileN),
                  static_cast<unsigned>((args.tokens + kMmaTileM - 1) / kMmaTileM));
  gemm_bf16_mma_kernel<<<grid, kMmaThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_gemm_f32(const MatmulArgs& args, cudaStream_t stream) {
  if (args.weight_type != ElementType::F32) return cudaErrorInvalidValue;
  if (args.tokens == 0 || args.n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((args.n + kF32Tile - 1) / kF32Tile),
                  static_cast<unsigned>((args.tokens + kF32Tile - 1) / kF32Tile));
  gemm_f32_kernel<<<grid, kF32Threads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_matmul_generic(const MatmulArgs& args, cudaStream_t stream) {
  if (args.tokens * args.n == 0) return cudaSuccess;
  matmul_generic_kernel<<<blocks_for(args.tokens * args.n, 256, 8192), 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace opencamp::cuda
