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
