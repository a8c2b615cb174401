// Sampling on the device (CudaBackend::argmax, sample, apply_penalties): the host Sampler's stages
// as kernels, so a caller can copy one token id per row instead of the logits. The engine samples
// on the host today; tests/cpp/test_cuda.cpp checks these against the host Sampler.
#include <cmath>

#include "backend_impl.h"

namespace opencamp::cuda {

// ---- sampling ------------------------------------------------------------------------------------

namespace {

// logits [R, V] with contiguous rows, on the device; returns R.
int expect_logits(const Tensor& logits, const char* op) {
  expect(logits.dtype == DType::F32 && (logits.ndim == 2 || logits.ndim == 1) &&
             logits.stride[logits.ndim - 1] == 1,
         op, "logits must be f32 [R, V] (or [V]) with contiguous rows");
  expect_device(logits, op, "logits");
  expect(logits.shape[logits.ndim - 1] > 0 && logits.shape[logits.ndim - 1] < (int64_t{1} << 31), op,
         "the vocabulary must have 1 to 2^31 - 1 entries");
  return logits.ndim == 2 ? static_cast<int>(logits.shape[0]) : 1;
}

}  // namespace

std::vector<int32_t> CudaBackend::argmax(const Tensor& logits) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  const int rows = expect_logits(logits, "argmax");
  s.finish_graphed_part("argmax", Fingerprint(kSample).add(logits).value());
  const int64_t vocab = logits.shape[logits.ndim - 1];
  const int64_t row_stride = logits.ndim == 2 ? logits.stride[0] : vocab;
  s.token_ids.reserve(static_cast<size_t>(rows) * sizeof(int32_t));
  int32_t* ids = static_cast<int32_t*>(s.token_ids.data());
  OPENCAMP_CUDA_CHECK(launch_argmax(logits.ptr<float>(), row_stride, vocab, rows, ids, s.stream()));
  std::vector<int32_t> result(static_cast<size_t>(rows));
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(result.data(), ids, result.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
  return result;
}

std::vector<int32_t> CudaBackend::sample(const Tensor& logits, std::span<const DeviceSampling> rows) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  const int n_rows = expect_logits(logits, "sample");
  expect(static_cast<int64_t>(rows.size()) == n_rows, "sample", "one DeviceSampling per logits row");
  std::vector<SampleRowParams> params;
  for (const DeviceSampling& r : rows) {
    if (!(r.temperature >= 0.0f) || !std::isfinite(r.temperature) || r.top_k < 0 || !(r.top_p > 0.0f && r.top_p <= 1.0f) ||
        !(r.min_p >= 0.0f && r.min_p <= 1.0f) || !(r.draw >= 0.0 && r.draw < 1.0)) {
      fail(ErrorKind::InvalidArgument, "cuda backend, op sample: temperature >= 0, top_k >= 0, top_p in (0, 1], "
                                       "min_p in [0, 1] and draw in [0, 1) are required");
    }
    params.push_back(SampleRowParams{r.temperature, r.top_k, r.top_p, r.min_p, r.draw});
  }
  s.finish_graphed_part("sample", Fingerprint(kSample).add(logits).value());
  const int64_t vocab = logits.shape[logits.ndim - 1];
  const int64_t row_stride = logits.ndim == 2 ? logits.stride[0] : vocab;
  s.sampling_params.upload(params.data(), params.size() * sizeof(SampleRowParams));
  s.token_ids.reserve(static_cast<size_t>(n_rows) * sizeof(int32_t));
  int32_t* ids = static_cast<int32_t*>(s.token_ids.data());
  OPENCAMP_CUDA_CHECK(launch_sample(logits.ptr<float>(), row_stride, vocab, n_rows,
                                    static_cast<const SampleRowParams*>(s.sampling_params.device()), ids, s.stream()));
  std::vector<int32_t> result(static_cast<size_t>(n_rows));
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(result.data(), ids, result.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
  for (size_t r = 0; r < result.size(); ++r) {
    if (result[r] < 0) fail(ErrorKind::Internal, "every logit is NaN (row ", r, ")");
  }
  return result;
}

void CudaBackend::apply_penalties(const Tensor& logits, std::span<const int32_t> history, float repetition_penalty,
                                  float presence_penalty, float frequency_penalty) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect(expect_logits(logits, "apply_penalties") == 1, "apply_penalties", "penalties take one row");
  if (repetition_penalty == 1.0f && presence_penalty == 0.0f && frequency_penalty == 0.0f) return;
  expect(repetition_penalty > 0.0f, "apply_penalties", "repetition_penalty must be > 0");
  const int64_t vocab = logits.shape[logits.ndim - 1];
  std::unordered_map<int32_t, int32_t> counts;
  for (int32_t token : history) {
    if (token >= 0 && token < vocab) ++counts[token];
  }
  if (counts.empty()) return;
  std::vector<int32_t> packed;  // [tokens n][counts n]
  for (const auto& [token, count] : counts) packed.push_back(token);
  for (const auto& [token, count] : counts) packed.push_back(count);
  s.finish_graphed_part("apply_penalties", Fingerprint(kSample).add(logits).value());
  s.penalty_tokens.upload(packed.data(), packed.size() * sizeof(int32_t));
  const int32_t* device = static_cast<const int32_t*>(s.penalty_tokens.device());
  const int n = static_cast<int>(counts.size());
  OPENCAMP_CUDA_CHECK(launch_penalties(logits.ptr<float>(), device, device + n, n, repetition_penalty,
                                       presence_penalty, frequency_penalty, s.stream()));
}

}  // namespace opencamp::cuda
