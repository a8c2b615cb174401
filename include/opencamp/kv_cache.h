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
  int n_blocks = 0;
  DType dtype = DType::F32;  // what keys and values are held in: f32, bf16, f16 or q8_0
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
  // The same for a cache of this shape, before there is one (sizing a cache to a memory budget);
  // the cache allocates exactly n_blocks * block_size times this.
  static size_t bytes_per_position(int n_layers, int n_kv_heads, int head_dim, DType dtype);

  // Sequences are small integer ids, reused after free_sequence.
  int create_sequence();
  // Returns the sequence's blocks: published ones stay cached for later prefix hits.
  void free_sequence(int seq);
  bool has_sequence(int seq) const;
  int sequence_count() const;

  int length(int seq) const;  // token positions stored
  const std::vector<int32_t>& tokens(int seq) const;       // [length] the token at each position
  const std::vector<int32_t>& block_table(int seq) const;  // [ceil(length / block_size)]

  // Makes room for `tokens` after the sequence's last position, allocating blocks (and evicting
  // unused cached ones) as needed; the caller then writes their keys and values. Throws
  // Error(CapacityExceeded) and changes nothing when too few blocks can be had.
  void append(int seq, std::span<const int32_t> tokens);
  // append() of n positions whose tokens are unknown (never published to the prefix cache).
  void grow(int seq, int n_new);
  // Drops positions from the end and returns the new length: `new_length`, or the start of the
  // block it falls in when that block is shared with another sequence (its tail must not be
  // rewritten); the caller recomputes the difference.
  int truncate(int seq, int new_length);

  // Blocks append() of n_tokens more positions to seq would take.
  int blocks_needed(int seq, int n_tokens) const;

  // Maps onto an empty sequence the cached blocks that hold the longest whole-block prefix of
  // `tokens`, leaving at least one token for the caller to compute (it needs its logits).
  // Returns the positions mapped; counts hits and misses.
  int map_cached_prefix(int seq, std::span<const int32_t> tokens);
  // The positions map_cached_prefix would map for `tokens`, changing nothing.
  int cached_prefix_length(std::span<const int32_t> tokens) const;
  // Offers the sequence's full blocks to the prefix cache; call once their keys and values are
  // written.
  void publish(int seq);

  // Blocks a sequence holds, blocks that can be had (free or cached and unused), cached ones.
  int used_blocks() const { return shape_.n_blocks - free_blocks(); }
  int free_blocks() const { return static_cast<int>(free_list_.size() + lru_.size()); }
  int cached_blocks() const { return static_cast<int>(lru_.size()); }
  int capacity_tokens() const { return shape_.n_blocks * shape_.block_size; }

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
    std::vector<int32_t> blocks;
    std::vector<uint64_t> hashes;  // chain hash of each published full block
  };
  struct Block {
    int refs = 0;              // sequences holding it
    bool published = false;    // in index_ (full, keys and values final)
    uint64_t hash = 0;
    std::list<int32_t>::iterator lru_position;  // valid when published and refs == 0
  };

  Sequence& sequence(int seq);
  const Sequence& sequence(int seq) const;
  int32_t take_block();           // a free block, else the least recently used cached one
  void release_block(int32_t b);  // one sequence fewer holds it
  void unpublish(int32_t b);
  static uint64_t chain_hash(uint64_t previous, std::span<const int32_t> block_tokens);
  bool block_holds(int32_t b, std::span<const int32_t> block_tokens) const;
  struct CachedBlock {
    int32_t block;
    uint64_t hash;
  };
  // The cached blocks holding the longest whole-block prefix of `prompt` (one token left over).
  std::vector<CachedBlock> find_cached_prefix(std::span<const int32_t> prompt) const;

  KVCacheShape shape_;
  std::shared_ptr<Buffer> storage_;
  std::vector<KVLayerView> layers_;
  std::vector<Block> blocks_;
  std::vector<int32_t> block_tokens_;  // [n_blocks][block_size]: what a published block holds
  std::vector<int32_t> free_list_;     // a stack: recently freed blocks are reused first
  std::list<int32_t> lru_;             // cached, unused blocks; least recently used first
  std::unordered_map<uint64_t, int32_t> index_;  // chain hash -> published block
  std::vector<Sequence> sequences_;
  PrefixStats prefix_stats_;
};

}  // namespace opencamp
