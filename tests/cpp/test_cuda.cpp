// The cuda backend beyond what test_backend_ops and test_engine already check on every usable
// backend (there the cuda ops meet the cpu oracle on the common odd shapes, and the tiny models
// meet the transformers fixtures): GPU-sized shapes against the oracle (decode matrix-vector and
// tensor-core matrix products, split-K attention over long contexts, GQA 1/3/8, head_dim up to
// 256, prefill over several sequences, 3-d norms and rope on strided views), the fused decode
// sequence against the unfused one, CUDA graph replay against eager passes, the memory pool's
// statistics, sampling on the GPU against the host Sampler's stages, and error reporting.
//
// Without a usable GPU only the first case runs (the backend must say why it cannot run), then
// the program exits with 77, which ctest reports as skipped.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "cuda_backend.h"
#include "models/decoder.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;
using cuda::CudaBackend;

namespace {

constexpr int kSkipped = 77;
constexpr double kF32Bound = 1e-8;   // normalised squared error, as test_backend_ops
constexpr double kBF16Bound = 1e-4;  // bf16 weights: the GPU also rounds activations to bf16

std::vector<float> random_values(size_t n, std::mt19937& rng, float low = -1.0f, float high = 1.0f) {
  std::uniform_real_distribution<float> dist(low, high);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

double normalised_error(const std::vector<float>& got, const std::vector<float>& expected) {
  if (got.size() != expected.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(got[i]) - double(expected[i]);
    num += d * d;
    den += double(expected[i]) * expected[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? num / den : num;
}


// One f32 array twice: on the host for the cpu oracle, on the GPU for the cuda backend.
class Twin {
 public:
  Twin(CudaBackend& gpu, std::vector<float> values) : gpu_(gpu), host_(std::move(values)) {
    device_ = gpu.allocate(host_.size() * sizeof(float));
    gpu.from_host(whole(), host_.data());
  }
  Tensor cpu(std::initializer_list<int64_t> shape) { return Tensor::contiguous(host_.data(), DType::F32, shape); }
  Tensor gpu(std::initializer_list<int64_t> shape) {
    return Tensor::contiguous(device_->data(), DType::F32, shape, Device::CUDA);
  }
  const std::vector<float>& cpu_values() const { return host_; }
  std::vector<float> gpu_values() {
    std::vector<float> out(host_.size());
    gpu_.to_host(out.data(), whole());
    return out;
  }

 private:
  Tensor whole() {
    return Tensor::contiguous(device_->data(), DType::F32, {static_cast<int64_t>(host_.size())}, Device::CUDA);
  }
  CudaBackend& gpu_;
  std::vector<float> host_;
  std::shared_ptr<Buffer> device_;
};

std::unique_ptr<CudaBackend> make_gpu() { return std::make_unique<CudaBackend>(0); }

std::unique_ptr<Backend> make_oracle() { return create_backend("cpu", {}); }

void report(const char* op, const std::string& shape, double err, double bound) {
  std::printf("  %-10s %-58s err %.2e (bound %.0e)\n", op, shape.c_str(), err, bound);
}

std::string describe(const char* format, auto... args) {
  char buffer[256];
  std::snprintf(buffer, sizeof buffer, format, args...);
  return buffer;
}

// ---- paged caches ---------------------------------------------------------------------------

// A KV pool with random contents and shuffled block tables for sequences of the given lengths.
struct Paged {
  int64_t n_blocks = 0, block_size = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::vector<int32_t>> tables;
  std::vector<float> keys, values;  // [n_blocks, block_size, Hkv, hd]

  Paged(std::mt19937& rng, int64_t block, int64_t hkv, int64_t hd, const std::vector<int>& lengths)
      : block_size(block), kv_heads(hkv), head_dim(hd) {
    for (int len : lengths) n_blocks += (len + block - 1) / block;
    n_blocks += 2;
    std::vector<int32_t> order(static_cast<size_t>(n_blocks));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    size_t next = 0;
    for (int len : lengths) {
      std::vector<int32_t> table;
      for (int b = 0; b < (len + block - 1) / block; ++b) table.push_back(order[next++]);
      tables.push_back(table);
    }
    const size_t n = static_cast<size_t>(n_blocks * block * hkv * hd);
    keys = random_values(n, rng, -1.5f, 1.5f);
    values = random_values(n, rng, -1.0f, 1.0f);
  }
};

// ---- the model runner (the engine's passes, on a backend we hold) ----------------------------

struct Runner {
  std::unique_ptr<CudaBackend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<DecoderScratch> scratch;

  Runner(const std::string& fixture_name, const std::string& dtype, bool graphs, bool fusion) {
    backend = make_gpu();
    backend->set_graphs_enabled(graphs);
    backend->set_fusion_enabled(fusion);
    model = std::make_unique<Model>(fixture(fixture_name), *backend, dtype);
    const ModelConfig& c = model->config();
    KVCacheShape shape;
    shape.n_layers = c.num_layers;
    shape.n_kv_heads = c.num_kv_heads;
    shape.head_dim = c.head_dim;
    shape.block_size = 16;
    shape.n_blocks = 64;
    cache = std::make_unique<KVCache>(*backend, shape);
    scratch = std::make_unique<DecoderScratch>(*backend, c, 64, 32);
  }

  size_t vocab() const { return static_cast<size_t>(model->config().vocab_size); }

  // Appends tokens[i] to seqs[i] (one pass); logits of every token.
  std::vector<float> pass(const std::vector<int>& seqs, const std::vector<int32_t>& tokens) {
    std::vector<int32_t> positions, rows;
    std::vector<KVSlot> slots;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int position = cache->length(seqs[i]);
      cache->grow(seqs[i], 1);
      positions.push_back(position);
      rows.push_back(static_cast<int32_t>(i));
    }
    for (size_t i = 0; i < seqs.size(); ++i) slots.push_back({cache->block_table(seqs[i]).data(), positions[i]});
    const std::span<const KVSlot> group_slots[] = {slots};  // one layer group: no windows here
    ForwardBatch batch{tokens, positions, group_slots, cache->layer_groups(), rows};
    std::vector<float> logits(seqs.size() * vocab());
    decoder_forward(*model, *backend, cache->layers(), batch, *scratch, logits);
    return logits;
  }

  // A prompt into one sequence in one pass; logits of every position.
  std::vector<float> prefill(int seq, const std::vector<int32_t>& tokens) {
    return pass(std::vector<int>(tokens.size(), seq), tokens);
  }
};

int32_t host_argmax(const std::vector<float>& logits, size_t row, size_t vocab) {
  return argmax(std::span(logits).subspan(row * vocab, vocab));
}

// ---- the host Sampler's stages 3-7 with a given draw (Sampler::pick, the one definition) -----

using HostPick = Sampler::Pick;

HostPick host_pick(const std::vector<float>& logits, const cuda::DeviceSampling& p) {
  Sampler::Scratch scratch;
  return Sampler::pick(logits, p.top_k, p.top_p, p.min_p, p.temperature, p.draw, scratch);
}

}  // namespace

// ---- always: the registry says whether the GPU can be used, and why not ------------------------

TEST_CASE(registry_reports_the_gpu_or_why_not) {
  const cuda::DeviceProbe& probe = cuda::probe_devices();
  std::printf("  cuda: %s (%d device(s))\n", probe.summary.c_str(), probe.devices);
  CHECK(!probe.summary.empty());
  bool registered = false;
  for (const BackendInfo& info : registered_backends()) {
    if (info.name != "cuda") continue;
    registered = true;
    CHECK_EQ(info.usable(), probe.usable);
    CHECK(info.description.find(probe.summary) != std::string::npos);
    // The best score: "auto" takes the GPU whenever it is usable.
    for (const BackendInfo& other : registered_backends()) CHECK(other.name == "cuda" || other.score < info.score);
  }
  CHECK(registered);
  const auto usable = usable_backends();
  const bool listed = std::find(usable.begin(), usable.end(), "cuda") != usable.end();
  CHECK_EQ(listed, probe.usable);
  if (probe.usable) {
    CHECK_EQ(usable.front(), std::string("cuda"));
    CHECK_EQ(create_backend("auto", {})->name(), std::string("cuda"));
  } else {
    CHECK_THROWS_WITH(create_backend("cuda", {}), ErrorKind::Unsupported, "cuda", "cannot run here");
    CHECK_THROWS_WITH(CudaBackend(0), ErrorKind::Unsupported, "cuda backend", probe.summary);
    CHECK(create_backend("auto", {})->name() != "cuda");
  }
}

// ---- GPU only -----------------------------------------------------------------------------------

TEST_CASE(matmul_decode_and_prefill_sizes_match_the_oracle) {
  auto gpu = make_gpu();
  auto oracle = make_oracle();
  struct Shape {
    int64_t K, N;
  };
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (const Shape s : {Shape{576, 960}, Shape{577, 33}, Shape{64, 1000}, Shape{1536, 576}, Shape{5, 7}}) {
      for (int64_t T : {1, 2, 3, 5, 8, 9, 17, 64, 130}) {
        std::mt19937 rng(static_cast<unsigned>(T * 1000 + s.K + s.N));
        const bool with_bias = (T + s.N) % 2 == 1;
        const int64_t x_row = s.K + (T % 3);  // padded rows now and then
        Twin x(*gpu, random_values(static_cast<size_t>(T * x_row), rng));
        Twin bias(*gpu, random_values(static_cast<size_t>(s.N), rng));
        Twin out(*gpu, std::vector<float>(static_cast<size_t>(T * s.N), 0.0f));
        std::vector<float> w = random_values(static_cast<size_t>(s.N * s.K), rng);
        const Tensor w_host = Tensor::contiguous(w.data(), DType::F32, {s.N, s.K});
        std::vector<std::shared_ptr<Buffer>> owned;
        const Tensor w_cpu = oracle->prepare_weight(w_host, dtype, WeightUse::Matrix, owned);
        const Tensor w_gpu = gpu->prepare_weight(w_host, dtype, WeightUse::Matrix, owned);
        const Tensor b_cpu = bias.cpu({s.N}), b_gpu = bias.gpu({s.N});
        oracle->matmul(out.cpu({T, s.N}), x.cpu({T, x_row}).columns(0, s.K), w_cpu, with_bias ? &b_cpu : nullptr);
        gpu->matmul(out.gpu({T, s.N}), x.gpu({T, x_row}).columns(0, s.K), w_gpu, with_bias ? &b_gpu : nullptr);
        const double bound = dtype == DType::BF16 ? kBF16Bound : kF32Bound;
        const double err = normalised_error(out.gpu_values(), out.cpu_values());
        report("matmul", describe("%s T=%lld K=%lld N=%lld%s", dtype_name(dtype), (long long)T, (long long)s.K,
                                  (long long)s.N, with_bias ? " +bias" : ""),
               err, bound);
        CHECK_MSG(err <= bound, dtype_name(dtype) << " T=" << T << " K=" << s.K << " N=" << s.N << ": " << err);
      }
    }
  }
}

TEST_CASE(attention_long_contexts_gqa_and_prefill_match_the_oracle) {
  auto gpu = make_gpu();
  auto oracle = make_oracle();
  struct Case {
    int64_t H, Hkv, hd, block;
    std::vector<int> lengths;
    std::vector<std::pair<int, int>> batch;  // (sequence, position) per token
    const char* what;
  };
  auto run = [](int seq, int from, int to) {
    std::vector<std::pair<int, int>> b;
    for (int p = from; p < to; ++p) b.push_back({seq, p});
    return b;
  };
  auto join = [](std::vector<std::pair<int, int>> a, const std::vector<std::pair<int, int>>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const std::vector<Case> cases = {
      {4, 4, 64, 16, {3000}, {{0, 2999}}, "gqa 1, one token over 3000 keys (split-K)"},
      {9, 3, 64, 16, {1000, 17}, {{0, 999}, {1, 16}}, "gqa 3 (SmolLM2), two decodes"},
      {32, 4, 128, 16, {700, 1, 64, 333, 90}, {{0, 699}, {1, 0}, {2, 63}, {3, 332}, {4, 89}}, "gqa 8, five decodes"},
      {8, 2, 256, 16, {300, 20}, join({{0, 299}}, run(1, 0, 20)), "hd 256, a decode and a 20-token prefill"},
      {9, 3, 64, 16, {40}, run(0, 0, 40), "gqa 3, 40-token prefill from 0"},
      {6, 2, 64, 8, {50, 70}, join(run(0, 20, 50), run(1, 40, 70)), "two sequences' prefill chunks"},
      {4, 2, 13, 5, {37}, run(0, 0, 37), "odd head_dim 13, small blocks"},
      {32, 1, 64, 16, {2100, 2100}, {{0, 2099}, {1, 2050}}, "gqa 32: two blocks of 16 heads per KV head"},
      {32, 1, 64, 16, {30}, run(0, 0, 30), "gqa 32 prefill: one token per block"},
  };
  for (const Case& c : cases) {
    std::mt19937 rng(static_cast<unsigned>(c.H * 100 + c.hd + c.lengths.size()));
    Paged paged(rng, c.block, c.Hkv, c.hd, c.lengths);
    const int64_t T = static_cast<int64_t>(c.batch.size());
    std::vector<KVSlot> slots;
    for (const auto& [seq, pos] : c.batch) slots.push_back({paged.tables[static_cast<size_t>(seq)].data(), pos});
    Twin keys(*gpu, paged.keys), values(*gpu, paged.values);
    // q inside a wider row, as the decoder's q view of the fused projection
    const int64_t row = c.H * c.hd + 2 * c.Hkv * c.hd;
    Twin qkv(*gpu, random_values(static_cast<size_t>(T * row), rng, -1.5f, 1.5f));
    Twin out(*gpu, std::vector<float>(static_cast<size_t>(T * c.H * c.hd), 0.0f));
    const std::initializer_list<int64_t> pool_shape = {paged.n_blocks, c.block, c.Hkv, c.hd};
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    oracle->attention(out.cpu({T, c.H, c.hd}), qkv.cpu({T, row}).columns(0, c.H * c.hd).split_last(c.hd),
                      KVLayerView{keys.cpu(pool_shape), values.cpu(pool_shape)}, slots, scale, 0);
    gpu->attention(out.gpu({T, c.H, c.hd}), qkv.gpu({T, row}).columns(0, c.H * c.hd).split_last(c.hd),
                   KVLayerView{keys.gpu(pool_shape), values.gpu(pool_shape)}, slots, scale, 0);
    const double err = normalised_error(out.gpu_values(), out.cpu_values());
    report("attention", c.what, err, kF32Bound);
    CHECK_MSG(err <= kF32Bound, c.what << ": " << err);
  }
}

TEST_CASE(norms_rope_and_kv_store_on_strided_views_match_the_oracle) {
  auto gpu = make_gpu();
  auto oracle = make_oracle();
  const int64_t T = 7, Hq = 6, Hkv = 2, hd = 64, row = (Hq + 2 * Hkv) * hd + 3;  // padded rows
  std::mt19937 rng(11);
  Twin qkv(*gpu, random_values(static_cast<size_t>(T * row), rng, -2.0f, 2.0f));
  Twin norm_weight(*gpu, random_values(hd, rng, 0.5f, 1.5f));
  std::vector<float> freqs = rope_inverse_frequencies(RopeConfig{}, static_cast<int>(hd));
  Twin inv_freq(*gpu, freqs);
  std::vector<int32_t> positions = {0, 5, 17, 100, 2047, 4095, 8000};
  Paged paged(rng, 16, Hkv, hd, {8001});
  Twin keys(*gpu, paged.keys), values(*gpu, paged.values);
  std::vector<KVSlot> slots;
  for (int32_t p : positions) slots.push_back({paged.tables[0].data(), p});
  const std::initializer_list<int64_t> pool_shape = {paged.n_blocks, 16, Hkv, hd};
  for (Backend* b : {static_cast<Backend*>(oracle.get()), static_cast<Backend*>(gpu.get())}) {
    const bool on_gpu = b == gpu.get();
    const Tensor all = on_gpu ? qkv.gpu({T, row}) : qkv.cpu({T, row});
    const Tensor q = all.columns(0, Hq * hd).split_last(hd);
    const Tensor k = all.columns(Hq * hd, Hkv * hd).split_last(hd);
    const Tensor v = all.columns((Hq + Hkv) * hd, Hkv * hd).split_last(hd);
    const Tensor w = on_gpu ? norm_weight.gpu({hd}) : norm_weight.cpu({hd});
    const Tensor f = on_gpu ? inv_freq.gpu({hd / 2}) : inv_freq.cpu({hd / 2});
    b->rmsnorm(q, q, w, 1e-6f);  // per-head norms in place (qwen3)
    b->rmsnorm(k, k, w, 1e-6f);
    b->rope(q, positions, f);
    b->rope(k, positions, f);
    b->kv_store(on_gpu ? KVLayerView{keys.gpu(pool_shape), values.gpu(pool_shape)}
                       : KVLayerView{keys.cpu(pool_shape), values.cpu(pool_shape)},
                k, v, slots);
  }
  const double err_qkv = normalised_error(qkv.gpu_values(), qkv.cpu_values());
  const double err_k = normalised_error(keys.gpu_values(), keys.cpu_values());
  const double err_v = normalised_error(values.gpu_values(), values.cpu_values());
  report("norm+rope", "3-d norms and rope on q/k views of a padded qkv", err_qkv, kF32Bound);
  report("kv_store", "rotated keys and values into 16-position blocks", std::max(err_k, err_v), kF32Bound);
  CHECK(err_qkv <= kF32Bound);
  CHECK(err_k <= kF32Bound);
  CHECK(err_v <= kF32Bound);
}

// The decoder's passes with fusion against the same passes op by op; both against HF's logits.
TEST_CASE(fused_passes_match_unfused_passes) {
  for (const std::string model : {"tiny-llama", "tiny-qwen2", "tiny-qwen3"}) {
    for (const std::string dtype : {"f32", "bf16"}) {
      Runner fused(model, dtype, false, true), plain(model, dtype, false, false);
      auto reference = SafetensorsFile::open(fixture(model) / "reference.safetensors");
      const std::vector<int32_t> ids = tensor_ints(*reference, "input_ids");
      const int a = fused.cache->create_sequence(), b = plain.cache->create_sequence();
      double worst = max_abs_diff(fused.prefill(a, ids), plain.prefill(b, ids));
      for (int step = 0; step < 6; ++step) {
        const int32_t token = ids[static_cast<size_t>(step)];
        worst = std::max(worst, max_abs_diff(fused.pass({a}, {token}), plain.pass({b}, {token})));
      }
      // The fused kernels do the unfused ones' arithmetic in the same order (the norm's sum too),
      // so the results should agree to the bit; the bound leaves room for a compiler's choices.
      const double bound = 1e-6;
      std::printf("  %-10s %-4s fused vs op by op: max abs %.3g (bound %g)\n", model.c_str(), dtype.c_str(), worst, bound);
      CHECK_MSG(worst <= bound, model << " " << dtype << ": " << worst);
    }
  }
}

// Decode passes replayed from CUDA graphs give exactly what the same passes give eagerly, and a
// decode step allocates no device memory.
TEST_CASE(graph_replay_equals_eager_and_decode_allocates_nothing) {
  for (const std::string model : {"tiny-llama", "tiny-qwen2", "tiny-qwen3"}) {
    for (const std::string dtype : {"f32", "bf16"}) {
      Runner graphed(model, dtype, true, true), eager(model, dtype, false, true);
      auto reference = SafetensorsFile::open(fixture(model) / "reference.safetensors");
      const std::vector<int32_t> ids = tensor_ints(*reference, "input_ids");
      const int a = graphed.cache->create_sequence(), b = graphed.cache->create_sequence();
      const int ea = eager.cache->create_sequence(), eb = eager.cache->create_sequence();
      double worst = max_abs_diff(graphed.prefill(a, ids), eager.prefill(ea, ids));
      worst = std::max(worst, max_abs_diff(graphed.prefill(b, {ids[0], ids[1]}), eager.prefill(eb, {ids[0], ids[1]})));
      uint64_t allocations_after_warmup = 0;
      const size_t V = graphed.vocab();
      int32_t next_a = 1, next_b = 2;
      for (int step = 0; step < 12; ++step) {
        std::vector<float> got, expected;
        if (step < 8) {  // one sequence: T = 1 graphs
          got = graphed.pass({a}, {next_a});
          expected = eager.pass({ea}, {next_a});
          next_a = host_argmax(got, 0, V);
        } else {  // two sequences of different lengths in one pass: T = 2 graphs
          got = graphed.pass({b, a}, {next_b, next_a});
          expected = eager.pass({eb, ea}, {next_b, next_a});
          next_b = host_argmax(got, 0, V);
          next_a = host_argmax(got, 1, V);
        }
        worst = std::max(worst, max_abs_diff(got, expected));
        if (step == 2) allocations_after_warmup = graphed.backend->pool_stats().allocations;
      }
      const cuda::GraphStats stats = graphed.backend->graph_stats();
      const cuda::PoolStats pool = graphed.backend->pool_stats();
      std::printf("  %-10s %-4s graphs vs eager: max abs %.3g; %llu eager, %llu captured, %llu replayed passes; "
                  "%llu pool allocations (%llu after warm-up)\n",
                  model.c_str(), dtype.c_str(), worst, (unsigned long long)stats.eager_passes,
                  (unsigned long long)stats.captured_passes, (unsigned long long)stats.replayed_passes,
                  (unsigned long long)pool.allocations,
                  (unsigned long long)(pool.allocations - allocations_after_warmup));
      CHECK_MSG(worst == 0.0, model << " " << dtype << ": graph replay differs from eager by " << worst);
      CHECK(stats.captured_passes >= 2);   // T = 1 and T = 2
      CHECK(stats.replayed_passes >= 8);   // steps 2..7 and 10..11
      CHECK_EQ(pool.allocations, allocations_after_warmup);
      CHECK_EQ(eager.backend->graph_stats().captured_passes, uint64_t{0});
    }
  }
}

TEST_CASE(pool_statistics_count_allocations_and_reuse) {
  auto gpu = make_gpu();
  const cuda::PoolStats before = gpu->pool_stats();
  {
    auto first = gpu->allocate(64 << 20);
    auto second = gpu->allocate(1000);
    const cuda::PoolStats during = gpu->pool_stats();
    CHECK_EQ(during.allocations, before.allocations + 2);
    CHECK(during.live_bytes >= before.live_bytes + (64 << 20) + 1000);
    if (during.stream_ordered_pool) CHECK(during.reserved_bytes >= (64u << 20));
  }
  gpu->synchronize();
  const cuda::PoolStats after = gpu->pool_stats();
  CHECK_EQ(after.frees, before.frees + 2);
  CHECK_EQ(after.live_bytes, before.live_bytes);
  // Freed memory stays in the pool: the same request again needs nothing new from the driver.
  auto again = gpu->allocate(64 << 20);
  const cuda::PoolStats reused = gpu->pool_stats();
  if (reused.stream_ordered_pool) CHECK_EQ(reused.reserved_bytes, after.reserved_bytes);
  std::printf("  pool: %s, reserved %.1f MiB (high %.1f), used %.1f MiB (high %.1f), %llu allocations, "
              "%llu frees, live %.1f MiB (peak %.1f)\n",
              reused.stream_ordered_pool ? "stream-ordered" : "cudaMalloc", reused.reserved_bytes / 1048576.0,
              reused.reserved_high_bytes / 1048576.0, reused.used_bytes / 1048576.0,
              reused.used_high_bytes / 1048576.0, (unsigned long long)reused.allocations,
              (unsigned long long)reused.frees, reused.live_bytes / 1048576.0, reused.peak_live_bytes / 1048576.0);
}

TEST_CASE(sampling_on_the_gpu_matches_the_host_sampler) {
  auto gpu = make_gpu();
  std::mt19937 rng(5);
  std::mt19937_64 draws(77);
  for (int64_t V : {1000, 49152}) {
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const int rows = 12;
    std::vector<float> logits(static_cast<size_t>(rows * V));
    for (float& x : logits) x = normal(rng);
    for (int64_t i = 0; i < V; i += 7) logits[static_cast<size_t>(V + i)] = 1.0f;  // row 1: many ties
    logits[static_cast<size_t>(2 * V + 3)] = logits[static_cast<size_t>(2 * V + 9)] = 50.0f;  // tied maximum
    logits[static_cast<size_t>(3 * V + 5)] = std::numeric_limits<float>::quiet_NaN();
    for (int64_t i = 0; i < V; ++i) logits[static_cast<size_t>(4 * V + i)] = -INFINITY;  // row 4: one finite
    logits[static_cast<size_t>(5 * V - 1)] = 0.0f;
    Twin device(*gpu, logits);
    const Tensor on_gpu = device.gpu({rows, V});

    // Greedy.
    const std::vector<int32_t> ids = gpu->argmax(on_gpu);
    for (int r = 0; r < rows; ++r) CHECK_EQ(ids[static_cast<size_t>(r)], host_argmax(logits, static_cast<size_t>(r), static_cast<size_t>(V)));

    // The stages 3-7 with the Sampler's own draws.
    const std::vector<cuda::DeviceSampling> settings = {
        {0.0f, 0, 1.0f, 0.0f, 0.0},   {0.7f, 40, 1.0f, 0.0f, 0.0},  {1.0f, 0, 0.9f, 0.0f, 0.0},
        {1.3f, 0, 1.0f, 0.05f, 0.0},  {1.0f, 0, 1.0f, 0.0f, 0.0},   {0.5f, 1, 1.0f, 0.0f, 0.0},
        {1.0f, 5, 0.5f, 0.1f, 0.0},   {2.0f, 200, 0.95f, 0.0f, 0.0}, {0.8f, 0, 0.3f, 0.0f, 0.0},
        {1.0f, 3000, 1.0f, 0.02f, 0.0}, {1.0f, 2, 1.0f, 0.0f, 0.0},  {0.9f, 50, 0.8f, 0.05f, 0.0},
    };
    int mismatches = 0, total = 0;
    for (int round = 0; round < 8; ++round) {
      std::vector<cuda::DeviceSampling> params = settings;
      for (auto& p : params) p.draw = static_cast<double>(draws() >> 11) * 0x1.0p-53;
      const std::vector<int32_t> picked = gpu->sample(on_gpu, params);
      for (int r = 0; r < rows; ++r) {
        const std::vector<float> row(logits.begin() + r * V, logits.begin() + (r + 1) * V);
        const cuda::DeviceSampling& p = params[static_cast<size_t>(r)];
        const int32_t expected = p.temperature == 0.0f ? argmax(row) : host_pick(row, p).id;
        ++total;
        if (picked[static_cast<size_t>(r)] == expected) continue;
        ++mismatches;
        // Only a draw right at a boundary between two tokens may land differently (f32 exp and
        // f64 sums in another order).
        const HostPick at = host_pick(row, p);
        const bool boundary = std::fabs(at.before - p.draw) < 1e-6 || std::fabs(at.after - p.draw) < 1e-6;
        CHECK_MSG(boundary, "V=" << V << " row " << r << " round " << round << ": gpu picked "
                                  << picked[static_cast<size_t>(r)] << ", host " << expected);
      }
    }
    std::printf("  sample V=%lld: %d of %d picks equal the host's\n", (long long)V, total - mismatches, total);
    CHECK(mismatches <= 1);

    // Penalties on one row: the host's float operations exactly.
    std::vector<float> row(logits.begin(), logits.begin() + V);
    const std::vector<int32_t> history = {3, 3, 17, 999, 5, 3, 17};
    Twin single(*gpu, row);
    gpu->apply_penalties(single.gpu({V}), history, 1.3f, 0.2f, 0.1f);
    apply_penalties(row, history, 1.3f, 0.2f, 0.1f);
    CHECK(single.gpu_values() == row);
  }
}

TEST_CASE(errors_name_the_call_and_leave_the_backend_usable) {
  auto gpu = make_gpu();
  // 1 TiB, more than any GPU has: a CUDA out-of-memory becomes CapacityExceeded naming the call.
  const std::string message = CHECK_THROWS_WITH(gpu->allocate(size_t{1} << 40), ErrorKind::CapacityExceeded,
                                                "CUDA error", "cudaErrorMemoryAllocation", "cuda/device_context.cpp:");
  std::printf("  %s\n", message.c_str());
  auto fine = gpu->allocate(1 << 20);  // still works afterwards
  CHECK(fine->data() != nullptr);

  std::mt19937 rng(3);
  Twin table(*gpu, random_values(50 * 8, rng));
  Twin out(*gpu, std::vector<float>(2 * 8));
  const int32_t bad_ids[] = {1, 50};
  CHECK_THROWS_WITH(gpu->embedding(out.gpu({2, 8}), table.gpu({50, 8}), bad_ids), ErrorKind::InvalidArgument, "50");
  std::vector<float> host(16);
  CHECK_THROWS_WITH(gpu->add(Tensor::contiguous(host.data(), DType::F32, {2, 8}), out.gpu({2, 8}), out.gpu({2, 8})),
                    ErrorKind::InvalidArgument, "not GPU memory");
  Twin big(*gpu, std::vector<float>(320 * 2));
  const int32_t table_entries[] = {0};
  const KVSlot slot[] = {{table_entries, 0}};
  const Tensor pool = big.gpu({1, 1, 2, 320});
  CHECK_THROWS_WITH(gpu->attention(big.gpu({1, 2, 320}), big.gpu({1, 2, 320}), KVLayerView{pool, pool}, slot, 1.0f, 0),
                    ErrorKind::Unsupported, "head_dim 320");
  CHECK_NOTHROW(gpu->synchronize());  // the refused calls left nothing behind
}

int main(int argc, char** argv) {
  const cuda::DeviceProbe& probe = cuda::probe_devices();
  if (!probe.usable) {
    char name[] = "test_cuda";
    char filter[] = "registry_reports_the_gpu_or_why_not";
    char* only[] = {name, filter, nullptr};
    const int result = opencamp_test::run_all(2, only);
    if (result != 0) return result;
    std::printf("SKIPPED: the cuda backend cannot run here (%s); these tests need a GPU\n", probe.summary.c_str());
    return kSkipped;
  }
  return opencamp_test::run_all(argc, argv);
}
