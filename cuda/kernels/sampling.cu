// Token selection on the GPU, so only a token id crosses to the host. One block per row.
//
// The host Sampler sorts candidates by (logit descending, id ascending) and walks that order.
// Here the same order is a 64-bit key (the logit's order-preserving bits, then the inverted id),
// and each "walk the sorted list until ..." becomes a radix select over the keys: eight 8-bit
// digits from the top, a histogram per digit of the weight (count or probability) of the
// candidates under the prefix chosen so far, stopping as soon as one candidate is left. No sort
// of the vocabulary and no score copy to the host; probabilities are computed as the host
// computes them (f32 exp, f64 sums), so the same draw picks the same token except where two
// sums differ in their last bits right at the draw.
#include <climits>

#include "kernels/common.cuh"

namespace opencamp::cuda {
namespace {

constexpr int kSampleThreads = 1024;
constexpr int kWarps = kSampleThreads / 32;

__device__ __forceinline__ uint64_t order_key(float logit, int64_t id) {
  if (logit == 0.0f) logit = 0.0f;  // -0 and +0 compare equal on the host: the id decides
  uint32_t bits = __float_as_uint(logit);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

__device__ __forceinline__ int32_t key_id(uint64_t key) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu));
}

struct Shared {
  double mass[256];
  unsigned count[256];
  int chosen;
  unsigned long long best_key;
  double partial_double[kWarps];
  float partial_float[kWarps];
  unsigned partial_count[kWarps];
  int partial_index[kWarps];
};

__device__ double block_sum_double(double value, Shared& sh) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.partial_double[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += sh.partial_double[w];  // same order in every thread
  return total;
}

__device__ float block_max_float(float value, Shared& sh) {
  value = warp_max(value);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.partial_float[threadIdx.x / 32] = value;
  __syncthreads();
  float result = -INFINITY;
  for (int w = 0; w < kWarps; ++w) result = fmaxf(result, sh.partial_float[w]);
  return result;
}

__device__ unsigned block_sum_count(unsigned value, Shared& sh) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.partial_count[threadIdx.x / 32] = value;
  __syncthreads();
  unsigned total = 0;
  for (int w = 0; w < kWarps; ++w) total += sh.partial_count[w];
  return total;
}

// The host's argmax: the first (lowest id) of the highest logits; NaN never wins; 0 if none wins.
__device__ int32_t block_argmax(const float* row, int64_t vocab, Shared& sh) {
  float best = -INFINITY;
  int index = INT_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    if (row[i] > best) {  // ids ascend within a thread: the first of equals stays
      best = row[i];
      index = static_cast<int>(i);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, best, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other > best || (other == best && other_index < index)) {
      best = other;
      index = other_index;
    }
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    sh.partial_float[threadIdx.x / 32] = best;
    sh.partial_index[threadIdx.x / 32] = index;
  }
  __syncthreads();
  best = -INFINITY;
  index = INT_MAX;
  for (int w = 0; w < kWarps; ++w) {
    const float other = sh.partial_float[w];
    const int other_index = sh.partial_index[w];
    if (other > best || (other == best && other_index < index)) {
      best = other;
      index = other_index;
    }
  }
  return index == INT_MAX ? 0 : index;
}

// Which tokens are still candidates, and their probabilities as the host computes them.
struct Candidates {
  uint64_t min_key = 0;          // the top-k / top-p cut: lower keys are out
  float max_logit = 0.0f;        // the first candidate's logit
  double total_t1 = 1.0;         // softmax denominator at temperature 1 over the top-k set
  float min_probability = 0.0f;  // > 0: the min-p threshold on the temperature-1 probability
  float temperature = 1.0f;
  double total_t = 1.0;          // softmax denominator at `temperature` over the survivors

  __device__ float probability_t1(float logit) const {
    return static_cast<float>(static_cast<double>(expf(logit - max_logit)) / total_t1);
  }
  __device__ float probability_t(float logit) const {
    return static_cast<float>(static_cast<double>(expf((logit - max_logit) / temperature)) / total_t);
  }
  __device__ bool contains(float logit, uint64_t key) const {
    if (isnan(logit) || key < min_key) return false;
    return min_probability <= 0.0f || probability_t1(logit) >= min_probability;
  }
};

enum class Weight { Count, ProbabilityT1, ProbabilityT };

__device__ __forceinline__ double weight_of(Weight weight, const Candidates& c, float logit) {
  switch (weight) {
    case Weight::Count: return 1.0;
    case Weight::ProbabilityT1: return c.probability_t1(logit);
    case Weight::ProbabilityT: return c.probability_t(logit);
  }
  return 0.0;
}

// The largest key whose candidates at or above it (in sorted order: the prefix up to it) weigh
// at least `threshold` (strict: more than). False when even all candidates weigh less.
__device__ bool select_key(const float* row, int64_t vocab, const Candidates& c, Weight weight,
                           double threshold, bool strict, Shared& sh, uint64_t* result) {
  uint64_t prefix = 0, mask = 0;
  double before = 0.0;  // thread 0: the weight of candidates sorted before the prefix's range
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh.mass[b] = 0.0;
      sh.count[b] = 0;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float logit = row[i];
      const uint64_t key = order_key(logit, i);
      if ((key & mask) != prefix || !c.contains(logit, key)) continue;
      const int bin = static_cast<int>((key >> shift) & 0xff);
      atomicAdd(&sh.mass[bin], weight_of(weight, c, logit));
      atomicAdd(&sh.count[bin], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1;
      for (int b = 255; b >= 0; --b) {
        if (sh.count[b] == 0) continue;
        const double reached = before + sh.mass[b];
        if (strict ? reached > threshold : reached >= threshold) {
          chosen = b;
          break;
        }
        before = reached;
      }
      sh.chosen = chosen;
    }
    __syncthreads();
    const int chosen = sh.chosen;
    if (chosen < 0) return false;  // the same answer in every thread
    prefix |= static_cast<uint64_t>(chosen) << shift;
    mask |= static_cast<uint64_t>(0xff) << shift;
    const bool single = sh.count[chosen] == 1;
    __syncthreads();  // everyone has read the histogram before it is reset or reused
    if (single || shift == 0) {
      if (threadIdx.x == 0) sh.best_key = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float logit = row[i];
        const uint64_t key = order_key(logit, i);
        if ((key & mask) == prefix && c.contains(logit, key)) atomicMax(&sh.best_key, key);
      }
      __syncthreads();
      *result = sh.best_key;
      __syncthreads();
      return true;
    }
  }
  return false;
}

// The smallest candidate key: the host's last candidate.
__device__ uint64_t last_candidate(const float* row, int64_t vocab, const Candidates& c, Shared& sh) {
  if (threadIdx.x == 0) sh.best_key = ~0ull;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float logit = row[i];
    const uint64_t key = order_key(logit, i);
    if (c.contains(logit, key)) atomicMin(&sh.best_key, key);
  }
  __syncthreads();
  const uint64_t key = sh.best_key;
  __syncthreads();
  return key;
}

__global__ void __launch_bounds__(kSampleThreads) argmax_kernel(const float* logits, int64_t row_stride,
                                                                int64_t vocab, int32_t* ids) {
  __shared__ Shared sh;
  const int32_t id = block_argmax(logits + blockIdx.x * row_stride, vocab, sh);
  if (threadIdx.x == 0) ids[blockIdx.x] = id;
}

__global__ void __launch_bounds__(kSampleThreads) sample_kernel(const float* logits, int64_t row_stride,
                                                                int64_t vocab, const SampleRowParams* params,
                                                                int32_t* ids) {
  __shared__ Shared sh;
  const float* row = logits + blockIdx.x * row_stride;
  const SampleRowParams p = params[blockIdx.x];
  if (p.temperature == 0.0f) {  // greedy
    const int32_t id = block_argmax(row, vocab, sh);
    if (threadIdx.x == 0) ids[blockIdx.x] = id;
    return;
  }
  float max_logit = -INFINITY;
  unsigned valid = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float logit = row[i];
    if (!isnan(logit)) {
      ++valid;
      max_logit = fmaxf(max_logit, logit);
    }
  }
  max_logit = block_max_float(max_logit, sh);
  valid = block_sum_count(valid, sh);
  if (valid == 0) {
    if (threadIdx.x == 0) ids[blockIdx.x] = -1;
    return;
  }
  Candidates c;
  c.max_logit = max_logit;
  // 3. top-k: the k-th key in sorted order is the cut.
  if (p.top_k > 0 && static_cast<unsigned>(p.top_k) < valid) {
    uint64_t kth = 0;
    if (select_key(row, vocab, c, Weight::Count, static_cast<double>(p.top_k), false, sh, &kth)) c.min_key = kth;
  }
  // Probabilities at temperature 1 over the top-k candidates (for top-p and min-p).
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float logit = row[i];
    if (c.contains(logit, order_key(logit, i))) total += static_cast<double>(expf(logit - max_logit));
  }
  c.total_t1 = block_sum_double(total, sh);
  // 4. top-p: the shortest prefix reaching top_p (the host's tolerance included).
  if (p.top_p < 1.0f) {
    uint64_t cut = 0;
    if (select_key(row, vocab, c, Weight::ProbabilityT1, static_cast<double>(p.top_p) - 1e-6, false, sh, &cut)) {
      c.min_key = cut;
    }
  }
  // 5. min-p: the top candidate's probability is exp(0) / total.
  if (p.min_p > 0.0f) c.min_probability = p.min_p * static_cast<float>(1.0 / c.total_t1);
  // 6-7. softmax at the temperature over the survivors, then the first prefix passing the draw.
  c.temperature = p.temperature;
  total = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float logit = row[i];
    if (c.contains(logit, order_key(logit, i))) {
      total += static_cast<double>(expf((logit - max_logit) / p.temperature));
    }
  }
  c.total_t = block_sum_double(total, sh);
  uint64_t chosen = 0;
  if (!select_key(row, vocab, c, Weight::ProbabilityT, p.draw, true, sh, &chosen)) {
    chosen = last_candidate(row, vocab, c, sh);  // rounding left the total a hair under the draw
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = key_id(chosen);
}

__global__ void penalties_kernel(float* logits, const int32_t* tokens, const int32_t* counts, int n,
                                 float repetition, float presence, float frequency) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float& logit = logits[tokens[i]];
    logit = logit > 0.0f ? logit / repetition : logit * repetition;
    // Rounded like the host's separate multiply and adds (no fused multiply-add).
    logit = __fsub_rn(logit, __fadd_rn(presence, __fmul_rn(frequency, static_cast<float>(counts[i]))));
  }
}

}  // namespace

cudaError_t launch_argmax(const float* logits, int64_t row_stride, int64_t vocab, int rows,
                          int32_t* ids, cudaStream_t stream) {
  if (rows > 0) argmax_kernel<<<rows, kSampleThreads, 0, stream>>>(logits, row_stride, vocab, ids);
  return cudaGetLastError();
}

cudaError_t launch_sample(const float* logits, int64_t row_stride, int64_t vocab, int rows,
                          const SampleRowParams* params, int32_t* ids, cudaStream_t stream) {
  if (rows > 0) sample_kernel<<<rows, kSampleThreads, 0, stream>>>(logits, row_stride, vocab, params, ids);
  return cudaGetLastError();
}

cudaError_t launch_penalties(float* logits, const int32_t* tokens, const int32_t* counts, int n,
                             float repetition, float presence, float frequency, cudaStream_t stream) {
  if (n > 0) {
    penalties_kernel<<<blocks_for(n, 256, 64), 256, 0, stream>>>(logits, tokens, counts, n, repetition,
                                                                  presence, frequency);
  }
  return cudaGetLastError();
}

}  // namespace opencamp::cuda
