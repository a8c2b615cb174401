// The thread pool: every chunk runs exactly once on some thread, errors come back to the
// caller, and the pool keeps working across thousands of jobs, sleeps and wake-ups.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "opencamp/thread_pool.h"

using opencamp::ThreadPool;

TEST_CASE(every_chunk_runs_exactly_once) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    CHECK_EQ(pool.size(), threads);
    for (int64_t n : {1, 2, 3, 7, 64, 1000}) {
      std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
      std::atomic<int64_t> wrong_count{0};
      pool.run(n, [&](int64_t index, int64_t count) {
        if (count != n) wrong_count.fetch_add(1);
        runs[static_cast<size_t>(index)].fetch_add(1);
      });
      CHECK_EQ(wrong_count.load(), 0);
      int bad = 0;
      for (auto& r : runs) bad += r.load() != 1;
      CHECK_MSG(bad == 0, bad << " of " << n << " chunks did not run exactly once on " << threads << " threads");
    }
  }
}

TEST_CASE(parallel_for_covers_the_range_once) {
  ThreadPool pool(3);
  for (int64_t n : {1, 5, 11, 12, 13, 997}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    pool.parallel_for(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
    });
    int bad = 0;
    for (auto& s : seen) bad += s.load() != 1;
    CHECK_EQ(bad, 0);
  }
  pool.parallel_for(0, [&](int64_t, int64_t) { CHECK(false); });  // nothing to do: no call
}

TEST_CASE(work_really_spreads_over_threads) {
  ThreadPool pool(2);
  // Chunks that wait for each other can only finish if two threads run them at once.
  std::atomic<int> arrived{0};
  std::atomic<bool> both{false};
  pool.run(2, [&](int64_t, int64_t) {
    arrived.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (arrived.load() < 2 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    if (arrived.load() == 2) both.store(true);
  });
  CHECK(both.load());
}

TEST_CASE(an_exception_in_a_chunk_reaches_the_caller_and_the_pool_survives) {
  ThreadPool pool(3);
  for (int round = 0; round < 20; ++round) {
    std::atomic<int> ran{0};
    bool caught = false;
    try {
      pool.run(30, [&](int64_t index, int64_t) {
        ran.fetch_add(1);
        if (index == 17) throw std::runtime_error("chunk 17 failed");
      });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "chunk 17 failed";
    }
    CHECK(caught);
    CHECK_EQ(ran.load(), 30);  // the other chunks still ran
  }
  std::atomic<int> after{0};
  pool.run(10, [&](int64_t, int64_t) { after.fetch_add(1); });
  CHECK_EQ(after.load(), 10);
}

TEST_CASE(thousands_of_jobs_with_sleeps_between_them) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  for (int job = 0; job < 20000; ++job) {
    if (job % 5000 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // workers sleep
    pool.run(4, [&](int64_t index, int64_t) { total.fetch_add(index + 1); });
  }
  CHECK_EQ(total.load(), int64_t{20000} * 10);
}

TEST_CASE(default_threads_is_positive) { CHECK(ThreadPool::default_threads() >= 1); }

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
