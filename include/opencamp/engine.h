// The Engine owns a model, the backend that runs it, the thread pool and the KV cache. Prefill
// (a prompt, many tokens of one sequence, causal) and decode (one new token for each of several
// sequences) are separate entry points so each can be made fast on its own terms.
// Public methods are thread-safe: they serialise on one mutex, so generations of different
// sequences running on different threads interleave step by step.
//
// Sequences a Scheduler holds (a generation runs on them, or a finished conversation is kept on
// them for the next turn) are the scheduler's: the public calls that change a sequence
// (free_sequence, truncate_sequence, reuse_prefix, prefill, decode, forward) refuse them with
// Error(InvalidArgument). Kept conversations give way to anyone who needs blocks: when a pass or
// a prompt needs more than is free, the least recently kept ones are freed first.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "opencamp/backend.h"
#include "opencamp/kv_cache.h"
#include "opencamp/model.h"
#include "opencamp/sampler.h"
#include "opencamp/thread_pool.h"

namespace opencamp {

struct DecoderScratch;
class Scheduler;

struct EngineOptions {
  std::string backend = "auto";  // "auto" or a registered name ("cpu", ...)
  std::string dtype = "auto";    // "auto" (the file's formats), "f32", "bf16", or "q8_0", "q4_k", ...
  int threads = 0;               // 0: physical cores
  int max_context = 0;           // positions per sequence; 0: the model's max_position_embeddings
  // Positions in the shared KV pool (of the global layers, for a model with sliding-window
  // layers too); 0: max_context.
  int kv_cache_tokens = 0;
  // Models with sliding-window and global layers: sequences the sliding layers' pool has room
  // for at once (each about its window; they hold no more, however long they grow). More
  // running at once than this can find that pool full (CapacityExceeded; a Scheduler then
  // preempts). 0: 16, the Scheduler's default max_running.
  int kv_window_sequences = 0;
  int prefill_chunk = 256;       // tokens per forward pass during prefill (bounds scratch memory)
  // What the KV cache holds: "f32", "bf16", "f16", "q8_0", or "auto" (see resolve_kv_cache_dtype).
  std::string kv_cache_dtype = "auto";
};

// The KV cache type a request names. "auto" follows the weights, as they are held: f32 weights
// keep the f32 reference, bf16 weights a bf16 cache (as vLLM and transformers run them), and
// quantised weights (GGUF block formats) an f16 cache (llama.cpp's default for those files).
// Throws Error(InvalidArgument) for any other name.
DType resolve_kv_cache_dtype(const std::string& requested, DType weight_dtype);

// Positions per KV cache block in an Engine's cache.
inline constexpr int kKVBlockSize = 16;

// Blocks of kKVBlockSize positions the pool of a sliding-window layer group gets in an Engine
// of a model with global layers too: room for `sequences` sequences (each the window, aligned
// as attention reads it, and the blocks either end shares) and one pass of `prefill_chunk` new
// positions; the engine takes no more than the global pool has. The one formula the engine
// and `opencamp serve`'s memory sizing use.
int64_t kv_sliding_pool_blocks(int window, int sequences, int prefill_chunk);

enum class FinishReason { Stop, Length, Cancelled };
const char* finish_reason_name(FinishReason reason);  // "stop", "length", "cancelled"

struct GenerationRequest {
  // The whole prompt of the sequence. When the sequence already holds a prefix of it in the KV
  // cache (an earlier turn of the same chat), only the rest is prefilled.
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int max_tokens = 256;
  std::vector<int32_t> stop_token_ids;  // extra stop ids, besides the model's EOS ids
  bool ignore_eos = false;              // do not stop at the model's EOS ids
  // Stage 0 of sampling (sampler.h): allowed_token_ids, logit_bias, and a constraint (a
  // grammar) asked for the mask of every token; the scheduler computes a constrained
  // sequence's next mask while the forward pass that makes its logits runs.
  TokenRules token_rules;
  std::shared_ptr<TokenConstraint> constraint;
  // -1: no log-probabilities (no cost). 0..kMaxTopLogprobs: every token comes with its
  // log-probability and this many most likely alternatives (see token_logprobs).
  int logprobs = -1;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids, the stop token included when one ended it
  FinishReason finish_reason = FinishReason::Length;
  int prompt_tokens = 0;
  int cached_tokens = 0;  // prompt tokens reused from the KV cache, not recomputed
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Called with every generated token; `is_stop` marks the token that ended generation (an EOS or
// stop id). Return false to stop early (finish reason Cancelled).
using TokenCallback = std::function<bool(int32_t token, bool is_stop)>;

class Engine {
 public:
  // `model_path`: a Hugging Face folder, a .gguf file, or a folder holding one .gguf file.
  explicit Engine(const std::filesystem::path& model_path, const EngineOptions& options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& config() const { return model_->config(); }
  const Model& model() const { return *model_; }
  std::string backend_name() const { return backend_->name(); }
  DType weight_dtype() const { return model_->weight_dtype(); }  // see Model::weight_format
  // What the matmuls round activations to for this model's weights (see Backend).
  DType matmul_activation_dtype() const { return backend_->matmul_activation_dtype(weight_dtype()); }
  int threads() const { return pool_.size(); }
  int max_context() const { return max_context_; }
  DType kv_cache_dtype() const { return cache_->shape().dtype; }

  // Sequences: independent token streams sharing the KV pool.
  int create_sequence();
  void free_sequence(int seq);
  std::vector<int32_t> sequence_tokens(int seq) const;  // the tokens held in the cache
  // Drops positions from the end; returns the new length, which is shorter than asked when the
  // cut falls inside a block shared with another sequence, or 0 when a sliding-window layer has
  // released keys the window at the new length needs (see KVCache::truncate).
  int truncate_sequence(int seq, int length);

  // Appends `tokens` to `seq`. Writes the logits of the last token to `logits` [vocab], or of
  // every token when all_positions (`logits` is then [n_tokens, vocab]).
  void prefill(int seq, std::span<const int32_t> tokens, std::span<float> logits,
               bool all_positions = false);

  // Appends one token to each sequence in one batched pass; logits: [n_sequences, vocab].
  void decode(std::span<const int> seqs, std::span<const int32_t> tokens,
              std::span<float> logits);

  // The general step: tokens for several sequences (prefill chunks and decode tokens alike) in
  // one forward pass, so each weight is read once for all of them. Logits come out for the
  // chunks that want them, in chunk order: [wanting chunks (all_positions: each token), vocab].
  // On any error every sequence is left as it was, but for one case: a failure inside the pass
  // after a chunk longer than prefill_chunk has had its sliding-window blocks released leaves
  // that sequence truncated as truncate_sequence would (to nothing).
  struct Chunk {
    int seq;
    std::span<const int32_t> tokens;
    enum class Logits { None, Last, All } logits = Logits::Last;
  };
  void forward(std::span<const Chunk> chunks, std::span<float> logits);
  // Rows of logits forward() writes for these chunks.
  static int64_t logit_rows(std::span<const Chunk> chunks);

  // Prepares `seq` to continue with `prompt`: keeps the longest prefix it already holds (or,
  // when it holds nothing, maps the longest cached prefix from other sequences), always
  // leaving at least one prompt token to compute. Returns the prompt positions reused. Throws
  // Error(CapacityExceeded), changing nothing, when the rest of the prompt cannot fit.
  int reuse_prefix(int seq, std::span<const int32_t> prompt);

  // Throws the error generate() would throw for this request before doing any work: bad
  // sampling parameters, an empty prompt, out-of-vocabulary ids, a prompt over the context.
  void check_request(const GenerationRequest& request) const;

  // The blocking call for C++ users: prefill the uncached part of the prompt, then sample and
  // decode until a stop token, max_tokens, the context limit, or the callback (or `cancel`)
  // says stop. Afterwards the sequence holds the prompt and every generated token except the
  // last one sampled (which was never fed back). It runs the request through the Scheduler
  // (a batch of one, in passes of prefill_chunk tokens): there is one generation loop.
  GenerationResult generate(int seq, const GenerationRequest& request,
                            const TokenCallback& on_token = {},
                            const std::atomic<bool>* cancel = nullptr);

  // One layer group's pool (KVCache: group 0 holds the global layers when there are any,
  // then each sliding window).
  struct GroupStats {
    int window;  // 0: global layers
    int layers;
    int used_blocks, total_blocks, cached_blocks, kept_blocks;
    size_t bytes_per_position;  // of these layers
  };
  // The block counts and bytes_per_position are group 0's: the pool whose positions bound the
  // contexts (every layer's for a model without windows). `groups` has every group.
  struct CacheStats {
    int used_blocks, total_blocks, block_size, sequences;
    int cached_blocks;                       // unused, kept for prefix hits, evictable
    int64_t prefix_hit_blocks, prefix_miss_blocks, evictions;
    size_t bytes_per_position;
    size_t bytes;        // the whole cache, every group's pool
    int kept_sequences;  // finished conversations kept by schedulers (evictable)
    int kept_blocks;     // distinct blocks those conversations hold: with nothing running,
                         // used_blocks == kept_blocks (any more would be a leak)
    std::vector<GroupStats> groups;
  };
  CacheStats cache_stats() const;

 private:
  // ---- the Scheduler's side: the same calls on the sequences it holds -------------------
  friend class Scheduler;
  int create_sequence_for(const Scheduler* scheduler);  // created and held, atomically
  // Claims a caller's sequence for a generation; refused when it is missing or held already.
  void hold_sequence(int seq, const Scheduler* scheduler);
  void release_sequence(int seq, const Scheduler* scheduler);  // the caller's again
  void free_sequence_as(int seq, const Scheduler* scheduler);
  int truncate_sequence_as(int seq, int length, const Scheduler* scheduler);
  int reuse_prefix_as(int seq, std::span<const int32_t> prompt, const Scheduler* scheduler);
  void forward_as(std::span<const Chunk> chunks, std::span<float> logits, const Scheduler* scheduler);
  // Keeps a finished conversation of `scheduler` for a later request that continues it.
  void keep_sequence(int seq, const Scheduler* scheduler);
  // Takes back the kept sequence of `scheduler` sharing the longest prefix with `prompt` (at
  // least `min_common` tokens, and always leaving one prompt token to compute), or -1; also -1
  // when the prefix cache holds more of the prompt than that conversation does.
  int take_kept_sequence(const Scheduler* scheduler, std::span<const int32_t> prompt,
                         size_t min_common);
  bool free_oldest_kept(const Scheduler* scheduler);  // false when it keeps none
  int kept_count(const Scheduler* scheduler) const;

  struct Holder {
    const Scheduler* scheduler;
    bool kept;           // a finished conversation, evictable
    uint64_t kept_at;    // for least recently kept first
  };
  // Throws unless `seq` exists and is not held by anyone but `scheduler` (nullptr: a public
  // call); `what` names the call for the message.
  void check_may_change_locked(int seq, const Scheduler* scheduler, const char* what) const;
  bool evict_oldest_kept_locked(const Scheduler* only = nullptr);
  void forward_locked(std::span<const Chunk> chunks, std::span<float> logits);
  int reuse_prefix_locked(int seq, std::span<const int32_t> prompt);
  void check_sequence_locked(int seq) const;
  void check_tokens(std::span<const int32_t> tokens) const;

  EngineOptions options_;
  ThreadPool pool_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<KVCache> cache_;
  std::unique_ptr<DecoderScratch> scratch_;
  int max_context_ = 0;
  std::unordered_map<int, Holder> holders_;  // sequences schedulers hold
  uint64_t keep_clock_ = 0;
  mutable std::mutex mutex_;
};

}  // namespace opencamp
