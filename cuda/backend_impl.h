// The state of one CudaBackend (private to the backend's files): the device, the open pass, the
// graphs, the fusion queue and the device copies of each pass's batch. Its methods live by concern:
// graphs.cpp (capture, replay, the pass), fusion.cpp (the queue), launches.cpp (uploads and kernel
// launches); the Backend ops that use them (argument checks first) are in cuda_backend.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_runtime_api.h>

#include "checks.h"
#include "cuda_backend.h"
#include "device_context.h"
#include "fusion.h"
#include "graphs.h"
#include "kernels/kernels.h"
#include "opencamp/error.h"

namespace opencamp::cuda {

constexpr int kMaxSplits = 64;
constexpr int64_t kMinKeysPerSplit = 64;

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// A batch as the kernels read it, in one int32 array: [token ids T][rope positions T], then per
// slot set (KV layer group) [slot positions T], per set [table offsets T], then [block tables ...].
// Tables are deduplicated (tokens of one sequence share theirs) and cut to the entries the
// batch's positions reach.
class BatchOnDevice {
 public:
  explicit BatchOnDevice(std::shared_ptr<DeviceContext> context) : array_(std::move(context)) {}

  // Returns true when the device memory moved. block_size 0: no tables (size not known yet).
  bool upload(std::span<const int32_t> tokens, std::span<const int32_t> positions,
              std::span<const std::span<const KVSlot>> slot_sets, int64_t block_size) {
    count_ = static_cast<int64_t>(std::max(tokens.size(), positions.size()));
    for (const auto& slots : slot_sets) count_ = std::max(count_, static_cast<int64_t>(slots.size()));
    sets_ = static_cast<int64_t>(slot_sets.size());
    const size_t header = static_cast<size_t>((2 + 2 * sets_) * count_);
    packed_.assign(header, 0);
    std::copy(tokens.begin(), tokens.end(), packed_.begin());
    std::copy(positions.begin(), positions.end(), packed_.begin() + count_);
    for (int64_t set = 0; set < sets_; ++set) {
      const auto& slots = slot_sets[static_cast<size_t>(set)];
      for (size_t t = 0; t < slots.size(); ++t) packed_[static_cast<size_t>((2 + set) * count_) + t] = slots[t].position;
    }
    block_size_ = sets_ == 0 ? 0 : block_size;
    if (block_size_ > 0) {
      std::unordered_map<const int32_t*, int64_t> entries;  // table -> entries the batch reads
      std::vector<const int32_t*> order;
      for (const auto& slots : slot_sets) {
        for (const KVSlot& slot : slots) {
          auto [it, added] = entries.try_emplace(slot.block_table, 0);
          if (added) order.push_back(slot.block_table);
          it->second = std::max<int64_t>(it->second, slot.position / block_size_ + 1);
        }
      }
      std::unordered_map<const int32_t*, int32_t> offsets;
      for (const int32_t* table : order) {
        offsets[table] = static_cast<int32_t>(packed_.size() - header);
        packed_.insert(packed_.end(), table, table + entries[table]);
      }
      for (int64_t set = 0; set < sets_; ++set) {
        const auto& slots = slot_sets[static_cast<size_t>(set)];
        for (size_t t = 0; t < slots.size(); ++t) {
          packed_[static_cast<size_t>((2 + sets_ + set) * count_) + t] = offsets[slots[t].block_table];
        }
      }
    }
    return array_.upload(packed_.data(), packed_.size() * sizeof(int32_t));
  }

  const int32_t* tokens() const { return base(); }
  const int32_t* positions() const { return base() + count_; }
  DeviceSlots slots(int64_t set) const {
    return DeviceSlots{base() + (2 + set) * count_, base() + (2 + sets_ + set) * count_,
                       base() + (2 + 2 * sets_) * count_, static_cast<int>(block_size_)};
  }
  int64_t block_size() const { return block_size_; }

 private:
  const int32_t* base() const { return static_cast<const int32_t*>(array_.device()); }
  StagedArray array_;
  std::vector<int32_t> packed_;
  int64_t count_ = 0;
  int64_t sets_ = 0;
  int64_t block_size_ = 0;
};

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
  std::vector<std::span<const KVSlot>> pass_slots;  // [KV layer groups] the pass's slot sets
  // Which of the pass's slot sets `slots` is, or -1 (slots of its own, or outside a pass).
  int64_t pass_slot_set(std::span<const KVSlot> slots) const {
    if (!in_pass) return -1;
    for (size_t set = 0; set < pass_slots.size(); ++set) {
      if (same_span(slots, pass_slots[set])) return static_cast<int64_t>(set);
    }
    return -1;
  }
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

  // ---- graphs (graphs.cpp) ----

  void drop_graphs();
  void bump_generation();
  [[noreturn]] void graph_contract_broken(const char* op, const char* why);

  // Every op calls this once its arguments are checked. False: the op belongs to a graph being
  // replayed, and is skipped.
  bool enter(const char* op, uint64_t fingerprint, bool uses_pass_data);
  void abandon_capture() noexcept;

  // Runs the pass's graph: captures it first (capture mode) or checks the pass matched it.
  void launch_graph();

  // The first op that needs results on the host (a copy out, sampling) ends the graphed part of
  // a pass: the graph runs (captured first, or checked against the capture), the rest is eager.
  // Outside graphed passes it only flushes the fusion queue.
  void finish_graphed_part(const char* op, uint64_t fingerprint);

  // ---- the pass (graphs.cpp) ----

  void begin_forward(const ForwardInfo& batch);

  // Must not throw (the decoder calls it from a destructor): errors wait for the next call.
  void end_forward() noexcept;

  // ---- uploads of host-side op arguments (launches.cpp) ----

  void require_eager(const char* op);
  const int32_t* device_tokens(std::span<const int32_t> ids, const char* op);
  const int32_t* device_positions(std::span<const int32_t> positions, const char* op);
  DeviceSlots device_slots(std::span<const KVSlot> slots, int64_t block_size, const char* op);

  // ---- the fusion queue (fusion.cpp) ----

  void discard_pending();
  void flush_pending();

  // ---- kernel launches (launches.cpp) ----

  void run_rmsnorm(const NormOp& op);
  static bool gemv_fits(const MatmulOp& op);
  void run_matmul(const MatmulOp& op, const NormOp* norm, const Tensor* residual, int64_t silu_pair);

  // Rotates the ropes' tensors (the last one is the keys when `store` follows) and stores.
  void run_rope_store(const std::vector<RopeOp>& ropes, const StoreOp* store);
  void run_attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                     std::span<const KVSlot> slots, float scale, int32_t window);
};

}  // namespace opencamp::cuda
