#include "io/file_tensor.h"

#include <cstring>

namespace opencamp {
namespace {

// Blocks of every format start with (or hold) uint16_t f16 scales: 2-byte alignment; an
// element type needs its element size.
size_t required_alignment(DType dtype) {
  return is_block_format(dtype) ? alignof(uint16_t) : dtype_traits(dtype).block_bytes;
}

}  // namespace

Tensor tensor_from_file(const unsigned char* bytes, DType dtype, int ndim,
                        const std::array<int64_t, Tensor::kMaxDims>& shape,
                        std::vector<std::shared_ptr<Buffer>>& copies) {
  Tensor tensor;
  tensor.dtype = dtype;
  tensor.ndim = ndim;
  tensor.shape = shape;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    tensor.stride[d] = stride;
    stride *= shape[d];
  }
  const unsigned char* where = bytes;
  if (reinterpret_cast<uintptr_t>(where) % required_alignment(dtype) != 0) {
    // Misaligned data cannot be viewed in place; copy it once.
    auto copy = std::make_shared<HostBuffer>(tensor.nbytes());
    std::memcpy(copy->data(), where, tensor.nbytes());
    copies.push_back(copy);
    where = static_cast<const unsigned char*>(copy->data());
  }
  tensor.data = const_cast<unsigned char*>(where);  // read-only mapping: never written
  return tensor;
}

}  // namespace opencamp
