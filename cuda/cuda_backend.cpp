// The cuda backend (see cuda_backend.h for what it does): the device probe and registration, and
// the Backend ops: each checks its arguments (the same errors as the cpu oracle, checks.h), then
// queues (fusion.h), records or skips itself for a graph (graphs.h) and launches (launches.cpp).
#include "backend_impl.h"

#include <cmath>
#include <cstring>

#include "core/builtin.h"

namespace opencamp::cuda {

// ---- device probe and registration -------------------------------------------------------------

const DeviceProbe& probe_devices() {
  static const DeviceProbe probe = [] {
    DeviceProbe p;
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
      cudaGetLastError();
      if (status == cudaErrorNoDevice) {
        p.summary = "no NVIDIA GPU found";
      } else if (status == cudaErrorInsufficientDriver) {
        p.summary = "no usable NVIDIA driver (libcuda.so.1 is missing or older than CUDA " +
                    std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
                    ", which this build needs)";
      } else {
        p.summary = "CUDA cannot start here: " + describe(status);
      }
      return p;
    }
    p.devices = count;
    if (count == 0) {
      p.summary = "no NVIDIA GPU found";
      return p;
    }
    cudaDeviceProp props{};
    const cudaError_t props_status = cudaGetDeviceProperties(&props, 0);
    if (props_status != cudaSuccess) {
      cudaGetLastError();
      p.summary = "cannot read GPU 0's properties: " + describe(props_status);
      return p;
    }
    p.summary = std::string(props.name) + ", compute capability " + std::to_string(props.major) + "." +
                std::to_string(props.minor) + ", " + std::to_string(props.totalGlobalMem >> 30) + " GiB";
    if (props.major < 8) {
      p.summary += "; the cuda backend needs compute capability 8.0 or newer (A100, RTX 30xx, H100, ...)";
      return p;
    }
    p.usable = true;
    return p;
  }();
  return probe;
}

// ---- the implementation ----------------------------------------------------------------------

// ---- CudaBackend ------------------------------------------------------------------------------

CudaBackend::CudaBackend(int device) {
  const DeviceProbe& probe = probe_devices();
  if (!probe.usable) fail(ErrorKind::Unsupported, "cuda backend: cannot run here: ", probe.summary);
  if (device < 0 || device >= probe.devices) {
    fail(ErrorKind::InvalidArgument, "cuda backend: no GPU ", device, " (", probe.devices, " found)");
  }
  impl_ = std::make_unique<Impl>(device);
}

CudaBackend::~CudaBackend() = default;

std::shared_ptr<Buffer> CudaBackend::allocate(size_t bytes) {
  impl_->context->activate();
  return std::make_shared<DeviceBuffer>(impl_->context, bytes);
}

Tensor CudaBackend::prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                                   std::vector<std::shared_ptr<Buffer>>& owned) {
  if (dtype != DType::F32 && dtype != DType::BF16) {
    fail(ErrorKind::InvalidArgument, "cuda backend holds weights as f32 or bf16, not ", dtype_name(dtype));
  }
  if (use == WeightUse::Table || source.ndim != 2) return Backend::prepare_weight(source, dtype, use, owned);
  if (!source.is_contiguous()) fail(ErrorKind::Internal, "weights must be contiguous");
  // Row-major with each row padded to 16 bytes (zeros), so every row starts aligned for the
  // kernels' wide loads.
  const int64_t rows = source.shape[0], cols = source.shape[1], padded = round_up(cols, 8);
  const size_t element = dtype_size(dtype), in_element = dtype_size(source.dtype);
  std::vector<unsigned char> staging(static_cast<size_t>(rows * padded) * element, 0);
  for (int64_t r = 0; r < rows; ++r) {
    convert_dtype(static_cast<const unsigned char*>(source.data) + static_cast<size_t>(r * cols) * in_element,
                  source.dtype, staging.data() + static_cast<size_t>(r * padded) * element, dtype, cols);
  }
  auto buffer = allocate(staging.size());
  owned.push_back(buffer);
  Tensor prepared = source;
  prepared.dtype = dtype;
  prepared.data = buffer->data();
  prepared.device = Device::CUDA;
  prepared.layout = Layout::Strided;
  prepared.stride = {padded, 1, 0, 0};
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(prepared.data, staging.data(), staging.size(), cudaMemcpyHostToDevice,
                                      impl_->stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(impl_->stream()));
  return prepared;
}

void CudaBackend::embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "embedding", "out");
  expect(table.ndim == 2 && out.shape[1] == table.shape[1] && out.shape[0] == static_cast<int64_t>(ids.size()),
         "embedding", "shapes disagree (out [T, D], table [V, D], ids [T])");
  expect_device(table, "embedding", "table");
  const ElementType type = element_type(table.dtype, "embedding");
  for (size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] < 0 || ids[t] >= table.shape[0]) {
      fail(ErrorKind::InvalidArgument, "token id ", ids[t], " is outside the vocabulary [0, ", table.shape[0], ")");
    }
  }
  const bool pass_data = same_span(ids, s.pass_tokens);
  if (!s.enter("embedding", Fingerprint(kEmbedding).add(out).add(table).value(), pass_data)) return;
  s.context->activate();
  s.flush_pending();
  EmbeddingArgs a{};
  a.ids = s.device_tokens(ids, "embedding");
  a.out = out.ptr<float>();
  a.out_row = out.stride[0];
  a.out_col = out.stride[1];
  a.table = table.data;
  a.table_row = table.stride[0];
  a.table_col = table.stride[1];
  a.table_type = type;
  a.tokens = out.shape[0];
  a.dim = out.shape[1];
  OPENCAMP_CUDA_CHECK(launch_embedding(a, s.stream()));
}

void CudaBackend::rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect((x.ndim == 2 || x.ndim == 3) && x.dtype == DType::F32 && out.dtype == DType::F32 &&
             out.ndim == x.ndim && out.shape == x.shape,
         "rmsnorm", "out and x must be f32 [R, D] or [T, H, D] of the same shape");
  expect(weight.ndim == 1 && weight.shape[0] == x.shape[x.ndim - 1] && weight.dtype == DType::F32, "rmsnorm",
         "weight must be f32 [D]");
  expect_device(out, "rmsnorm", "out");
  expect_device(x, "rmsnorm", "x");
  expect_device(weight, "rmsnorm", "weight");
  if (!s.enter("rmsnorm", Fingerprint(kRmsNorm).add(out).add(x).add(weight).add(eps).value(), true)) return;
  s.context->activate();
  const NormOp op{out, x, weight, eps};
  s.flush_pending();
  if (s.fusion_active() && x.ndim == 2) {
    s.pending_norm = op;  // the next matmul may take it as its input transform
    return;
  }
  s.run_rmsnorm(op);
}

void CudaBackend::matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "matmul", "out");
  expect_f32(x, 2, "matmul", "x");
  expect(weight.ndim == 2 && weight.shape[1] == x.shape[1] && out.shape[0] == x.shape[0] &&
             out.shape[1] == weight.shape[0],
         "matmul", "shapes disagree (out [T, N], x [T, K], weight [N, K])");
  expect(weight.dtype == DType::F32 || weight.dtype == DType::BF16, "matmul", "weights must be f32 or bf16");
  expect(weight.layout == Layout::Strided, "matmul",
         "the weight was packed for another backend; prepare it with this backend");
  expect_device(weight, "matmul", "weight");
  if (bias != nullptr) {
    expect(bias->ndim == 1 && bias->shape[0] == weight.shape[0] && bias->dtype == DType::F32, "matmul",
           "bias must be f32 [N]");
    expect_device(*bias, "matmul", "bias");
  }
  Fingerprint fingerprint(kMatmul);
  fingerprint.add(out).add(x).add(weight);
  if (bias != nullptr) fingerprint.add(*bias);
  if (!s.enter("matmul", fingerprint.value(), true)) return;
  s.context->activate();
  MatmulOp op{out, x, weight, bias ? std::optional<Tensor>(*bias) : std::nullopt};
  if (s.fusion_active() && Impl::gemv_fits(op)) {
    // Normalise x on the fly when the pending norm wrote it (and nothing else overlaps).
    const bool takes_norm = s.pending_norm && !s.pending_matmul && same_view(s.pending_norm->out, x) &&
                            !overlaps(s.pending_norm->out, s.pending_norm->x) &&
                            !overlaps(out, s.pending_norm->x) && !overlaps(out, s.pending_norm->out);
    if (!takes_norm) s.flush_pending();
    s.pending_matmul = op;
    return;
  }
  s.flush_pending();
  s.run_matmul(op, nullptr, nullptr, 0);
}

void CudaBackend::rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(x, 3, "rope", "x");
  expect(static_cast<int64_t>(positions.size()) == x.shape[0] && x.shape[2] % 2 == 0 && inv_freq.ndim == 1 &&
             inv_freq.shape[0] * 2 == x.shape[2] && inv_freq.dtype == DType::F32,
         "rope", "shapes disagree (x [T, H, head_dim], inv_freq [head_dim / 2])");
  expect_device(inv_freq, "rope", "inv_freq");
  for (int32_t p : positions) {
    if (p < 0) fail(ErrorKind::InvalidArgument, "rope: negative position ", p);
  }
  const bool pass_data = same_span(positions, s.pass_positions);
  if (!s.enter("rope", Fingerprint(kRope).add(x).add(inv_freq).value(), pass_data)) return;
  s.context->activate();
  const RopeOp op{x, positions, inv_freq};
  if (s.fusion_active() && s.in_pass && pass_data) {
    const bool pairs = s.pending_ropes.size() == 1 && same_span(s.pending_ropes[0].positions, positions) &&
                       same_view(s.pending_ropes[0].inv_freq, inv_freq) &&
                       s.pending_ropes[0].x.shape[0] == x.shape[0] && s.pending_ropes[0].x.shape[2] == x.shape[2] &&
                       disjoint(s.pending_ropes[0].x, x);
    if (!pairs) s.flush_pending();
    s.pending_ropes.push_back(op);  // the kv_store that follows may store the rotated keys
    return;
  }
  s.flush_pending();
  s.run_rope_store({op}, nullptr);
}

// A KV cache view the kernels read: its type's elements on the device, keys and values with the
// same strides; q8_0's f16 scales with groups contiguous, keys' and values' alike.
static void expect_kv_cache(const KVLayerView& cache, const char* op) {
  const DType element = cache.dtype == DType::Q8_0 ? DType::I8 : cache.dtype;
  expect(is_kv_dtype(cache.dtype) && cache.keys.dtype == element && cache.values.dtype == element &&
             cache.keys.ndim == 4 && cache.values.ndim == 4,
         op, "the cache must be f32, bf16, f16 or q8_0 (i8 quants) [n_blocks, block_size, Hkv, hd]");
  expect_device(cache.keys, op, "cache keys");
  expect_device(cache.values, op, "cache values");
  if (cache.dtype == DType::Q8_0) {
    const Tensor& ks = cache.key_scales;
    const Tensor& vs = cache.value_scales;
    expect(ks.dtype == DType::F16 && vs.dtype == DType::F16 && ks.ndim == 4 && ks.shape == vs.shape &&
               ks.stride == vs.stride && ks.stride[3] == 1 && ks.shape[3] * kKVQuantGroup == cache.keys.shape[3],
           op, "a q8_0 cache needs f16 scales [n_blocks, block_size, Hkv, hd / 32], groups contiguous");
    expect_device(ks, op, "cache key scales");
    expect_device(vs, op, "cache value scales");
  }
}

void CudaBackend::kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
                           std::span<const KVSlot> slots) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(keys, 3, "kv_store", "keys");
  expect_f32(values, 3, "kv_store", "values");
  expect_kv_cache(cache, "kv_store");
  const Tensor& pool = cache.keys;
  expect(keys.shape[0] == static_cast<int64_t>(slots.size()) && keys.shape[1] == pool.shape[2] &&
             keys.shape[2] == pool.shape[3] && values.shape == keys.shape && cache.values.shape == pool.shape &&
             cache.values.stride == pool.stride,
         "kv_store", "shapes disagree with the cache");
  for (const KVSlot& slot : slots) {
    expect(slot.position >= 0 && slot.block_table != nullptr, "kv_store", "a slot has a negative position or no block table");
  }
  const int64_t slot_set = s.pass_slot_set(slots);
  const bool pass_data = slot_set >= 0;
  if (!s.enter("kv_store",
               Fingerprint(kKvStore).add(pool).add(cache.values).add(keys).add(values)
                   .add(static_cast<uint64_t>(slot_set)).value(),
               pass_data)) {
    return;
  }
  s.context->activate();
  const StoreOp op{cache, keys, values, slots};
  if (!s.pending_ropes.empty() && pass_data && same_view(s.pending_ropes.back().x, keys)) {
    bool values_apart = true;
    for (const RopeOp& rope : s.pending_ropes) values_apart = values_apart && disjoint(rope.x, values);
    if (values_apart) {
      const std::vector<RopeOp> ropes = std::move(s.pending_ropes);
      s.discard_pending();
      s.run_rope_store(ropes, &op);  // rope of q and k, then the store, in one launch
      return;
    }
  }
  s.flush_pending();
  s.run_rope_store({}, &op);
}

void CudaBackend::attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                            std::span<const KVSlot> slots, float scale, int32_t window) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 3, "attention", "out");
  expect_f32(queries, 3, "attention", "queries");
  expect_kv_cache(cache, "attention");
  const int64_t T = queries.shape[0], Hq = queries.shape[1], hd = queries.shape[2];
  const int64_t Hkv = cache.keys.shape[2];
  expect(out.shape == queries.shape && T == static_cast<int64_t>(slots.size()) && hd == cache.keys.shape[3] &&
             Hkv > 0 && Hq % Hkv == 0 && cache.values.shape == cache.keys.shape &&
             cache.values.stride == cache.keys.stride,
         "attention", "shapes disagree (queries [T, H, hd], cache [.., .., Hkv, hd], H % Hkv == 0)");
  if (hd > kMaxHeadDim) {
    fail(ErrorKind::Unsupported, "cuda backend, op attention: head_dim ", hd, " is over the ", kMaxHeadDim,
         " the kernels hold");
  }
  for (const KVSlot& slot : slots) {
    expect(slot.position >= 0 && slot.block_table != nullptr, "attention", "a slot has a negative position or no block table");
  }
  const int64_t slot_set = s.pass_slot_set(slots);
  const bool pass_data = slot_set >= 0;
  if (!s.enter("attention",
               Fingerprint(kAttention).add(out).add(queries).add(cache.keys).add(cache.values).add(scale)
                   .add(static_cast<uint64_t>(window)).add(static_cast<uint64_t>(slot_set)).value(),
               pass_data)) {
    return;
  }
  s.context->activate();
  s.flush_pending();
  s.run_attention(out, queries, cache, slots, scale, window);
}

void CudaBackend::silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "silu_mul", "out");
  expect_f32(gate, 2, "silu_mul", "gate");
  expect_f32(up, 2, "silu_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "silu_mul", "shapes disagree");
  if (!s.enter("silu_mul", Fingerprint(kSiluMul).add(out).add(gate).add(up).value(), true)) return;
  s.context->activate();
  if (s.pending_matmul) {
    // gate and up the two column halves of the pending matmul's output, out == gate: one pass.
    const Tensor& mm = s.pending_matmul->out;
    const int64_t F = gate.shape[1];
    const bool halves = same_view(out, gate) && gate.data == mm.data && mm.shape[1] == 2 * F &&
                        gate.stride == mm.stride && up.stride == mm.stride && gate.shape[0] == mm.shape[0] &&
                        up.data == mm.at({0, F});
    if (halves && !s.pending_norm.has_value()) {
      const MatmulOp matmul = *s.pending_matmul;
      s.discard_pending();
      s.run_matmul(matmul, nullptr, nullptr, F);
      return;
    }
    if (halves) {
      const MatmulOp matmul = *s.pending_matmul;
      const NormOp norm = *s.pending_norm;
      s.discard_pending();
      s.run_matmul(matmul, &norm, nullptr, F);
      return;
    }
  }
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], gate.ptr<float>(), gate.stride[0],
                    gate.stride[1],   up.ptr<float>(), up.stride[0], up.stride[1],     out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_silu_mul(a, s.stream()));
}

void CudaBackend::gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "gelu_tanh_mul", "out");
  expect_f32(gate, 2, "gelu_tanh_mul", "gate");
  expect_f32(up, 2, "gelu_tanh_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "gelu_tanh_mul", "shapes disagree");
  if (!s.enter("gelu_tanh_mul", Fingerprint(kGeluTanhMul).add(out).add(gate).add(up).value(), true)) return;
  s.context->activate();
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], gate.ptr<float>(), gate.stride[0],
                    gate.stride[1],   up.ptr<float>(), up.stride[0], up.stride[1],     out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_gelu_tanh_mul(a, s.stream()));
}

void CudaBackend::scale(const Tensor& out, const Tensor& x, float factor) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "scale", "out");
  expect_f32(x, 2, "scale", "x");
  expect(out.shape == x.shape, "scale", "shapes disagree");
  if (!s.enter("scale", Fingerprint(kScale).add(out).add(x).add(factor).value(), true)) return;
  s.context->activate();
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], x.ptr<float>(), x.stride[0],
                    x.stride[1],      nullptr,         0,            0,             out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_scale(a, factor, s.stream()));
}

void CudaBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "add", "out");
  expect_f32(a, 2, "add", "a");
  expect_f32(b, 2, "add", "b");
  expect(out.shape == a.shape && a.shape == b.shape, "add", "shapes disagree");
  if (!s.enter("add", Fingerprint(kAdd).add(out).add(a).add(b).value(), true)) return;
  s.context->activate();
  if (s.pending_matmul) {
    // x = x + (matmul output): the matmul's epilogue adds into x as it writes its output.
    const MatmulOp& mm = *s.pending_matmul;
    const bool residual = (same_view(b, mm.out) && same_view(out, a)) || (same_view(a, mm.out) && same_view(out, b));
    bool apart = residual && !overlaps(out, mm.out) && !overlaps(out, mm.x) && !overlaps(out, mm.weight);
    if (apart && s.pending_norm) apart = !overlaps(out, s.pending_norm->x) && !overlaps(out, s.pending_norm->out);
    if (apart) {
      const MatmulOp matmul = mm;
      const std::optional<NormOp> norm = s.pending_norm;
      s.discard_pending();
      s.run_matmul(matmul, norm ? &*norm : nullptr, &out, 0);
      return;
    }
  }
  s.flush_pending();
  ElementwiseArgs args{out.ptr<float>(), out.stride[0], out.stride[1], a.ptr<float>(), a.stride[0],
                       a.stride[1],      b.ptr<float>(),   b.stride[0],   b.stride[1],    out.shape[0],
                       out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_add(args, s.stream()));
}

void CudaBackend::to_host(void* host, const Tensor& source) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect_device(source, "to_host", "source");
  expect(source.is_contiguous(), "to_host", "the source must be contiguous");
  s.finish_graphed_part("to_host", Fingerprint(kToHost).add(source).value());
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(host, source.data, source.nbytes(), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
}

void CudaBackend::from_host(const Tensor& target, const void* host) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect_device(target, "from_host", "target");
  expect(target.is_contiguous(), "from_host", "the target must be contiguous");
  if (s.graph_mode()) s.graph_contract_broken("from_host", "host data cannot be copied into a graphed pass");
  s.flush_pending();
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(target.data, host, target.nbytes(), cudaMemcpyHostToDevice, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));  // the caller may free `host` on return
}

void CudaBackend::begin_forward(const ForwardInfo& batch) { impl_->begin_forward(batch); }

void CudaBackend::end_forward() { impl_->end_forward(); }

// ---- extras --------------------------------------------------------------------------------------

PoolStats CudaBackend::pool_stats() const { return impl_->context->stats(); }

GraphStats CudaBackend::graph_stats() const {
  GraphStats stats = impl_->stats;
  stats.cached_graphs = impl_->graphs.size();
  return stats;
}

void CudaBackend::set_graphs_enabled(bool enabled) {
  if (impl_->in_pass) fail(ErrorKind::Internal, "cuda backend: graphs switched inside a pass");
  impl_->graphs_enabled = enabled;
  if (!enabled) impl_->drop_graphs();
}

void CudaBackend::set_fusion_enabled(bool enabled) {
  if (impl_->in_pass) fail(ErrorKind::Internal, "cuda backend: fusion switched inside a pass");
  impl_->fusion_enabled = enabled;
}

std::string CudaBackend::device_name() const { return impl_->device_name; }

void CudaBackend::synchronize() {
  impl_->context->activate();
  impl_->rethrow_deferred();
  if (!impl_->in_pass) impl_->flush_pending();
  impl_->context->synchronize();
}

}  // namespace opencamp::cuda

namespace opencamp {

BackendInfo cuda_backend_info() {
  BackendInfo info;
  info.name = "cuda";
  info.score = 1000;  // a usable GPU beats every CPU backend for "auto"
  info.description = "NVIDIA GPU kernels (bf16 tensor cores, CUDA graphs): " + cuda::probe_devices().summary;
  info.usable = [] { return cuda::probe_devices().usable; };
  info.create = [](const BackendOptions&) -> std::unique_ptr<Backend> {
    return std::make_unique<cuda::CudaBackend>(0);
  };
  return info;
}

}  // namespace opencamp

