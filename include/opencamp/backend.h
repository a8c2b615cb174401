// A Backend runs the model's ops on one device. Backends register by name with a score; the
// highest-scoring usable backend wins for backend="auto". Every op has a default that throws
// Unsupported, so a new backend can be brought up op by op and tested against the cpu oracle.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "opencamp/tensor.h"

namespace opencamp {

class ThreadPool;

// Where one token of a batch reads and writes the KV cache: the block table of its sequence
// and its position in that sequence. The token attends to keys at positions [0, position].
struct KVSlot {
  const int32_t* block_table = nullptr;  // [blocks of the sequence] -> block index in the pool
  int32_t position = 0;
};

// A block table entry a sliding-window layer group has released: it lies before the window of
// every query that can still come (KVCache::release_behind_windows), so no kernel reads it.
inline constexpr int32_t kReleasedBlock = -1;

// The KV cache's q8_0: one f16 scale per this many consecutive dims of a head.
inline constexpr int kKVQuantGroup = 32;

// Sliding-window attention may read (and mask out) keys from the start of the chunk of this
// many positions that holds a window's first key, never earlier: the avx kernels work in 16-key
// chunks. The KV cache keeps those keys (KVCache::release_behind_windows).
inline constexpr int kWindowKeyAlignment = 16;

// One layer of the paged KV cache: a pool of blocks of block_size token positions, held in the
// cache's KV type (EngineOptions::kv_cache_dtype). f32, bf16 and f16 are per element; q8_0 is
// GGUF's Q8_0 numbers (x = d * q, q an int8, d = max|x| / 127 in f16 per 32 dims of a head)
// with the scales kept apart from the quants, so the quants have element strides (and the
// transposed key layout) like the other types. Backends read the stored type directly.
struct KVLayerView {
  Tensor keys;    // [n_blocks, block_size, n_kv_heads, head_dim] f32 / bf16 / f16, i8 for q8_0
  Tensor values;  // [n_blocks, block_size, n_kv_heads, head_dim] the same
  DType dtype = DType::F32;  // F32, BF16, F16 or Q8_0
  Tensor key_scales = {};    // q8_0 only: [n_blocks, block_size, n_kv_heads, head_dim / 32] f16
  Tensor value_scales = {};  // q8_0 only: the same (empty for the other types)
};

// The types a KV cache can hold: f32, bf16, f16, q8_0.
bool is_kv_dtype(DType dtype);
// Bytes one position of one KV head takes (keys or values) in `kv_dtype`: the one formula every
// size of the cache is computed from (q8_0: 34 bytes per 32 dims, quants and scale).
size_t kv_head_bytes(DType kv_dtype, int64_t head_dim);

// The reference reading and writing of one head's row of a KV pool, through the views'
// strides: what every backend's kv_store and attention are tested against.
enum class KVPart { Keys, Values };
// Element d of row (block, slot, head), as f32.
float kv_load(const KVLayerView& cache, KVPart part, int64_t block, int64_t slot, int64_t head, int64_t d);
// Rounds x to the cache's type (nearest even; q8_0 as GGUF's quantize_q8_0) and stores it.
void kv_store_row(const KVLayerView& cache, KVPart part, int64_t block, int64_t slot, int64_t head,
                  const float* x);  // [head_dim]

// What a weight is for, so a backend can pick its layout: a matmul weight may be packed for the
// backend's kernels; an embedding table is read by rows.
enum class WeightUse { Matrix, Table };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const { return Device::CPU; }

  // Memory on this backend's device.
  virtual std::shared_ptr<Buffer> allocate(size_t bytes);

  // Returns `source` (host memory, any float dtype) as a weight held in `dtype` (F32 or BF16)
  // in the layout this backend's kernels want for `use`. May return a view of `source` itself
  // when no conversion is needed (zero-copy); otherwise memory is allocated and appended to
  // `owned`. Norm weights and biases are prepared as F32 tables.
  virtual Tensor prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                                std::vector<std::shared_ptr<Buffer>>& owned);

  // True when embedding() reads its rows from `matrix`, a weight this backend prepared as a
  // Matrix: a model whose output layer is its embedding (tied) then holds that table once.
  virtual bool embeds_from(const Tensor& matrix) const {
    (void)matrix;
    return false;
  }

  // True when the backend wants q/k/v and gate/up each as one matrix (one pass over the input
  // instead of three or two); models then concatenate them at load time.
  virtual bool fuses_projections() const { return false; }

  // True when the backend wants each KV-cache block's keys stored [head][dim][position] (a
  // vector over positions per dim), the layout decode attention reads fastest on SIMD CPUs.
  // The keys view keeps its logical shape [n_blocks, block_size, n_kv_heads, head_dim]; only
  // its strides change, so every backend reads either layout through them.
  virtual bool transposed_keys() const { return false; }

  // The precision activations are rounded to when multiplied by weights of `weight_dtype`:
  // F32 (exact products, the reference) or BF16 (bf16 x bf16 dot products, as llama.cpp and
  // PyTorch's bf16 kernels do: faster, about 3 significant digits per product).
  virtual DType matmul_activation_dtype(DType weight_dtype) const {
    (void)weight_dtype;
    return DType::F32;
  }

  // out[t, :] = table[ids[t], :]
  virtual void embedding(const Tensor& out,    // [T, D] f32
                         const Tensor& table,  // [V, D] weight dtype
                         std::span<const int32_t> ids);  // [T]

  // Over the last dim: out[..., :] = x[..., :] / sqrt(mean(x[..., :]^2) + eps) * weight; out
  // may alias x. 2-d rows, or 3-d [T, H, D] for per-head norms of a strided projection.
  virtual void rmsnorm(const Tensor& out,     // [R, D] or [T, H, D] f32
                       const Tensor& x,       // same shape as out
                       const Tensor& weight,  // [D] f32
                       float eps);

  // out = x @ weight^T (+ bias): the weight layout of a PyTorch Linear.
  virtual void matmul(const Tensor& out,     // [T, N] f32
                      const Tensor& x,       // [T, K] f32
                      const Tensor& weight,  // [N, K] f32 or bf16
                      const Tensor* bias);   // [N] f32 or nullptr

  // Rotary embedding in place, rotate-half convention (pairs i and i + head_dim / 2), as
  // Hugging Face checkpoints expect: angle = positions[t] * inv_freq[i].
  virtual void rope(const Tensor& x,                     // [T, H, head_dim] f32, in place
                    std::span<const int32_t> positions,  // [T]
                    const Tensor& inv_freq);             // [head_dim / 2] f32

  // Writes each token's key and value into its slot of the cache, rounded (or quantised) to
  // the cache's KV type as kv_store_head (kv_format.h) defines.
  virtual void kv_store(const KVLayerView& cache,
                        const Tensor& keys,    // [T, n_kv_heads, head_dim] f32
                        const Tensor& values,  // [T, n_kv_heads, head_dim] f32
                        std::span<const KVSlot> slots);  // [T]

  // Causal attention over the cache: token t attends to positions [0, slots[t].position] of its
  // own sequence, or with window > 0 (sliding-window layers) to the last `window` of them,
  // [slots[t].position - window + 1, slots[t].position]. Query heads share KV heads in groups
  // of n_heads / n_kv_heads (GQA / MQA). With a window, block table entries wholly before
  // (position - window + 1) rounded down to kWindowKeyAlignment may be kReleasedBlock (-1): such
  // blocks are never read.
  virtual void attention(const Tensor& out,      // [T, n_heads, head_dim] f32
                         const Tensor& queries,  // [T, n_heads, head_dim] f32
                         const KVLayerView& cache,
                         std::span<const KVSlot> slots,  // [T]
                         float scale, int32_t window);

  // out = silu(gate) * up; out may alias gate.
  virtual void silu_mul(const Tensor& out,    // [T, F] f32
                        const Tensor& gate,   // [T, F] f32
                        const Tensor& up);    // [T, F] f32

  // out = gelu(gate) * up with GELU's tanh approximation (PyTorch's gelu(approximate="tanh"),
  // Gemma's gelu_pytorch_tanh); out may alias gate.
  virtual void gelu_tanh_mul(const Tensor& out,    // [T, F] f32
                             const Tensor& gate,   // [T, F] f32
                             const Tensor& up);    // [T, F] f32

  // out = x * factor; out may alias x (Gemma's embedding scale).
  virtual void scale(const Tensor& out, const Tensor& x, float factor);  // [T, D] f32 each

  // out = a + b; out may alias a or b.
  virtual void add(const Tensor& out, const Tensor& a, const Tensor& b);  // [T, D] f32 each

  // Copies between host memory and this backend's device (plain memcpy on the CPU).
  virtual void to_host(void* host, const Tensor& source);  // source contiguous
  virtual void from_host(const Tensor& target, const void* host);  // target contiguous

  // Brackets one forward pass of the model; every op call between the two belongs to it. A
  // device backend can upload the pass's token ids, positions and block tables once here, and
  // replay a captured graph for a pass shaped like an earlier one (decode steps). The ops of a
  // pass with the same shape come in the same order with the same tensors, only the values of
  // `batch` change. Defaults do nothing.
  struct ForwardInfo {
    std::span<const int32_t> tokens;     // [T]
    std::span<const int32_t> positions;  // [T]
    // [n_groups][T] the slots of each KV layer group (one for models without sliding windows):
    // every kv_store and attention of the pass gets one of these spans.
    std::span<const std::span<const KVSlot>> group_slots;
    int64_t n_logit_rows = 0;            // tokens that need logits
    std::span<const int32_t> logit_rows; // [n_logit_rows] their ascending indices in the pass
  };
  virtual void begin_forward(const ForwardInfo& batch) { (void)batch; }
  virtual void end_forward() {}

 protected:
  [[noreturn]] void unsupported(const char* op) const;
};

struct BackendOptions {
  ThreadPool* pool = nullptr;  // CPU backends run their ops on this pool (not owned)
};

struct BackendInfo {
  std::string name;
  int score = 0;                   // higher wins for "auto"
  std::string description;
  std::function<bool()> usable;    // false when the hardware or the build lacks something
  std::function<std::unique_ptr<Backend>(const BackendOptions&)> create;
};

// The built-in backends are registered on first use; extra backends can be added here.
void register_backend(BackendInfo info);
const std::vector<BackendInfo>& registered_backends();
// Names of the backends that can run on this machine, best first.
std::vector<std::string> usable_backends();
// "auto" picks the best usable backend; a named backend that is unknown or unusable throws.
std::unique_ptr<Backend> create_backend(const std::string& name, const BackendOptions& options);

}  // namespace opencamp
