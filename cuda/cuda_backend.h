// The cuda backend: every op of opencamp::Backend as CUDA kernels on one NVIDIA GPU (compute
// capability 8.0 or newer), f32 and bf16 weights.
//
//   memory    every device buffer (weights, KV cache, activations, scratch) comes from one
//             stream-ordered pool (cudaMemPool_t) and is allocated once; a forward pass
//             allocates nothing. pool_stats() reports it.
//   weights   matrices stay row-major [N, K] with rows padded to 16 bytes (wide coalesced loads);
//             q/k/v and gate/up arrive fused (fuses_projections()).
//   passes    begin_forward uploads the pass's token ids, positions and block tables in one copy
//             from pinned memory. Within a pass ops are queued one step so neighbours fuse: RMSNorm
//             into the next decode matmul, SiLU * up into the gate/up matmul, the residual add into
//             the matmul before it, rope of q and k into the KV store.
//   graphs    a decode-shaped pass (<= 16 tokens, all needing logits) runs eagerly the first time,
//             is captured as a CUDA graph the second time and replayed from then on (keyed by
//             token count, a power-of-two bound of the context, the KV block size and the
//             generation of the backend's internal buffers). Replays check that the ops and
//             tensors are those captured and throw otherwise.
//   errors    every CUDA call is checked; failures throw opencamp::Error naming the call and
//             file:line (out of memory: CapacityExceeded).
//
// OPENCAMP_CUDA_GRAPHS=0 and OPENCAMP_CUDA_FUSION=0 in the environment turn graphs / fusion off.
// This header has no CUDA types, so tests and tools can use the backend's extras without nvcc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "opencamp/backend.h"

namespace opencamp::cuda {

struct PoolStats {
  bool stream_ordered_pool = false;  // false: the device has no memory pools (cudaMalloc)
  size_t reserved_bytes = 0;         // memory the pool holds from the driver
  size_t reserved_high_bytes = 0;
  size_t used_bytes = 0;             // of that, handed out
  size_t used_high_bytes = 0;
  uint64_t allocations = 0;          // allocations and frees since the backend was made
  uint64_t frees = 0;
  size_t live_bytes = 0;             // requested by live buffers
  size_t peak_live_bytes = 0;
};

struct GraphStats {
  uint64_t eager_passes = 0;     // passes run op by op
  uint64_t captured_passes = 0;  // passes captured into a new graph (and run by it)
  uint64_t replayed_passes = 0;  // passes run by replaying a graph
  size_t cached_graphs = 0;
};

// One row of device sampling: the host Sampler's stages 2-7 (greedy when temperature is 0).
// draw is the uniform number in [0, 1) the host Sampler would draw for this token.
struct DeviceSampling {
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  double draw = 0.0;
};

// Can this process use a GPU? Probed once (it loads the driver if there is one).
struct DeviceProbe {
  bool usable = false;
  int devices = 0;
  std::string summary;  // "NVIDIA H100 80GB HBM3, compute capability 9.0, 79 GiB" or why not
};
const DeviceProbe& probe_devices();

class CudaBackend final : public Backend {
 public:
  // Throws Error(Unsupported) when device `device` cannot be used (see probe_devices()).
  explicit CudaBackend(int device = 0);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }
  std::shared_ptr<Buffer> allocate(size_t bytes) override;
  Tensor prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                        std::vector<std::shared_ptr<Buffer>>& owned) override;
  bool fuses_projections() const override { return true; }
  // bf16 weights multiply bf16-rounded activations (tensor cores in prefill; the decode kernels
  // round the same way so both paths agree); f32 weights multiply f32 activations exactly.
  DType matmul_activation_dtype(DType weight_dtype) const override {
    return weight_dtype == DType::BF16 ? DType::BF16 : DType::F32;
  }

  void embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) override;
  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override;
  void matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) override;
  void rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) override;
  void kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
                std::span<const KVSlot> slots) override;
  void attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                 std::span<const KVSlot> slots, float scale, int32_t window) override;
  void silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override;
  void gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override;
  void scale(const Tensor& out, const Tensor& x, float factor) override;
  void add(const Tensor& out, const Tensor& a, const Tensor& b) override;
  void to_host(void* host, const Tensor& source) override;
  void from_host(const Tensor& target, const void* host) override;
  void begin_forward(const ForwardInfo& batch) override;
  void end_forward() override;

  // ---- beyond Backend ----

  // Token ids chosen on the GPU from logits on the device (e.g. the decoder scratch's logits
  // rows), so only the ids cross to the host. Inside a graphed pass, like to_host, the first of
  // these ends the graphed part (a sampling step can replace the logits copy).
  std::vector<int32_t> argmax(const Tensor& logits);  // [R, V] f32 -> R ids
  std::vector<int32_t> sample(const Tensor& logits,   // [R, V] f32, modified by nothing
                              std::span<const DeviceSampling> rows);  // [R]
  // The Sampler's penalties stage on one device row, in place (history: the sequence's tokens).
  void apply_penalties(const Tensor& logits,  // [V] or [1, V] f32
                       std::span<const int32_t> history, float repetition_penalty,
                       float presence_penalty, float frequency_penalty);

  PoolStats pool_stats() const;
  GraphStats graph_stats() const;
  void set_graphs_enabled(bool enabled);  // drops cached graphs when turned off
  void set_fusion_enabled(bool enabled);
  std::string device_name() const;
  void synchronize();  // waits for every queued operation; throws a deferred error if any

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace opencamp::cuda
