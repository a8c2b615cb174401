#include "opencamp/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <future>
#include <iterator>
#include <set>
#include <utility>

#include "opencamp/error.h"

namespace opencamp {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The consumer's side of a request's token queue: waits, under `lock`, until `queue` has a
// token or `done` is set, at most timeout_seconds (< 0: no limit). False on timeout.
bool wait_for_news(std::unique_lock<std::mutex>& lock, std::condition_variable& ready,
                   const std::deque<TokenEvent>& queue, const bool& done, double timeout_seconds) {
  auto has_news = [&] { return !queue.empty() || done; };
  if (timeout_seconds < 0) {
    ready.wait(lock, has_news);
    return true;
  }
  return ready.wait_for(lock, std::chrono::duration<double>(timeout_seconds), has_news);
}

}  // namespace

// ---- the caller's side ---------------------------------------------------------------------

std::optional<TokenEvent> ScheduledRequest::next(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  timed_out_ = !wait_for_news(lock, changed_, queue_, done_, timeout_seconds);
  if (!queue_.empty() && !timed_out_) {
    TokenEvent event = std::move(queue_.front());
    queue_.pop_front();
    taken_locked(1);
    return event;
  }
  if (!timed_out_ && error_) std::rethrow_exception(error_);
  return std::nullopt;
}

std::vector<TokenEvent> ScheduledRequest::next_batch(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  timed_out_ = !wait_for_news(lock, changed_, queue_, done_, timeout_seconds);
  std::vector<TokenEvent> events;
  if (timed_out_) return events;
  events.assign(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
  queue_.clear();
  if (!events.empty()) {
    taken_locked(events.size());
  } else if (error_) {
    std::rethrow_exception(error_);
  }
  return events;
}

void ScheduledRequest::acknowledge(size_t tokens) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (collected_) taken_locked(tokens);
}

void ScheduledRequest::taken_locked(size_t tokens) {
  unread_ -= std::min(tokens, unread_);
  last_read_ = Clock::now();
  // Only a paused request needs the loop to look again: a running one is never waited for.
  if (paused_ && scheduler_ != nullptr) scheduler_->wake();
}

bool ScheduledRequest::wait_first_token(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto started = [this] { return sampled_first_ || done_; };
  if (timeout_seconds < 0) {
    changed_.wait(lock, started);
    return true;
  }
  return changed_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), started);
}

void ScheduledRequest::cancel() {
  cancelled_.store(true);
  std::lock_guard<std::mutex> lock(mutex_);
  if (scheduler_ != nullptr) scheduler_->wake();  // null once the request has ended
}

const GenerationResult& ScheduledRequest::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!done_ && !waiting_for_end_) {
    waiting_for_end_ = true;  // tokens pile up unread from now on: never pause for them
    if (scheduler_ != nullptr) scheduler_->wake();
  }
  changed_.wait(lock, [this] { return done_; });
  if (error_) std::rethrow_exception(error_);
  return result_;
}

bool ScheduledRequest::finished() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

double ScheduledRequest::queue_seconds() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_seconds_;
}

// ---- the loop's side -----------------------------------------------------------------------

struct Scheduler::Active {
  std::shared_ptr<ScheduledRequest> handle;
  GenerationRequest request;
  uint64_t arrival = 0;
  int seq = -1;
  bool owns_sequence = false;
  bool admitted_once = false;
  // What must be in the cache before the next token is sampled: the prompt, plus the tokens
  // generated before a preemption (they are recomputed, not generated again).
  std::vector<int32_t> prompt;
  size_t prefilled = 0;     // positions of `prompt` in the cache
  bool decoding = false;    // the prompt is in; last_token is still to be fed
  int32_t last_token = 0;
  size_t cache_length = 0;  // positions the sequence holds
  std::unique_ptr<Sampler> sampler;
  std::vector<int32_t> history;  // prompt and generated tokens, for penalties
  std::set<int32_t> stop_ids;
  // A constrained request: the mask of its next token, the token sampled that the constraint
  // has not been told yet (it is told on the worker, just before the next mask), and what
  // went wrong there.
  std::vector<uint32_t> mask;
  std::optional<int32_t> unaccepted;
  std::exception_ptr mask_error;
  TokenCallback on_token;  // runs on the loop thread; false ends the request
  GenerationResult result;
  Clock::time_point submitted, admitted, first_token;
  Clock::time_point paused_at;  // when its reader's backlog took it off the batch
  bool done = false;

  // On the mask worker: tells the constraint the last token, then asks for the next mask.
  void compute_mask(size_t words) {
    try {
      if (unaccepted) {
        request.constraint->accept(*unaccepted);
        unaccepted.reset();
      }
      mask.assign(words, 0u);
      request.constraint->fill_mask(mask);
    } catch (...) {
      mask_error = std::current_exception();
    }
  }

  // Hands a sampled token on (a collected request's through the step's outbox); false when
  // the token callback asks to end the request.
  bool emit(int32_t token, bool is_stop, std::shared_ptr<const TokenLogprobs> logprobs,
            std::vector<std::shared_ptr<ScheduledRequest>>& outbox) {
    const bool go_on = !on_token || on_token(token, is_stop);
    bool list = false;
    bool first = false;
    {
      std::lock_guard<std::mutex> lock(handle->mutex_);
      handle->queue_.push_back({token, is_stop, std::move(logprobs)});
      first = !std::exchange(handle->sampled_first_, true);
      ++handle->unread_;
      list = handle->collected_ && !std::exchange(handle->in_outbox_, true);
    }
    if (list) outbox.push_back(handle);
    // A collected request's reader is the dispatcher, woken by collect(); wait_first_token()
    // still waits on changed_.
    if (!handle->collected_ || first) handle->changed_.notify_all();
    return go_on;
  }

  // The one place that decides whether a generation ends after the token just sampled, and
  // why: the callback said stop, a stop id, max_tokens, or the context is full.
  std::optional<FinishReason> finish_reason_after(int32_t token, bool go_on, int max_context) const {
    if (!go_on) return FinishReason::Cancelled;
    if (stop_ids.count(token) > 0) return FinishReason::Stop;
    if (static_cast<int>(result.tokens.size()) >= request.max_tokens ||
        static_cast<int>(cache_length) + 1 > max_context) {
      return FinishReason::Length;
    }
    return std::nullopt;
  }
};

Scheduler::Scheduler(Engine& engine, const SchedulerOptions& options)
    : engine_(engine), options_(options) {
  if (options.max_running < 1 || options.step_tokens < 1 || options.max_unread_tokens < 1) {
    opencamp::fail(ErrorKind::InvalidArgument,
                   "max_running, step_tokens and max_unread_tokens must be >= 1");
  }
  if (!(options.stream_idle_timeout_seconds >= 0.0)) {
    opencamp::fail(ErrorKind::InvalidArgument, "stream_idle_timeout_seconds must be >= 0 (0: "
                   "never), got ", options.stream_idle_timeout_seconds);
  }
  // Where a token's attention (2 * q_dim multiply-adds per key: scores and values) costs as
  // much as its matrix products (q, k, v, o and a gated MLP): 3072 positions for SmolLM2-135M.
  const ModelConfig& c = engine_.config();
  const double q_dim = static_cast<double>(c.num_heads) * c.head_dim;
  const double kv_dim = static_cast<double>(c.num_kv_heads) * c.head_dim;
  const double matrix_work = c.hidden_size * (2.0 * q_dim + 2.0 * kv_dim) +
                             3.0 * c.hidden_size * c.intermediate_size;
  attention_span_ = std::max(1.0, matrix_work / (2.0 * q_dim));
  thread_ = std::thread([this] { loop(); });
}

size_t Scheduler::chunk_within(int64_t budget, size_t start, size_t left) const {
  // The largest n with chunk_cost(start, n) <= budget, from the real root of
  // n + n (start + n / 2) / S = budget, then made exact; at least one token, so every prompt
  // goes on.
  const double S = attention_span_;
  const double b = 1.0 + static_cast<double>(start) / S;
  const double root = S * (std::sqrt(b * b + 2.0 * static_cast<double>(budget) / S) - b);
  size_t n = std::min(left, static_cast<size_t>(std::max(0.0, root)) + 1);
  while (n > 1 && chunk_cost(start, n) > budget) --n;
  return std::max<size_t>(n, 1);
}

int64_t Scheduler::chunk_cost(size_t start, size_t n) const {
  // n tokens, plus the extra attention work of positions start .. start + n - 1 in units of a
  // token's matrix products (rounded down: a short prompt early on costs its length).
  const double extra = static_cast<double>(n) * (static_cast<double>(start) + 0.5 * n) / attention_span_;
  return static_cast<int64_t>(n) + static_cast<int64_t>(extra);
}

Scheduler::~Scheduler() { shutdown(); }

void Scheduler::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake();
  if (thread_.joinable()) thread_.join();
  for (auto& a : running_) finish(*a, FinishReason::Cancelled);
  running_.clear();
  for (auto& a : paused_) finish(*a, FinishReason::Cancelled);
  paused_.clear();
  std::deque<std::unique_ptr<Active>> waiting;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    waiting.swap(waiting_);
    stats_.waiting = 0;
    stats_.running = 0;
  }
  for (auto& a : waiting) finish(*a, FinishReason::Cancelled);
  while (engine_.free_oldest_kept(this)) {
  }
  flush_outbox();
  {
    std::lock_guard<std::mutex> lock(outbox_mutex_);
    outbox_stopping_ = true;  // collectors take what is left, then return at once
  }
  outbox_ready_.notify_all();
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.paused = 0;
}

void Scheduler::flush_outbox() {
  if (step_outbox_.empty()) return;
  {
    std::lock_guard<std::mutex> lock(outbox_mutex_);
    outbox_.insert(outbox_.end(), step_outbox_.begin(), step_outbox_.end());
  }
  step_outbox_.clear();
  outbox_ready_.notify_all();
}

std::vector<Scheduler::Collected> Scheduler::collect(double timeout_seconds) {
  std::vector<std::shared_ptr<ScheduledRequest>> handles;
  {
    std::unique_lock<std::mutex> lock(outbox_mutex_);
    auto ready = [this] { return !outbox_.empty() || outbox_stopping_; };
    if (timeout_seconds < 0) {
      outbox_ready_.wait(lock, ready);
    } else {
      outbox_ready_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), ready);
    }
    handles.swap(outbox_);
  }
  std::vector<Collected> collected;
  collected.reserve(handles.size());
  for (auto& handle : handles) {
    Collected c;
    {
      std::lock_guard<std::mutex> lock(handle->mutex_);
      c.tokens.assign(std::make_move_iterator(handle->queue_.begin()),
                      std::make_move_iterator(handle->queue_.end()));
      handle->queue_.clear();
      handle->in_outbox_ = false;
      c.ended = handle->done_ && !std::exchange(handle->reported_end_, true);
    }
    if (c.tokens.empty() && !c.ended) continue;
    c.request = std::move(handle);
    collected.push_back(std::move(c));
  }
  return collected;
}

std::shared_ptr<ScheduledRequest> Scheduler::submit(GenerationRequest request, int seq,
                                                    TokenCallback on_token, bool collected) {
  engine_.check_request(request);
  auto active = std::make_unique<Active>();
  active->handle = std::make_shared<ScheduledRequest>();
  active->handle->scheduler_ = this;
  active->handle->collected_ = collected;
  active->request = std::move(request);
  active->seq = seq;
  active->prompt = active->request.prompt;
  active->history = active->request.prompt;
  active->sampler = std::make_unique<Sampler>(active->request.sampling, active->request.token_rules,
                                              static_cast<size_t>(engine_.config().vocab_size));
  active->on_token = std::move(on_token);
  active->stop_ids.insert(active->request.stop_token_ids.begin(), active->request.stop_token_ids.end());
  if (!active->request.ignore_eos) {
    active->stop_ids.insert(engine_.config().eos_token_ids.begin(), engine_.config().eos_token_ids.end());
  }
  active->result.prompt_tokens = static_cast<int>(active->request.prompt.size());
  active->submitted = Clock::now();
  auto handle = active->handle;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) opencamp::fail(ErrorKind::Internal, "the scheduler is shutting down");
    if (waiting_.size() >= options_.max_waiting) {
      opencamp::fail(ErrorKind::QueueFull, "too many requests are waiting (", waiting_.size(),
                     "); try again later");
    }
    // From here the caller's sequence is this request's: the engine refuses outside changes.
    if (active->seq >= 0) engine_.hold_sequence(active->seq, this);
    active->arrival = next_arrival_++;
    active->handle->id_ = active->arrival;
    waiting_.push_back(std::move(active));
    stats_.waiting = static_cast<int>(waiting_.size());
  }
  wake();
  return handle;
}

void Scheduler::wake() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    woken_ = true;
  }
  work_.notify_all();
}

Scheduler::Stats Scheduler::stats() const {
  const int kept = engine_.kept_count(this);
  std::lock_guard<std::mutex> lock(mutex_);
  Stats stats = stats_;
  stats.idle = kept;
  return stats;
}

void Scheduler::loop() {
  bool idle = false;  // the last step found nothing it could do
  for (;;) {
    {
      // Read before taking mutex_: a request's lock is taken before mutex_, never inside it.
      const Clock::time_point deadline = idle ? next_idle_deadline() : Clock::time_point::max();
      std::unique_lock<std::mutex> lock(mutex_);
      if (idle && deadline != Clock::time_point::max()) {
        // Nothing to do until something changes or a paused stream's reader times out.
        work_.wait_until(lock, deadline, [this] { return stopping_ || woken_; });
      } else if (idle) {
        work_.wait(lock, [this] { return stopping_ || woken_; });
      } else {
        work_.wait(lock, [this] { return stopping_ || woken_ || !waiting_.empty() || !running_.empty() || !paused_.empty(); });
      }
      woken_ = false;
      if (stopping_) return;
    }
    try {
      idle = !step();
    } catch (...) {
      // A failure outside any one request's forward pass: end them all, keep serving.
      for (auto& a : running_) fail(*a, std::current_exception());
      running_.clear();
    }
    flush_outbox();  // the step's tokens and ends to collect(), in one wake-up
  }
}

Clock::time_point Scheduler::next_idle_deadline() const {
  Clock::time_point deadline = Clock::time_point::max();
  if (options_.stream_idle_timeout_seconds <= 0.0) return deadline;
  const auto timeout = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(options_.stream_idle_timeout_seconds));
  for (const auto& a : paused_) {
    std::lock_guard<std::mutex> lock(a->handle->mutex_);
    deadline = std::min(deadline, std::max(a->handle->last_read_, a->paused_at) + timeout);
  }
  return deadline;
}

void Scheduler::pause_and_resume() {
  // Whether the reader is max_unread_tokens behind; marks the request paused or running as
  // `pause_if_behind` / `resume_if_not` say, under the request's lock, so that a reader taking
  // tokens meanwhile sees the mark (and wakes the loop when it is paused).
  auto behind = [this](Active& a, bool pause_if_behind, bool resume_if_not) {
    std::lock_guard<std::mutex> lock(a.handle->mutex_);
    const bool is_behind =
        a.handle->unread_ >= options_.max_unread_tokens && !a.handle->waiting_for_end_;
    if (is_behind && pause_if_behind) a.handle->paused_ = true;
    if (!is_behind && resume_if_not) a.handle->paused_ = false;
    return is_behind;
  };
  const Clock::time_point now = Clock::now();
  int64_t paused_now = 0, timed_out = 0;
  for (auto& a : running_) {
    if (!a->decoding || !behind(*a, true, false)) continue;
    a->paused_at = now;
    paused_.push_back(std::move(a));
    ++paused_now;
  }
  std::erase_if(running_, [](const auto& a) { return a == nullptr; });
  // Resumed streams come before anyone waiting: they were admitted already.
  const double timeout = options_.stream_idle_timeout_seconds;
  for (auto& a : paused_) {
    const bool room = static_cast<int>(running_.size()) < options_.max_running;
    if (a->handle->cancelled_.load()) {
      finish(*a, FinishReason::Cancelled);
    } else if (!behind(*a, false, room)) {
      if (room) running_.push_back(std::move(a));  // else: caught up, waits for a slot
    } else if (timeout > 0.0) {
      Clock::time_point last_read;
      {
        std::lock_guard<std::mutex> lock(a->handle->mutex_);
        last_read = std::max(a->handle->last_read_, a->paused_at);
      }
      if (seconds_between(last_read, now) >= timeout) {
        fail(*a, std::make_exception_ptr(Error(
                     ErrorKind::Timeout, "the stream's reader read nothing for " +
                                             std::to_string(timeout) +
                                             " s while its generation waited; it was ended "
                                             "and its KV cache freed")));
        ++timed_out;
      }
    }
  }
  std::erase_if(paused_, [](const auto& a) { return a == nullptr || a->done; });
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.paused = static_cast<int>(paused_.size());
  stats_.pauses += paused_now;
  stats_.stream_timeouts += timed_out;
}

void Scheduler::finish(Active& a, FinishReason reason) {
  if (a.done) return;
  a.done = true;
  admission_paused_ = false;  // blocks came back
  a.result.finish_reason = reason;
  const Clock::time_point now = Clock::now();
  if (!a.result.tokens.empty()) a.result.decode_seconds = seconds_between(a.first_token, now);
  if (a.seq >= 0 && a.owns_sequence) {
    bool kept = false;
    if (reason != FinishReason::Cancelled && options_.max_idle_sequences > 0) {
      try {  // kept for a request that continues this conversation
        engine_.keep_sequence(a.seq, this);
        kept = true;
        while (engine_.kept_count(this) > static_cast<int>(options_.max_idle_sequences)) {
          engine_.free_oldest_kept(this);
        }
      } catch (...) {
      }
    }
    if (!kept) {
      try {
        engine_.free_sequence_as(a.seq, this);
      } catch (...) {
      }
    }
  } else if (a.seq >= 0) {
    engine_.release_sequence(a.seq, this);  // the caller's sequence is the caller's again
  }
  {
    // The stats before the handle: whoever wait() wakes sees this request counted as ended.
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.generated_tokens += static_cast<int64_t>(a.result.tokens.size());
    stats_.running = static_cast<int>(
        std::count_if(running_.begin(), running_.end(), [](const auto& r) { return !r->done; }));
  }
  bool list = false;
  {
    std::lock_guard<std::mutex> lock(a.handle->mutex_);
    a.handle->result_ = a.result;
    a.handle->done_ = true;
    a.handle->scheduler_ = nullptr;
    list = a.handle->collected_ && !std::exchange(a.handle->in_outbox_, true);
  }
  if (list) step_outbox_.push_back(a.handle);
  a.handle->changed_.notify_all();
}

void Scheduler::fail(Active& a, std::exception_ptr error) {
  if (a.done) return;
  {
    std::lock_guard<std::mutex> lock(a.handle->mutex_);
    a.handle->error_ = error;
  }
  finish(a, FinishReason::Cancelled);
}

void Scheduler::admit() {
  if (admission_paused_ && !running_.empty()) return;
  admission_paused_ = false;
  while (static_cast<int>(running_.size()) < options_.max_running) {
    std::unique_ptr<Active> a;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (waiting_.empty()) return;
      a = std::move(waiting_.front());
      waiting_.pop_front();
      stats_.waiting = static_cast<int>(waiting_.size());
    }
    if (a->handle->cancelled_.load()) {
      finish(*a, FinishReason::Cancelled);
      continue;
    }
    try {
      if (a->seq < 0) {
        // A kept conversation this prompt continues (shorter shared starts, such as a system
        // prompt, come as cached blocks without taking the sequence from its conversation).
        const size_t min_common = static_cast<size_t>(engine_.cache_stats().block_size);
        a->seq = engine_.take_kept_sequence(this, a->prompt, min_common);
        if (a->seq < 0) a->seq = engine_.create_sequence_for(this);
        a->owns_sequence = true;
      }
      // Kept conversations give their blocks back inside the engine when this needs them.
      const int reused = engine_.reuse_prefix_as(a->seq, a->prompt, this);
      a->prefilled = static_cast<size_t>(reused);
      a->cache_length = a->prefilled;
      if (!a->admitted_once) {
        a->admitted_once = true;
        a->result.cached_tokens = reused;
        a->admitted = Clock::now();
        std::lock_guard<std::mutex> lock(a->handle->mutex_);
        a->handle->queue_seconds_ = seconds_between(a->submitted, a->admitted);
        std::lock_guard<std::mutex> stats_lock(mutex_);
        stats_.prompt_tokens += static_cast<int64_t>(a->prompt.size());
        stats_.cached_tokens += reused;
      }
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::CapacityExceeded && (!running_.empty() || !paused_.empty())) {
        // Not now: it waits (first in line) for running or paused requests to free their
        // blocks (paused ones do when their readers return, or at the idle timeout).
        std::lock_guard<std::mutex> lock(mutex_);
        waiting_.push_front(std::move(a));
        stats_.waiting = static_cast<int>(waiting_.size());
        return;
      }
      fail(*a, std::current_exception());
      continue;
    } catch (...) {
      fail(*a, std::current_exception());
      continue;
    }
    running_.push_back(std::move(a));
  }
}

void Scheduler::preempt_newest() {
  auto newest = std::max_element(running_.begin(), running_.end(),
                                 [](const auto& x, const auto& y) { return x->arrival < y->arrival; });
  std::unique_ptr<Active> a = std::move(*newest);
  running_.erase(newest);
  // Its blocks go back (full ones stay cached, so the recomputation is mostly prefix hits);
  // what it generated so far becomes part of what it recomputes.
  if (a->owns_sequence) {
    engine_.free_sequence_as(a->seq, this);
    a->seq = -1;
    a->owns_sequence = false;
  } else {
    engine_.truncate_sequence_as(a->seq, 0, this);
  }
  a->prompt = a->request.prompt;
  a->prompt.insert(a->prompt.end(), a->result.tokens.begin(), a->result.tokens.end());
  a->prefilled = 0;
  a->decoding = false;
  std::lock_guard<std::mutex> lock(mutex_);
  waiting_.push_front(std::move(a));
  stats_.waiting = static_cast<int>(waiting_.size());
  stats_.preemptions += 1;
  admission_paused_ = true;
}

bool Scheduler::step() {
  // Requests cancelled while waiting end here; running ones below.
  {
    std::vector<std::unique_ptr<Active>> cancelled;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->handle->cancelled_.load()) {
          cancelled.push_back(std::move(*it));
          it = waiting_.erase(it);
        } else {
          ++it;
        }
      }
      stats_.waiting = static_cast<int>(waiting_.size());
    }
    for (auto& a : cancelled) finish(*a, FinishReason::Cancelled);
  }
  for (auto& a : running_) {
    if (a->handle->cancelled_.load()) finish(*a, FinishReason::Cancelled);
  }
  std::erase_if(running_, [](const auto& a) { return a->done; });
  pause_and_resume();
  admit();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.running = static_cast<int>(running_.size());
  }
  if (running_.empty()) return false;

  // The step: every decoding sequence's next token, then prompt chunks, the prompt with the
  // fewest tokens left first (ties: first come), each taking what the budget still holds. A
  // prompt token counts more the further into its sequence it is (it attends to more keys),
  // so a step late in a long prefill takes about as long as one early in it.
  std::vector<Engine::Chunk> chunks;
  std::vector<Active*> owners;
  int64_t budget = options_.step_tokens;
  std::vector<Active*> prefilling;
  for (auto& a : running_) {
    if (!a->decoding) {
      prefilling.push_back(a.get());
      continue;
    }
    chunks.push_back({a->seq, std::span(&a->last_token, 1), Engine::Chunk::Logits::Last});
    owners.push_back(a.get());
    budget -= chunk_cost(a->cache_length, 1);
  }
  std::stable_sort(prefilling.begin(), prefilling.end(), [](const Active* x, const Active* y) {
    return x->prompt.size() - x->prefilled < y->prompt.size() - y->prefilled;
  });
  for (Active* a : prefilling) {
    if (budget <= 0) break;
    const size_t n = chunk_within(budget, a->cache_length, a->prompt.size() - a->prefilled);
    const bool completes = a->prefilled + n == a->prompt.size();
    chunks.push_back({a->seq, std::span(a->prompt).subspan(a->prefilled, n),
                      completes ? Engine::Chunk::Logits::Last : Engine::Chunk::Logits::None});
    owners.push_back(a);
    budget -= chunk_cost(a->cache_length, n);
  }
  if (chunks.empty()) return false;
  const int64_t vocab = engine_.config().vocab_size;
  // The masks of the constrained sequences that get logits this step are computed on a
  // worker while the forward pass runs: the step waits only for a mask slower than the pass,
  // and unconstrained sequences cost nothing.
  std::vector<Active*> constrained;
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i].logits != Engine::Chunk::Logits::None && owners[i]->request.constraint) {
      constrained.push_back(owners[i]);
    }
  }
  std::future<void> masks;
  if (!constrained.empty()) {
    masks = std::async(std::launch::async, [&constrained, words = mask_words(static_cast<size_t>(vocab))] {
      for (Active* a : constrained) a->compute_mask(words);
    });
  }
  std::vector<float> logits(static_cast<size_t>(Engine::logit_rows(chunks) * vocab));
  try {
    engine_.forward_as(chunks, logits, this);  // kept conversations give way inside
  } catch (const Error& e) {
    if (masks.valid()) masks.wait();  // it works on these requests
    if (e.kind() == ErrorKind::CapacityExceeded && running_.size() > 1) {
      preempt_newest();  // then try again with one sequence fewer
      return true;
    }
    for (Active* a : owners) fail(*a, std::current_exception());
    std::erase_if(running_, [](const auto& a) { return a->done; });
    return true;
  }
  if (masks.valid()) masks.wait();
  int64_t batch_tokens = 0;
  for (const auto& c : chunks) batch_tokens += static_cast<int64_t>(c.tokens.size());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.steps += 1;
    stats_.batch_tokens += batch_tokens;
  }

  size_t row = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    Active& a = *owners[i];
    a.cache_length += chunks[i].tokens.size();
    if (!a.decoding) a.prefilled += chunks[i].tokens.size();
    if (chunks[i].logits == Engine::Chunk::Logits::None) continue;
    std::span<float> row_logits(logits.data() + row * vocab, static_cast<size_t>(vocab));
    ++row;
    int32_t token;
    try {
      if (a.mask_error) std::rethrow_exception(a.mask_error);
      token = a.sampler->sample(row_logits, a.history,
                                a.request.constraint ? std::span<const uint32_t>(a.mask)
                                                     : std::span<const uint32_t>());
    } catch (...) {  // the constraint failed, or allows nothing: this request ends, not the step
      fail(a, std::current_exception());
      continue;
    }
    if (!a.decoding) {  // the prompt is in: this is its first token (or the first after a preemption)
      a.decoding = true;
      if (a.result.tokens.empty()) {
        a.first_token = Clock::now();
        a.result.prefill_seconds = seconds_between(a.admitted, a.first_token);
      }
    }
    const bool is_stop = a.stop_ids.count(token) > 0;
    a.result.tokens.push_back(token);
    // Only for requests that ask: row_logits now holds the logits after the penalties.
    std::shared_ptr<const TokenLogprobs> logprobs;
    if (a.request.logprobs >= 0) {
      logprobs = std::make_shared<const TokenLogprobs>(token_logprobs(row_logits, token, a.request.logprobs));
    }
    const bool go_on = a.emit(token, is_stop, std::move(logprobs), step_outbox_);
    if (const auto reason = a.finish_reason_after(token, go_on, engine_.max_context())) {
      finish(a, *reason);
    } else {
      a.last_token = token;
      a.history.push_back(token);
      if (a.request.constraint) a.unaccepted = token;
    }
  }
  std::erase_if(running_, [](const auto& a) { return a->done; });
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.running = static_cast<int>(running_.size());
  return true;
}

}  // namespace opencamp
