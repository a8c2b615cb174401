#include "runtime/profiling_backend.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace opencamp {
namespace {

class ProfilingBackend final : public Backend {
 private:
  struct Entry {
    long long calls = 0;
    double seconds = 0;
  };

  template <class F>
  auto timed(const std::string& name, const F& f) {
    const auto start = std::chrono::steady_clock::now();
    struct Record {
      Entry& entry;
      std::chrono::steady_clock::time_point start;
      ~Record() {
        entry.calls += 1;
        entry.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    } record{entries_[name], start};
    return f();
  }


 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

  ~ProfilingBackend() override {
    double total = 0;
    for (const auto& [name, entry] : entries_) total += entry.seconds;
    std::vector<std::pair<std::string, Entry>> sorted(entries_.begin(), entries_.end());
    std::sort(sorted.begin(), sorted.end(),
              [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    std::fprintf(stderr, "opencamp profile (%s backend): %.3f s in ops\n", inner_->name().c_str(), total);
    std::fprintf(stderr, "  %-44s %10s %8s %10s %6s\n", "op", "calls", "ms", "us/call", "share");
    for (const auto& [name, e] : sorted) {
      std::fprintf(stderr, "  %-44s %10lld %8.1f %10.2f %5.1f%%\n", name.c_str(), e.calls,
                   e.seconds * 1e3, e.seconds * 1e6 / static_cast<double>(e.calls),
                   100.0 * e.seconds / total);
    }
  }

  std::string name() const override { return inner_->name(); }
  Device device() const override { return inner_->device(); }
  std::shared_ptr<Buffer> allocate(size_t bytes) override { return inner_->allocate(bytes); }
  Tensor prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                        std::vector<std::shared_ptr<Buffer>>& owned) override {
    return timed("prepare_weight", [&] { return inner_->prepare_weight(source, dtype, use, owned); });
  }
  bool embeds_from(const Tensor& matrix) const override { return inner_->embeds_from(matrix); }
  bool fuses_projections() const override { return inner_->fuses_projections(); }
  bool transposed_keys() const override { return inner_->transposed_keys(); }
  DType matmul_activation_dtype(DType weight_dtype) const override {
    return inner_->matmul_activation_dtype(weight_dtype);
  }

  void embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) override {
    timed("embedding", [&] { inner_->embedding(out, table, ids); });
  }
  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    timed("rmsnorm", [&] { inner_->rmsnorm(out, x, weight, eps); });
  }
  void matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) override {
    // Per shape: which projection costs what ("matmul T>1 [960x576] bf16").
    const std::string key = std::string("matmul ") + (x.shape[0] == 1 ? "T=1 " : "T>1 ") +
                            shape_string(weight) + " " + dtype_name(weight.dtype);
    timed(key, [&] { inner_->matmul(out, x, weight, bias); });
  }
  void rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) override {
    timed("rope", [&] { inner_->rope(x, positions, inv_freq); });
  }
  void kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
                std::span<const KVSlot> slots) override {
    timed("kv_store", [&] { inner_->kv_store(cache, keys, values, slots); });
  }
  void attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                 std::span<const KVSlot> slots, float scale, int32_t window) override {
    timed(queries.shape[0] == 1 ? "attention T=1" : "attention T>1",
          [&] { inner_->attention(out, queries, cache, slots, scale, window); });
  }
  void silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override {
    timed("silu_mul", [&] { inner_->silu_mul(out, gate, up); });
  }
  void gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override {
    timed("gelu_tanh_mul", [&] { inner_->gelu_tanh_mul(out, gate, up); });
  }
  void scale(const Tensor& out, const Tensor& x, float factor) override {
    timed("scale", [&] { inner_->scale(out, x, factor); });
  }
  void add(const Tensor& out, const Tensor& a, const Tensor& b) override {
    timed("add", [&] { inner_->add(out, a, b); });
  }
  void to_host(void* host, const Tensor& source) override {
    timed("to_host", [&] { inner_->to_host(host, source); });
  }
  void from_host(const Tensor& target, const void* host) override {
    timed("from_host", [&] { inner_->from_host(target, host); });
  }
  void begin_forward(const ForwardInfo& batch) override {
    timed("begin_forward", [&] { inner_->begin_forward(batch); });
  }
  void end_forward() override { timed("end_forward", [&] { inner_->end_forward(); }); }

 private:
  std::unique_ptr<Backend> inner_;
  std::map<std::string, Entry> entries_;
};

}  // namespace

std::unique_ptr<Backend> maybe_profile(std::unique_ptr<Backend> inner) {
  const char* flag = std::getenv("OPENCAMP_PROFILE");
  if (flag == nullptr || *flag == '\0' || std::string(flag) == "0") return inner;
  return std::make_unique<ProfilingBackend>(std::move(inner));
}

}  // namespace opencamp
