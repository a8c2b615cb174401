// The device a cuda backend runs on: one stream that every operation is ordered on, a
// stream-ordered memory pool (cudaMemPool_t) that every device buffer comes from, pinned host
// staging, and the check that turns a CUDA status into an opencamp::Error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda_backend.h"
#include "opencamp/tensor.h"

namespace opencamp::cuda {

// Throws opencamp::Error naming the failing call and file:line. Out of memory is
// CapacityExceeded, a missing driver / device / kernel image Unsupported, the rest Internal.
void check(cudaError_t status, const char* call, const char* file, int line);
#define OPENCAMP_CUDA_CHECK(call) ::opencamp::cuda::check((call), #call, __FILE__, __LINE__)

// "cudaErrorMemoryAllocation (out of memory)"
std::string describe(cudaError_t status);

class DeviceContext {
 public:
  explicit DeviceContext(int device);
  ~DeviceContext();
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  int multiprocessors() const { return multiprocessors_; }
  // Makes this device current on the calling thread (the CUDA runtime's current device is
  // per thread, and the engine may be driven from several threads one after the other).
  void activate() const;
  bool capturing() const;  // a graph capture is under way on the stream

  // Device memory from the pool, ordered on the stream; never called during a capture.
  void* allocate(size_t bytes);
  // Stream-ordered free; during a capture the free waits until capture_ended().
  void release(void* pointer, size_t bytes) noexcept;
  void capture_ended() noexcept;

  PoolStats stats() const;
  void synchronize();

 private:
  int device_;
  int multiprocessors_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;  // null where the device has no memory pools: cudaMalloc
  mutable std::mutex mutex_;      // the counters and the deferred frees
  uint64_t allocations_ = 0, frees_ = 0;
  size_t live_bytes_ = 0, peak_live_bytes_ = 0;
  std::vector<void*> deferred_frees_;
};

// Memory handed out by CudaBackend::allocate; keeps the context (stream, pool) alive.
class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(std::shared_ptr<DeviceContext> context, size_t bytes);
  ~DeviceBuffer() override;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  std::shared_ptr<DeviceContext> context_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Page-locked host memory: copies from it are truly asynchronous.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A host array copied to the device with one asynchronous copy from pinned staging. The device
// copy keeps its address until it must grow (then `upload` reports it), so kernels captured in a
// graph can read it again after a later upload refreshed it.
class StagedArray {
 public:
  explicit StagedArray(std::shared_ptr<DeviceContext> context);
  ~StagedArray();
  StagedArray(const StagedArray&) = delete;
  StagedArray& operator=(const StagedArray&) = delete;

  // Copies `bytes` from `host` to the device (ordered on the stream). Returns true when the
  // device memory moved.
  bool upload(const void* host, size_t bytes);
  const void* device() const { return device_; }

 private:
  std::shared_ptr<DeviceContext> context_;
  std::unique_ptr<PinnedBuffer> staging_;
  void* device_ = nullptr;
  size_t capacity_ = 0;
  cudaEvent_t copied_ = nullptr;  // the last copy out of `staging_`
  bool pending_ = false;
};

// Device scratch that only grows (stream-ordered), for kernel intermediates.
class DeviceArray {
 public:
  explicit DeviceArray(std::shared_ptr<DeviceContext> context) : context_(std::move(context)) {}
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  // Returns true when the memory moved (it had to grow).
  bool reserve(size_t bytes);
  void* data() const { return data_; }
  size_t size() const { return capacity_; }

 private:
  std::shared_ptr<DeviceContext> context_;
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace opencamp::cuda
