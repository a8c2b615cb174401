#include "checks.h"

#include <cstdlib>

#include "opencamp/error.h"

namespace opencamp::cuda {

bool env_disables(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && (std::string(value) == "0" || std::string(value) == "off" ||
                              std::string(value) == "OFF" || std::string(value) == "false");
}

[[noreturn]] void invalid(const char* op, const std::string& what) {
  fail(ErrorKind::InvalidArgument, "cuda backend, op ", op, ": ", what);
}

void expect(bool ok, const char* op, const char* what) {
  if (!ok) invalid(op, what);
}

void expect_device(const Tensor& t, const char* op, const char* name) {
  if (t.device != Device::CUDA || t.data == nullptr) {
    invalid(op, std::string(name) + " is not GPU memory; allocate it with this backend (allocate / prepare_weight)");
  }
}

void expect_f32(const Tensor& t, int ndim, const char* op, const char* name) {
  if (t.dtype != DType::F32 || t.ndim != ndim) {
    fail(ErrorKind::InvalidArgument, "cuda backend, op ", op, ": ", name, " must be f32 with ", ndim,
         " dims, got ", dtype_name(t.dtype), " ", shape_string(t));
  }
  expect_device(t, op, name);
}

ElementType element_type(DType dtype, const char* op) {
  switch (dtype) {
    case DType::F32: return ElementType::F32;
    case DType::BF16: return ElementType::BF16;
    case DType::F16: return ElementType::F16;
    default: break;  // i32 and the block formats (no cuda kernels yet)
  }
  invalid(op, std::string("weights must be f32, bf16 or f16, got ") + dtype_name(dtype));
}

bool same_view(const Tensor& a, const Tensor& b) {
  if (a.data != b.data || a.dtype != b.dtype || a.ndim != b.ndim) return false;
  for (int d = 0; d < a.ndim; ++d) {
    if (a.shape[d] != b.shape[d] || a.stride[d] != b.stride[d]) return false;
  }
  return true;
}



// [first byte, one past the last byte] a view touches.
std::pair<uintptr_t, uintptr_t> byte_range(const Tensor& t) {
  int64_t low = 0, high = 0;
  for (int d = 0; d < t.ndim; ++d) {
    const int64_t extent = (t.shape[d] - 1) * t.stride[d];
    (extent < 0 ? low : high) += extent;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data);
  const auto size = static_cast<int64_t>(dtype_size(t.dtype));
  return {base + low * size, base + (high + 1) * size};
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a_begin, a_end] = byte_range(a);
  const auto [b_begin, b_end] = byte_range(b);
  return a_begin < b_end && b_begin < a_end;
}

// No element in common: separate memory, or disjoint column ranges of the same rows (q, k and v
// of a fused projection).
bool disjoint(const Tensor& a, const Tensor& b) {
  if (!overlaps(a, b)) return true;
  if (a.ndim != b.ndim || a.dtype != b.dtype || a.stride[0] != b.stride[0] || a.shape[0] != b.shape[0]) {
    return false;
  }
  auto footprint = [](const Tensor& t) {  // elements one row spans, or -1
    int64_t span = 1;
    for (int d = 1; d < t.ndim; ++d) {
      if (t.stride[d] < 0) return int64_t{-1};
      span += (t.shape[d] - 1) * t.stride[d];
    }
    return span;
  };
  const int64_t fa = footprint(a), fb = footprint(b), row = a.stride[0];
  const auto size = static_cast<intptr_t>(dtype_size(a.dtype));
  const intptr_t bytes = reinterpret_cast<intptr_t>(b.data) - reinterpret_cast<intptr_t>(a.data);
  if (fa < 0 || fb < 0 || bytes % size != 0) return false;
  const int64_t diff = bytes / size;
  return diff >= 0 ? diff >= fa && diff + fb <= row : -diff >= fb && -diff + fa <= row;
}

bool rows_aligned(const Tensor& weight) {  // what the wide-load kernels need
  return weight.ndim == 2 && weight.stride[1] == 1 && weight.stride[0] % 8 == 0 &&
         reinterpret_cast<uintptr_t>(weight.data) % 16 == 0 &&
         (weight.dtype == DType::F32 || weight.dtype == DType::BF16);
}

}  // namespace opencamp::cuda
