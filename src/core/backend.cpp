#include "opencamp/backend.h"

#include <algorithm>
#include <cstring>
#include <mutex>

#include "core/builtin.h"
#include "opencamp/error.h"

namespace opencamp {

std::shared_ptr<Buffer> Backend::allocate(size_t bytes) {
  return std::make_shared<HostBuffer>(bytes);
}

Tensor Backend::prepare_weight(const Tensor& source, DType dtype, WeightUse,
                               std::vector<std::shared_ptr<Buffer>>& owned) {
  if (!source.is_contiguous()) fail(ErrorKind::Internal, "weights must be contiguous");
  if (source.dtype == dtype && device() == Device::CPU) return source;  // zero-copy
  auto buffer = allocate(dtype_bytes(dtype, source.numel()));
  owned.push_back(buffer);
  Tensor converted = source;
  converted.dtype = dtype;
  converted.data = buffer->data();
  converted.device = device();
  if (device() == Device::CPU) {
    convert_dtype(source.data, source.dtype, converted.data, dtype, source.numel());
  } else {
    HostBuffer staging(converted.nbytes());
    convert_dtype(source.data, source.dtype, staging.data(), dtype, source.numel());
    from_host(converted, staging.data());
  }
  return converted;
}

bool is_kv_dtype(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::Q8_0;
}

size_t kv_head_bytes(DType kv_dtype, int64_t head_dim) {
  if (!is_kv_dtype(kv_dtype)) {
    fail(ErrorKind::InvalidArgument, "a KV cache holds f32, bf16, f16 or q8_0, not ", dtype_name(kv_dtype));
  }
  if (kv_dtype == DType::Q8_0 && head_dim % kKVQuantGroup != 0) {
    fail(ErrorKind::InvalidArgument, "a q8_0 KV cache needs head_dim to be a multiple of ", kKVQuantGroup,
         " (this model's is ", head_dim, "); use kv_cache_dtype f16, bf16 or f32");
  }
  return dtype_bytes(kv_dtype, head_dim);
}

namespace {

// Element offset of (block, slot, head, d) in a 4-d view.
int64_t offset4(const Tensor& t, int64_t block, int64_t slot, int64_t head, int64_t d) {
  return block * t.stride[0] + slot * t.stride[1] + head * t.stride[2] + d * t.stride[3];
}

}  // namespace

float kv_load(const KVLayerView& cache, KVPart part, int64_t block, int64_t slot, int64_t head, int64_t d) {
  const Tensor& data = part == KVPart::Keys ? cache.keys : cache.values;
  const float value = load_as_f32(data.data, data.dtype, offset4(data, block, slot, head, d));
  if (cache.dtype != DType::Q8_0) return value;
  const Tensor& scales = part == KVPart::Keys ? cache.key_scales : cache.value_scales;
  const uint16_t d_bits = scales.ptr<uint16_t>()[offset4(scales, block, slot, head, d / kKVQuantGroup)];
  return f16_to_f32(d_bits) * value;
}

void kv_store_row(const KVLayerView& cache, KVPart part, int64_t block, int64_t slot, int64_t head,
                  const float* x) {
  const Tensor& data = part == KVPart::Keys ? cache.keys : cache.values;
  const int64_t head_dim = data.shape[3];
  auto at = [&](int64_t d) { return offset4(data, block, slot, head, d); };
  switch (cache.dtype) {
    case DType::F32:
      for (int64_t d = 0; d < head_dim; ++d) data.ptr<float>()[at(d)] = x[d];
      return;
    case DType::BF16:
      for (int64_t d = 0; d < head_dim; ++d) data.ptr<uint16_t>()[at(d)] = f32_to_bf16(x[d]);
      return;
    case DType::F16:
      for (int64_t d = 0; d < head_dim; ++d) data.ptr<uint16_t>()[at(d)] = f32_to_f16(x[d]);
      return;
    case DType::Q8_0: {
      // One GGUF Q8_0 block per 32 dims (f16 scale, then 32 int8 quants), split apart.
      const Tensor& scales = part == KVPart::Keys ? cache.key_scales : cache.value_scales;
      unsigned char quantised[sizeof(uint16_t) + kKVQuantGroup];
      for (int64_t g = 0; g < head_dim / kKVQuantGroup; ++g) {
        convert_dtype(x + g * kKVQuantGroup, DType::F32, quantised, DType::Q8_0, kKVQuantGroup);
        std::memcpy(scales.ptr<uint16_t>() + offset4(scales, block, slot, head, g), quantised, sizeof(uint16_t));
        for (int64_t i = 0; i < kKVQuantGroup; ++i) {
          std::memcpy(data.ptr<int8_t>() + at(g * kKVQuantGroup + i), quantised + sizeof(uint16_t) + i, 1);
        }
      }
      return;
    }
    default:
      fail(ErrorKind::Internal, "KV cache of type ", dtype_name(cache.dtype));
  }
}

void Backend::unsupported(const char* op) const {
  fail(ErrorKind::Unsupported, "backend '", name(), "' does not implement op '", op, "'");
}

void Backend::embedding(const Tensor&, const Tensor&, std::span<const int32_t>) {
  unsupported("embedding");
}
void Backend::rmsnorm(const Tensor&, const Tensor&, const Tensor&, float) { unsupported("rmsnorm"); }
void Backend::matmul(const Tensor&, const Tensor&, const Tensor&, const Tensor*) {
  unsupported("matmul");
}
void Backend::rope(const Tensor&, std::span<const int32_t>, const Tensor&) { unsupported("rope"); }
void Backend::kv_store(const KVLayerView&, const Tensor&, const Tensor&, std::span<const KVSlot>) {
  unsupported("kv_store");
}
void Backend::attention(const Tensor&, const Tensor&, const KVLayerView&, std::span<const KVSlot>,
                        float, int32_t) {
  unsupported("attention");
}
void Backend::silu_mul(const Tensor&, const Tensor&, const Tensor&) { unsupported("silu_mul"); }
void Backend::gelu_tanh_mul(const Tensor&, const Tensor&, const Tensor&) { unsupported("gelu_tanh_mul"); }
void Backend::scale(const Tensor&, const Tensor&, float) { unsupported("scale"); }
void Backend::add(const Tensor&, const Tensor&, const Tensor&) { unsupported("add"); }

void Backend::to_host(void* host, const Tensor& source) {
  if (device() != Device::CPU) unsupported("to_host");
  std::memcpy(host, source.data, source.nbytes());
}
void Backend::from_host(const Tensor& target, const void* host) {
  if (device() != Device::CPU) unsupported("from_host");
  std::memcpy(target.data, host, target.nbytes());
}

namespace {

std::mutex registry_mutex;

std::vector<BackendInfo> builtin_backends() {
  std::vector<BackendInfo> backends{cpu_backend_info()};
#ifdef OPENCAMP_HAVE_AVX
  for (auto& info : avx_backend_infos()) backends.push_back(std::move(info));
#endif
#ifdef OPENCAMP_HAVE_CUDA
  backends.push_back(cuda_backend_info());
#endif
  std::stable_sort(backends.begin(), backends.end(),
                   [](const BackendInfo& a, const BackendInfo& b) { return a.score > b.score; });
  return backends;
}

std::vector<BackendInfo>& registry_locked() {
  static std::vector<BackendInfo> backends = builtin_backends();
  return backends;
}

}  // namespace

void register_backend(BackendInfo info) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& backends = registry_locked();
  std::erase_if(backends, [&](const BackendInfo& b) { return b.name == info.name; });
  backends.push_back(std::move(info));
  std::stable_sort(backends.begin(), backends.end(),
                   [](const BackendInfo& a, const BackendInfo& b) { return a.score > b.score; });
}

const std::vector<BackendInfo>& registered_backends() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return registry_locked();
}

std::vector<std::string> usable_backends() {
  std::vector<std::string> names;
  for (const auto& info : registered_backends()) {
    if (info.usable()) names.push_back(info.name);
  }
  return names;
}

std::unique_ptr<Backend> create_backend(const std::string& name, const BackendOptions& options) {
  const auto& backends = registered_backends();
  std::string known;
  for (const auto& info : backends) known += (known.empty() ? "" : ", ") + info.name;
  for (const auto& info : backends) {
    if (name == "auto" ? !info.usable() : info.name != name) continue;
    if (!info.usable()) {
      fail(ErrorKind::Unsupported, "backend '", name, "' is compiled in but cannot run here (",
           info.description, "); use backend=\"auto\" or one of: ", known);
    }
    return info.create(options);
  }
  if (name == "auto") fail(ErrorKind::Internal, "no usable backend registered");
  fail(ErrorKind::InvalidArgument, "unknown backend '", name, "'; available: auto, ", known);
}

}  // namespace opencamp
