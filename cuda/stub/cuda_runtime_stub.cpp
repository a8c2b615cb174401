// The stub CUDA runtime (see cuda_runtime_api.h here): every call fails with
// cudaErrorStubLibrary, so the cuda backend's probe reports it unusable and nothing runs.
#include <cuda_runtime_api.h>

namespace {
constexpr cudaError_t kStub = cudaErrorStubLibrary;
}  // namespace

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorStubLibrary: return "cudaErrorStubLibrary";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    default: return "cudaError (stub runtime)";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaErrorStubLibrary) {
    return "this opencamp was built without the CUDA toolkit (the host code is compiled against "
           "a stub runtime); rebuild with nvcc (-DOPENCAMP_CUDA=ON) to use the cuda backend";
  }
  return error == cudaSuccess ? "no error" : "stub CUDA runtime";
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;
  return kStub;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int) { return kStub; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 0;
  return kStub;
}
cudaError_t cudaSetDevice(int) { return kStub; }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  *stream = nullptr;
  return kStub;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return kStub; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return kStub; }
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return kStub;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) { return kStub; }
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* graph) {
  *graph = nullptr;
  return kStub;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = nullptr;
  return kStub;
}
cudaError_t cudaEventDestroy(cudaEvent_t) { return kStub; }
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return kStub; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return kStub; }

cudaError_t cudaGraphInstantiateWithFlags(cudaGraphExec_t* exec, cudaGraph_t, unsigned long long) {
  *exec = nullptr;
  return kStub;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t, cudaStream_t) { return kStub; }
cudaError_t cudaGraphDestroy(cudaGraph_t) { return kStub; }
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t) { return kStub; }

cudaError_t cudaMalloc(void** pointer, size_t) {
  *pointer = nullptr;
  return kStub;
}
cudaError_t cudaFree(void*) { return kStub; }
cudaError_t cudaMallocHost(void** pointer, size_t) {
  *pointer = nullptr;
  return kStub;
}
cudaError_t cudaFreeHost(void*) { return kStub; }
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t) { return kStub; }

cudaError_t cudaMemPoolCreate(cudaMemPool_t* pool, const cudaMemPoolProps*) {
  *pool = nullptr;
  return kStub;
}
cudaError_t cudaMemPoolDestroy(cudaMemPool_t) { return kStub; }
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return kStub; }
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return kStub; }
cudaError_t cudaMallocFromPoolAsync(void** pointer, size_t, cudaMemPool_t, cudaStream_t) {
  *pointer = nullptr;
  return kStub;
}
cudaError_t cudaFreeAsync(void*, cudaStream_t) { return kStub; }
