// The cuda backend (see cuda_backend.h for what it does). This file is host code: argument checks
// (the same errors as the cpu oracle), the per-pass upload, the one-op-deep fusion queue, CUDA
// graph capture and replay, and the calls into the kernel launchers of kernels/*.cu.
#include "cuda_backend.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>

#include <cuda_runtime_api.h>

#include "core/builtin.h"
#include "device_context.h"
#include "kernels/kernels.h"
#include "opencamp/error.h"

namespace opencamp::cuda {
namespace {

constexpr int64_t kMaxGraphTokens = 16;  // passes up to this many tokens (all with logits) are graphed
constexpr size_t kMaxGraphs = 48;        // instantiated graphs kept (least recently used goes)
constexpr int64_t kMinKeyBound = 256;    // graphed passes size attention for a power of two >= this
constexpr int kMaxSplits = 64;
constexpr int64_t kMinKeysPerSplit = 64;

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

template <class T>
bool same_span(std::span<const T> a, std::span<const T> b) {
  return a.data() == b.data() && a.size() == b.size();
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

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

int64_t key_bound(int64_t keys) {  // a power of two, so graphs serve a range of context lengths
  return static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(std::max(keys, kMinKeyBound))));
}

// Identifies an op call: which op, which tensors (address, dtype, shape, strides), which scalars.
class Fingerprint {
 public:
  explicit Fingerprint(int op) { mix(static_cast<uint64_t>(op)); }
  Fingerprint& add(uint64_t value) {
    mix(value);
    return *this;
  }
  Fingerprint& add(float value) { return add(static_cast<uint64_t>(std::bit_cast<uint32_t>(value))); }
  Fingerprint& add(const Tensor& t) {
    add(reinterpret_cast<uint64_t>(t.data)).add(static_cast<uint64_t>(t.dtype)).add(static_cast<uint64_t>(t.ndim));
    for (int d = 0; d < t.ndim; ++d) add(static_cast<uint64_t>(t.shape[d])).add(static_cast<uint64_t>(t.stride[d]));
    return *this;
  }
  uint64_t value() const { return hash_; }

 private:
  void mix(uint64_t value) {
    hash_ ^= value + 0x9e3779b97f4a7c15ull + (hash_ << 6) + (hash_ >> 2);
    hash_ *= 0xff51afd7ed558ccdull;
  }
  uint64_t hash_ = 0xcbf29ce484222325ull;
};

enum OpCode { kEmbedding = 1, kRmsNorm, kMatmul, kRope, kKvStore, kAttention, kSiluMul, kAdd, kToHost, kSample,
              kGeluTanhMul, kScale };

struct NormOp {
  Tensor out, x, weight;  // [R, D] f32 each (weight [D])
  float eps;
};
struct MatmulOp {
  Tensor out, x, weight;  // [T, N], [T, K], [N, K]
  std::optional<Tensor> bias;  // [N]
};
struct RopeOp {
  Tensor x;  // [T, H, hd]
  std::span<const int32_t> positions;
  Tensor inv_freq;  // [hd / 2]
};
struct StoreOp {
  KVLayerView cache;
  Tensor keys, values;  // [T, Hkv, hd]
  std::span<const KVSlot> slots;
};

struct GraphKey {
  int64_t tokens = 0;
  int64_t key_bound = 0;
  int64_t block_size = 0;
  uint64_t generation = 0;
  auto operator<=>(const GraphKey&) const = default;
};

struct GraphEntry {
  cudaGraphExec_t exec = nullptr;
  std::vector<uint64_t> ops;  // fingerprints of the captured pass, up to its first to_host
  uint64_t last_use = 0;
};

// A batch as the kernels read it, in one int32 array:
// [token ids T][rope positions T][slot positions T][table offsets T][block tables ...].
// Tables are deduplicated per sequence (tokens of one sequence share theirs) and cut to the
// entries the batch's positions reach.
class BatchOnDevice {
 public:
  explicit BatchOnDevice(std::shared_ptr<DeviceContext> context) : array_(std::move(context)) {}

  // Returns true when the device memory moved. block_size 0: no tables (size not known yet).
  bool upload(std::span<const int32_t> tokens, std::span<const int32_t> positions,
              std::span<const KVSlot> slots, int64_t block_size) {
    count_ = static_cast<int64_t>(std::max({tokens.size(), positions.size(), slots.size()}));
    packed_.assign(static_cast<size_t>(4 * count_), 0);
    std::copy(tokens.begin(), tokens.end(), packed_.begin());
    std::copy(positions.begin(), positions.end(), packed_.begin() + count_);
    for (size_t t = 0; t < slots.size(); ++t) packed_[static_cast<size_t>(2 * count_) + t] = slots[t].position;
    block_size_ = slots.empty() ? 0 : block_size;
    if (block_size_ > 0) {
      std::unordered_map<const int32_t*, int64_t> entries;  // table -> entries the batch reads
      std::vector<const int32_t*> order;
      for (const KVSlot& slot : slots) {
        auto [it, added] = entries.try_emplace(slot.block_table, 0);
        if (added) order.push_back(slot.block_table);
        it->second = std::max<int64_t>(it->second, slot.position / block_size_ + 1);
      }
      std::unordered_map<const int32_t*, int32_t> offsets;
      for (const int32_t* table : order) {
        offsets[table] = static_cast<int32_t>(packed_.size() - static_cast<size_t>(4 * count_));
        packed_.insert(packed_.end(), table, table + entries[table]);
      }
      for (size_t t = 0; t < slots.size(); ++t) {
        packed_[static_cast<size_t>(3 * count_) + t] = offsets[slots[t].block_table];
      }
    }
    return array_.upload(packed_.data(), packed_.size() * sizeof(int32_t));
  }

  const int32_t* tokens() const { return base(); }
  const int32_t* positions() const { return base() + count_; }
  DeviceSlots slots() const {
    return DeviceSlots{base() + 2 * count_, base() + 3 * count_, base() + 4 * count_, static_cast<int>(block_size_)};
  }
  int64_t block_size() const { return block_size_; }

 private:
  const int32_t* base() const { return static_cast<const int32_t*>(array_.device()); }
  StagedArray array_;
  std::vector<int32_t> packed_;
  int64_t count_ = 0;
  int64_t block_size_ = 0;
};

}  // namespace

// ---- device probe and registration -------------------------------------------------------------

const DeviceProbe& probe_devices() {
  static const DeviceProbe probe = [] {
    DeviceProbe p;
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
      cudaGetLastError();
      if (status == cudaErrorNoDevice) {
        p.summary = "no NVIDIA GPU found";
      } else if (status == cudaErrorInsufficientDriver) {
        p.summary = "no usable NVIDIA driver (libcuda.so.1 is missing or older than CUDA " +
                    std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
                    ", which this build needs)";
      } else {
        p.summary = "CUDA cannot start here: " + describe(status);
      }
      return p;
    }
    p.devices = count;
    if (count == 0) {
      p.summary = "no NVIDIA GPU found";
      return p;
    }
    cudaDeviceProp props{};
    const cudaError_t props_status = cudaGetDeviceProperties(&props, 0);
    if (props_status != cudaSuccess) {
      cudaGetLastError();
      p.summary = "cannot read GPU 0's properties: " + describe(props_status);
      return p;
    }
    p.summary = std::string(props.name) + ", compute capability " + std::to_string(props.major) + "." +
                std::to_string(props.minor) + ", " + std::to_string(props.totalGlobalMem >> 30) + " GiB";
    if (props.major < 8) {
      p.summary += "; the cuda backend needs compute capability 8.0 or newer (A100, RTX 30xx, H100, ...)";
      return p;
    }
    p.usable = true;
    return p;
  }();
  return probe;
}

// ---- the implementation ----------------------------------------------------------------------

class CudaBackend::Impl {
 public:
  explicit Impl(int device)
      : context(std::make_shared<DeviceContext>(device)),
        pass_batch(context),
        adhoc_batch(context),
        attention_items(context),
        sampling_params(context),
        penalty_tokens(context),
        partials(context),
        token_ids(context) {
    graphs_enabled = !env_disables("OPENCAMP_CUDA_GRAPHS");
    fusion_enabled = !env_disables("OPENCAMP_CUDA_FUSION");
    cudaDeviceProp props{};
    OPENCAMP_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
    device_name = props.name;
  }

  ~Impl() {
    cudaSetDevice(context->device());
    if (in_pass && mode == Mode::Capture && !launched) abandon_capture();
    cudaStreamSynchronize(context->stream());
    drop_graphs();
    cudaGetLastError();
  }

  enum class Mode { Eager, Capture, Replay };

  std::shared_ptr<DeviceContext> context;
  std::string device_name;
  bool graphs_enabled = true, fusion_enabled = true;

  // The open pass.
  bool in_pass = false;
  std::span<const int32_t> pass_tokens, pass_positions;
  std::span<const KVSlot> pass_slots;
  int uncaught_at_begin = 0;
  bool graph_shaped = false;  // decode-like (<= 16 tokens, all with logits): may be graphed
  int64_t pass_key_bound = 0;  // key_bound() of the pass: attention is sized by it
  Mode mode = Mode::Eager;
  bool launched = false;  // this pass's graph ran; its remaining ops run eagerly
  GraphKey key;
  std::vector<uint64_t> recorded;  // capture: the fingerprints so far
  GraphEntry* replay = nullptr;
  size_t op_index = 0;  // replay: the next fingerprint to match
  std::exception_ptr deferred_error;  // from end_forward, which must not throw

  // Device data.
  BatchOnDevice pass_batch, adhoc_batch;
  int64_t last_block_size = 0;  // of the KV cache the ops saw last
  StagedArray attention_items, sampling_params, penalty_tokens;
  DeviceArray partials, token_ids;
  size_t attention_shared_limit = 48 * 1024;
  uint64_t generation = 0;  // bumped when memory a graph may bake in moves

  std::map<GraphKey, GraphEntry> graphs;
  std::set<GraphKey> seen;  // shapes run once eagerly: captured next time
  uint64_t use_clock = 0;
  GraphStats stats;

  // The fusion queue: at most [norm], [norm, matmul], [matmul], [rope] or [rope, rope].
  std::optional<NormOp> pending_norm;
  std::optional<MatmulOp> pending_matmul;
  std::vector<RopeOp> pending_ropes;

  cudaStream_t stream() const { return context->stream(); }

  void rethrow_deferred() {
    if (deferred_error) {
      std::exception_ptr error = deferred_error;
      deferred_error = nullptr;
      std::rethrow_exception(error);
    }
  }

  bool graph_mode() const { return in_pass && !launched && mode != Mode::Eager; }
  bool fusion_active() const { return fusion_enabled && in_pass; }

  // ---- graphs ----

  void drop_graphs() {
    for (auto& [k, entry] : graphs) cudaGraphExecDestroy(entry.exec);
    graphs.clear();
    seen.clear();
    replay = nullptr;
  }

  void bump_generation() {
    ++generation;
    if (mode == Mode::Replay && !launched) {
      fail(ErrorKind::Internal, "cuda backend: device buffers moved during a replayed pass");
    }
    drop_graphs();
  }

  [[noreturn]] void graph_contract_broken(const char* op, const char* why) {
    if (mode == Mode::Replay) {
      auto it = graphs.find(key);
      if (it != graphs.end()) {
        cudaGraphExecDestroy(it->second.exec);
        graphs.erase(it);
      }
      replay = nullptr;
    }
    seen.erase(key);  // the next pass of this shape starts over, eagerly
    fail(ErrorKind::Internal, "cuda backend, op ", op, " (op #", mode == Mode::Replay ? op_index : recorded.size(),
         " of the pass): ", why, ". Passes of one batch shape must repeat the same ops on the same "
         "tensors to be replayed as a CUDA graph; set OPENCAMP_CUDA_GRAPHS=0 to run without graphs");
  }

  // Every op calls this once its arguments are checked. False: the op belongs to a graph being
  // replayed, and is skipped.
  bool enter(const char* op, uint64_t fingerprint, bool uses_pass_data) {
    if (!graph_mode()) return true;
    if (!uses_pass_data) {
      graph_contract_broken(op, "it was given token ids, positions or KV slots other than the pass's");
    }
    if (mode == Mode::Capture) {
      recorded.push_back(fingerprint);
      return true;
    }
    if (op_index >= replay->ops.size() || replay->ops[op_index] != fingerprint) {
      graph_contract_broken(op, "its tensors or arguments differ from the pass captured for this batch shape");
    }
    ++op_index;
    return false;
  }

  void abandon_capture() noexcept {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream(), &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    context->capture_ended();
  }

  // Runs the pass's graph: captures it first (capture mode) or checks the pass matched it.
  void launch_graph() {
    if (mode == Mode::Capture) {
      flush_pending();
      cudaGraph_t graph = nullptr;
      const cudaError_t ended = cudaStreamEndCapture(stream(), &graph);
      context->capture_ended();
      launched = true;  // capture is over either way
      check(ended, "cudaStreamEndCapture(stream, &graph)", __FILE__, __LINE__);
      cudaGraphExec_t exec = nullptr;
      const cudaError_t made = cudaGraphInstantiateWithFlags(&exec, graph, 0);
      cudaGraphDestroy(graph);
      check(made, "cudaGraphInstantiateWithFlags(&exec, graph, 0)", __FILE__, __LINE__);
      if (graphs.size() >= kMaxGraphs) {
        auto oldest = std::min_element(graphs.begin(), graphs.end(), [](const auto& a, const auto& b) {
          return a.second.last_use < b.second.last_use;
        });
        cudaGraphExecDestroy(oldest->second.exec);
        graphs.erase(oldest);
      }
      graphs[key] = GraphEntry{exec, std::move(recorded), ++use_clock};
      recorded.clear();
      ++stats.captured_passes;
      OPENCAMP_CUDA_CHECK(cudaGraphLaunch(exec, stream()));
    } else {
      if (op_index != replay->ops.size()) {
        graph_contract_broken("(end of the graph)", "the pass has fewer ops than the one captured for this batch shape");
      }
      launched = true;
      ++stats.replayed_passes;
      OPENCAMP_CUDA_CHECK(cudaGraphLaunch(replay->exec, stream()));
    }
    replay = nullptr;
  }

  // The first op that needs results on the host (a copy out, sampling) ends the graphed part of
  // a pass: the graph runs (captured first, or checked against the capture), the rest is eager.
  // Outside graphed passes it only flushes the fusion queue.
  void finish_graphed_part(const char* op, uint64_t fingerprint) {
    if (!graph_mode()) {
      flush_pending();
      return;
    }
    if (mode == Mode::Capture) {
      recorded.push_back(fingerprint);
    } else {
      if (op_index >= replay->ops.size() || replay->ops[op_index] != fingerprint) {
        graph_contract_broken(op, "it reads other data than the pass captured for this batch shape");
      }
      ++op_index;
    }
    launch_graph();
  }

  // ---- the pass ----

  void begin_forward(const ForwardInfo& batch) {
    context->activate();
    rethrow_deferred();
    if (in_pass) fail(ErrorKind::Internal, "cuda backend: begin_forward while a pass is open");
    const size_t T = batch.tokens.size();
    if (batch.positions.size() != T || batch.slots.size() != T) {
      fail(ErrorKind::InvalidArgument, "cuda backend: a forward pass needs one position and one KV slot per token");
    }
    int64_t max_keys = 0;
    for (size_t t = 0; t < T; ++t) {
      if (batch.positions[t] < 0 || batch.slots[t].position < 0 || batch.slots[t].block_table == nullptr) {
        fail(ErrorKind::InvalidArgument, "cuda backend: token ", t, " of the pass has a negative position or no block table");
      }
      max_keys = std::max<int64_t>(max_keys, batch.slots[t].position + 1);
    }
    flush_pending();
    if (pass_batch.upload(batch.tokens, batch.positions, batch.slots, last_block_size)) bump_generation();

    pass_tokens = batch.tokens;
    pass_positions = batch.positions;
    pass_slots = batch.slots;
    uncaught_at_begin = std::uncaught_exceptions();
    mode = Mode::Eager;
    launched = false;
    recorded.clear();
    replay = nullptr;
    op_index = 0;
    graph_shaped = T >= 1 && static_cast<int64_t>(T) <= kMaxGraphTokens && batch.n_logit_rows == static_cast<int64_t>(T);
    pass_key_bound = key_bound(max_keys);
    if (graph_shaped && graphs_enabled && last_block_size > 0) {
      key = GraphKey{static_cast<int64_t>(T), pass_key_bound, last_block_size, generation};
      auto it = graphs.find(key);
      if (it != graphs.end()) {
        mode = Mode::Replay;
        replay = &it->second;
        replay->last_use = ++use_clock;
      } else if (seen.count(key)) {
        OPENCAMP_CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
        mode = Mode::Capture;
      } else {
        if (seen.size() > 4096) seen.clear();
        seen.insert(key);
      }
    }
    if (mode == Mode::Eager) ++stats.eager_passes;
    in_pass = true;
  }

  // Must not throw (the decoder calls it from a destructor): errors wait for the next call.
  void end_forward() noexcept {
    if (!in_pass) return;
    const bool failing = std::uncaught_exceptions() > uncaught_at_begin;
    try {
      context->activate();
      if (failing) {
        discard_pending();
        if (mode == Mode::Capture && !launched) abandon_capture();
      } else {
        if (graph_mode()) launch_graph();  // a pass without logits
        flush_pending();
      }
    } catch (...) {
      discard_pending();
      if (mode == Mode::Capture && !launched) abandon_capture();
      if (!deferred_error) deferred_error = std::current_exception();
    }
    in_pass = false;
    mode = Mode::Eager;
    launched = false;
    replay = nullptr;
    recorded.clear();
    pass_tokens = {};
    pass_positions = {};
    pass_slots = {};
  }

  // ---- uploads of host-side op arguments ----

  void require_eager(const char* op) {
    if (graph_mode()) graph_contract_broken(op, "it needs host data uploaded in the middle of a graphed pass");
  }

  const int32_t* device_tokens(std::span<const int32_t> ids, const char* op) {
    if (in_pass && same_span(ids, pass_tokens)) return pass_batch.tokens();
    require_eager(op);
    adhoc_batch.upload(ids, {}, {}, 0);
    return adhoc_batch.tokens();
  }

  const int32_t* device_positions(std::span<const int32_t> positions, const char* op) {
    if (in_pass && same_span(positions, pass_positions)) return pass_batch.positions();
    require_eager(op);
    adhoc_batch.upload({}, positions, {}, 0);
    return adhoc_batch.positions();
  }

  DeviceSlots device_slots(std::span<const KVSlot> slots, int64_t block_size, const char* op) {
    if (in_pass && same_span(slots, pass_slots)) {
      if (pass_batch.block_size() != block_size) {  // the first pass: the block size was unknown
        require_eager(op);
        if (pass_batch.upload(pass_tokens, pass_positions, pass_slots, block_size)) bump_generation();
      }
      last_block_size = block_size;
      return pass_batch.slots();
    }
    require_eager(op);
    adhoc_batch.upload({}, {}, slots, block_size);
    last_block_size = block_size;
    return adhoc_batch.slots();
  }

  // ---- running ops ----

  void discard_pending() {
    pending_norm.reset();
    pending_matmul.reset();
    pending_ropes.clear();
  }

  void flush_pending() {
    if (pending_matmul) {
      const MatmulOp matmul = *pending_matmul;
      const std::optional<NormOp> norm = pending_norm;
      discard_pending();
      run_matmul(matmul, norm ? &*norm : nullptr, nullptr, 0);
    } else if (pending_norm) {
      const NormOp norm = *pending_norm;
      discard_pending();
      run_rmsnorm(norm);
    }
    if (!pending_ropes.empty()) {
      const std::vector<RopeOp> ropes = std::move(pending_ropes);
      discard_pending();
      run_rope_store(ropes, nullptr);
    }
  }

  void run_rmsnorm(const NormOp& op) {
    const bool heads = op.x.ndim == 3;
    RmsNormArgs a{};
    a.out = op.out.ptr<float>();
    a.out_s0 = op.out.stride[0];
    a.out_s1 = heads ? op.out.stride[1] : 0;
    a.out_s2 = op.out.stride[op.out.ndim - 1];
    a.x = op.x.ptr<float>();
    a.x_s0 = op.x.stride[0];
    a.x_s1 = heads ? op.x.stride[1] : 0;
    a.x_s2 = op.x.stride[op.x.ndim - 1];
    a.weight = op.weight.ptr<float>();
    a.weight_stride = op.weight.stride[0];
    a.rows = op.x.shape[0];
    a.heads = heads ? op.x.shape[1] : 1;
    a.dim = op.x.shape[op.x.ndim - 1];
    a.eps = op.eps;
    OPENCAMP_CUDA_CHECK(launch_rmsnorm(a, stream()));
  }

  static bool gemv_fits(const MatmulOp& op) {
    return op.x.shape[0] <= kGemvMaxTokens && rows_aligned(op.weight);
  }

  void run_matmul(const MatmulOp& op, const NormOp* norm, const Tensor* residual, int64_t silu_pair) {
    MatmulArgs a{};
    a.x = op.x.ptr<float>();
    a.x_row = op.x.stride[0];
    a.x_col = op.x.stride[1];
    a.weight = op.weight.data;
    a.w_row = op.weight.stride[0];
    a.w_col = op.weight.stride[1];
    a.weight_type = element_type(op.weight.dtype, "matmul");
    a.out = op.out.ptr<float>();
    a.out_row = op.out.stride[0];
    a.out_col = op.out.stride[1];
    if (op.bias) {
      a.bias = op.bias->ptr<float>();
      a.bias_stride = op.bias->stride[0];
    }
    a.tokens = op.x.shape[0];
    a.k = op.x.shape[1];
    a.n = op.weight.shape[0];
    a.bf16_activations = op.weight.dtype == DType::BF16;
    if (norm != nullptr) {
      a.norm_weight = norm->weight.ptr<float>();
      a.norm_weight_stride = norm->weight.stride[0];
      a.norm_eps = norm->eps;
      a.norm_out = norm->out.ptr<float>();
      a.norm_out_row = norm->out.stride[0];
      a.norm_out_col = norm->out.stride[1];
    }
    if (residual != nullptr) {
      a.residual = residual->ptr<float>();
      a.residual_row = residual->stride[0];
      a.residual_col = residual->stride[1];
    }
    a.silu_pair = silu_pair;
    a.multiprocessors = context->multiprocessors();
    if (gemv_fits(op)) {
      OPENCAMP_CUDA_CHECK(launch_gemv(a, stream()));
    } else if (norm != nullptr || residual != nullptr || silu_pair != 0) {
      fail(ErrorKind::Internal, "cuda backend: a fused matmul reached a layout the decode kernel does not take");
    } else if (op.weight.dtype == DType::BF16 && rows_aligned(op.weight)) {
      OPENCAMP_CUDA_CHECK(launch_gemm_bf16_mma(a, stream()));
    } else if (op.weight.dtype == DType::F32) {
      OPENCAMP_CUDA_CHECK(launch_gemm_f32(a, stream()));
    } else {
      OPENCAMP_CUDA_CHECK(launch_matmul_generic(a, stream()));
    }
  }

  // Rotates the ropes' tensors (the last one is the keys when `store` follows) and stores.
  void run_rope_store(const std::vector<RopeOp>& ropes, const StoreOp* store) {
    RopeStoreArgs a{};
    if (!ropes.empty()) {
      const RopeOp& first = ropes.front();
      a.positions = device_positions(first.positions, "rope");
      a.inv_freq = first.inv_freq.ptr<float>();
      a.inv_freq_stride = first.inv_freq.stride[0];
      a.tokens = first.x.shape[0];
      a.head_dim = first.x.shape[2];
      for (size_t i = 0; i < ropes.size(); ++i) {
        const int slot = static_cast<int>(i + 2 - ropes.size());  // the last rope takes slot 1
        const Tensor& x = ropes[i].x;
        a.rotated[slot] = x.ptr<float>();
        a.rot_s0[slot] = x.stride[0];
        a.rot_s1[slot] = x.stride[1];
        a.rot_s2[slot] = x.stride[2];
        a.rot_heads[slot] = x.shape[1];
      }
    }
    if (store != nullptr) {
      const Tensor& pool = store->cache.keys;
      a.store = true;
      a.store_keys_rotated = !ropes.empty() && same_view(ropes.back().x, store->keys);
      a.keys = store->keys.ptr<float>();
      a.k_s0 = store->keys.stride[0];
      a.k_s1 = store->keys.stride[1];
      a.k_s2 = store->keys.stride[2];
      a.values = store->values.ptr<float>();
      a.v_s0 = store->values.stride[0];
      a.v_s1 = store->values.stride[1];
      a.v_s2 = store->values.stride[2];
      a.kv_heads = store->keys.shape[1];
      a.cache = DeviceCache{pool.ptr<float>(), store->cache.values.ptr<float>(), pool.stride[0], pool.stride[1],
                            pool.stride[2], pool.stride[3]};
      a.slots = device_slots(store->slots, pool.shape[1], "kv_store");
      a.tokens = store->keys.shape[0];
      a.head_dim = store->keys.shape[2];
    }
    OPENCAMP_CUDA_CHECK(launch_rope_store(a, stream()));
  }

  void run_attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                     std::span<const KVSlot> slots, float scale, int32_t window) {
    const int64_t T = queries.shape[0], Hq = queries.shape[1], hd = queries.shape[2];
    const int64_t Hkv = cache.keys.shape[2], block_size = cache.keys.shape[1];
    AttentionArgs a{};
    a.queries = queries.ptr<float>();
    a.q_s0 = queries.stride[0];
    a.q_s1 = queries.stride[1];
    a.q_s2 = queries.stride[2];
    a.out = out.ptr<float>();
    a.o_s0 = out.stride[0];
    a.o_s1 = out.stride[1];
    a.o_s2 = out.stride[2];
    a.cache = DeviceCache{cache.keys.ptr<float>(), cache.values.ptr<float>(), cache.keys.stride[0],
                          cache.keys.stride[1], cache.keys.stride[2], cache.keys.stride[3]};
    a.slots = device_slots(slots, block_size, "attention");
    a.tokens = static_cast<int>(T);
    a.heads = static_cast<int>(Hq);
    a.kv_heads = static_cast<int>(Hkv);
    a.head_dim = static_cast<int>(hd);
    a.scale = scale;
    a.window = window;
    const int64_t group = Hq / Hkv;
    a.heads_per_item = static_cast<int>(std::min<int64_t>(group, kAttentionRows));
    int64_t max_keys = 0;
    for (const KVSlot& slot : slots) max_keys = std::max<int64_t>(max_keys, slot.position + 1);

    if (T <= kMaxGraphTokens) {  // one token per work item, keys split over blocks
      // The split of a token's keys depends only on the (power-of-two) bound and the model, not on
      // the batch: a token gets the same arithmetic alone and batched, eagerly and in a graph.
      const int64_t bound = key_bound(max_keys);
      const int64_t blocks_per_token = Hkv * ((group + a.heads_per_item - 1) / a.heads_per_item);
      const int64_t wanted =
          std::clamp<int64_t>((2 * context->multiprocessors() + blocks_per_token - 1) / blocks_per_token, 1, kMaxSplits);
      const int64_t per_split = std::max(kMinKeysPerSplit, round_up((bound + wanted - 1) / wanted, 32));
      a.keys_per_split = static_cast<int>(per_split);
      a.splits = static_cast<int>(std::max<int64_t>(1, (bound + per_split - 1) / per_split));
      a.items = nullptr;
      a.n_items = static_cast<int>(T);
    } else {  // runs of one sequence's tokens, a few per block, sharing each key tile
      require_eager("attention");
      const int64_t tokens_per_item = std::max<int64_t>(1, kAttentionRows / a.heads_per_item);
      std::vector<int32_t> items;
      for (int64_t t = 0; t < T;) {
        int64_t run_end = t + 1;
        while (run_end < T && slots[run_end].block_table == slots[t].block_table) ++run_end;
        for (int64_t first = t; first < run_end; first += tokens_per_item) {
          items.push_back(static_cast<int32_t>(first));
          items.push_back(static_cast<int32_t>(std::min(tokens_per_item, run_end - first)));
        }
        t = run_end;
      }
      attention_items.upload(items.data(), items.size() * sizeof(int32_t));
      a.items = static_cast<const int32_t*>(attention_items.device());
      a.n_items = static_cast<int>(items.size() / 2);
      a.keys_per_split = static_cast<int>(std::max<int64_t>(max_keys, 1));
      a.splits = 1;
    }
    if (a.splits > 1) {
      const size_t bytes = static_cast<size_t>(T * Hq * a.splits * (hd + 2)) * sizeof(float);
      if (partials.size() < bytes) {
        require_eager("attention");
        if (partials.reserve(bytes)) bump_generation();
      }
      a.partial = static_cast<float*>(partials.data());
    }
    const size_t shared_bytes = attention_shared_bytes(static_cast<int>(hd));
    if (shared_bytes > attention_shared_limit) {
      OPENCAMP_CUDA_CHECK(set_attention_shared_limit(shared_bytes));
      attention_shared_limit = shared_bytes;
    }
    OPENCAMP_CUDA_CHECK(launch_attention(a, stream()));
  }
};

// ---- CudaBackend ------------------------------------------------------------------------------

CudaBackend::CudaBackend(int device) {
  const DeviceProbe& probe = probe_devices();
  if (!probe.usable) fail(ErrorKind::Unsupported, "cuda backend: cannot run here: ", probe.summary);
  if (device < 0 || device >= probe.devices) {
    fail(ErrorKind::InvalidArgument, "cuda backend: no GPU ", device, " (", probe.devices, " found)");
  }
  impl_ = std::make_unique<Impl>(device);
}

CudaBackend::~CudaBackend() = default;

std::shared_ptr<Buffer> CudaBackend::allocate(size_t bytes) {
  impl_->context->activate();
  return std::make_shared<DeviceBuffer>(impl_->context, bytes);
}

Tensor CudaBackend::prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                                   std::vector<std::shared_ptr<Buffer>>& owned) {
  if (dtype != DType::F32 && dtype != DType::BF16) {
    fail(ErrorKind::InvalidArgument, "cuda backend holds weights as f32 or bf16, not ", dtype_name(dtype));
  }
  if (use == WeightUse::Table || source.ndim != 2) return Backend::prepare_weight(source, dtype, use, owned);
  if (!source.is_contiguous()) fail(ErrorKind::Internal, "weights must be contiguous");
  // Row-major with each row padded to 16 bytes (zeros), so every row starts aligned for the
  // kernels' wide loads.
  const int64_t rows = source.shape[0], cols = source.shape[1], padded = round_up(cols, 8);
  const size_t element = dtype_size(dtype), in_element = dtype_size(source.dtype);
  std::vector<unsigned char> staging(static_cast<size_t>(rows * padded) * element, 0);
  for (int64_t r = 0; r < rows; ++r) {
    convert_dtype(static_cast<const unsigned char*>(source.data) + static_cast<size_t>(r * cols) * in_element,
                  source.dtype, staging.data() + static_cast<size_t>(r * padded) * element, dtype, cols);
  }
  auto buffer = allocate(staging.size());
  owned.push_back(buffer);
  Tensor prepared = source;
  prepared.dtype = dtype;
  prepared.data = buffer->data();
  prepared.device = Device::CUDA;
  prepared.layout = Layout::Strided;
  prepared.stride = {padded, 1, 0, 0};
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(prepared.data, staging.data(), staging.size(), cudaMemcpyHostToDevice,
                                      impl_->stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(impl_->stream()));
  return prepared;
}

void CudaBackend::embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "embedding", "out");
  expect(table.ndim == 2 && out.shape[1] == table.shape[1] && out.shape[0] == static_cast<int64_t>(ids.size()),
         "embedding", "shapes disagree (out [T, D], table [V, D], ids [T])");
  expect_device(table, "embedding", "table");
  const ElementType type = element_type(table.dtype, "embedding");
  for (size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] < 0 || ids[t] >= table.shape[0]) {
      fail(ErrorKind::InvalidArgument, "token id ", ids[t], " is outside the vocabulary [0, ", table.shape[0], ")");
    }
  }
  const bool pass_data = same_span(ids, s.pass_tokens);
  if (!s.enter("embedding", Fingerprint(kEmbedding).add(out).add(table).value(), pass_data)) return;
  s.context->activate();
  s.flush_pending();
  EmbeddingArgs a{};
  a.ids = s.device_tokens(ids, "embedding");
  a.out = out.ptr<float>();
  a.out_row = out.stride[0];
  a.out_col = out.stride[1];
  a.table = table.data;
  a.table_row = table.stride[0];
  a.table_col = table.stride[1];
  a.table_type = type;
  a.tokens = out.shape[0];
  a.dim = out.shape[1];
  OPENCAMP_CUDA_CHECK(launch_embedding(a, s.stream()));
}

void CudaBackend::rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect((x.ndim == 2 || x.ndim == 3) && x.dtype == DType::F32 && out.dtype == DType::F32 &&
             out.ndim == x.ndim && out.shape == x.shape,
         "rmsnorm", "out and x must be f32 [R, D] or [T, H, D] of the same shape");
  expect(weight.ndim == 1 && weight.shape[0] == x.shape[x.ndim - 1] && weight.dtype == DType::F32, "rmsnorm",
         "weight must be f32 [D]");
  expect_device(out, "rmsnorm", "out");
  expect_device(x, "rmsnorm", "x");
  expect_device(weight, "rmsnorm", "weight");
  if (!s.enter("rmsnorm", Fingerprint(kRmsNorm).add(out).add(x).add(weight).add(eps).value(), true)) return;
  s.context->activate();
  const NormOp op{out, x, weight, eps};
  s.flush_pending();
  if (s.fusion_active() && x.ndim == 2) {
    s.pending_norm = op;  // the next matmul may take it as its input transform
    return;
  }
  s.run_rmsnorm(op);
}

void CudaBackend::matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "matmul", "out");
  expect_f32(x, 2, "matmul", "x");
  expect(weight.ndim == 2 && weight.shape[1] == x.shape[1] && out.shape[0] == x.shape[0] &&
             out.shape[1] == weight.shape[0],
         "matmul", "shapes disagree (out [T, N], x [T, K], weight [N, K])");
  expect(weight.dtype == DType::F32 || weight.dtype == DType::BF16, "matmul", "weights must be f32 or bf16");
  expect(weight.layout == Layout::Strided, "matmul",
         "the weight was packed for another backend; prepare it with this backend");
  expect_device(weight, "matmul", "weight");
  if (bias != nullptr) {
    expect(bias->ndim == 1 && bias->shape[0] == weight.shape[0] && bias->dtype == DType::F32, "matmul",
           "bias must be f32 [N]");
    expect_device(*bias, "matmul", "bias");
  }
  Fingerprint fingerprint(kMatmul);
  fingerprint.add(out).add(x).add(weight);
  if (bias != nullptr) fingerprint.add(*bias);
  if (!s.enter("matmul", fingerprint.value(), true)) return;
  s.context->activate();
  MatmulOp op{out, x, weight, bias ? std::optional<Tensor>(*bias) : std::nullopt};
  if (s.fusion_active() && Impl::gemv_fits(op)) {
    // Normalise x on the fly when the pending norm wrote it (and nothing else overlaps).
    const bool takes_norm = s.pending_norm && !s.pending_matmul && same_view(s.pending_norm->out, x) &&
                            !overlaps(s.pending_norm->out, s.pending_norm->x) &&
                            !overlaps(out, s.pending_norm->x) && !overlaps(out, s.pending_norm->out);
    if (!takes_norm) s.flush_pending();
    s.pending_matmul = op;
    return;
  }
  s.flush_pending();
  s.run_matmul(op, nullptr, nullptr, 0);
}

void CudaBackend::rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(x, 3, "rope", "x");
  expect(static_cast<int64_t>(positions.size()) == x.shape[0] && x.shape[2] % 2 == 0 && inv_freq.ndim == 1 &&
             inv_freq.shape[0] * 2 == x.shape[2] && inv_freq.dtype == DType::F32,
         "rope", "shapes disagree (x [T, H, head_dim], inv_freq [head_dim / 2])");
  expect_device(inv_freq, "rope", "inv_freq");
  for (int32_t p : positions) {
    if (p < 0) fail(ErrorKind::InvalidArgument, "rope: negative position ", p);
  }
  const bool pass_data = same_span(positions, s.pass_positions);
  if (!s.enter("rope", Fingerprint(kRope).add(x).add(inv_freq).value(), pass_data)) return;
  s.context->activate();
  const RopeOp op{x, positions, inv_freq};
  if (s.fusion_active() && s.in_pass && pass_data) {
    const bool pairs = s.pending_ropes.size() == 1 && same_span(s.pending_ropes[0].positions, positions) &&
                       same_view(s.pending_ropes[0].inv_freq, inv_freq) &&
                       s.pending_ropes[0].x.shape[0] == x.shape[0] && s.pending_ropes[0].x.shape[2] == x.shape[2] &&
                       disjoint(s.pending_ropes[0].x, x);
    if (!pairs) s.flush_pending();
    s.pending_ropes.push_back(op);  // the kv_store that follows may store the rotated keys
    return;
  }
  s.flush_pending();
  s.run_rope_store({op}, nullptr);
}

void CudaBackend::kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
                           std::span<const KVSlot> slots) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(keys, 3, "kv_store", "keys");
  expect_f32(values, 3, "kv_store", "values");
  expect_f32(cache.keys, 4, "kv_store", "cache keys");
  expect_f32(cache.values, 4, "kv_store", "cache values");
  const Tensor& pool = cache.keys;
  expect(keys.shape[0] == static_cast<int64_t>(slots.size()) && keys.shape[1] == pool.shape[2] &&
             keys.shape[2] == pool.shape[3] && values.shape == keys.shape && cache.values.shape == pool.shape &&
             cache.values.stride == pool.stride,
         "kv_store", "shapes disagree with the cache");
  for (const KVSlot& slot : slots) {
    expect(slot.position >= 0 && slot.block_table != nullptr, "kv_store", "a slot has a negative position or no block table");
  }
  const bool pass_data = same_span(slots, s.pass_slots);
  if (!s.enter("kv_store", Fingerprint(kKvStore).add(pool).add(cache.values).add(keys).add(values).value(), pass_data)) {
    return;
  }
  s.context->activate();
  const StoreOp op{cache, keys, values, slots};
  if (!s.pending_ropes.empty() && pass_data && same_view(s.pending_ropes.back().x, keys)) {
    bool values_apart = true;
    for (const RopeOp& rope : s.pending_ropes) values_apart = values_apart && disjoint(rope.x, values);
    if (values_apart) {
      const std::vector<RopeOp> ropes = std::move(s.pending_ropes);
      s.discard_pending();
      s.run_rope_store(ropes, &op);  // rope of q and k, then the store, in one launch
      return;
    }
  }
  s.flush_pending();
  s.run_rope_store({}, &op);
}

void CudaBackend::attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                            std::span<const KVSlot> slots, float scale, int32_t window) {
  Impl& s = *impl_;
  s.rethrow_deferred();

  expect_f32(out, 3, "attention", "out");
  expect_f32(queries, 3, "attention", "queries");
  expect_f32(cache.keys, 4, "attention", "cache keys");
  expect_f32(cache.values, 4, "attention", "cache values");
  const int64_t T = queries.shape[0], Hq = queries.shape[1], hd = queries.shape[2];
  const int64_t Hkv = cache.keys.shape[2];
  expect(out.shape == queries.shape && T == static_cast<int64_t>(slots.size()) && hd == cache.keys.shape[3] &&
             Hkv > 0 && Hq % Hkv == 0 && cache.values.shape == cache.keys.shape &&
             cache.values.stride == cache.keys.stride,
         "attention", "shapes disagree (queries [T, H, hd], cache [.., .., Hkv, hd], H % Hkv == 0)");
  if (hd > kMaxHeadDim) {
    fail(ErrorKind::Unsupported, "cuda backend, op attention: head_dim ", hd, " is over the ", kMaxHeadDim,
         " the kernels hold");
  }
  for (const KVSlot& slot : slots) {
    expect(slot.position >= 0 && slot.block_table != nullptr, "attention", "a slot has a negative position or no block table");
  }
  const bool pass_data = same_span(slots, s.pass_slots);
  if (!s.enter("attention",
               Fingerprint(kAttention).add(out).add(queries).add(cache.keys).add(cache.values).add(scale)
                   .add(static_cast<uint64_t>(window)).value(),
               pass_data)) {
    return;
  }
  s.context->activate();
  s.flush_pending();
  s.run_attention(out, queries, cache, slots, scale, window);
}

void CudaBackend::silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "silu_mul", "out");
  expect_f32(gate, 2, "silu_mul", "gate");
  expect_f32(up, 2, "silu_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "silu_mul", "shapes disagree");
  if (!s.enter("silu_mul", Fingerprint(kSiluMul).add(out).add(gate).add(up).value(), true)) return;
  s.context->activate();
  if (s.pending_matmul) {
    // gate and up the two column halves of the pending matmul's output, out == gate: one pass.
    const Tensor& mm = s.pending_matmul->out;
    const int64_t F = gate.shape[1];
    const bool halves = same_view(out, gate) && gate.data == mm.data && mm.shape[1] == 2 * F &&
                        gate.stride == mm.stride && up.stride == mm.stride && gate.shape[0] == mm.shape[0] &&
                        up.data == mm.at({0, F});
    if (halves && !s.pending_norm.has_value()) {
      const MatmulOp matmul = *s.pending_matmul;
      s.discard_pending();
      s.run_matmul(matmul, nullptr, nullptr, F);
      return;
    }
    if (halves) {
      const MatmulOp matmul = *s.pending_matmul;
      const NormOp norm = *s.pending_norm;
      s.discard_pending();
      s.run_matmul(matmul, &norm, nullptr, F);
      return;
    }
  }
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], gate.ptr<float>(), gate.stride[0],
                    gate.stride[1],   up.ptr<float>(), up.stride[0], up.stride[1],     out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_silu_mul(a, s.stream()));
}

void CudaBackend::gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "gelu_tanh_mul", "out");
  expect_f32(gate, 2, "gelu_tanh_mul", "gate");
  expect_f32(up, 2, "gelu_tanh_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "gelu_tanh_mul", "shapes disagree");
  if (!s.enter("gelu_tanh_mul", Fingerprint(kGeluTanhMul).add(out).add(gate).add(up).value(), true)) return;
  s.context->activate();
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], gate.ptr<float>(), gate.stride[0],
                    gate.stride[1],   up.ptr<float>(), up.stride[0], up.stride[1],     out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_gelu_tanh_mul(a, s.stream()));
}

void CudaBackend::scale(const Tensor& out, const Tensor& x, float factor) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "scale", "out");
  expect_f32(x, 2, "scale", "x");
  expect(out.shape == x.shape, "scale", "shapes disagree");
  if (!s.enter("scale", Fingerprint(kScale).add(out).add(x).add(factor).value(), true)) return;
  s.context->activate();
  s.flush_pending();
  ElementwiseArgs a{out.ptr<float>(), out.stride[0], out.stride[1], x.ptr<float>(), x.stride[0],
                    x.stride[1],      nullptr,         0,            0,             out.shape[0],
                    out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_scale(a, factor, s.stream()));
}

void CudaBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  Impl& s = *impl_;
  s.rethrow_deferred();
  expect_f32(out, 2, "add", "out");
  expect_f32(a, 2, "add", "a");
  expect_f32(b, 2, "add", "b");
  expect(out.shape == a.shape && a.shape == b.shape, "add", "shapes disagree");
  if (!s.enter("add", Fingerprint(kAdd).add(out).add(a).add(b).value(), true)) return;
  s.context->activate();
  if (s.pending_matmul) {
    // x = x + (matmul output): the matmul's epilogue adds into x as it writes its output.
    const MatmulOp& mm = *s.pending_matmul;
    const bool residual = (same_view(b, mm.out) && same_view(out, a)) || (same_view(a, mm.out) && same_view(out, b));
    bool apart = residual && !overlaps(out, mm.out) && !overlaps(out, mm.x) && !overlaps(out, mm.weight);
    if (apart && s.pending_norm) apart = !overlaps(out, s.pending_norm->x) && !overlaps(out, s.pending_norm->out);
    if (apart) {
      const MatmulOp matmul = mm;
      const std::optional<NormOp> norm = s.pending_norm;
      s.discard_pending();
      s.run_matmul(matmul, norm ? &*norm : nullptr, &out, 0);
      return;
    }
  }
  s.flush_pending();
  ElementwiseArgs args{out.ptr<float>(), out.stride[0], out.stride[1], a.ptr<float>(), a.stride[0],
                       a.stride[1],      b.ptr<float>(),   b.stride[0],   b.stride[1],    out.shape[0],
                       out.shape[1]};
  OPENCAMP_CUDA_CHECK(launch_add(args, s.stream()));
}

void CudaBackend::to_host(void* host, const Tensor& source) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect_device(source, "to_host", "source");
  expect(source.is_contiguous(), "to_host", "the source must be contiguous");
  s.finish_graphed_part("to_host", Fingerprint(kToHost).add(source).value());
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(host, source.data, source.nbytes(), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
}

void CudaBackend::from_host(const Tensor& target, const void* host) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect_device(target, "from_host", "target");
  expect(target.is_contiguous(), "from_host", "the target must be contiguous");
  if (s.graph_mode()) s.graph_contract_broken("from_host", "host data cannot be copied into a graphed pass");
  s.flush_pending();
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(target.data, host, target.nbytes(), cudaMemcpyHostToDevice, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));  // the caller may free `host` on return
}

void CudaBackend::begin_forward(const ForwardInfo& batch) { impl_->begin_forward(batch); }

void CudaBackend::end_forward() { impl_->end_forward(); }

// ---- sampling ------------------------------------------------------------------------------------

namespace {

// logits [R, V] with contiguous rows, on the device; returns R.
int expect_logits(const Tensor& logits, const char* op) {
  expect(logits.dtype == DType::F32 && (logits.ndim == 2 || logits.ndim == 1) &&
             logits.stride[logits.ndim - 1] == 1,
         op, "logits must be f32 [R, V] (or [V]) with contiguous rows");
  expect_device(logits, op, "logits");
  expect(logits.shape[logits.ndim - 1] > 0 && logits.shape[logits.ndim - 1] < (int64_t{1} << 31), op,
         "the vocabulary must have 1 to 2^31 - 1 entries");
  return logits.ndim == 2 ? static_cast<int>(logits.shape[0]) : 1;
}

}  // namespace

std::vector<int32_t> CudaBackend::argmax(const Tensor& logits) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  const int rows = expect_logits(logits, "argmax");
  s.finish_graphed_part("argmax", Fingerprint(kSample).add(logits).value());
  const int64_t vocab = logits.shape[logits.ndim - 1];
  const int64_t row_stride = logits.ndim == 2 ? logits.stride[0] : vocab;
  s.token_ids.reserve(static_cast<size_t>(rows) * sizeof(int32_t));
  int32_t* ids = static_cast<int32_t*>(s.token_ids.data());
  OPENCAMP_CUDA_CHECK(launch_argmax(logits.ptr<float>(), row_stride, vocab, rows, ids, s.stream()));
  std::vector<int32_t> result(static_cast<size_t>(rows));
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(result.data(), ids, result.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
  return result;
}

std::vector<int32_t> CudaBackend::sample(const Tensor& logits, std::span<const DeviceSampling> rows) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  const int n_rows = expect_logits(logits, "sample");
  expect(static_cast<int64_t>(rows.size()) == n_rows, "sample", "one DeviceSampling per logits row");
  std::vector<SampleRowParams> params;
  for (const DeviceSampling& r : rows) {
    if (!(r.temperature >= 0.0f) || !std::isfinite(r.temperature) || r.top_k < 0 || !(r.top_p > 0.0f && r.top_p <= 1.0f) ||
        !(r.min_p >= 0.0f && r.min_p <= 1.0f) || !(r.draw >= 0.0 && r.draw < 1.0)) {
      fail(ErrorKind::InvalidArgument, "cuda backend, op sample: temperature >= 0, top_k >= 0, top_p in (0, 1], "
                                       "min_p in [0, 1] and draw in [0, 1) are required");
    }
    params.push_back(SampleRowParams{r.temperature, r.top_k, r.top_p, r.min_p, r.draw});
  }
  s.finish_graphed_part("sample", Fingerprint(kSample).add(logits).value());
  const int64_t vocab = logits.shape[logits.ndim - 1];
  const int64_t row_stride = logits.ndim == 2 ? logits.stride[0] : vocab;
  s.sampling_params.upload(params.data(), params.size() * sizeof(SampleRowParams));
  s.token_ids.reserve(static_cast<size_t>(n_rows) * sizeof(int32_t));
  int32_t* ids = static_cast<int32_t*>(s.token_ids.data());
  OPENCAMP_CUDA_CHECK(launch_sample(logits.ptr<float>(), row_stride, vocab, n_rows,
                                    static_cast<const SampleRowParams*>(s.sampling_params.device()), ids, s.stream()));
  std::vector<int32_t> result(static_cast<size_t>(n_rows));
  OPENCAMP_CUDA_CHECK(cudaMemcpyAsync(result.data(), ids, result.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s.stream()));
  OPENCAMP_CUDA_CHECK(cudaStreamSynchronize(s.stream()));
  for (size_t r = 0; r < result.size(); ++r) {
    if (result[r] < 0) fail(ErrorKind::Internal, "every logit is NaN (row ", r, ")");
  }
  return result;
}

void CudaBackend::apply_penalties(const Tensor& logits, std::span<const int32_t> history, float repetition_penalty,
                                  float presence_penalty, float frequency_penalty) {
  Impl& s = *impl_;
  s.context->activate();
  s.rethrow_deferred();
  expect(expect_logits(logits, "apply_penalties") == 1, "apply_penalties", "penalties take one row");
  if (repetition_penalty == 1.0f && presence_penalty == 0.0f && frequency_penalty == 0.0f) return;
  expect(repetition_penalty > 0.0f, "apply_penalties", "repetition_penalty must be > 0");
  const int64_t vocab = logits.shape[logits.ndim - 1];
  std::unordered_map<int32_t, int32_t> counts;
  for (int32_t token : history) {
    if (token >= 0 && token < vocab) ++counts[token];
  }
  if (counts.empty()) return;
  std::vector<int32_t> packed;  // [tokens n][counts n]
  for (const auto& [token, count] : counts) packed.push_back(token);
  for (const auto& [token, count] : counts) packed.push_back(count);
  s.finish_graphed_part("apply_penalties", Fingerprint(kSample).add(logits).value());
  s.penalty_tokens.upload(packed.data(), packed.size() * sizeof(int32_t));
  const int32_t* device = static_cast<const int32_t*>(s.penalty_tokens.device());
  const int n = static_cast<int>(counts.size());
  OPENCAMP_CUDA_CHECK(launch_penalties(logits.ptr<float>(), device, device + n, n, repetition_penalty,
                                       presence_penalty, frequency_penalty, s.stream()));
}

// ---- extras --------------------------------------------------------------------------------------

PoolStats CudaBackend::pool_stats() const { return impl_->context->stats(); }

GraphStats CudaBackend::graph_stats() const {
  GraphStats stats = impl_->stats;
  stats.cached_graphs = impl_->graphs.size();
  return stats;
}

void CudaBackend::set_graphs_enabled(bool enabled) {
  if (impl_->in_pass) fail(ErrorKind::Internal, "cuda backend: graphs switched inside a pass");
  impl_->graphs_enabled = enabled;
  if (!enabled) impl_->drop_graphs();
}

void CudaBackend::set_fusion_enabled(bool enabled) {
  if (impl_->in_pass) fail(ErrorKind::Internal, "cuda backend: fusion switched inside a pass");
  impl_->fusion_enabled = enabled;
}

std::string CudaBackend::device_name() const { return impl_->device_name; }

void CudaBackend::synchronize() {
  impl_->context->activate();
  impl_->rethrow_deferred();
  if (!impl_->in_pass) impl_->flush_pending();
  impl_->context->synchronize();
}

}  // namespace opencamp::cuda

namespace opencamp {

BackendInfo cuda_backend_info() {
  BackendInfo info;
  info.name = "cuda";
  info.score = 1000;  // a usable GPU beats every CPU backend for "auto"
  info.description = "NVIDIA GPU kernels (bf16 tensor cores, CUDA graphs): " + cuda::probe_devices().summary;
  info.usable = [] { return cuda::probe_devices().usable; };
  info.create = [](const BackendOptions&) -> std::unique_ptr<Backend> {
    return std::make_unique<cuda::CudaBackend>(0);
  };
  return info;
}

}  // namespace opencamp
