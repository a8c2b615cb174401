#include "device_context.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>

#include "opencamp/error.h"

namespace opencamp::cuda {

std::string describe(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
}

void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  // Paths under the source tree are long; the part from cuda/ on says where.
  const char* short_file = std::strstr(file, "cuda/");
  const std::string where = std::string(short_file ? short_file : file) + ":" + std::to_string(line);
  const std::string what = "CUDA error " + describe(status) + " in " + call + " at " + where;
  switch (status) {
    case cudaErrorMemoryAllocation:
      fail(ErrorKind::CapacityExceeded, what,
           "; the GPU is out of memory: use a smaller kv_cache_tokens / max_context, bf16 weights, "
           "or end other GPU programs");
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:  // a build without the CUDA toolkit (cuda/stub/)
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorInvalidDevice:
      fail(ErrorKind::Unsupported, what);
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorAssert:
      fail(ErrorKind::Internal, what,
           "; a kernel faulted, which leaves the CUDA context unusable: restart the process "
           "(and please report this with the model and the settings)");
    default:
      fail(ErrorKind::Internal, what);
  }
}

// ---- DeviceContext ---------------------------------------------------------------------------

DeviceContext::DeviceContext(int device) : device_(device) {
  activate();
  OPENCAMP_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors_, cudaDevAttrMultiProcessorCount, device_));
  OPENCAMP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  int pools_supported = 0;
  OPENCAMP_CUDA_CHECK(cudaDeviceGetAttribute(&pools_supported, cudaDevAttrMemoryPoolsSupported, device_));
  if (pools_supported) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device_;
    OPENCAMP_CUDA_CHECK(cudaMemPoolCreate(&pool_, &props));
    // Keep freed memory in the pool: later allocations of the same sizes cost nothing.
    uint64_t keep_everything = std::numeric_limits<uint64_t>::max();
    OPENCAMP_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep_everything));
  }
}

DeviceContext::~DeviceContext() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  for (void* pointer : deferred_frees_) pool_ ? cudaFreeAsync(pointer, stream_) : cudaFree(pointer);
  cudaStreamSynchronize(stream_);
  if (pool_) cudaMemPoolDestroy(pool_);
  cudaStreamDestroy(stream_);
  cudaGetLastError();  // nothing to report from a destructor
}

void DeviceContext::activate() const { OPENCAMP_CUDA_CHECK(cudaSetDevice(device_)); }

bool DeviceContext::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  OPENCAMP_CUDA_CHECK(cudaStreamIsCapturing(stream_, &status));
  return status != cudaStreamCaptureStatusNone;
}

void* DeviceContext::allocate(size_t bytes) {
  if (capturing()) {
    fail(ErrorKind::Internal, "cuda backend: device memory requested while a CUDA graph is being "
                              "captured (the pass should have been run once without capture)");
  }
  bytes = std::max<size_t>(bytes, 256);
  void* pointer = nullptr;
  if (pool_) {
    OPENCAMP_CUDA_CHECK(cudaMallocFromPoolAsync(&pointer, bytes, pool_, stream_));
  } else {
    OPENCAMP_CUDA_CHECK(cudaMalloc(&pointer, bytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++allocations_;
  live_bytes_ += bytes;
  peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
  return pointer;
}

void DeviceContext::release(void* pointer, size_t bytes) noexcept {
  if (pointer == nullptr) return;
  bytes = std::max<size_t>(bytes, 256);
  std::lock_guard<std::mutex> lock(mutex_);
  ++frees_;
  live_bytes_ -= std::min(live_bytes_, bytes);
  cudaSetDevice(device_);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream_, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
    deferred_frees_.push_back(pointer);  // a free now would become part of the graph
    return;
  }
  const cudaError_t result = pool_ ? cudaFreeAsync(pointer, stream_) : cudaFree(pointer);
  if (result != cudaSuccess) {
    std::fprintf(stderr, "opencamp: cuda backend: freeing device memory failed: %s\n", describe(result).c_str());
    cudaGetLastError();
  }
}

void DeviceContext::capture_ended() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  for (void* pointer : deferred_frees_) pool_ ? cudaFreeAsync(pointer, stream_) : cudaFree(pointer);
  deferred_frees_.clear();
  cudaGetLastError();
}

PoolStats DeviceContext::stats() const {
  PoolStats s;
  if (pool_) {
    uint64_t value = 0;
    OPENCAMP_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemCurrent, &value));
    s.reserved_bytes = value;
    OPENCAMP_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemHigh, &value));
    s.reserved_high_bytes = value;
    OPENCAMP_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrUsedMemCurrent, &value));
    s.used_bytes = value;
    OPENCAMP_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrUsedMemHigh, &value));
    s.used_high_bytes = value;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  s.stream_ordered_pool = pool_ != nullptr;
  s.allocations = allocations_;
  s.frees = frees_;
  s.live_bytes = live_bytes_;
  s.peak_live_bytes = peak_live_bytes_;
  return s;
}

void DeviceContext::synchronize() { OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

// ---- buffers -------------------------------------------------------------------------------

DeviceBuffer::DeviceBuffer(std::shared_ptr<DeviceContext> context, size_t bytes)
    : context_(std::move(context)), size_(bytes) {
  context_->activate();
  data_ = context_->allocate(bytes);
}

DeviceBuffer::~DeviceBuffer() { context_->release(data_, size_); }

PinnedBuffer::PinnedBuffer(size_t bytes) : size_(bytes) {
  OPENCAMP_CUDA_CHECK(cudaMallocHost(&data_, std::max<size_t>(bytes, 64)));
}

PinnedBuffer::~PinnedBuffer() {
  if (data_ != nullptr) cudaFreeHost(data_);
}

StagedArray::StagedArray(std::shared_ptr<DeviceContext> context) : context_(std::move(context)) {
  OPENCAMP_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
}

StagedArray::~StagedArray() {
  if (pending_) cudaEventSynchronize(copied_);  // the staging memory is still being read
  cudaEventDestroy(copied_);
  context_->release(device_, capacity_);
}

bool StagedArray::upload(const void* host, size_t bytes) {
  if (bytes == 0) return false;
  if (context_->capturing()) {
    fail(ErrorKind::Internal, "cuda backend: host data uploaded while a CUDA graph is being captured");
  }
  if (pending_) OPENCAMP_CUDA_CHECK(cudaEventSynchronize(copied_));  // staging is free again
  bool moved = false;
  if (bytes > capacity_) {
    const size_t grown = std::max({bytes, 2 * capacity_, size_t{1024}});
    staging_ = std::make_unique<PinnedBuffer>(grown);
    void* replacement = context_->allocate(grown);
    context_->release(device_, capacity_);
    device_ = replacement;
    capacity_ = grown;
    moved = true;
  }
  std::memcpy(staging_->data(), host, bytes);
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(device_, staging_->data(), bytes, cudaMemcpyHostToDevice, context_->stream()));
  OPENCAMP_CUDA_CHECK(cudaEventRecord(copied_, context_->stream()));
  pending_ = true;
  return moved;
}

DeviceArray::~DeviceArray() { context_->release(data_, capacity_); }

bool DeviceArray::reserve(size_t bytes) {
  if (bytes <= capacity_) return false;
  const size_t grown = std::max(bytes, capacity_ + capacity_ / 2);
  void* replacement = context_->allocate(grown);
  context_->release(data_, capacity_);
  data_ = replacement;
  capacity_ = grown;
  return true;
}

}  // namespace opencamp::cuda
