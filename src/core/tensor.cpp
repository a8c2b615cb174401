#include "opencamp/tensor.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <sstream>

#include "opencamp/error.h"

namespace opencamp {

Tensor Tensor::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                          Device device) {
  if (shape.size() == 0 || shape.size() > kMaxDims) {
    fail(ErrorKind::Internal, "a tensor has 1 to ", kMaxDims, " dims, got ", shape.size());
  }
  Tensor t;
  t.dtype = dtype;
  t.ndim = static_cast<int>(shape.size());
  t.data = data;
  t.device = device;
  int i = 0;
  for (int64_t extent : shape) t.shape[i++] = extent;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

int64_t Tensor::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

Tensor Tensor::reshaped(std::initializer_list<int64_t> new_shape) const {
  if (!is_contiguous()) fail(ErrorKind::Internal, "reshape of a non-contiguous tensor");
  Tensor t = contiguous(data, dtype, new_shape, device);
  if (t.numel() != numel()) {
    fail(ErrorKind::Internal, "reshape from ", shape_string(*this), " to ", shape_string(t),
         " changes the element count");
  }
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  if (begin < 0 || end > shape[0] || begin > end) {
    fail(ErrorKind::Internal, "rows [", begin, ", ", end, ") outside ", shape_string(*this));
  }
  Tensor t = *this;
  t.shape[0] = end - begin;
  t.data = static_cast<char*>(data) + dtype_bytes(dtype, begin * stride[0]);
  return t;
}

Tensor Tensor::columns(int64_t begin, int64_t count) const {
  if (ndim != 2 || begin < 0 || count < 0 || begin + count > shape[1]) {
    fail(ErrorKind::Internal, "columns [", begin, ", ", begin + count, ") outside ", shape_string(*this));
  }
  Tensor t = *this;
  t.shape[1] = count;
  t.data = static_cast<char*>(data) + dtype_bytes(dtype, begin * stride[1]);
  return t;
}

Tensor Tensor::split_last(int64_t inner) const {
  if (ndim != 2 || inner <= 0 || shape[1] % inner != 0) {
    fail(ErrorKind::Internal, "cannot split ", shape_string(*this), " into rows of ", inner);
  }
  Tensor t = *this;
  t.ndim = 3;
  t.shape = {shape[0], shape[1] / inner, inner, 0};
  t.stride = {stride[0], inner * stride[1], stride[1], 0};
  return t;
}

void* Tensor::at(std::initializer_list<int64_t> index) const {
  int64_t offset = 0;
  int d = 0;
  for (int64_t i : index) offset += i * stride[d++];
  return static_cast<char*>(data) + dtype_bytes(dtype, offset);
}

std::string shape_string(const Tensor& tensor) {
  std::ostringstream out;
  out << '[';
  for (int d = 0; d < tensor.ndim; ++d) out << (d ? ", " : "") << tensor.shape[d];
  out << ']';
  return out.str();
}

HostBuffer::HostBuffer(size_t bytes) : size_(bytes) {
  // Big buffers (weights, the KV pool) in transparent huge pages where the system allows them:
  // filling 2.5 GB of weights 4 KiB at a time costs ~600k page faults, most of a model's load.
  constexpr size_t kHugePage = size_t{2} << 20;
  const bool huge = bytes >= 2 * kHugePage;
  const size_t alignment = huge ? kHugePage : 64;
  const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  data_ = std::aligned_alloc(alignment, rounded == 0 ? alignment : rounded);
  if (data_ == nullptr) {
    fail(ErrorKind::CapacityExceeded, "out of memory allocating ", bytes, " bytes");
  }
  if (huge) ::madvise(data_, rounded, MADV_HUGEPAGE);  // advice only: no huge pages is fine
}

HostBuffer::~HostBuffer() { std::free(data_); }

}  // namespace opencamp
