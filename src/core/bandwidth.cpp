#include "opencamp/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "opencamp/tensor.h"
#include "opencamp/thread_pool.h"

namespace opencamp {

double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int passes) {
  HostBuffer buffer(bytes);
  const size_t words = bytes / sizeof(uint64_t);
  auto* data = static_cast<uint64_t*>(buffer.data());
  pool.parallel_for(static_cast<int64_t>(words), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) data[i] = static_cast<uint64_t>(i);  // touch every page
  });
  std::vector<uint64_t> sinks(static_cast<size_t>(pool.size()) * 64);
  double best = 0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    pool.run(pool.size(), [&](int64_t index, int64_t count) {
      const size_t begin = words * static_cast<size_t>(index) / static_cast<size_t>(count);
      const size_t end = words * static_cast<size_t>(index + 1) / static_cast<size_t>(count);
      // Eight independent accumulators keep many loads in flight.
      uint64_t acc[8] = {};
      size_t i = begin;
      for (; i + 8 <= end; i += 8) {
        for (int j = 0; j < 8; ++j) acc[j] ^= data[i + j];
      }
      for (; i < end; ++i) acc[0] ^= data[i];
      uint64_t sum = 0;
      for (uint64_t a : acc) sum ^= a;
      sinks[static_cast<size_t>(index) * 64] = sum;  // one cache line apart
    });
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(bytes) / seconds / 1e9);
  }
  return best;
}

}  // namespace opencamp
