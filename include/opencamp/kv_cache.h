// The paged KV cache: a pool of fixed-size blocks shared by every sequence of an engine; each
// sequence owns a block table. Blocks are handed out as a sequence grows and returned when it
// shrinks or ends, so many sequences of different lengths share one memory budget.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "opencamp/backend.h"

namespace opencamp {

struct KVCacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;  // token positions per block
  int n_blocks = 0;
};

class KVCache {
 public:
  KVCache(Backend& backend, const KVCacheShape& shape);

  const KVCacheShape& shape() const { return shape_; }
  KVLayerView layer(int layer) const { return layers_[layer]; }
  size_t bytes() const;

  // Sequences are small integer ids, reused after free_sequence.
  int create_sequence();
  void free_sequence(int seq);
  bool has_sequence(int seq) const;
  int sequence_count() const;

  int length(int seq) const;  // token positions stored
  const std::vector<int32_t>& block_table(int seq) const;

  // Makes room for `n_new` more positions, allocating blocks as needed. Throws
  // Error(CapacityExceeded) and changes nothing when the pool has too few free blocks.
  void grow(int seq, int n_new);
  // Drops positions from the end, returning emptied blocks to the pool.
  void truncate(int seq, int new_length);

  int free_blocks() const { return static_cast<int>(free_list_.size()); }
  int used_blocks() const { return shape_.n_blocks - free_blocks(); }
  int capacity_tokens() const { return shape_.n_blocks * shape_.block_size; }

 private:
  struct Sequence {
    bool live = false;
    int length = 0;
    std::vector<int32_t> blocks;
  };
  Sequence& sequence(int seq);
  const Sequence& sequence(int seq) const;

  KVCacheShape shape_;
  std::shared_ptr<Buffer> storage_;
  std::vector<KVLayerView> layers_;
  std::vector<int32_t> free_list_;  // a stack: recently freed blocks are reused first
  std::vector<Sequence> sequences_;
};

}  // namespace opencamp
