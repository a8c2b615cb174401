// Continuous batching: one loop on its own thread runs every request the engine serves. Each
// step is one forward pass holding the next token of every running sequence (so each weight is
// read once for all of them) plus chunks of new prompts up to a per-step token budget (so a
// long prompt never stalls the running streams for more than a step). Requests are admitted
// first come, first served while sequences and KV blocks allow; when the KV cache runs out
// mid-flight the newest running request is preempted and recomputed later. Cancellation takes
// effect at the next step and frees the request's cache.
//
// Fairness, decided here and nowhere else:
// - A step's token budget (step_tokens) goes first to one token for every decoding sequence,
//   then to prompts, the one with the fewest prompt tokens left first. A short prompt that
//   arrives during a long prefill gets its first token after at most one more step (one chunk
//   of the long prompt); the long prompt keeps whatever budget the others leave.
// - A token at position p counts 1 + p / S of the budget (rounded down per chunk), S being where a token's attention
//   costs as much as its matrix products (from the model's shape; 3072 for SmolLM2-135M): a
//   chunk deep into a long prompt is smaller, so every step, and so that one-step wait, takes
//   about as long late in a long prefill as early in it.
// - A stream whose reader has max_unread_tokens tokens unread is paused: its sequence leaves
//   the batch (keeping its KV cache) and frees its running slot for someone else. It resumes
//   when the reader takes a token, and is ended (Error(Timeout), blocks freed) when the reader
//   reads nothing for stream_idle_timeout_seconds while it is paused.
// The sequences the scheduler holds are its own: the Engine refuses outside calls on them.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "opencamp/engine.h"

namespace opencamp {

struct TokenEvent {
  int32_t token;
  bool is_stop;  // the token that ended generation (EOS / stop id); not part of the text
  // Only when the request asked (GenerationRequest::logprobs >= 0), else null: the token's
  // log-probability and the most likely alternatives, from the logits it was sampled from.
  std::shared_ptr<const TokenLogprobs> logprobs;
};

struct SchedulerOptions {
  int max_running = 16;        // sequences decoding together
  // Tokens per forward pass (a prompt token deep into its sequence counting more, see above):
  // decode tokens first, then prompt chunks. It bounds how long a step takes, so how long a
  // new prompt waits for its first token and a stream for its next: 64 keeps both under a
  // second for SmolLM2-135M on 2 busy cores while an 8k prompt prefills, for ~13% of that
  // prefill's speed against 256 (bench/test_prefill_fairness.py).
  int step_tokens = 64;
  size_t max_waiting = 4096;   // queued requests beyond this are refused (QueueFull)
  // A request whose reader has this many tokens unread is paused (out of the batch, off its
  // running slot, its cache kept) until the reader takes one: a stalled client costs no compute
  // and holds no slot.
  size_t max_unread_tokens = 256;
  // A paused request whose reader has read nothing for this long is ended with Error(Timeout)
  // and its blocks freed; 0: never (a library caller may hold a stream as long as it likes).
  double stream_idle_timeout_seconds = 0.0;
  // Finished conversations whose sequences stay alive (least recently used first out): a new
  // request that continues one takes it over and reuses every token it holds, not only whole
  // cached blocks. They give their blocks back as soon as anything else needs them.
  size_t max_idle_sequences = 32;
};

class Scheduler;

// The caller's side of one request: tokens as they come, cancellation, the final result.
class ScheduledRequest {
 public:
  // Blocks until the next token or the end: nullopt once finished and drained (then, or on an
  // error, wait() tells why). timeout_seconds < 0 waits without limit; on timeout returns
  // nullopt with timed_out() true.
  std::optional<TokenEvent> next(double timeout_seconds = -1.0);
  bool timed_out() const { return timed_out_; }
  // Blocks until the first token was sampled (the prompt is in the KV cache, its full blocks
  // shared with later prompts that start the same way) or the request ended; false on timeout.
  bool wait_first_token(double timeout_seconds = -1.0);
  // Stops the request at the next step; its sequence's blocks are freed (or stay cached).
  void cancel();
  // Waits for the end (the request no longer waits for its tokens to be read); rethrows the
  // error that ended the request, if any.
  const GenerationResult& wait();
  bool finished() const;
  double queue_seconds() const;  // waiting before admission (for time to first token)

 private:
  friend class Scheduler;
  Scheduler* scheduler_ = nullptr;
  std::atomic<bool> cancelled_{false};
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<TokenEvent> queue_;
  bool done_ = false;
  bool timed_out_ = false;
  bool waiting_for_end_ = false;  // wait() was called: unread tokens do not pause the request
  bool sampled_first_ = false;    // a token was sampled (wait_first_token)
  std::exception_ptr error_;
  GenerationResult result_;
  double queue_seconds_ = 0.0;
  std::chrono::steady_clock::time_point last_read_ = std::chrono::steady_clock::now();
};

class Scheduler {
 public:
  Scheduler(Engine& engine, const SchedulerOptions& options = {});
  ~Scheduler();  // cancels what is left and stops the loop
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Ends every request (cancelled), stops the loop and frees the idle sequences; later
  // submits are refused. The destructor does this too.
  void shutdown();

  // Queues a request (checked first: a bad request throws here). With `seq` >= 0 the request
  // continues that sequence (a chat session: it keeps what the sequence already holds), which
  // the caller owns and which stays alive afterwards; otherwise the scheduler makes a sequence
  // (mapping any cached prefix) and frees it at the end, its full blocks staying cached.
  // `on_token`, when given, runs on the loop thread with every token as it is sampled (before
  // the request's queue has it); returning false ends the request there (Cancelled).
  std::shared_ptr<ScheduledRequest> submit(GenerationRequest request, int seq = -1,
                                           TokenCallback on_token = {});

  struct Stats {
    int running = 0, waiting = 0, idle = 0;
    int paused = 0;                // streams waiting for their readers, off the batch
    int64_t steps = 0, preemptions = 0;
    int64_t pauses = 0, stream_timeouts = 0;  // streams paused / ended for an idle reader
    int64_t prompt_tokens = 0, cached_tokens = 0, generated_tokens = 0;
    int64_t batch_tokens = 0;  // tokens through the engine, for the mean batch size
  };
  Stats stats() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  struct Active;  // a request the loop is working on
  void loop();
  bool step();    // one forward pass; false when there was nothing to do
  void admit();
  void finish(Active& a, FinishReason reason);
  void fail(Active& a, std::exception_ptr error);
  void preempt_newest();
  // Moves running requests whose readers are behind to paused_, resumes those whose readers
  // caught up (before anyone waiting is admitted), ends those idle for too long.
  void pause_and_resume();
  // When the loop must look at paused_ again for the idle timeout (max() when never).
  std::chrono::steady_clock::time_point next_idle_deadline() const;
  void wake();
  // Prompt tokens from position `start` (at most `left`, at least 1) that fit in `budget`, and
  // what `n` of them cost: a token at position p counts 1 + p / attention_span_.
  size_t chunk_within(int64_t budget, size_t start, size_t left) const;
  int64_t chunk_cost(size_t start, size_t n) const;

  Engine& engine_;
  SchedulerOptions options_;
  // The position at which a token's attention costs as much as its matrix products (from the
  // model's shape): what weights a prompt token's share of a step's budget.
  double attention_span_ = 1.0;
  mutable std::mutex mutex_;  // waiting_, stats_, stopping_
  std::condition_variable work_;
  std::deque<std::unique_ptr<Active>> waiting_;
  std::vector<std::unique_ptr<Active>> running_;  // the loop thread's alone
  std::vector<std::unique_ptr<Active>> paused_;   // the loop thread's alone
  // Finished conversations are kept by the Engine (keep_sequence), which frees them least
  // recently kept first whenever anyone needs their blocks.
  Stats stats_;
  bool stopping_ = false;
  bool woken_ = false;  // something changed since the loop last found nothing to do
  // After a preemption nothing new is admitted until a request ends: otherwise a re-admitted
  // request could be preempted again and again without anyone making progress.
  bool admission_paused_ = false;
  uint64_t next_arrival_ = 0;
  std::thread thread_;
  friend class ScheduledRequest;
};

}  // namespace opencamp
