// The one place where a weight's bytes are taken from a mapped file, shared by every reader
// (safetensors, GGUF): today a view in place where the bytes are aligned for their format, a
// copy where they are not. How weight memory is held (live mapping views vs owned memory) is
// decided here and nowhere else.
#pragma once

#include <memory>
#include <vector>

#include "opencamp/tensor.h"

namespace opencamp {

// A contiguous tensor of `dtype` and `shape` (numpy order, 1 to 4 dims) over `bytes`, which
// must hold its nbytes. Copies go to `copies`, which must outlive the tensor.
Tensor tensor_from_file(const unsigned char* bytes, DType dtype, int ndim,
                        const std::array<int64_t, Tensor::kMaxDims>& shape,
                        std::vector<std::shared_ptr<Buffer>>& copies);

}  // namespace opencamp
