#include "opencamp/thread_pool.h"

#include <algorithm>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#include "opencamp/error.h"

#ifdef __linux__
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace opencamp {
namespace {

// About 50-100 us of spinning before a worker sleeps: longer than the gap between the ops of
// one forward pass, far shorter than the gap between user requests.
constexpr int kSpinsBeforeSleep = 1 << 14;
constexpr int64_t kMaxChunks = int64_t{1} << 31;
// Chunks per thread in parallel_for: enough that a stalled thread's share is soon taken over,
// few enough that each chunk is a long contiguous run.
constexpr int64_t kChunksPerThread = 4;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads > 0 ? n_threads : default_threads()) {
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_.store(true);
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run(int64_t n_chunks, const std::function<void(int64_t, int64_t)>& chunk) {
  if (n_chunks <= 0) return;
  if (n_chunks >= kMaxChunks) fail(ErrorKind::Internal, "thread pool job of ", n_chunks, " chunks");
  if (n_threads_ == 1 || n_chunks == 1) {
    for (int64_t i = 0; i < n_chunks; ++i) chunk(i, n_chunks);
    return;
  }
  const uint64_t generation = generation_.load(std::memory_order_relaxed) + 1;
  job_ = &chunk;
  done_.store(0, std::memory_order_relaxed);
  limit_.store(generation << 32 | static_cast<uint64_t>(n_chunks), std::memory_order_relaxed);
  ticket_.store(generation << 32, std::memory_order_relaxed);
  generation_.store(generation, std::memory_order_seq_cst);  // publishes the fields above
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lock(mutex_);  // orders against a worker about to sleep
    work_ready_.notify_all();
  }
  work_on(generation);
  for (int spins = 0; done_.load(std::memory_order_acquire) != n_chunks; ++spins) {
    if (spins < kSpinsBeforeSleep) cpu_relax();
    else std::this_thread::yield();  // a worker holding a chunk was descheduled
  }
  job_ = nullptr;
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error = std::exchange(first_error_, nullptr);
  }
  if (error) std::rethrow_exception(error);
}

void ThreadPool::work_on(uint64_t generation) {
  for (;;) {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    if (ticket >> 32 != generation) return;
    if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
    const int64_t index = static_cast<int64_t>(ticket & 0xffffffffu);
    // The claim succeeded while the job was live; its chunk count can be read safely as long
    // as it still belongs to this generation (a claim past the end can outlive the job).
    const uint64_t limit = limit_.load(std::memory_order_acquire);
    if (limit >> 32 != generation) return;
    const int64_t n_chunks = static_cast<int64_t>(limit & 0xffffffffu);
    if (index >= n_chunks) return;
    try {
      (*job_)(index, n_chunks);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_error_) first_error_ = std::current_exception();
    }
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  const int64_t chunks = std::min<int64_t>(n, n_threads_ == 1 ? 1 : n_threads_ * kChunksPerThread);
  run(chunks, [&](int64_t index, int64_t count) {
    const int64_t begin = n * index / count, end = n * (index + 1) / count;
    if (begin < end) body(begin, end);
  });
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    uint64_t current = generation_.load(std::memory_order_acquire);
    for (int spins = 0; current == seen && spins < kSpinsBeforeSleep; ++spins) {
      cpu_relax();
      current = generation_.load(std::memory_order_acquire);
    }
    if (current == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      work_ready_.wait(lock, [&] {
        return stopping_.load() || generation_.load(std::memory_order_seq_cst) != seen;
      });
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
      current = generation_.load(std::memory_order_acquire);
    }
    if (stopping_.load()) return;
    seen = current;
    work_on(current);
  }
}

int ThreadPool::default_threads() {
  int logical = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
    std::set<std::pair<std::string, std::string>> cores;  // (package, core) of allowed cpus
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &allowed)) continue;
      const std::string topology = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream package_file(topology + "physical_package_id"), core_file(topology + "core_id");
      std::string package, core;
      if (!(package_file >> package) || !(core_file >> core)) {
        package = "cpu";
        core = std::to_string(cpu);
      }
      cores.emplace(package, core);
    }
    if (!cores.empty()) return static_cast<int>(cores.size());
  }
#endif
  return std::max(1, logical);
}

}  // namespace opencamp
