// A persistent pool of worker threads that share out the chunks of a job. The calling thread
// takes part, and chunks are claimed one at a time, so a worker the OS has descheduled (a busy
// machine) delays nothing: the others, the caller included, take its chunks. Idle workers spin
// briefly before they sleep, so back-to-back jobs (a model runs hundreds per token) start in
// well under a microsecond instead of paying a futex wake-up each.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace opencamp {

class ThreadPool {
 public:
  // n_threads counts the caller; 0 means default_threads().
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs chunk(index, n_chunks) for every index in [0, n_chunks), spread over the threads, and
  // returns when all are done. A chunk may run on any thread: chunks must not depend on which.
  // The first exception thrown by a chunk is rethrown here. One job at a time (callers
  // serialise, as the Engine does).
  void run(int64_t n_chunks, const std::function<void(int64_t index, int64_t n_chunks)>& chunk);

  // Splits [0, n) into a few contiguous ranges per thread: body(begin, end).
  void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& body);

  // Physical cores available to this process (hyper-threads share one core's FMA units and
  // memory bandwidth, so more threads than cores only adds contention).
  static int default_threads();

 private:
  void worker_loop();
  // Claims and runs chunks of job `generation` until none are left.
  void work_on(uint64_t generation);

  int n_threads_;
  std::vector<std::thread> workers_;
  // Each job gets a generation. ticket_ = generation << 32 | next unclaimed chunk; limit_ =
  // generation << 32 | chunk count. Claims only succeed for the live generation, so a worker
  // that wakes late can never touch a job that has already returned.
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint64_t> limit_{0};
  std::atomic<int64_t> done_{0};  // chunks of the live job finished
  std::atomic<int> sleepers_{0};  // workers blocked on work_ready_
  std::atomic<bool> stopping_{false};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::exception_ptr first_error_;  // guarded by mutex_
};

}  // namespace opencamp
