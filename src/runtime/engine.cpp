#include "opencamp/engine.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "models/decoder.h"
#include "runtime/profiling_backend.h"
#include "opencamp/error.h"

namespace opencamp {
namespace {

constexpr int kBlockSize = 16;
constexpr int kMaxLogitRows = 32;  // lm_head runs over at most this many rows at a time

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "?";
}

Engine::Engine(const std::filesystem::path& model_dir, const EngineOptions& options)
    : options_(options), pool_(options.threads >= 0 ? options.threads : 1) {
  if (options.threads < 0) {
    fail(ErrorKind::InvalidArgument, "threads must be >= 0 (0 picks the physical core count)");
  }
  if (options.prefill_chunk <= 0 || options.max_context < 0 || options.kv_cache_tokens < 0) {
    fail(ErrorKind::InvalidArgument,
         "prefill_chunk must be > 0; max_context and kv_cache_tokens must be >= 0 (0: default)");
  }
  BackendOptions backend_options;
  backend_options.pool = &pool_;
  backend_ = maybe_profile(create_backend(options.backend, backend_options));
  model_ = std::make_unique<Model>(model_dir, *backend_, options.dtype);
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
  cache_ = std::make_unique<KVCache>(*backend_, shape);
  scratch_ = std::make_unique<DecoderScratch>(*backend_, c, options.prefill_chunk, kMaxLogitRows);
}

Engine::~Engine() = default;

int Engine::create_sequence() {
  std::lock_guard<std::mutex> lock(mutex_);
  const int seq = cache_->create_sequence();
  if (static_cast<size_t>(seq) >= sequence_tokens_.size()) sequence_tokens_.resize(seq + 1);
  sequence_tokens_[seq].clear();
  return seq;
}

void Engine::free_sequence(int seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_sequence_locked(seq);
  cache_->free_sequence(seq);
  sequence_tokens_[seq].clear();
}

std::vector<int32_t> Engine::sequence_tokens(int seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_sequence_locked(seq);
  return sequence_tokens_[seq];
}

void Engine::truncate_sequence(int seq, int length) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_sequence_locked(seq);
  cache_->truncate(seq, length);
  sequence_tokens_[seq].resize(static_cast<size_t>(length));
}

Engine::CacheStats Engine::cache_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {cache_->used_blocks(), cache_->shape().n_blocks, cache_->shape().block_size,
          cache_->sequence_count()};
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

void Engine::prefill(int seq, std::span<const int32_t> tokens, std::span<float> logits,
                     bool all_positions) {
  const int64_t vocab = config().vocab_size;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail(ErrorKind::InvalidArgument, "prefill needs at least one token");
  check_tokens(tokens);
  if (static_cast<int64_t>(logits.size()) != (all_positions ? n : 1) * vocab) {
    fail(ErrorKind::InvalidArgument, "prefill: logits buffer holds ", logits.size(),
         " floats, needs ", (all_positions ? n : 1) * vocab);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  prefill_locked(seq, tokens, logits, all_positions);
}

void Engine::prefill_locked(int seq, std::span<const int32_t> tokens, std::span<float> logits,
                            bool all_positions) {
  const int64_t vocab = config().vocab_size;
  const int64_t n = static_cast<int64_t>(tokens.size());
  check_sequence_locked(seq);
  const int start = cache_->length(seq);
  if (start + n > max_context_) {
    fail(ErrorKind::CapacityExceeded, "the prompt needs ", start + n, " positions (", n, " new + ",
         start, " cached) but the context holds ", max_context_,
         "; shorten the prompt or start a new conversation");
  }
  cache_->grow(seq, static_cast<int>(n));
  try {
    const int chunk = scratch_->max_tokens;
    std::vector<int32_t> positions, logit_rows;
    std::vector<KVSlot> slots;
    for (int64_t begin = 0; begin < n; begin += chunk) {
      const int64_t end = std::min<int64_t>(n, begin + chunk);
      positions.clear();
      slots.clear();
      for (int64_t i = begin; i < end; ++i) {
        positions.push_back(static_cast<int32_t>(start + i));
        slots.push_back({cache_->block_table(seq).data(), static_cast<int32_t>(start + i)});
      }
      ForwardBatch batch;
      batch.tokens = tokens.subspan(static_cast<size_t>(begin), static_cast<size_t>(end - begin));
      batch.positions = positions;
      batch.slots = slots;
      std::span<float> out;
      logit_rows.clear();
      if (all_positions) {
        for (int64_t i = 0; i < end - begin; ++i) logit_rows.push_back(static_cast<int32_t>(i));
        out = logits.subspan(static_cast<size_t>(begin * vocab), static_cast<size_t>((end - begin) * vocab));
      } else if (end == n) {
        logit_rows.push_back(static_cast<int32_t>(end - begin - 1));
        out = logits;
      }
      batch.logit_rows = logit_rows;
      decoder_forward(*model_, *backend_, *cache_, batch, *scratch_, out);
    }
  } catch (...) {
    cache_->truncate(seq, start);  // leave the sequence as it was
    throw;
  }
  auto& history = sequence_tokens_[seq];
  history.insert(history.end(), tokens.begin(), tokens.end());
}

void Engine::decode(std::span<const int> seqs, std::span<const int32_t> tokens,
                    std::span<float> logits) {
  const int64_t vocab = config().vocab_size;
  const size_t n = seqs.size();
  if (n == 0 || tokens.size() != n || logits.size() != n * static_cast<size_t>(vocab)) {
    fail(ErrorKind::InvalidArgument, "decode: need one token per sequence and [n_sequences, vocab] logits");
  }
  check_tokens(tokens);
  if (std::set<int>(seqs.begin(), seqs.end()).size() != n) {
    fail(ErrorKind::InvalidArgument, "decode: a sequence appears twice in one batch");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (int seq : seqs) {
    check_sequence_locked(seq);
    if (cache_->length(seq) == 0) {
      fail(ErrorKind::InvalidArgument, "decode: sequence ", seq, " is empty; prefill it first");
    }
    if (cache_->length(seq) + 1 > max_context_) {
      fail(ErrorKind::CapacityExceeded, "sequence ", seq, " has reached the context limit of ",
           max_context_, " positions");
    }
  }
  std::vector<int> starts;
  try {
    for (int seq : seqs) {
      starts.push_back(cache_->length(seq));
      cache_->grow(seq, 1);
    }
    const size_t chunk = static_cast<size_t>(scratch_->max_tokens);
    std::vector<int32_t> positions;
    std::vector<KVSlot> slots;
    for (size_t begin = 0; begin < n; begin += chunk) {
      const size_t end = std::min(n, begin + chunk);
      positions.clear();
      slots.clear();
      for (size_t i = begin; i < end; ++i) {
        positions.push_back(starts[i]);
        slots.push_back({cache_->block_table(seqs[i]).data(), starts[i]});
      }
      ForwardBatch batch;
      batch.tokens = tokens.subspan(begin, end - begin);
      batch.positions = positions;
      batch.slots = slots;
      std::vector<int32_t> logit_rows(end - begin);
      for (size_t i = 0; i < logit_rows.size(); ++i) logit_rows[i] = static_cast<int32_t>(i);
      batch.logit_rows = logit_rows;
      decoder_forward(*model_, *backend_, *cache_, batch, *scratch_,
                      logits.subspan(begin * vocab, (end - begin) * vocab));
    }
  } catch (...) {
    for (size_t i = 0; i < starts.size(); ++i) cache_->truncate(seqs[i], starts[i]);
    throw;
  }
  for (size_t i = 0; i < n; ++i) sequence_tokens_[seqs[i]].push_back(tokens[i]);
}

void Engine::check_request(const GenerationRequest& request) const {
  request.sampling.validate();
  if (request.prompt.empty()) fail(ErrorKind::InvalidArgument, "the prompt is empty");
  if (request.max_tokens < 1) {
    fail(ErrorKind::InvalidArgument, "max_tokens must be >= 1, got ", request.max_tokens);
  }
  check_tokens(request.prompt);
  check_tokens(request.stop_token_ids);
  const int prompt_tokens = static_cast<int>(request.prompt.size());
  if (prompt_tokens > max_context_) {
    fail(ErrorKind::CapacityExceeded, "the prompt has ", prompt_tokens,
         " tokens but the context holds ", max_context_, "; shorten the prompt");
  }
}

GenerationResult Engine::generate(int seq, const GenerationRequest& request,
                                  const TokenCallback& on_token, const std::atomic<bool>* cancel) {
  check_request(request);
  Sampler sampler(request.sampling);
  const int prompt_tokens = static_cast<int>(request.prompt.size());
  std::set<int32_t> stop_ids(request.stop_token_ids.begin(), request.stop_token_ids.end());
  if (!request.ignore_eos) stop_ids.insert(config().eos_token_ids.begin(), config().eos_token_ids.end());

  GenerationResult result;
  result.prompt_tokens = prompt_tokens;
  const int64_t vocab = config().vocab_size;
  std::vector<float> logits(static_cast<size_t>(vocab));
  const auto prefill_start = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence_locked(seq);
    // Reuse the longest cached prefix; at least one prompt token is recomputed for its logits.
    const std::vector<int32_t>& cached = sequence_tokens_[seq];
    const size_t limit = std::min(cached.size(), request.prompt.size() - 1);
    size_t common = 0;
    while (common < limit && cached[common] == request.prompt[common]) ++common;
    // Refuse before dropping anything when the rest of the prompt cannot fit.
    const int block_size = cache_->shape().block_size;
    const int kept_blocks = static_cast<int>((common + block_size - 1) / block_size);
    const int needed_blocks = (prompt_tokens + block_size - 1) / block_size - kept_blocks;
    const int held_blocks = static_cast<int>(cache_->block_table(seq).size());
    if (needed_blocks > cache_->free_blocks() + held_blocks - kept_blocks) {
      fail(ErrorKind::CapacityExceeded, "the KV cache is full: the prompt needs ", needed_blocks,
           " more blocks of ", block_size, " positions but only ",
           cache_->free_blocks() + held_blocks - kept_blocks,
           " can be had; end other sequences or give the engine a larger kv_cache_tokens");
    }
    cache_->truncate(seq, static_cast<int>(common));
    sequence_tokens_[seq].resize(common);
    result.cached_tokens = static_cast<int>(common);
    prefill_locked(seq, std::span(request.prompt).subspan(common), logits, false);
  }
  result.prefill_seconds = seconds_since(prefill_start);

  std::vector<int32_t> history = request.prompt;  // the sequence's tokens, for penalties
  const auto decode_start = std::chrono::steady_clock::now();
  for (;;) {
    const int32_t token = sampler.sample(logits, history);
    const bool is_stop = stop_ids.count(token) > 0;
    result.tokens.push_back(token);
    if (on_token && !on_token(token, is_stop)) {
      result.finish_reason = FinishReason::Cancelled;
      break;
    }
    if (is_stop) {
      result.finish_reason = FinishReason::Stop;
      break;
    }
    if (static_cast<int>(result.tokens.size()) >= request.max_tokens ||
        static_cast<int>(history.size()) + 1 > max_context_) {
      result.finish_reason = FinishReason::Length;
      break;
    }
    if (cancel && cancel->load()) {
      result.finish_reason = FinishReason::Cancelled;
      break;
    }
    const int seqs[] = {seq};
    decode(seqs, std::span(&token, 1), logits);
    history.push_back(token);
  }
  result.decode_seconds = seconds_since(decode_start);
  return result;
}

}  // namespace opencamp
