// The paged KV cache: a pool of fixed-size blocks shared by every sequence of an engine; each
// sequence owns a block table. Blocks are handed out as a sequence grows and returned when it
// shrinks or ends, so many sequences of different lengths share one memory budget.
//
// Prefix caching: a full block is identified by the hash of every token up to its end (a
// chain: each block's hash covers its own tokens and its predecessor's hash). Published full
// blocks stay cached after their sequences end, and a new sequence whose tokens start the same
// way maps them instead of recomputing them (shared system prompts, the history of a chat).
// Blocks are shared read-only: a sequence only ever writes into its own partial last block.
// Cached blocks no sequence uses are evicted least-recently-used when memory runs out.
//
// Sliding windows: layers with the same attention window form a group with a pool of its own,
// and a sequence holds one block table per group. A sliding group's blocks that lie wholly
// before the earliest key any later query can see (the next position - window + 1) are
// released as the sequence grows (published ones to the prefix cache, the rest to the free
// list) and their table entries become kReleasedBlock, which attention never reads; so such a
// group holds about window / block_size blocks per sequence however long it grows. A cached
// prefix of length P is reusable when the global groups hold all its blocks and each sliding
// group the blocks its window needs at P.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "opencamp/backend.h"

namespace opencamp {

struct KVCacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;  // token positions per block
  int n_blocks = 0;     // blocks of the global layers' pool (of every layer's without windows)
  DType dtype = DType::F32;  // what keys and values are held in: f32, bf16, f16 or q8_0
  // [n_layers] each layer's attention window, 0 for a global layer; empty: every layer global.
  std::vector<int> layer_windows = {};
  // Blocks of each sliding-window group's pool; 0: n_blocks.
  int sliding_blocks = 0;
};

class KVCache {
 public:
  KVCache(Backend& backend, const KVCacheShape& shape);

  const KVCacheShape& shape() const { return shape_; }
  KVLayerView layer(int layer) const { return layers_[layer]; }
  // Every layer's view, in layer order: what a model's forward pass sees of the cache.
  std::span<const KVLayerView> layers() const { return layers_; }
  size_t bytes() const;
  // Bytes one token position takes in every layer (keys and values, q8_0's scales included).
  size_t bytes_per_position() const;
  // The same in the layers of one group.
  size_t bytes_per_position(int group) const;
  // The same for a cache of this shape, before there is one (sizing a cache to a memory budget);
  // the cache allocates exactly this for one layer times the positions of each layer's pool
  // (n_blocks * block_size times this without windows).
  static size_t bytes_per_position(int n_layers, int n_kv_heads, int head_dim, DType dtype);

  // Sequences are small integer ids, reused after free_sequence.
  int create_sequence();
  // Returns the sequence's blocks: published ones stay cached for later prefix hits.
  void free_sequence(int seq);
  bool has_sequence(int seq) const;
  int sequence_count() const;

  int length(int seq) const;  // token positions stored
  const std::vector<int32_t>& tokens(int seq) const;       // [length] the token at each position
  // [ceil(length / block_size)] the group's block of each span of block_size positions
  // (kReleasedBlock before a sliding group's window).
  const std::vector<int32_t>& block_table(int seq, int group = 0) const;

  // Layer groups: group 0 is the global layers' (window 0) when there are any, then the sliding
  // windows, smallest first. Models without windows have one group.
  int group_count() const { return static_cast<int>(pools_.size()); }
  int group_window(int group) const { return pool(group).window; }  // 0: global
  std::span<const int> layer_groups() const { return layer_groups_; }  // [n_layers] -> group
  int group_layers(int group) const;  // layers in the group

  // Makes room for `tokens` after the sequence's last position, allocating blocks (and evicting
  // unused cached ones) as needed; the caller then writes their keys and values. First releases
  // what the windows of the new positions have left behind (release_behind_windows). Throws
  // Error(CapacityExceeded) and changes nothing (but that release) when too few blocks can be had.
  void append(int seq, std::span<const int32_t> tokens);
  // Releases the sliding groups' blocks before the earliest key a query at the sequence's next
  // position (or later) can see. Attention may read keys from the start of the
  // kWindowKeyAlignment-key chunk holding a window's first key, so those stay too.
  void release_behind_windows(int seq);
  // append() of n positions whose tokens are unknown (never published to the prefix cache).
  void grow(int seq, int n_new);
  // Drops positions from the end and returns the new length: `new_length`, or the start of the
  // block it falls in when that block is shared with another sequence (its tail must not be
  // rewritten), or 0 when a sliding group has already released keys the window at the new
  // length needs (they cannot be had back); the caller recomputes the difference.
  int truncate(int seq, int new_length);
  // The length truncate(seq, new_length) would leave, changing nothing.
  int truncated_length(int seq, int new_length) const;

  // Blocks of `group` that appending n_tokens more positions to seq takes (net of what the
  // sliding windows release), at most `piece` positions per append() (0: all in one).
  int blocks_needed(int seq, int n_tokens, int group = 0, int piece = 0) const;
  // The most blocks of `group` a sequence holds on its way to `length` positions appended at
  // most `piece` at a time (0: all in one): all its blocks in a global group, about its window's
  // in a sliding one.
  int blocks_to_hold(int length, int group, int piece = 0) const;
  // Blocks of `group` the sequence holds (kReleasedBlock entries not counted).
  int held_blocks(int seq, int group) const;

  // Maps onto an empty sequence the cached blocks that hold the longest whole-block prefix of
  // `tokens`, leaving at least one token for the caller to compute (it needs its logits).
  // Returns the positions mapped; counts hits and misses.
  int map_cached_prefix(int seq, std::span<const int32_t> tokens);
  // The positions map_cached_prefix would map for `tokens`, changing nothing.
  int cached_prefix_length(std::span<const int32_t> tokens) const;
  // Offers the sequence's full blocks to the prefix cache; call once their keys and values are
  // written.
  void publish(int seq);

  // Per group: blocks in its pool, blocks a sequence holds, blocks that can be had (free or
  // cached and unused), cached ones. Group 0 is the one whose positions bound a context.
  int total_blocks(int group = 0) const { return pool(group).n_blocks; }
  int used_blocks(int group = 0) const { return total_blocks(group) - free_blocks(group); }
  int free_blocks(int group = 0) const {
    return static_cast<int>(pool(group).free_list.size() + pool(group).lru.size());
  }
  int cached_blocks(int group = 0) const { return static_cast<int>(pool(group).lru.size()); }
  int capacity_tokens() const { return total_blocks(0) * shape_.block_size; }

  struct PrefixStats {
    int64_t hit_blocks = 0;    // blocks mapped from the cache instead of computed
    int64_t miss_blocks = 0;   // whole prompt blocks looked up and not found
    int64_t evictions = 0;     // cached blocks reused for new data
  };
  const PrefixStats& prefix_stats() const { return prefix_stats_; }

 private:
  struct Sequence {
    bool live = false;
    std::vector<int32_t> tokens;
    std::vector<std::vector<int32_t>> tables;  // [group][block]
    std::vector<int> released;                 // [group] leading table entries released
    std::vector<uint64_t> hashes;  // chain hash of each published full block
  };
  struct Block {
    int refs = 0;              // sequences holding it
    bool published = false;    // in the pool's index (full, keys and values final)
    uint64_t hash = 0;
    std::list<int32_t>::iterator lru_position;  // valid when published and refs == 0
  };
  struct Pool {  // one layer group's blocks
    int window = 0;  // 0: global
    int n_blocks = 0;
    int layers = 0;
    std::vector<Block> blocks;
    std::vector<int32_t> block_tokens;  // [n_blocks][block_size]: what a published block holds
    std::vector<int32_t> free_list;     // a stack: recently freed blocks are reused first
    std::list<int32_t> lru;             // cached, unused blocks; least recently used first
    std::unordered_map<uint64_t, int32_t> index;  // chain hash -> published block
  };

  const Pool& pool(int group) const;
  Sequence& sequence(int seq);
  const Sequence& sequence(int seq) const;
  Sequence empty_sequence() const;
  // Table entries before this are released (or may be) once `next_position` is the next to be
  // written: 0 for a global group.
  int first_kept_block(int group, int64_t next_position) const;
  int32_t take_block(Pool& p);           // a free block, else the least recently used cached one
  void release_block(Pool& p, int32_t b);  // one sequence fewer holds it
  void unpublish(Pool& p, int32_t b);
  static uint64_t chain_hash(uint64_t previous, std::span<const int32_t> block_tokens);
  bool block_holds(const Pool& p, int32_t b, std::span<const int32_t> block_tokens) const;
  struct CachedPrefix {
    size_t blocks = 0;                         // whole blocks of the prompt it covers
    std::vector<uint64_t> hashes;              // [blocks]
    std::vector<std::vector<int32_t>> tables;  // [group][blocks] kReleasedBlock before windows
  };
  // The cached blocks holding the longest whole-block prefix of `prompt` (one token left over)
  // every group can continue from.
  CachedPrefix find_cached_prefix(std::span<const int32_t> prompt) const;

  KVCacheShape shape_;
  std::shared_ptr<Buffer> storage_;
  std::vector<KVLayerView> layers_;
  std::vector<int> layer_groups_;  // [n_layers] -> group
  std::vector<Pool> pools_;        // [group]
  std::vector<Sequence> sequences_;
  PrefixStats prefix_stats_;
};

}  // namespace opencamp
