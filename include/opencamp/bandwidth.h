// How fast this machine reads memory: the physical limit of decoding (every weight is read
// once per token), measured rather than assumed.
#pragma once

#include <cstddef>

namespace opencamp {

class ThreadPool;

// Best of `passes` read-only passes over a buffer of `bytes` (make it larger than the caches),
// split over the pool's threads. GB/s (1e9 bytes per second).
double measure_read_bandwidth(ThreadPool& pool, size_t bytes = size_t{1} << 30, int passes = 3);

}  // namespace opencamp
