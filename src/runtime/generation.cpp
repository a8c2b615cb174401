#include "opencamp/generation.h"

#include <chrono>

namespace opencamp {

GenerationStream::GenerationStream(Engine& engine, int seq, GenerationRequest request,
                                   size_t max_queued)
    : max_queued_(max_queued > 0 ? max_queued : 1) {
  engine.check_request(request);  // bad requests fail here, in the caller, not on the thread
  thread_ = std::thread([this, &engine, seq, request = std::move(request)]() mutable {
    run(engine, seq, std::move(request));
  });
}

void GenerationStream::cancel() {
  cancel_.store(true);
  std::lock_guard<std::mutex> lock(mutex_);  // wakes a generation paused on a full queue
  drained_.notify_all();
}

GenerationStream::~GenerationStream() {
  cancel();
  if (thread_.joinable()) thread_.join();
}

void GenerationStream::run(Engine& engine, int seq, GenerationRequest request) {
  GenerationResult result;
  std::exception_ptr error;
  try {
    result = engine.generate(
        seq, request,
        [this](int32_t token, bool is_stop) {
          {
            std::unique_lock<std::mutex> lock(mutex_);
            drained_.wait(lock, [this] { return queue_.size() < max_queued_ || cancel_.load(); });
            queue_.push_back({token, is_stop});
          }
          ready_.notify_all();
          return !cancel_.load();
        },
        &cancel_);
  } catch (...) {
    error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    result_ = std::move(result);
    error_ = error;
    done_ = true;
  }
  ready_.notify_all();
}

std::optional<TokenEvent> pop_token(std::unique_lock<std::mutex>& lock,
                                    std::condition_variable& ready, std::deque<TokenEvent>& queue,
                                    const bool& done, double timeout_seconds, bool& timed_out) {
  timed_out = false;
  auto has_news = [&] { return !queue.empty() || done; };
  if (timeout_seconds < 0) {
    ready.wait(lock, has_news);
  } else if (!ready.wait_for(lock, std::chrono::duration<double>(timeout_seconds), has_news)) {
    timed_out = true;
    return std::nullopt;
  }
  if (queue.empty()) return std::nullopt;
  const TokenEvent event = queue.front();
  queue.pop_front();
  return event;
}

std::optional<TokenEvent> GenerationStream::next(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  const auto event = pop_token(lock, ready_, queue_, done_, timeout_seconds, timed_out_);
  if (event) {
    drained_.notify_one();  // room in the queue for a paused generation
  } else if (!timed_out_ && error_) {
    std::rethrow_exception(error_);
  }
  return event;
}

const GenerationResult& GenerationStream::wait() {
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_) std::rethrow_exception(error_);
  return result_;
}

bool GenerationStream::finished() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

}  // namespace opencamp
