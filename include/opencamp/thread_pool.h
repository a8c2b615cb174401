// A persistent pool of worker threads. The calling thread takes part in every job, so a pool
// of size 1 runs everything inline with no synchronisation at all. Idle workers spin briefly
// before they sleep, so back-to-back jobs (a model runs hundreds per token) start in well under
// a microsecond instead of paying a futex wake-up each.
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

  // Runs job(thread_index, n_threads) once on every thread and waits for all of them. The first
  // exception thrown by any thread is rethrown here after all threads finished. Not reentrant:
  // one job at a time (callers serialise, as the Engine does).
  void run(const std::function<void(int thread_index, int n_threads)>& job);

  // Splits [0, n) into one contiguous range per thread: body(begin, end).
  void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& body);

  // Physical cores available to this process (hyper-threads share one core's FMA units and
  // memory bandwidth, so more threads than cores only adds contention).
  static int default_threads();

 private:
  void worker_loop(int thread_index);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};  // bumped for every job so workers notice new work
  std::atomic<int> pending_{0};          // workers still running the current job
  std::atomic<int> sleepers_{0};         // workers blocked on work_ready_
  std::atomic<bool> stopping_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::vector<std::exception_ptr> errors_;  // one slot per thread
};

}  // namespace opencamp
