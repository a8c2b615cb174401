// The fusion queue (see fusion.h): flushing what waits, or dropping it.
#include "backend_impl.h"

namespace opencamp::cuda {

void CudaBackend::Impl::discard_pending() {
  pending_norm.reset();
  pending_matmul.reset();
  pending_ropes.clear();
}

void CudaBackend::Impl::flush_pending() {
  if (pending_matmul) {
    const MatmulOp matmul = *pending_matmul;
    const std::optional<NormOp> norm = pending_norm;
    discard_pending();
    run_matmul(matmul, norm ? &*norm : nullptr, nullptr, 0);
  } else if (pending_norm) {
    const NormOp norm = *pending_norm;
    discard_pending();
    run_rmsnorm(norm);
  }
  if (!pending_ropes.empty()) {
    const std::vector<RopeOp> ropes = std::move(pending_ropes);
    discard_pending();
    run_rope_store(ropes, nullptr);
  }
}

}  // namespace opencamp::cuda
