// The reference backend. Other CPU backends derive from it and fall back to it for inputs their
// fast kernels do not take (unusual strides), so every op always has a correct implementation.
#pragma once

#include <memory>

#include "opencamp/backend.h"
#include "opencamp/thread_pool.h"

namespace opencamp {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(ThreadPool* pool);

  std::string name() const override { return "cpu"; }

  // Its matrices are row-major tables already.
  bool embeds_from(const Tensor& matrix) const override { return matrix.layout == Layout::Strided; }
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

 protected:
  ThreadPool& pool() { return *pool_; }

 private:
  ThreadPool* pool_;
  std::unique_ptr<ThreadPool> owned_pool_;  // when constructed without a pool
};

}  // namespace opencamp
