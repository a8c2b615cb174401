// The kernel launchers of cuda/kernels/kernels.h for a build without nvcc: each fails with
// cudaErrorStubLibrary (never reached: the stub runtime leaves the backend unusable). The real
// ones are the .cu files; the declarations are shared, so a changed launcher breaks both.
#include "kernels/kernels.h"

namespace opencamp::cuda {

cudaError_t launch_embedding(const EmbeddingArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_rmsnorm(const RmsNormArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_add(const ElementwiseArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_silu_mul(const ElementwiseArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_rope_store(const RopeStoreArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_attention(const AttentionArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
size_t attention_shared_bytes(int) { return 0; }
cudaError_t set_attention_shared_limit(size_t) { return cudaErrorStubLibrary; }
cudaError_t launch_gemv(const MatmulArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_gemm_bf16_mma(const MatmulArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_gemm_f32(const MatmulArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_matmul_generic(const MatmulArgs&, cudaStream_t) { return cudaErrorStubLibrary; }
cudaError_t launch_argmax(const float*, int64_t, int64_t, int, int32_t*, cudaStream_t) {
  return cudaErrorStubLibrary;
}
cudaError_t launch_sample(const float*, int64_t, int64_t, int, const SampleRowParams*, int32_t*,
                          cudaStream_t) {
  return cudaErrorStubLibrary;
}
cudaError_t launch_penalties(float*, const int32_t*, const int32_t*, int, float, float, float,
                             cudaStream_t) {
  return cudaErrorStubLibrary;
}

}  // namespace opencamp::cuda
