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

std::optional<TokenEvent> GenerationStream::next(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  timed_out_ = false;
  auto ready = [this] { return !queue_.empty() || done_; };
  if (timeout_seconds < 0) {
    ready_.wait(lock, ready);
  } else if (!ready_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), ready)) {
    timed_out_ = true;
    return std::nullopt;
  }
  if (!queue_.empty()) {
    TokenEvent event = queue_.front();
    queue_.pop_front();
    drained_.notify_one();
    return event;
  }
  if (error_) std::rethrow_exception(error_);
  return std::nullopt;
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
