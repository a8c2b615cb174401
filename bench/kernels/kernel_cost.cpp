// Kernel cost of one matrix-vector product (a decode step's matmul) per weight format, on one
// thread, hot in cache (one matrix, called again and again) and streamed from memory (enough
// copies of it to leave the caches): ns per weight and GB/s of the weights' bytes.
//
//   cmake --build build --target opencamp-kernel-cost && build/bench/kernels/opencamp-kernel-cost [backend] [N] [K]
//
// Timing only (best of 5 rounds); correctness is tests/cpp/test_backend_ops.cpp's job.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "opencamp/backend.h"
#include "opencamp/thread_pool.h"

using namespace opencamp;

namespace {

// Seconds per call of out[1, N] = x[1, K] @ W^T over `copies` prepared copies of W, best of 5.
double seconds_per_call(Backend& backend, DType dtype, int64_t n, int64_t k, int copies) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(n * k));
  for (float& v : values) v = uniform(rng);
  std::vector<unsigned char> stored(dtype_bytes(dtype, n * k));
  convert_dtype(values.data(), DType::F32, stored.data(), dtype, n * k);
  std::vector<std::shared_ptr<Buffer>> owned;
  std::vector<Tensor> matrices;
  for (int c = 0; c < copies; ++c) {
    matrices.push_back(backend.prepare_weight(Tensor::contiguous(stored.data(), dtype, {n, k}), dtype,
                                              WeightUse::Matrix, owned));
  }
  std::vector<float> x(static_cast<size_t>(k)), out(static_cast<size_t>(n));
  for (float& v : x) v = uniform(rng);
  const Tensor xt = Tensor::contiguous(x.data(), DType::F32, {1, k});
  const Tensor outt = Tensor::contiguous(out.data(), DType::F32, {1, n});
  const int rounds = std::max(3, 600 / copies);
  double best = 1e30;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < rounds; ++r)
      for (const Tensor& m : matrices) backend.matmul(outt, xt, m, nullptr);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, elapsed / (rounds * copies));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string name = argc > 1 ? argv[1] : "avx";
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 1536, k = argc > 3 ? std::atoll(argv[3]) : 768;
  ThreadPool pool(1);
  BackendOptions options;
  options.pool = &pool;
  const std::unique_ptr<Backend> backend = create_backend(name, options);
  std::printf("%s, one thread, [%lld, %lld] matrix-vector product\n", name.c_str(), (long long)n, (long long)k);
  std::printf("| format | hot: ns per weight | hot GB/s | streamed: ns per weight | streamed GB/s |\n|---|---|---|---|---|\n");
  for (DType dtype : {DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4_K,
                      DType::Q5_K, DType::Q6_K}) {
    const double bytes = static_cast<double>(dtype_bytes(dtype, n * k));
    const int streamed_copies = static_cast<int>(std::max(2.0, 1.0e9 / bytes));  // ~1 GB: past every cache
    const double hot = seconds_per_call(*backend, dtype, n, k, 1);
    const double streamed = seconds_per_call(*backend, dtype, n, k, streamed_copies);
    std::printf("| %s | %.3f | %.1f | %.3f | %.1f |\n", dtype_name(dtype), hot * 1e9 / (n * k), bytes / hot / 1e9,
                streamed * 1e9 / (n * k), bytes / streamed / 1e9);
  }
  return 0;
}
