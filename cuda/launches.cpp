// Uploads of each op's host-side arguments and the calls into the kernel launchers
// (kernels/kernels.h), each checked: a failed launch is an opencamp::Error naming it.
#include "backend_impl.h"

namespace opencamp::cuda {

static_assert(kReleasedBlock == opencamp::kReleasedBlock, "the kernels and the KV cache mark released blocks alike");

// The kernels' view of one layer of the KV cache (checked by the backend: keys and values share
// their strides, q8_0's key and value scales theirs).
static DeviceCache device_cache(const KVLayerView& cache) {
  DeviceCache c{cache.keys.data, cache.values.data, cache.keys.stride[0], cache.keys.stride[1],
                cache.keys.stride[2], cache.keys.stride[3]};
  c.type = cache.dtype == DType::BF16  ? KVType::BF16
           : cache.dtype == DType::F16 ? KVType::F16
           : cache.dtype == DType::Q8_0 ? KVType::Q8_0
                                        : KVType::F32;
  if (cache.dtype == DType::Q8_0) {
    c.key_scales = cache.key_scales.ptr<uint16_t>();
    c.value_scales = cache.value_scales.ptr<uint16_t>();
    c.ss0 = cache.key_scales.stride[0];
    c.ss1 = cache.key_scales.stride[1];
    c.ss2 = cache.key_scales.stride[2];
  }
  return c;
}

void CudaBackend::Impl::require_eager(const char* op) {
  if (graph_mode()) graph_contract_broken(op, "it needs host data uploaded in the middle of a graphed pass");
}

const int32_t* CudaBackend::Impl::device_tokens(std::span<const int32_t> ids, const char* op) {
  if (in_pass && same_span(ids, pass_tokens)) return pass_batch.tokens();
  require_eager(op);
  adhoc_batch.upload(ids, {}, {}, 0);
  return adhoc_batch.tokens();
}

const int32_t* CudaBackend::Impl::device_positions(std::span<const int32_t> positions, const char* op) {
  if (in_pass && same_span(positions, pass_positions)) return pass_batch.positions();
  require_eager(op);
  adhoc_batch.upload({}, positions, {}, 0);
  return adhoc_batch.positions();
}

DeviceSlots CudaBackend::Impl::device_slots(std::span<const KVSlot> slots, int64_t block_size, const char* op) {
  if (const int64_t set = pass_slot_set(slots); set >= 0) {
    if (pass_batch.block_size() != block_size) {  // the first pass: the block size was unknown
      require_eager(op);
      if (pass_batch.upload(pass_tokens, pass_positions, pass_slots, block_size)) bump_generation();
    }
    last_block_size = block_size;
    return pass_batch.slots(set);
  }
  require_eager(op);
  adhoc_batch.upload({}, {}, std::span(&slots, 1), block_size);
  last_block_size = block_size;
  return adhoc_batch.slots(0);
}

void CudaBackend::Impl::run_rmsnorm(const NormOp& op) {
  const bool heads = op.x.ndim == 3;
  RmsNormArgs a{};
  a.out = op.out.ptr<float>();
  a.out_s0 = op.out.stride[0];
  a.out_s1 = heads ? op.out.stride[1] : 0;
  a.out_s2 = op.out.stride[op.out.ndim - 1];
  a.x = op.x.ptr<float>();
  a.x_s0 = op.x.stride[0];
  a.x_s1 = heads ? op.x.stride[1] : 0;
  a.x_s2 = op.x.stride[op.x.ndim - 1];
  a.weight = op.weight.ptr<float>();
  a.weight_stride = op.weight.stride[0];
  a.rows = op.x.shape[0];
  a.heads = heads ? op.x.shape[1] : 1;
  a.dim = op.x.shape[op.x.ndim - 1];
  a.eps = op.eps;
  OPENCAMP_CUDA_CHECK(launch_rmsnorm(a, stream()));
}

bool CudaBackend::Impl::gemv_fits(const MatmulOp& op) {
  return op.x.shape[0] <= kGemvMaxTokens && rows_aligned(op.weight);
}

void CudaBackend::Impl::run_matmul(const MatmulOp& op, const NormOp* norm, const Tensor* residual, int64_t silu_pair) {
  MatmulArgs a{};
  a.x = op.x.ptr<float>();
  a.x_row = op.x.stride[0];
  a.x_col = op.x.stride[1];
  a.weight = op.weight.data;
  a.w_row = op.weight.stride[0];
  a.w_col = op.weight.stride[1];
  a.weight_type = element_type(op.weight.dtype, "matmul");
  a.out = op.out.ptr<float>();
  a.out_row = op.out.stride[0];
  a.out_col = op.out.stride[1];
  if (op.bias) {
    a.bias = op.bias->ptr<float>();
    a.bias_stride = op.bias->stride[0];
  }
  a.tokens = op.x.shape[0];
  a.k = op.x.shape[1];
  a.n = op.weight.shape[0];
  a.bf16_activations = op.weight.dtype == DType::BF16;
  if (norm != nullptr) {
    a.norm_weight = norm->weight.ptr<float>();
    a.norm_weight_stride = norm->weight.stride[0];
    a.norm_eps = norm->eps;
    a.norm_out = norm->out.ptr<float>();
    a.norm_out_row = norm->out.stride[0];
    a.norm_out_col = norm->out.stride[1];
  }
  if (residual != nullptr) {
    a.residual = residual->ptr<float>();
    a.residual_row = residual->stride[0];
    a.residual_col = residual->stride[1];
  }
  a.silu_pair = silu_pair;
  a.multiprocessors = context->multiprocessors();
  if (gemv_fits(op)) {
    OPENCAMP_CUDA_CHECK(launch_gemv(a, stream()));
  } else if (norm != nullptr || residual != nullptr || silu_pair != 0) {
    fail(ErrorKind::Internal, "cuda backend: a fused matmul reached a layout the decode kernel does not take");
  } else if (op.weight.dtype == DType::BF16 && rows_aligned(op.weight)) {
    OPENCAMP_CUDA_CHECK(launch_gemm_bf16_mma(a, stream()));
  } else if (op.weight.dtype == DType::F32) {
    OPENCAMP_CUDA_CHECK(launch_gemm_f32(a, stream()));
  } else {
    OPENCAMP_CUDA_CHECK(launch_matmul_generic(a, stream()));
  }
}

void CudaBackend::Impl::run_rope_store(const std::vector<RopeOp>& ropes, const StoreOp* store) {
  RopeStoreArgs a{};
  if (!ropes.empty()) {
    const RopeOp& first = ropes.front();
    a.positions = device_positions(first.positions, "rope");
    a.inv_freq = first.inv_freq.ptr<float>();
    a.inv_freq_stride = first.inv_freq.stride[0];
    a.tokens = first.x.shape[0];
    a.head_dim = first.x.shape[2];
    for (size_t i = 0; i < ropes.size(); ++i) {
      const int slot = static_cast<int>(i + 2 - ropes.size());  // the last rope takes slot 1
      const Tensor& x = ropes[i].x;
      a.rotated[slot] = x.ptr<float>();
      a.rot_s0[slot] = x.stride[0];
      a.rot_s1[slot] = x.stride[1];
      a.rot_s2[slot] = x.stride[2];
      a.rot_heads[slot] = x.shape[1];
    }
  }
  if (store != nullptr) {
    const Tensor& pool = store->cache.keys;
    a.store = true;
    a.store_keys_rotated = !ropes.empty() && same_view(ropes.back().x, store->keys);
    a.keys = store->keys.ptr<float>();
    a.k_s0 = store->keys.stride[0];
    a.k_s1 = store->keys.stride[1];
    a.k_s2 = store->keys.stride[2];
    a.values = store->values.ptr<float>();
    a.v_s0 = store->values.stride[0];
    a.v_s1 = store->values.stride[1];
    a.v_s2 = store->values.stride[2];
    a.kv_heads = store->keys.shape[1];
    a.cache = device_cache(store->cache);
    a.slots = device_slots(store->slots, pool.shape[1], "kv_store");
    a.tokens = store->keys.shape[0];
    a.head_dim = store->keys.shape[2];
  }
  OPENCAMP_CUDA_CHECK(launch_rope_store(a, stream()));
}

void CudaBackend::Impl::run_attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                   std::span<const KVSlot> slots, float scale, int32_t window) {
  const int64_t T = queries.shape[0], Hq = queries.shape[1], hd = queries.shape[2];
  const int64_t Hkv = cache.keys.shape[2], block_size = cache.keys.shape[1];
  AttentionArgs a{};
  a.queries = queries.ptr<float>();
  a.q_s0 = queries.stride[0];
  a.q_s1 = queries.stride[1];
  a.q_s2 = queries.stride[2];
  a.out = out.ptr<float>();
  a.o_s0 = out.stride[0];
  a.o_s1 = out.stride[1];
  a.o_s2 = out.stride[2];
  a.cache = device_cache(cache);
  a.slots = device_slots(slots, block_size, "attention");
  a.tokens = static_cast<int>(T);
  a.heads = static_cast<int>(Hq);
  a.kv_heads = static_cast<int>(Hkv);
  a.head_dim = static_cast<int>(hd);
  a.scale = scale;
  a.window = window;
  const int64_t group = Hq / Hkv;
  a.heads_per_item = static_cast<int>(std::min<int64_t>(group, kAttentionRows));
  int64_t max_keys = 0;
  for (const KVSlot& slot : slots) max_keys = std::max<int64_t>(max_keys, slot.position + 1);

  if (T <= kMaxGraphTokens) {  // one token per work item, keys split over blocks
    // The split of a token's keys depends only on the (power-of-two) bound and the model, not on
    // the batch: a token gets the same arithmetic alone and batched, eagerly and in a graph.
    const int64_t bound = key_bound(max_keys);
    const int64_t blocks_per_token = Hkv * ((group + a.heads_per_item - 1) / a.heads_per_item);
    const int64_t wanted =
        std::clamp<int64_t>((2 * context->multiprocessors() + blocks_per_token - 1) / blocks_per_token, 1, kMaxSplits);
    const int64_t per_split = std::max(kMinKeysPerSplit, round_up((bound + wanted - 1) / wanted, 32));
    a.keys_per_split = static_cast<int>(per_split);
    a.splits = static_cast<int>(std::max<int64_t>(1, (bound + per_split - 1) / per_split));
    a.items = nullptr;
    a.n_items = static_cast<int>(T);
  } else {  // runs of one sequence's tokens, a few per block, sharing each key tile
    require_eager("attention");
    const int64_t tokens_per_item = std::max<int64_t>(1, kAttentionRows / a.heads_per_item);
    std::vector<int32_t> items;
    for (int64_t t = 0; t < T;) {
      int64_t run_end = t + 1;
      while (run_end < T && slots[run_end].block_table == slots[t].block_table) ++run_end;
      for (int64_t first = t; first < run_end; first += tokens_per_item) {
        items.push_back(static_cast<int32_t>(first));
        items.push_back(static_cast<int32_t>(std::min(tokens_per_item, run_end - first)));
      }
      t = run_end;
    }
    attention_items.upload(items.data(), items.size() * sizeof(int32_t));
    a.items = static_cast<const int32_t*>(attention_items.device());
    a.n_items = static_cast<int>(items.size() / 2);
    a.keys_per_split = static_cast<int>(std::max<int64_t>(max_keys, 1));
    a.splits = 1;
  }
  if (a.splits > 1) {
    const size_t bytes = static_cast<size_t>(T * Hq * a.splits * (hd + 2)) * sizeof(float);
    if (partials.size() < bytes) {
      require_eager("attention");
      if (partials.reserve(bytes)) bump_generation();
    }
    a.partial = static_cast<float*>(partials.data());
  }
  const size_t shared_bytes = attention_shared_bytes(static_cast<int>(hd));
  if (shared_bytes > attention_shared_limit) {
    OPENCAMP_CUDA_CHECK(set_attention_shared_limit(shared_bytes));
    attention_shared_limit = shared_bytes;
  }
  OPENCAMP_CUDA_CHECK(launch_attention(a, stream()));
}

}  // namespace opencamp::cuda
