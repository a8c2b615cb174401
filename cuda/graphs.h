// CUDA graphs of the cuda backend: a decode-like pass (few tokens, every one with logits) is run
// eagerly once, captured the next time and replayed after that, as long as it repeats the same ops
// on the same tensors (checked op by op through each call's fingerprint).
#pragma once

#include <algorithm>
#include <bit>
#include <compare>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "opencamp/tensor.h"

namespace opencamp::cuda {

constexpr int64_t kMaxGraphTokens = 16;  // passes up to this many tokens (all with logits) are graphed
constexpr size_t kMaxGraphs = 48;        // instantiated graphs kept (least recently used goes)
constexpr int64_t kMinKeyBound = 256;    // graphed passes size attention for a power of two >= this

inline int64_t key_bound(int64_t keys) {  // a power of two, so graphs serve a range of context lengths
  return static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(std::max(keys, kMinKeyBound))));
}

// Identifies an op call: which op, which tensors (address, dtype, shape, strides), which scalars.
class Fingerprint {
 public:
  explicit Fingerprint(int op) { mix(static_cast<uint64_t>(op)); }
  Fingerprint& add(uint64_t value) {
    mix(value);
    return *this;
  }
  Fingerprint& add(float value) { return add(static_cast<uint64_t>(std::bit_cast<uint32_t>(value))); }
  Fingerprint& add(const Tensor& t) {
    add(reinterpret_cast<uint64_t>(t.data)).add(static_cast<uint64_t>(t.dtype)).add(static_cast<uint64_t>(t.ndim));
    for (int d = 0; d < t.ndim; ++d) add(static_cast<uint64_t>(t.shape[d])).add(static_cast<uint64_t>(t.stride[d]));
    return *this;
  }
  uint64_t value() const { return hash_; }

 private:
  void mix(uint64_t value) {
    hash_ ^= value + 0x9e3779b97f4a7c15ull + (hash_ << 6) + (hash_ >> 2);
    hash_ *= 0xff51afd7ed558ccdull;
  }
  uint64_t hash_ = 0xcbf29ce484222325ull;
};

enum OpCode { kEmbedding = 1, kRmsNorm, kMatmul, kRope, kKvStore, kAttention, kSiluMul, kAdd, kToHost, kSample,
              kGeluTanhMul, kScale };

struct GraphKey {
  int64_t tokens = 0;
  int64_t key_bound = 0;
  int64_t block_size = 0;
  uint64_t generation = 0;
  auto operator<=>(const GraphKey&) const = default;
};

struct GraphEntry {
  cudaGraphExec_t exec = nullptr;
  std::vector<uint64_t> ops;  // fingerprints of the captured pass, up to its first to_host
  uint64_t last_use = 0;
};

}  // namespace opencamp::cuda
