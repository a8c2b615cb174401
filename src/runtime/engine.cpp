#include "opencamp/engine.h"

#include <algorithm>
#include <set>
#include <unordered_set>

#include "models/decoder.h"
#include "runtime/profiling_backend.h"
#include "opencamp/error.h"
#include "opencamp/scheduler.h"

namespace opencamp {
namespace {

constexpr int kBlockSize = kKVBlockSize;
// Sequences the sliding-window layers' pools have room for when EngineOptions does not say
// (the Scheduler's default max_running).
constexpr int kDefaultWindowSequences = 16;
constexpr int kMaxLogitRows = 32;  // lm_head runs over at most this many rows at a time

}  // namespace

int64_t kv_sliding_pool_blocks(int window, int sequences, int prefill_chunk) {
  const int64_t window_blocks = (window - 1 + kWindowKeyAlignment - 1 + kBlockSize - 1) / kBlockSize + 2;
  const int64_t pass_blocks = (prefill_chunk + kBlockSize - 1) / kBlockSize;
  return sequences * window_blocks + pass_blocks;
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "?";
}

DType resolve_kv_cache_dtype(const std::string& requested, DType weight_dtype) {
  if (requested == "auto") {
    if (weight_dtype == DType::F32 || weight_dtype == DType::BF16) return weight_dtype;
    return DType::F16;
  }
  const std::optional<DType> named = dtype_from_name(requested);
  if (!named || !is_kv_dtype(*named)) {
    fail(ErrorKind::InvalidArgument, "kv_cache_dtype '", requested,
         "' is not one of auto, f32, bf16, f16, q8_0");
  }
  return *named;
}

Engine::Engine(const std::filesystem::path& model_path, const EngineOptions& options)
    : options_(options), pool_(options.threads >= 0 ? options.threads : 1) {
  if (options.threads < 0) {
    fail(ErrorKind::InvalidArgument, "threads must be >= 0 (0 picks the physical core count)");
  }
  if (options.prefill_chunk <= 0 || options.max_context < 0 || options.kv_cache_tokens < 0 ||
      options.kv_window_sequences < 0) {
    fail(ErrorKind::InvalidArgument, "prefill_chunk must be > 0; max_context, kv_cache_tokens "
         "and kv_window_sequences must be >= 0 (0: default)");
  }
  resolve_kv_cache_dtype(options.kv_cache_dtype, DType::F32);  // a bad name fails before loading
  BackendOptions backend_options;
  backend_options.pool = &pool_;
  backend_ = maybe_profile(create_backend(options.backend, backend_options));
  model_ = std::make_unique<Model>(model_path, *backend_, options.dtype);
  const ModelConfig& c = model_->config();
  if (options.max_context > c.max_position_embeddings) {
    fail(ErrorKind::InvalidArgument, "max_context ", options.max_context,
         " exceeds the model's max_position_embeddings (", c.max_position_embeddings,
         "); positions past it were never trained");
  }
  max_context_ = options.max_context > 0 ? options.max_context : c.max_position_embeddings;
  const int kv_tokens = options.kv_cache_tokens > 0 ? options.kv_cache_tokens : max_context_;
  KVCacheShape shape;
  shape.n_layers = c.num_layers;
  shape.n_kv_heads = c.num_kv_heads;
  shape.head_dim = c.head_dim;
  shape.block_size = kBlockSize;
  shape.n_blocks = (kv_tokens + kBlockSize - 1) / kBlockSize;
  shape.dtype = resolve_kv_cache_dtype(options.kv_cache_dtype, model_->weight_dtype());
  const int widest_window = c.layer_windows.empty() ? 0 : *std::max_element(c.layer_windows.begin(), c.layer_windows.end());
  if (widest_window > 0) shape.layer_windows = c.layer_windows;
  const bool has_global_layers =
      std::find(c.layer_windows.begin(), c.layer_windows.end(), 0) != c.layer_windows.end();
  if (widest_window > 0 && has_global_layers) {
    // Sliding layers keep about their window per sequence. Never more than the global layers'
    // pool: no sequence holds more blocks of a sliding layer than of a global one. A model whose
    // every layer slides keeps kv_cache_tokens for them (no pool would bound its contexts
    // otherwise), released as it goes.
    const int sequences = options.kv_window_sequences > 0 ? options.kv_window_sequences : kDefaultWindowSequences;
    shape.sliding_blocks = static_cast<int>(std::min<int64_t>(
        shape.n_blocks, kv_sliding_pool_blocks(widest_window, sequences, options.prefill_chunk)));
  }
  cache_ = std::make_unique<KVCache>(*backend_, shape);
  scratch_ = std::make_unique<DecoderScratch>(*backend_, c, options.prefill_chunk, kMaxLogitRows);
}

Engine::~Engine() = default;

int Engine::create_sequence() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_->create_sequence();
}

void Engine::free_sequence(int seq) { free_sequence_as(seq, nullptr); }

void Engine::free_sequence_as(int seq, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_may_change_locked(seq, scheduler, "free_sequence");
  cache_->free_sequence(seq);
  holders_.erase(seq);
}

std::vector<int32_t> Engine::sequence_tokens(int seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_sequence_locked(seq);
  return cache_->tokens(seq);
}

int Engine::truncate_sequence(int seq, int length) { return truncate_sequence_as(seq, length, nullptr); }

int Engine::truncate_sequence_as(int seq, int length, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_may_change_locked(seq, scheduler, "truncate_sequence");
  return cache_->truncate(seq, length);
}

// ---- sequences a scheduler holds ------------------------------------------------------------

int Engine::create_sequence_for(const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int seq = cache_->create_sequence();
  holders_[seq] = {scheduler, false, 0};
  return seq;
}

void Engine::hold_sequence(int seq, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_sequence_locked(seq);
  if (holders_.count(seq) > 0) {
    fail(ErrorKind::InvalidArgument, "sequence ", seq, " is already held by a generation (one "
         "stream at a time per sequence); wait for that stream to end or cancel it");
  }
  holders_[seq] = {scheduler, false, 0};
}

void Engine::release_sequence(int seq, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = holders_.find(seq);
  if (it != holders_.end() && it->second.scheduler == scheduler) holders_.erase(it);
}

void Engine::keep_sequence(int seq, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_may_change_locked(seq, scheduler, "keep_sequence");
  holders_[seq] = {scheduler, true, ++keep_clock_};
}

int Engine::take_kept_sequence(const Scheduler* scheduler, std::span<const int32_t> prompt,
                               size_t min_common) {
  std::lock_guard<std::mutex> lock(mutex_);
  int best = -1;
  size_t best_common = 0;
  for (const auto& [seq, holder] : holders_) {
    if (!holder.kept || holder.scheduler != scheduler) continue;
    const auto& held = cache_->tokens(seq);
    const size_t limit = std::min(held.size(), prompt.size() - 1);
    size_t common = 0;
    while (common < limit && held[common] == prompt[common]) ++common;
    // What it keeps of that (a sliding window may have released the keys a shorter one needs).
    common = static_cast<size_t>(cache_->truncated_length(seq, static_cast<int>(common)));
    if (common > best_common) {
      best = seq;
      best_common = common;
    }
  }
  if (best < 0 || best_common < min_common) return -1;
  // Cached blocks (from a running sequence with the same prompt, say: the other choices of an
  // n > 1 request) may hold more of the prompt than this conversation does: map those instead.
  if (static_cast<int>(best_common) < cache_->cached_prefix_length(prompt)) return -1;
  holders_[best].kept = false;
  return best;
}

bool Engine::free_oldest_kept(const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  return evict_oldest_kept_locked(scheduler);
}

int Engine::kept_count(const Scheduler* scheduler) const {
  std::lock_guard<std::mutex> lock(mutex_);
  int n = 0;
  for (const auto& [seq, holder] : holders_) n += holder.kept && holder.scheduler == scheduler;
  return n;
}

bool Engine::evict_oldest_kept_locked(const Scheduler* only) {
  auto oldest = holders_.end();
  for (auto it = holders_.begin(); it != holders_.end(); ++it) {
    if (!it->second.kept || (only != nullptr && it->second.scheduler != only)) continue;
    if (oldest == holders_.end() || it->second.kept_at < oldest->second.kept_at) oldest = it;
  }
  if (oldest == holders_.end()) return false;
  cache_->free_sequence(oldest->first);  // its full blocks stay cached for prefix hits
  holders_.erase(oldest);
  return true;
}

void Engine::check_may_change_locked(int seq, const Scheduler* scheduler, const char* what) const {
  check_sequence_locked(seq);
  const auto it = holders_.find(seq);
  if (it != holders_.end() && it->second.scheduler != scheduler) {
    fail(ErrorKind::InvalidArgument, what, ": sequence ", seq, " is owned by a generation in a "
         "scheduler (", it->second.kept ? "a finished conversation it keeps for the next turn"
                                        : "a request streams on it",
         "), so it cannot be changed from outside; cancel the stream or wait for its end, or "
         "use a sequence of your own from create_sequence()");
  }
}

Engine::CacheStats Engine::cache_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto& prefix = cache_->prefix_stats();
  int kept = 0;
  std::vector<std::unordered_set<int32_t>> kept_blocks(static_cast<size_t>(cache_->group_count()));
  for (const auto& [seq, holder] : holders_) {  // kept conversations may share prefix blocks
    if (!holder.kept) continue;
    ++kept;
    for (int g = 0; g < cache_->group_count(); ++g) {
      for (int32_t b : cache_->block_table(seq, g)) {
        if (b != kReleasedBlock) kept_blocks[static_cast<size_t>(g)].insert(b);
      }
    }
  }
  CacheStats stats{};
  for (int g = 0; g < cache_->group_count(); ++g) {
    stats.groups.push_back({cache_->group_window(g), cache_->group_layers(g), cache_->used_blocks(g),
                            cache_->total_blocks(g), cache_->cached_blocks(g),
                            static_cast<int>(kept_blocks[static_cast<size_t>(g)].size()),
                            cache_->bytes_per_position(g)});
  }
  const GroupStats& first = stats.groups.front();
  stats.used_blocks = first.used_blocks;
  stats.total_blocks = first.total_blocks;
  stats.block_size = cache_->shape().block_size;
  stats.sequences = cache_->sequence_count();
  stats.cached_blocks = first.cached_blocks;
  stats.prefix_hit_blocks = prefix.hit_blocks;
  stats.prefix_miss_blocks = prefix.miss_blocks;
  stats.evictions = prefix.evictions;
  stats.bytes_per_position = first.bytes_per_position;
  stats.bytes = cache_->bytes();
  stats.kept_sequences = kept;
  stats.kept_blocks = first.kept_blocks;
  return stats;
}

void Engine::check_sequence_locked(int seq) const {
  if (!cache_->has_sequence(seq)) {
    fail(ErrorKind::InvalidArgument, "sequence ", seq, " does not exist (freed or never created)");
  }
}

void Engine::check_tokens(std::span<const int32_t> tokens) const {
  const int vocab = config().vocab_size;
  for (int32_t token : tokens) {
    if (token < 0 || token >= vocab) {
      fail(ErrorKind::InvalidArgument, "token id ", token, " is outside the vocabulary [0, ", vocab, ")");
    }
  }
}

int64_t Engine::logit_rows(std::span<const Chunk> chunks) {
  int64_t rows = 0;
  for (const Chunk& c : chunks) {
    rows += c.logits == Chunk::Logits::All ? static_cast<int64_t>(c.tokens.size())
                                           : c.logits == Chunk::Logits::Last ? 1 : 0;
  }
  return rows;
}

void Engine::prefill(int seq, std::span<const int32_t> tokens, std::span<float> logits,
                     bool all_positions) {
  if (tokens.empty()) fail(ErrorKind::InvalidArgument, "prefill needs at least one token");
  const Chunk chunk{seq, tokens, all_positions ? Chunk::Logits::All : Chunk::Logits::Last};
  forward(std::span(&chunk, 1), logits);
}

void Engine::decode(std::span<const int> seqs, std::span<const int32_t> tokens,
                    std::span<float> logits) {
  if (seqs.empty() || tokens.size() != seqs.size() ||
      logits.size() != seqs.size() * static_cast<size_t>(config().vocab_size)) {
    fail(ErrorKind::InvalidArgument, "decode: need one token per sequence and [n_sequences, vocab] logits");
  }
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence_locked(seqs[i]);
    if (cache_->length(seqs[i]) == 0) {
      fail(ErrorKind::InvalidArgument, "decode: sequence ", seqs[i], " is empty; prefill it first");
    }
    chunks.push_back({seqs[i], tokens.subspan(i, 1), Chunk::Logits::Last});
  }
  forward(chunks, logits);
}

void Engine::forward(std::span<const Chunk> chunks, std::span<float> logits) {
  forward_as(chunks, logits, nullptr);
}

void Engine::forward_as(std::span<const Chunk> chunks, std::span<float> logits,
                        const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const Chunk& c : chunks) check_may_change_locked(c.seq, scheduler, "forward (prefill/decode)");
  forward_locked(chunks, logits);
}

void Engine::forward_locked(std::span<const Chunk> chunks, std::span<float> logits) {
  const int64_t vocab = config().vocab_size;
  if (chunks.empty()) fail(ErrorKind::InvalidArgument, "forward: no tokens");
  if (static_cast<int64_t>(logits.size()) != logit_rows(chunks) * vocab) {
    fail(ErrorKind::InvalidArgument, "forward: logits buffer holds ", logits.size(),
         " floats, needs ", logit_rows(chunks) * vocab);
  }
  // Everything is checked before anything changes. Positions go into the cache a pass at a
  // time, so a long chunk's sliding-window blocks are released as it goes.
  const int pass_size = scratch_->max_tokens;
  std::set<int> seen;
  std::vector<int> needed_blocks(static_cast<size_t>(cache_->group_count()), 0);
  for (const Chunk& c : chunks) {
    check_sequence_locked(c.seq);
    if (!seen.insert(c.seq).second) {
      fail(ErrorKind::InvalidArgument, "forward: sequence ", c.seq, " appears twice in one pass");
    }
    if (c.tokens.empty()) fail(ErrorKind::InvalidArgument, "forward: an empty chunk");
    check_tokens(c.tokens);
    const int64_t start = cache_->length(c.seq), n = static_cast<int64_t>(c.tokens.size());
    if (start + n > max_context_) {
      fail(ErrorKind::CapacityExceeded, "the prompt needs ", start + n, " positions (", n,
           " new + ", start, " cached) but the context holds ", max_context_,
           "; shorten the prompt or start a new conversation");
    }
    for (int g = 0; g < cache_->group_count(); ++g) {
      needed_blocks[static_cast<size_t>(g)] += cache_->blocks_needed(c.seq, static_cast<int>(n), g, pass_size);
    }
  }
  auto short_group = [&] {  // a group with too few blocks to be had, or -1
    for (int g = 0; g < cache_->group_count(); ++g) {
      if (needed_blocks[static_cast<size_t>(g)] > cache_->free_blocks(g)) return g;
    }
    return -1;
  };
  // Kept conversations give way (none of them is in this pass: they are not running).
  while (short_group() >= 0 && evict_oldest_kept_locked()) {
  }
  if (const int g = short_group(); g >= 0) {
    fail(ErrorKind::CapacityExceeded, "the KV cache is full: this step needs ",
         needed_blocks[static_cast<size_t>(g)], " blocks of ", cache_->shape().block_size,
         " positions", cache_->group_window(g) > 0 ? " in the sliding-window layers' pool" : "",
         " but only ", cache_->free_blocks(g), " of ", cache_->total_blocks(g), " are free (or "
         "cached and unused); end other sequences or give the engine a larger kv_cache_tokens",
         cache_->group_window(g) > 0 ? " (or kv_window_sequences)" : "");
  }

  // One entry per token, in chunk order; passes of at most the scratch size.
  struct Entry {
    size_t chunk;
    int32_t token, position;
    bool logits;
  };
  std::vector<Entry> entries;
  std::vector<int> starts;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const Chunk& c = chunks[ci];
    const int start = cache_->length(c.seq);
    starts.push_back(start);
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      const bool wants = c.logits == Chunk::Logits::All ||
                         (c.logits == Chunk::Logits::Last && i + 1 == c.tokens.size());
      entries.push_back({ci, c.tokens[i], static_cast<int32_t>(start + i), wants});
    }
  }
  try {
    std::vector<int32_t> tokens, positions, logit_rows;
    std::vector<std::vector<KVSlot>> group_slots(static_cast<size_t>(cache_->group_count()));
    std::vector<std::span<const KVSlot>> group_slot_spans;
    size_t logits_done = 0;
    for (size_t begin = 0; begin < entries.size(); begin += static_cast<size_t>(pass_size)) {
      const size_t end = std::min(entries.size(), begin + static_cast<size_t>(pass_size));
      for (size_t i = begin; i < end;) {  // each chunk's positions of this pass into the cache
        size_t run_end = i + 1;
        while (run_end < end && entries[run_end].chunk == entries[i].chunk) ++run_end;
        const size_t ci = entries[i].chunk;
        const size_t offset = static_cast<size_t>(entries[i].position - starts[ci]);
        cache_->append(chunks[ci].seq, chunks[ci].tokens.subspan(offset, run_end - i));
        i = run_end;
      }
      tokens.clear();
      positions.clear();
      logit_rows.clear();
      for (auto& slots : group_slots) slots.clear();
      group_slot_spans.clear();
      for (size_t i = begin; i < end; ++i) {
        const Entry& e = entries[i];
        tokens.push_back(e.token);
        positions.push_back(e.position);
        for (int g = 0; g < cache_->group_count(); ++g) {
          group_slots[static_cast<size_t>(g)].push_back({cache_->block_table(chunks[e.chunk].seq, g).data(), e.position});
        }
        if (e.logits) logit_rows.push_back(static_cast<int32_t>(i - begin));
      }
      for (const auto& slots : group_slots) group_slot_spans.emplace_back(slots);
      ForwardBatch batch;
      batch.tokens = tokens;
      batch.positions = positions;
      batch.group_slots = group_slot_spans;
      batch.layer_groups = cache_->layer_groups();
      batch.logit_rows = logit_rows;
      decoder_forward(*model_, *backend_, cache_->layers(), batch, *scratch_,
                      logits.subspan(logits_done * vocab, logit_rows.size() * vocab));
      logits_done += logit_rows.size();
      // Before a later pass releases them: full blocks of sliding layers stay cached too.
      for (const Chunk& c : chunks) cache_->publish(c.seq);
    }
  } catch (...) {
    for (size_t i = 0; i < chunks.size(); ++i) {  // leave every sequence as it was (see forward)
      if (cache_->length(chunks[i].seq) > starts[i]) cache_->truncate(chunks[i].seq, starts[i]);
    }
    throw;
  }
  for (const Chunk& c : chunks) cache_->release_behind_windows(c.seq);
}

int Engine::reuse_prefix(int seq, std::span<const int32_t> prompt) {
  return reuse_prefix_as(seq, prompt, nullptr);
}

int Engine::reuse_prefix_as(int seq, std::span<const int32_t> prompt, const Scheduler* scheduler) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_may_change_locked(seq, scheduler, "reuse_prefix");
  return reuse_prefix_locked(seq, prompt);
}

int Engine::reuse_prefix_locked(int seq, std::span<const int32_t> prompt) {
  check_sequence_locked(seq);
  if (prompt.empty()) fail(ErrorKind::InvalidArgument, "the prompt is empty");
  const std::vector<int32_t>& held = cache_->tokens(seq);
  const size_t limit = std::min(held.size(), prompt.size() - 1);
  size_t common = 0;
  while (common < limit && held[common] == prompt[common]) ++common;
  // Refuse before dropping anything when the whole prompt cannot fit: in each group, what it
  // will hold against what can be had, the blocks `seq` holds included.
  const int prompt_length = static_cast<int>(prompt.size());
  auto short_group = [&] {  // a group with too few blocks to be had, or -1
    for (int g = 0; g < cache_->group_count(); ++g) {
      if (cache_->blocks_to_hold(prompt_length, g, scratch_->max_tokens) >
          cache_->free_blocks(g) + cache_->held_blocks(seq, g)) {
        return g;
      }
    }
    return -1;
  };
  // Kept conversations (never `seq` itself: it is being reused) give way first.
  while (short_group() >= 0 && evict_oldest_kept_locked()) {
  }
  if (const int g = short_group(); g >= 0) {
    fail(ErrorKind::CapacityExceeded, "the KV cache is full: the prompt needs ",
         cache_->blocks_to_hold(prompt_length, g, scratch_->max_tokens), " blocks of ",
         cache_->shape().block_size, " positions",
         cache_->group_window(g) > 0 ? " in the sliding-window layers' pool" : "", " but only ",
         cache_->free_blocks(g) + cache_->held_blocks(seq, g),
         " can be had; end other sequences or give the engine a larger kv_cache_tokens");
  }
  // Keeps `common` positions, or none when a window has released keys they need.
  int reused = cache_->truncate(seq, static_cast<int>(common));
  if (reused == 0) reused = cache_->map_cached_prefix(seq, prompt);
  return reused;
}

void Engine::check_request(const GenerationRequest& request) const {
  request.sampling.validate();
  if (request.prompt.empty()) fail(ErrorKind::InvalidArgument, "the prompt is empty");
  if (request.max_tokens < 1) {
    fail(ErrorKind::InvalidArgument, "max_tokens must be >= 1, got ", request.max_tokens);
  }
  if (request.logprobs < -1 || request.logprobs > kMaxTopLogprobs) {
    fail(ErrorKind::InvalidArgument, "logprobs must be -1 (none) or in [0, ", kMaxTopLogprobs,
         "], got ", request.logprobs);
  }
  check_tokens(request.prompt);
  check_tokens(request.stop_token_ids);
  request.token_rules.check(static_cast<size_t>(config().vocab_size));
  const int prompt_tokens = static_cast<int>(request.prompt.size());
  if (prompt_tokens > max_context_) {
    fail(ErrorKind::CapacityExceeded, "the prompt has ", prompt_tokens,
         " tokens but the context holds ", max_context_, "; shorten the prompt");
  }
}

GenerationResult Engine::generate(int seq, const GenerationRequest& request,
                                  const TokenCallback& on_token, const std::atomic<bool>* cancel) {
  // A batch of one on a loop of its own, in passes of prefill_chunk tokens (the passes
  // prefill() makes): the same numbers as before, decided by the Scheduler's one loop.
  SchedulerOptions options;
  options.max_running = 1;
  options.step_tokens = options_.prefill_chunk;
  options.max_idle_sequences = 0;
  Scheduler scheduler(*this, options);
  TokenCallback watch = [&](int32_t token, bool is_stop) {
    if (on_token && !on_token(token, is_stop)) return false;
    return is_stop || cancel == nullptr || !cancel->load();  // a stop token still ends as Stop
  };
  return scheduler.submit(request, seq, std::move(watch))->wait();
}

}  // namespace opencamp
