// A Tensor is a non-owning, strided view: dtype, up to 4 dims in numpy order (shape[0] is the
// outermost), element strides, a data pointer and the device that pointer lives on. Memory is
// owned elsewhere: a memory-mapped weight file, a Buffer from a backend, a caller's array.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "opencamp/dtype.h"

namespace opencamp {

enum class Device : uint8_t { CPU, CUDA };

// Strided: element (i, j, ...) lives at data + sum(index * stride). Packed: a backend's private
// arrangement of a weight (e.g. panels for its matmul kernels); the logical shape still says
// what the tensor is, but only the backend that packed it can read the data.
enum class Layout : uint8_t { Strided, Packed };

struct Tensor {
  static constexpr int kMaxDims = 4;

  DType dtype = DType::F32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};   // numpy order: shape[ndim - 1] is the innermost
  // In elements, not bytes. A block format (dtype.h) is addressed in elements too: views and
  // offsets must start on a block boundary (a row holds whole blocks).
  std::array<int64_t, kMaxDims> stride{};
  void* data = nullptr;
  Device device = Device::CPU;
  Layout layout = Layout::Strided;

  // A contiguous (row-major) view of `data`.
  static Tensor contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                           Device device = Device::CPU);

  bool empty() const { return data == nullptr; }
  int64_t numel() const;
  // Bytes of the elements (a block format's rows hold whole blocks).
  size_t nbytes() const { return dtype_bytes(dtype, numel()); }
  bool is_contiguous() const;
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }

  // The same memory seen with another contiguous shape (the tensor must be contiguous).
  Tensor reshaped(std::initializer_list<int64_t> new_shape) const;
  // Rows [begin, end) along the outermost dimension.
  Tensor rows(int64_t begin, int64_t end) const;
  // Columns [begin, begin + count) of a 2-d tensor (e.g. the q part of a fused q/k/v output).
  Tensor columns(int64_t begin, int64_t count) const;
  // A 2-d [R, C] tensor seen as [R, C / inner, inner] (e.g. rows of heads); strides follow.
  Tensor split_last(int64_t inner) const;

  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
  // Byte pointer to the element at `index` (one entry per dim; missing trailing dims are 0).
  void* at(std::initializer_list<int64_t> index) const;
};

std::string shape_string(const Tensor& tensor);  // e.g. "[576, 1536]"

// Owned device or host memory. Backends hand these out; tensors view them.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
};

// 64-byte aligned host memory.
class HostBuffer final : public Buffer {
 public:
  explicit HostBuffer(size_t bytes);
  ~HostBuffer() override;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace opencamp
