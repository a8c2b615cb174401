// The cuda backend's fusion queue: an op may wait so that the next is launched with it in one
// kernel ([norm, matmul]: a gemv that normalises its input; [matmul, add]: one that adds the
// residual; [gate|up matmul, silu_mul]: one that applies silu; [rope, rope, kv_store]: one
// rope-and-store launch). The ops queued are kept as these structs.
#pragma once

#include <optional>
#include <span>

#include "opencamp/backend.h"

namespace opencamp::cuda {

struct NormOp {
  Tensor out, x, weight;  // [R, D] f32 each (weight [D])
  float eps;
};
struct MatmulOp {
  Tensor out, x, weight;  // [T, N], [T, K], [N, K]
  std::optional<Tensor> bias;  // [N]
};
struct RopeOp {
  Tensor x;  // [T, H, hd]
  std::span<const int32_t> positions;
  Tensor inv_freq;  // [hd / 2]
};
struct StoreOp {
  KVLayerView cache;
  Tensor keys, values;  // [T, Hkv, hd]
  std::span<const KVSlot> slots;
};

}  // namespace opencamp::cuda
