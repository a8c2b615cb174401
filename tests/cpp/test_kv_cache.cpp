// The paged KV cache's bookkeeping: blocks handed out and returned as sequences grow, shrink and
// end; capacity errors that change nothing; ids reused; block tables never overlapping.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "check.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;

namespace {

constexpr int kBlockSize = 4;
constexpr int kBlocks = 10;

std::unique_ptr<Backend> cpu() { return create_backend("cpu", {}); }

KVCacheShape small_shape() {
  KVCacheShape shape;
  shape.n_layers = 2;
  shape.n_kv_heads = 2;
  shape.head_dim = 6;
  shape.block_size = kBlockSize;
  shape.n_blocks = kBlocks;
  return shape;
}

int blocks_for(int length) { return (length + kBlockSize - 1) / kBlockSize; }

// Every live sequence's block table has ceil(len / bs) distinct blocks, no block is in two
// tables, and used_blocks is the total.
void check_invariants(const KVCache& cache, const std::map<int, int>& lengths) {
  std::set<int32_t> seen;
  int total = 0;
  for (const auto& [seq, length] : lengths) {
    CHECK(cache.has_sequence(seq));
    CHECK_EQ(cache.length(seq), length);
    const auto& table = cache.block_table(seq);
    CHECK_EQ(static_cast<int>(table.size()), blocks_for(length));
    for (int32_t block : table) {
      CHECK_MSG(block >= 0 && block < kBlocks, "block " << block << " outside the pool");
      CHECK_MSG(seen.insert(block).second, "block " << block << " is in two block tables");
    }
    total += blocks_for(length);
  }
  CHECK_EQ(cache.used_blocks(), total);
  CHECK_EQ(cache.free_blocks(), kBlocks - total);
  CHECK_EQ(cache.sequence_count(), static_cast<int>(lengths.size()));
}

}  // namespace

TEST_CASE(shape_and_layer_views) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  CHECK_EQ(cache.free_blocks(), kBlocks);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK_EQ(cache.capacity_tokens(), kBlocks * kBlockSize);
  CHECK_EQ(cache.bytes(), size_t(2) * 2 * kBlocks * kBlockSize * 2 * 6 * sizeof(float));
  const KVLayerView l0 = cache.layer(0), l1 = cache.layer(1);
  CHECK_EQ(l0.keys.ndim, 4);
  CHECK_EQ(l0.keys.shape[0], kBlocks);
  CHECK_EQ(l0.keys.shape[1], kBlockSize);
  CHECK_EQ(l0.keys.shape[2], 2);
  CHECK_EQ(l0.keys.shape[3], 6);
  CHECK(l0.keys.is_contiguous() && l0.values.is_contiguous());
  // Four distinct, non-overlapping regions (keys/values of two layers).
  std::set<void*> regions = {l0.keys.data, l0.values.data, l1.keys.data, l1.values.data};
  CHECK_EQ(regions.size(), size_t(4));
  KVCacheShape bad = small_shape();
  bad.n_blocks = 0;
  CHECK_THROWS_WITH(KVCache(*backend, bad), ErrorKind::InvalidArgument, "positive");
}

TEST_CASE(grow_allocates_ceil_len_over_block_size) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const int seq = cache.create_sequence();
  CHECK_EQ(cache.length(seq), 0);
  CHECK(cache.block_table(seq).empty());
  int length = 0;
  for (int step : {1, 2, 1, 1, 3, 4, 0, 5}) {
    cache.grow(seq, step);
    length += step;
    CHECK_EQ(cache.length(seq), length);
    CHECK_EQ(static_cast<int>(cache.block_table(seq).size()), blocks_for(length));
    CHECK_EQ(cache.used_blocks(), blocks_for(length));
  }
  CHECK_THROWS_WITH(cache.grow(seq, -1), ErrorKind::InvalidArgument, "-1");
  CHECK_EQ(cache.length(seq), length);
}

TEST_CASE(truncate_and_free_return_blocks) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const int seq = cache.create_sequence();
  cache.grow(seq, 13);  // 4 blocks
  CHECK_EQ(cache.used_blocks(), 4);
  const std::vector<int32_t> before = cache.block_table(seq);
  cache.truncate(seq, 9);  // 3 blocks: the last one returned
  CHECK_EQ(cache.length(seq), 9);
  CHECK_EQ(cache.used_blocks(), 3);
  CHECK(std::vector<int32_t>(before.begin(), before.begin() + 3) == cache.block_table(seq));
  cache.truncate(seq, 8);  // exactly 2 blocks
  CHECK_EQ(cache.used_blocks(), 2);
  cache.truncate(seq, 8);  // no-op
  CHECK_EQ(cache.used_blocks(), 2);
  CHECK_THROWS_WITH(cache.truncate(seq, 9), ErrorKind::InvalidArgument, "truncate");
  CHECK_THROWS_WITH(cache.truncate(seq, -1), ErrorKind::InvalidArgument, "truncate");
  CHECK_EQ(cache.length(seq), 8);
  cache.truncate(seq, 0);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK(cache.has_sequence(seq));  // truncating to 0 keeps the sequence
  cache.grow(seq, 10);
  cache.free_sequence(seq);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK_EQ(cache.free_blocks(), kBlocks);
  CHECK(!cache.has_sequence(seq));
  CHECK_EQ(cache.sequence_count(), 0);
}

TEST_CASE(sequence_ids_are_reused_and_invalid_ids_rejected) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const int a = cache.create_sequence(), b = cache.create_sequence(), c = cache.create_sequence();
  CHECK(a != b && b != c && a != c);
  CHECK_EQ(cache.sequence_count(), 3);
  cache.grow(b, 5);
  cache.free_sequence(b);
  CHECK(!cache.has_sequence(b));
  CHECK_EQ(cache.sequence_count(), 2);
  const int d = cache.create_sequence();
  CHECK_EQ(d, b);                 // the freed id comes back
  CHECK_EQ(cache.length(d), 0);   // empty, not the old sequence's state
  CHECK(cache.block_table(d).empty());

  cache.free_sequence(a);
  for (int bad : {a, -1, 1000}) {
    CHECK_THROWS_WITH(cache.length(bad), ErrorKind::InvalidArgument, "sequence", std::to_string(bad));
    CHECK_THROWS_WITH(cache.grow(bad, 1), ErrorKind::InvalidArgument, std::to_string(bad));
    CHECK_THROWS_WITH(cache.truncate(bad, 0), ErrorKind::InvalidArgument, std::to_string(bad));
    CHECK_THROWS_WITH(cache.block_table(bad), ErrorKind::InvalidArgument, std::to_string(bad));
    CHECK_THROWS_WITH(cache.free_sequence(bad), ErrorKind::InvalidArgument, std::to_string(bad));
    CHECK(!cache.has_sequence(bad));
  }
  CHECK_EQ(cache.sequence_count(), 2);
}

TEST_CASE(grow_beyond_capacity_throws_and_changes_nothing) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const int a = cache.create_sequence(), b = cache.create_sequence();
  cache.grow(a, 21);  // 6 blocks
  cache.grow(b, 10);  // 3 blocks; 1 free
  const auto table_a = cache.block_table(a), table_b = cache.block_table(b);
  CHECK_EQ(cache.free_blocks(), 1);
  // b has 2 spare positions in its last block, plus 1 free block = 6 more positions at most.
  CHECK_THROWS_WITH(cache.grow(b, 7), ErrorKind::CapacityExceeded, "KV cache");
  CHECK_EQ(cache.length(b), 10);
  CHECK(cache.block_table(b) == table_b);
  CHECK_EQ(cache.free_blocks(), 1);
  CHECK_THROWS_WITH(cache.grow(a, 1000), ErrorKind::CapacityExceeded, "free");
  CHECK_EQ(cache.length(a), 21);
  CHECK(cache.block_table(a) == table_a);
  CHECK_EQ(cache.free_blocks(), 1);
  // Exactly filling the pool works.
  cache.grow(b, 6);
  CHECK_EQ(cache.free_blocks(), 0);
  CHECK_EQ(cache.length(b), 16);
  const int c = cache.create_sequence();
  CHECK_THROWS_WITH(cache.grow(c, 1), ErrorKind::CapacityExceeded, "KV cache");
  CHECK_EQ(cache.length(c), 0);
  CHECK(cache.block_table(c).empty());
  cache.grow(a, 3);  // fits within a's last block (21 -> 24)
  CHECK_EQ(cache.length(a), 24);
  check_invariants(cache, {{a, 24}, {b, 16}, {c, 0}});
}

TEST_CASE(live_block_tables_never_share_a_block) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const int a = cache.create_sequence(), b = cache.create_sequence(), c = cache.create_sequence();
  // Interleaved growth so blocks alternate between sequences.
  std::map<int, int> lengths = {{a, 0}, {b, 0}, {c, 0}};
  for (int round = 0; round < 3; ++round) {
    for (int seq : {a, b, c}) {
      cache.grow(seq, 4);
      lengths[seq] += 4;
    }
  }
  check_invariants(cache, lengths);
  cache.free_sequence(b);  // its blocks go to whoever grows next
  lengths.erase(b);
  cache.grow(a, 8);
  lengths[a] += 8;
  check_invariants(cache, lengths);
}

TEST_CASE(random_stress_keeps_the_books_balanced) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  std::mt19937 rng(2024);
  std::map<int, int> lengths;
  int capacity_errors = 0;
  for (int step = 0; step < 5000; ++step) {
    const int action = static_cast<int>(rng() % 10);
    if (lengths.size() < 2 || (action == 0 && lengths.size() < 6)) {
      const int seq = cache.create_sequence();
      CHECK(!lengths.count(seq));
      lengths[seq] = 0;
      continue;
    }
    auto it = lengths.begin();
    std::advance(it, static_cast<long>(rng() % lengths.size()));
    const int seq = it->first;
    if (action <= 5) {
      const int n = static_cast<int>(rng() % 9);
      const int free_before = cache.free_blocks();
      const auto table_before = cache.block_table(seq);
      const int needed = blocks_for(it->second + n) - blocks_for(it->second);
      if (needed > free_before) {
        ++capacity_errors;
        CHECK_THROWS_WITH(cache.grow(seq, n), ErrorKind::CapacityExceeded, "KV cache");
        CHECK_EQ(cache.free_blocks(), free_before);
        CHECK(cache.block_table(seq) == table_before);
      } else {
        cache.grow(seq, n);
        it->second += n;
      }
    } else if (action <= 8) {
      const int new_length = it->second == 0 ? 0 : static_cast<int>(rng() % (it->second + 1));
      cache.truncate(seq, new_length);
      it->second = new_length;
    } else {
      cache.free_sequence(seq);
      lengths.erase(it);
      CHECK(!cache.has_sequence(seq));
    }
    if (step % 50 == 0) check_invariants(cache, lengths);
  }
  check_invariants(cache, lengths);
  CHECK(capacity_errors > 10);  // the pool really ran full during the stress
  for (const auto& [seq, length] : lengths) cache.free_sequence(seq);
  CHECK_EQ(cache.free_blocks(), kBlocks);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK_EQ(cache.sequence_count(), 0);
}

// ---- prefix caching ------------------------------------------------------------------------

namespace {

std::vector<int32_t> tokens_from(int first, int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(first + i);
  return t;
}

// A sequence that holds `tokens` with their keys "written" and published.
int filled(KVCache& cache, const std::vector<int32_t>& tokens) {
  const int seq = cache.create_sequence();
  cache.append(seq, tokens);
  cache.publish(seq);
  return seq;
}

}  // namespace

TEST_CASE(published_blocks_outlive_their_sequence_and_are_mapped_again) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const auto prompt = tokens_from(100, 10);  // 2 full blocks of 4 + 2 tokens
  const int a = filled(cache, prompt);
  const std::vector<int32_t> a_blocks = cache.block_table(a);
  cache.free_sequence(a);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK_EQ(cache.cached_blocks(), 2);  // the full ones; the partial block is simply free
  CHECK_EQ(cache.free_blocks(), kBlocks);  // cached blocks can still be had

  const int b = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(b, prompt), 8);
  CHECK(cache.block_table(b) == std::vector<int32_t>(a_blocks.begin(), a_blocks.begin() + 2));
  CHECK(cache.tokens(b) == std::vector<int32_t>(prompt.begin(), prompt.begin() + 8));
  CHECK_EQ(cache.cached_blocks(), 0);  // in use again
  CHECK_EQ(cache.prefix_stats().hit_blocks, 2);
  CHECK_EQ(cache.prefix_stats().miss_blocks, 0);
}

TEST_CASE(mapping_stops_at_the_first_different_block_and_leaves_one_token) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  cache.free_sequence(filled(cache, tokens_from(0, 12)));  // 3 full blocks cached
  auto diverging = tokens_from(0, 12);
  diverging[5] = 999;  // second block differs
  const int b = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(b, diverging), 4);
  CHECK_EQ(cache.prefix_stats().miss_blocks, 1);  // (12 - 1) / 4 = 2 lookups, 1 hit
  // The same 12 tokens again: only 2 of the 3 cached blocks, one token must be computed.
  const int c = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(c, tokens_from(0, 12)), 8);
  // A block's hash covers everything before it: the same block after another prefix misses.
  auto shifted = tokens_from(0, 12);
  shifted[0] = 777;
  const int d = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(d, shifted), 0);
}

TEST_CASE(truncating_into_a_shared_block_rounds_down_and_an_owned_one_is_unpublished) {
  auto backend = cpu();
  KVCache cache(*backend, small_shape());
  const auto prompt = tokens_from(50, 9);
  const int a = filled(cache, prompt);  // 2 full blocks published + 1 partial
  const int b = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(b, prompt), 8);  // shares a's 2 full blocks
  // b cannot rewrite the tail of a block a also uses: it keeps only the blocks before it.
  CHECK_EQ(cache.truncate(b, 6), 4);
  CHECK_EQ(cache.length(b), 4);
  CHECK_EQ(cache.length(a), 9);  // untouched
  cache.free_sequence(b);
  // a owns its blocks alone now: truncating into one makes it unfit for the cache.
  CHECK_EQ(cache.truncate(a, 6), 6);
  cache.append(a, std::vector<int32_t>{1, 2});  // rewrites positions 6 and 7
  cache.publish(a);
  const int c = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(c, prompt), 4);  // the second block no longer matches
  const auto rewritten = cache.tokens(a);
  const int d = cache.create_sequence();
  auto longer = rewritten;
  longer.push_back(3);
  CHECK_EQ(cache.map_cached_prefix(d, longer), 8);  // but a's new content does
}

TEST_CASE(unused_cached_blocks_are_evicted_least_recently_used) {
  auto backend = cpu();
  KVCacheShape shape = small_shape();
  shape.n_blocks = 4;
  KVCache cache(*backend, shape);
  cache.free_sequence(filled(cache, tokens_from(0, 8)));    // blocks A0 A1, released first
  cache.free_sequence(filled(cache, tokens_from(100, 8)));  // blocks B0 B1
  CHECK_EQ(cache.cached_blocks(), 4);
  CHECK_EQ(cache.used_blocks(), 0);
  const int c = cache.create_sequence();
  cache.append(c, tokens_from(500, 12));  // 3 blocks: evicts A0, A1, B0
  CHECK_EQ(cache.prefix_stats().evictions, 3);
  CHECK_EQ(cache.cached_blocks(), 1);
  auto a_again = tokens_from(0, 8);
  a_again.push_back(1);
  const int d = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(d, a_again), 0);
  // Over capacity: throws and changes nothing.
  const int e = cache.create_sequence();
  CHECK_THROWS_WITH(cache.append(e, tokens_from(0, 9)), ErrorKind::CapacityExceeded, "KV cache");
  CHECK_EQ(cache.length(e), 0);
  CHECK_EQ(cache.cached_blocks(), 1);
}

TEST_CASE(random_sharing_stress_keeps_every_block_accounted_for) {
  auto backend = cpu();
  KVCacheShape shape = small_shape();
  shape.n_blocks = 24;
  KVCache cache(*backend, shape);
  // Appends `tokens`; false when the cache is full. Only a full cache may refuse, only with
  // CapacityExceeded, and only when the new blocks outnumber the free ones; a refused append
  // changes nothing.
  int full_appends = 0;
  auto append_or_full = [&](KVCache& c, int seq, std::span<const int32_t> tokens) {
    const int length = c.length(seq);
    const int needed = blocks_for(length + static_cast<int>(tokens.size())) - blocks_for(length);
    const bool room = needed <= c.free_blocks();
    try {
      c.append(seq, tokens);
    } catch (const Error& e) {
      CHECK_MSG(e.kind() == ErrorKind::CapacityExceeded, "append failed with " << opencamp_test::kind_name(e.kind())
                                                                                 << ": " << e.what());
      CHECK_MSG(!room, "append refused with " << needed << " blocks needed and " << c.free_blocks() << " free");
      CHECK_EQ(c.length(seq), length);
      ++full_appends;
      return false;
    }
    CHECK_MSG(room, "append succeeded with " << needed << " blocks needed and only " << c.free_blocks()
                                             << " free before");
    return true;
  };
  std::mt19937 rng(7);
  std::vector<int> live;
  // A few prompt families so prefixes repeat.
  std::vector<std::vector<int32_t>> families;
  for (int f = 0; f < 4; ++f) families.push_back(tokens_from(1000 * f, 30));
  for (int step = 0; step < 4000; ++step) {
    const int action = static_cast<int>(rng() % 4);
    if (action == 0 || live.empty()) {
      const int seq = cache.create_sequence();
      const auto& family = families[rng() % families.size()];
      const auto prompt = std::vector<int32_t>(family.begin(), family.begin() + 1 + rng() % 29);
      const int mapped = cache.map_cached_prefix(seq, prompt);
      CHECK(mapped % kBlockSize == 0 && mapped < static_cast<int>(prompt.size()));
      if (append_or_full(cache, seq, std::span(prompt).subspan(static_cast<size_t>(mapped)))) {
        cache.publish(seq);
        live.push_back(seq);
      } else {
        cache.free_sequence(seq);
      }
    } else if (action == 1) {
      const size_t i = rng() % live.size();
      cache.free_sequence(live[i]);
      live.erase(live.begin() + static_cast<ptrdiff_t>(i));
    } else if (action == 2) {
      const int seq = live[rng() % live.size()];
      const int asked = static_cast<int>(rng() % (cache.length(seq) + 1));
      const int got = cache.truncate(seq, asked);
      CHECK(got <= asked && asked - got < kBlockSize);
    } else {
      const int seq = live[rng() % live.size()];
      if (append_or_full(cache, seq, tokens_from(static_cast<int>(rng() % 5000), 1 + static_cast<int>(rng() % 6)))) {
        cache.publish(seq);
      }
    }
    // Every block is held, cached or free; held blocks are exactly the union of the tables.
    std::set<int32_t> held;
    for (int seq : live) {
      CHECK_EQ(static_cast<int>(cache.block_table(seq).size()), blocks_for(cache.length(seq)));
      held.insert(cache.block_table(seq).begin(), cache.block_table(seq).end());
    }
    CHECK_EQ(cache.used_blocks(), static_cast<int>(held.size()));
    CHECK(cache.cached_blocks() <= cache.free_blocks());
  }
  for (int seq : live) cache.free_sequence(seq);
  CHECK_EQ(cache.used_blocks(), 0);
  CHECK_EQ(cache.free_blocks(), shape.n_blocks);
  CHECK(cache.prefix_stats().hit_blocks > 0);
  CHECK(full_appends > 0);  // the cache really ran full, and said so the right way
}

// ---- sliding windows ---------------------------------------------------------------------------

namespace {

constexpr int kWindowBlockSize = 16;  // the engine's, and kWindowKeyAlignment
constexpr int kWindow = 32;

int blocks_for_size(int length, int block_size) { return (length + block_size - 1) / block_size; }

// Two sliding-window layers (window 32) and a global one, blocks of 16: the sliding pool is
// kept small, as the engine sizes it.
KVCacheShape windowed_shape(int sliding_blocks) {
  KVCacheShape shape;
  shape.n_layers = 3;
  shape.n_kv_heads = 1;
  shape.head_dim = 4;
  shape.block_size = kWindowBlockSize;
  shape.n_blocks = 24;
  shape.layer_windows = {kWindow, 0, kWindow};
  shape.sliding_blocks = sliding_blocks;
  return shape;
}

// Blocks a sliding layer must keep at rest with `length` positions: those holding keys
// [length - window + 1, length) (the next query's window), no more.
int window_blocks_at(int length) {
  const int first_key = std::max(0, length - kWindow + 1);
  return blocks_for_size(length, kWindowBlockSize) - first_key / kWindowBlockSize;
}

}  // namespace

TEST_CASE(layers_with_one_window_share_a_group_and_the_global_ones_come_first) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(5));
  CHECK_EQ(cache.group_count(), 2);
  CHECK_EQ(cache.group_window(0), 0);
  CHECK_EQ(cache.group_window(1), kWindow);
  CHECK(std::vector<int>(cache.layer_groups().begin(), cache.layer_groups().end()) == std::vector<int>({1, 0, 1}));
  CHECK_EQ(cache.total_blocks(0), 24);
  CHECK_EQ(cache.total_blocks(1), 5);
  CHECK_EQ(cache.capacity_tokens(), 24 * kWindowBlockSize);
  const KVLayerView sliding = cache.layer(0), global = cache.layer(1);
  CHECK_EQ(sliding.keys.shape[0], 5);  // a sliding layer's pool
  CHECK_EQ(global.keys.shape[0], 24);
  const size_t per_layer = KVCache::bytes_per_position(1, 1, 4, DType::F32);
  CHECK_EQ(cache.bytes_per_position(0), per_layer);
  CHECK_EQ(cache.bytes_per_position(1), 2 * per_layer);
  CHECK_EQ(cache.bytes(), per_layer * kWindowBlockSize * (24 + 2 * 5));
  // Without windows: one group, every layer's pool of n_blocks (as before windows).
  KVCacheShape plain = windowed_shape(5);
  plain.layer_windows.clear();
  KVCache one(*backend, plain);
  CHECK_EQ(one.group_count(), 1);
  CHECK_EQ(one.bytes(), 3 * per_layer * kWindowBlockSize * 24);
}

TEST_CASE(a_growing_sequence_gives_back_the_blocks_its_window_left_behind) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(5));
  const int seq = cache.create_sequence();
  int most_held = 0;
  bool gave_back = false;
  for (int length = 1; length <= 300; ++length) {  // 19 blocks of the global pool's 24
    const int free_before = cache.free_blocks(1);
    cache.grow(seq, 1);
    cache.release_behind_windows(seq);
    gave_back = gave_back || cache.free_blocks(1) > free_before;
    CHECK_EQ(cache.held_blocks(seq, 1), window_blocks_at(length));
    CHECK_EQ(cache.used_blocks(1), window_blocks_at(length));
    CHECK_EQ(cache.held_blocks(seq, 0), blocks_for_size(length, kWindowBlockSize));
    most_held = std::max(most_held, cache.held_blocks(seq, 1));
  }
  CHECK(gave_back);
  CHECK_EQ(most_held, 3);  // ceil((window - 1) / block) + 1, however long the sequence
  const auto& table = cache.block_table(seq, 1);
  CHECK_EQ(static_cast<int>(table.size()), 19);
  CHECK(std::count(table.begin(), table.end(), kReleasedBlock) == 19 - window_blocks_at(300));
  CHECK(std::find(cache.block_table(seq, 0).begin(), cache.block_table(seq, 0).end(), kReleasedBlock) ==
        cache.block_table(seq, 0).end());  // the global layers keep every position
  // Two such sequences need 6 sliding blocks: the pool of 5 says so, and nothing changes.
  const int other = cache.create_sequence();
  cache.grow(other, 32);
  CHECK_EQ(cache.blocks_needed(other, 8, 1), 1);  // a block more, none released yet
  CHECK_THROWS_WITH(cache.grow(other, 8), ErrorKind::CapacityExceeded, "sliding-window");
  CHECK_EQ(cache.length(other), 32);
  cache.free_sequence(seq);
  cache.free_sequence(other);
  CHECK_EQ(cache.used_blocks(0), 0);
  CHECK_EQ(cache.used_blocks(1), 0);
}

TEST_CASE(appending_a_long_chunk_in_pieces_needs_only_the_last_pieces_window) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(8));
  const int seq = cache.create_sequence();
  // 200 positions at once hold all 13 blocks while they are written; 16 at a time, no more
  // than the window and a piece.
  CHECK_EQ(cache.blocks_needed(seq, 200, 1), 13);
  CHECK_EQ(cache.blocks_needed(seq, 200, 0, 16), 13);  // the global layers keep them all
  const int bound = cache.blocks_needed(seq, 200, 1, 16);
  CHECK_EQ(bound, cache.blocks_to_hold(200, 1, 16));
  CHECK(bound <= 5);
  int most_held = 0;
  for (int done = 0; done < 200; done += 16) {
    cache.grow(seq, std::min(16, 200 - done));
    most_held = std::max(most_held, cache.held_blocks(seq, 1));
  }
  CHECK(most_held <= bound);
  // 100 more positions in one go: the global pool has their 7 blocks, the sliding one not.
  CHECK_THROWS_WITH(cache.grow(cache.create_sequence(), 100), ErrorKind::CapacityExceeded, "sliding-window");
}

TEST_CASE(a_cached_prefix_with_windows_needs_every_global_block_and_each_windows_blocks) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(8));
  const auto prompt = tokens_from(1000, 100);
  const int a = cache.create_sequence();
  // Written a block at a time and published only at the end: the sliding blocks released on
  // the way (0..2) were never published, they are gone.
  for (int done = 0; done < 96; done += kWindowBlockSize) {
    cache.append(a, std::span(prompt).subspan(static_cast<size_t>(done), kWindowBlockSize));
  }
  cache.publish(a);
  CHECK_EQ(cache.block_table(a, 1)[2], kReleasedBlock);
  cache.free_sequence(a);
  CHECK_EQ(cache.cached_blocks(0), 6);
  CHECK_EQ(cache.cached_blocks(1), 3);

  // 100 tokens: 6 whole blocks; a query at 96 sees keys from 65, blocks 4 and 5, both cached.
  CHECK_EQ(cache.cached_prefix_length(prompt), 96);
  const int b = cache.create_sequence();
  CHECK_EQ(cache.map_cached_prefix(b, prompt), 96);
  CHECK_EQ(cache.held_blocks(b, 0), 6);
  CHECK_EQ(cache.held_blocks(b, 1), 2);
  CHECK_EQ(cache.block_table(b, 1)[3], kReleasedBlock);
  CHECK(cache.block_table(b, 1)[4] != kReleasedBlock && cache.block_table(b, 1)[5] != kReleasedBlock);
  cache.append(b, std::span(prompt).subspan(96));  // it continues from there
  CHECK_EQ(cache.length(b), 100);
  cache.free_sequence(b);

  // The first 50 tokens then others: the global layers hold 3 blocks of it, but the window at
  // 48, 32 or 16 needs blocks 0..2 of the sliding layers, which are gone: nothing to reuse.
  auto diverging = tokens_from(1000, 50);
  diverging.push_back(7);
  CHECK_EQ(cache.cached_prefix_length(diverging), 0);
  const int c = cache.create_sequence();
  const int64_t misses = cache.prefix_stats().miss_blocks;
  CHECK_EQ(cache.map_cached_prefix(c, diverging), 0);
  CHECK_EQ(cache.prefix_stats().miss_blocks, misses + 3);
  CHECK_EQ(cache.held_blocks(c, 0), 0);
  // Without windows the same history would give those 48 positions.
  KVCacheShape plain = windowed_shape(8);
  plain.layer_windows.clear();
  KVCache global(*backend, plain);
  const int g = global.create_sequence();
  for (int done = 0; done < 96; done += kWindowBlockSize) {
    global.append(g, std::span(prompt).subspan(static_cast<size_t>(done), kWindowBlockSize));
  }
  global.publish(g);
  CHECK_EQ(global.cached_prefix_length(diverging), 48);
}

TEST_CASE(blocks_published_before_their_release_stay_cached_for_prefix_hits) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(8));
  const auto prompt = tokens_from(500, 100);
  const int a = cache.create_sequence();
  for (int done = 0; done < 96; done += kWindowBlockSize) {  // published as written (as the engine)
    cache.append(a, std::span(prompt).subspan(static_cast<size_t>(done), kWindowBlockSize));
    cache.publish(a);
  }
  CHECK_EQ(cache.held_blocks(a, 1), 3);
  CHECK_EQ(cache.cached_blocks(1), 3);  // released, but cached, and can still be had
  CHECK_EQ(cache.free_blocks(1), 8 - 3);
  auto diverging = tokens_from(500, 50);
  diverging.push_back(7);
  CHECK_EQ(cache.cached_prefix_length(diverging), 48);  // blocks 1 and 2 of the window at 48
}

TEST_CASE(truncating_behind_released_keys_gives_up_the_whole_sequence) {
  auto backend = cpu();
  KVCache cache(*backend, windowed_shape(8));
  const int seq = cache.create_sequence();
  cache.append(seq, tokens_from(0, 60));
  // The second append's first query (60) sees keys from 29: block 0 is released.
  cache.append(seq, tokens_from(60, 40));
  CHECK_EQ(cache.block_table(seq, 1)[0], kReleasedBlock);
  CHECK(cache.block_table(seq, 1)[1] != kReleasedBlock);
  // Back to 90: its window starts at 59, in block 3; still held.
  CHECK_EQ(cache.truncated_length(seq, 90), 90);
  // Back to 40: the window at 40 starts at 9, in released block 0: nothing can be kept (the
  // caller recomputes, from the prefix cache where it can), and nothing changed yet.
  CHECK_EQ(cache.truncated_length(seq, 40), 0);
  CHECK_EQ(cache.length(seq), 100);
  CHECK_EQ(cache.truncate(seq, 90), 90);
  CHECK_EQ(cache.held_blocks(seq, 0), 6);
  CHECK_EQ(cache.truncate(seq, 40), 0);
  CHECK_EQ(cache.length(seq), 0);
  CHECK_EQ(cache.used_blocks(0), 0);
  CHECK_EQ(cache.used_blocks(1), 0);
  cache.append(seq, tokens_from(0, 10));  // and the sequence is as new
  CHECK_EQ(cache.held_blocks(seq, 1), 1);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }

// ---- KV cache types ----------------------------------------------------------------------------

// One formula sizes every cache: bytes() is n_blocks * block_size * bytes_per_position for each
// type, and the per-position numbers are those of the README (SmolLM2: 30 layers, 3 KV heads of
// 64 dims).
TEST_CASE(every_kv_type_is_sized_by_one_formula) {
  auto backend = cpu();
  CHECK_EQ(KVCache::bytes_per_position(30, 3, 64, DType::F32), size_t{46080});
  CHECK_EQ(KVCache::bytes_per_position(30, 3, 64, DType::BF16), size_t{23040});
  CHECK_EQ(KVCache::bytes_per_position(30, 3, 64, DType::F16), size_t{23040});
  CHECK_EQ(KVCache::bytes_per_position(30, 3, 64, DType::Q8_0), size_t{12240});  // 34 bytes per 32
  for (DType dtype : {DType::F32, DType::BF16, DType::F16, DType::Q8_0}) {
    KVCacheShape shape = small_shape();
    shape.head_dim = 64;
    shape.dtype = dtype;
    KVCache cache(*backend, shape);
    CHECK_EQ(cache.bytes(), size_t{kBlocks * kBlockSize} * cache.bytes_per_position());
    CHECK(cache.layer(1).dtype == dtype);
    CHECK_EQ(cache.layer(1).key_scales.empty(), dtype != DType::Q8_0);
  }
  KVCacheShape odd = small_shape();  // head_dim 6: no whole q8_0 groups
  odd.dtype = DType::Q8_0;
  CHECK_THROWS_WITH(KVCache(*backend, odd), ErrorKind::InvalidArgument, "multiple of 32");
  odd.dtype = DType::Q4_K;
  CHECK_THROWS_WITH(KVCache(*backend, odd), ErrorKind::InvalidArgument, "q4_k");
  // "auto" follows the weights; other names are errors.
  CHECK(resolve_kv_cache_dtype("auto", DType::F32) == DType::F32);
  CHECK(resolve_kv_cache_dtype("auto", DType::BF16) == DType::BF16);
  CHECK(resolve_kv_cache_dtype("auto", DType::Q4_K) == DType::F16);
  CHECK(resolve_kv_cache_dtype("q8_0", DType::BF16) == DType::Q8_0);
  CHECK_THROWS_WITH(resolve_kv_cache_dtype("int4", DType::F32), ErrorKind::InvalidArgument, "int4");
}

namespace {

// Logits of `tokens`: the first `prefilled` in one prefill (every position), the rest decoded
// one at a time, so both attention paths (many query rows, and decode's few) read the cache.
std::vector<float> prefill_then_decode(Engine& engine, const std::vector<int32_t>& tokens, size_t prefilled) {
  const size_t vocab = static_cast<size_t>(engine.config().vocab_size);
  std::vector<float> logits(tokens.size() * vocab);
  const int seq = engine.create_sequence();
  engine.prefill(seq, std::span(tokens).first(prefilled), std::span(logits).first(prefilled * vocab), true);
  for (size_t i = prefilled; i < tokens.size(); ++i) {
    const int seqs[] = {seq};
    engine.decode(seqs, std::span(tokens).subspan(i, 1), std::span(logits).subspan(i * vocab, vocab));
  }
  engine.free_sequence(seq);
  return logits;
}

// The largest KL divergence KL(p_f32 || p) of the next-token distributions over the positions.
double max_kl(const std::vector<float>& reference, const std::vector<float>& other, size_t vocab) {
  double worst = 0.0;
  for (size_t row = 0; row < reference.size() / vocab; ++row) {
    auto log_softmax = [&](const std::vector<float>& l) {
      std::vector<double> out(l.begin() + row * vocab, l.begin() + (row + 1) * vocab);
      const double m = *std::max_element(out.begin(), out.end());
      double total = 0.0;
      for (double x : out) total += std::exp(x - m);
      for (double& x : out) x = x - m - std::log(total);
      return out;
    };
    const auto p = log_softmax(reference), q = log_softmax(other);
    double kl = 0.0;
    for (size_t i = 0; i < vocab; ++i) kl += std::exp(p[i]) * (p[i] - q[i]);
    worst = std::max(worst, kl);
  }
  return worst;
}

}  // namespace

// Every KV type on every usable backend against the f32 cache, on a random llama with head_dim
// 64 (q8_0's groups) and the tiny Gemma 3 past its sliding window (bf16 / f16: head_dim 16):
// close (bounds a broken type or kernel fails by orders of magnitude), and not identical (the
// type really is what the cache held).
TEST_CASE(every_kv_type_stays_close_to_f32_kv) {
  TempDir tmp("kv-types");
  write_random_llama(tmp / "llama", [](std::vector<float> v, const std::vector<int64_t>&) { return v; });
  struct Bound {
    DType dtype;
    double max_abs, kl;
  };
  // Measured on both models (cpu and avx alike, the worst position): max abs / KL of bf16
  // 0.043 / 8.1e-5, f16 0.008 / 3.5e-6, q8_0 0.037 / 9.8e-5; the bounds leave 3-4x.
  const Bound bounds[] = {{DType::BF16, 0.15, 3e-4}, {DType::F16, 0.03, 1.5e-5}, {DType::Q8_0, 0.15, 4e-4}};
  struct Model {
    std::filesystem::path path;
    std::vector<int32_t> tokens;
  };
  std::vector<int32_t> llama_tokens, gemma_tokens;
  std::mt19937 rng(5);
  for (int i = 0; i < 40; ++i) llama_tokens.push_back(static_cast<int32_t>(rng() % 48));
  for (int i = 0; i < 24; ++i) gemma_tokens.push_back(static_cast<int32_t>(rng() % 64));  // past the window of 5
  const Model models[] = {{tmp / "llama", llama_tokens}, {fixture("tiny-gemma3"), gemma_tokens}};
  for (const std::string& backend : usable_backends()) {
    for (const Model& m : models) {
      EngineOptions options;
      options.backend = backend;
      options.threads = 2;
      options.kv_cache_dtype = "f32";
      Engine reference_engine(m.path, options);
      const size_t vocab = static_cast<size_t>(reference_engine.config().vocab_size);
      const size_t prefilled = m.tokens.size() / 2;
      const auto reference = prefill_then_decode(reference_engine, m.tokens, prefilled);
      for (const Bound& b : bounds) {
        if (b.dtype == DType::Q8_0 && reference_engine.config().head_dim % 32 != 0) continue;
        options.kv_cache_dtype = dtype_name(b.dtype);
        Engine engine(m.path, options);
        CHECK(engine.kv_cache_dtype() == b.dtype);
        const auto logits = prefill_then_decode(engine, m.tokens, prefilled);
        const double diff = max_abs_diff(logits, reference), kl = max_kl(reference, logits, vocab);
        std::printf("  %-8s %-12s %-5s max abs %.3g, max KL %.3g\n", backend.c_str(),
                    m.path.filename().c_str(), dtype_name(b.dtype), diff, kl);
        CHECK_MSG(diff <= b.max_abs && kl <= b.kl, backend << " " << m.path << " " << dtype_name(b.dtype)
                                                           << ": max abs " << diff << ", KL " << kl);
        CHECK_MSG(diff > 0.0, dtype_name(b.dtype) << " gave exactly the f32 logits: was it used?");
      }
    }
  }
}
