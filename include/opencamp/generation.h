// A generation running on its own thread, handing tokens to a consumer through a queue. This
// is how bindings stream without holding Python's GIL, and how a server awaits tokens.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include "opencamp/engine.h"

namespace opencamp {

struct TokenEvent {
  int32_t token;
  bool is_stop;  // the token that ended generation (EOS / stop id); not part of the text
};

// The consumer's side of a token queue (GenerationStream, ScheduledRequest): waits, under
// `lock`, until `queue` has a token or `done` is set, at most timeout_seconds (< 0: no limit).
// Returns the token popped, or nullopt when finished and drained, or on timeout with
// timed_out set; the caller then reports its error, if any.
std::optional<TokenEvent> pop_token(std::unique_lock<std::mutex>& lock,
                                    std::condition_variable& ready, std::deque<TokenEvent>& queue,
                                    const bool& done, double timeout_seconds, bool& timed_out);

class GenerationStream {
 public:
  // Starts generating on a new thread right away; a request Engine::check_request refuses
  // throws here instead. `engine` must outlive this object. At most `max_queued` tokens wait
  // for the consumer: a consumer that stalls pauses the generation instead of letting it run
  // arbitrarily far ahead.
  GenerationStream(Engine& engine, int seq, GenerationRequest request, size_t max_queued = 1024);
  ~GenerationStream();  // cancels and joins
  GenerationStream(const GenerationStream&) = delete;
  GenerationStream& operator=(const GenerationStream&) = delete;

  // Blocks until the next token or the end: nullopt once finished and drained. Rethrows an
  // error raised by the generation thread. timeout_seconds < 0 waits without limit; on timeout
  // it throws nothing and returns nullopt with timed_out() true.
  std::optional<TokenEvent> next(double timeout_seconds = -1.0);
  bool timed_out() const { return timed_out_; }

  // Asks the generation to stop after the current step.
  void cancel();
  // Waits for the thread; the result is valid afterwards (rethrows the thread's error).
  const GenerationResult& wait();
  bool finished() const;

 private:
  void run(Engine& engine, int seq, GenerationRequest request);

  std::thread thread_;
  std::atomic<bool> cancel_{false};
  mutable std::mutex mutex_;
  std::condition_variable ready_;     // a token arrived or the generation ended
  std::condition_variable drained_;   // the consumer took a token (room in the queue)
  size_t max_queued_;
  std::deque<TokenEvent> queue_;
  bool done_ = false;
  bool timed_out_ = false;
  std::exception_ptr error_;
  GenerationResult result_;
};

}  // namespace opencamp
