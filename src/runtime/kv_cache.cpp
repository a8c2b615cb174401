#include "opencamp/kv_cache.h"

#include "opencamp/error.h"

namespace opencamp {

KVCache::KVCache(Backend& backend, const KVCacheShape& shape) : shape_(shape) {
  if (shape.n_layers <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_size <= 0 || shape.n_blocks <= 0) {
    fail(ErrorKind::InvalidArgument, "KV cache dimensions must be positive");
  }
  const int64_t per_layer = static_cast<int64_t>(shape.n_blocks) * shape.block_size *
                            shape.n_kv_heads * shape.head_dim;
  storage_ = backend.allocate(static_cast<size_t>(per_layer) * 2 * shape.n_layers * sizeof(float));
  float* base = static_cast<float*>(storage_->data());
  for (int layer = 0; layer < shape.n_layers; ++layer) {
    KVLayerView view;
    for (Tensor* t : {&view.keys, &view.values}) {
      *t = Tensor::contiguous(base, DType::F32,
                              {shape.n_blocks, shape.block_size, shape.n_kv_heads, shape.head_dim},
                              backend.device());
      base += per_layer;
    }
    layers_.push_back(view);
  }
  free_list_.reserve(static_cast<size_t>(shape.n_blocks));
  for (int block = shape.n_blocks - 1; block >= 0; --block) free_list_.push_back(block);
}

size_t KVCache::bytes() const { return storage_->size(); }

int KVCache::create_sequence() {
  for (size_t i = 0; i < sequences_.size(); ++i) {
    if (!sequences_[i].live) {
      sequences_[i] = Sequence{true, 0, {}};
      return static_cast<int>(i);
    }
  }
  sequences_.push_back(Sequence{true, 0, {}});
  return static_cast<int>(sequences_.size() - 1);
}

void KVCache::free_sequence(int seq) {
  truncate(seq, 0);
  sequence(seq).live = false;
}

bool KVCache::has_sequence(int seq) const {
  return seq >= 0 && seq < static_cast<int>(sequences_.size()) && sequences_[seq].live;
}

int KVCache::sequence_count() const {
  int n = 0;
  for (const auto& s : sequences_) n += s.live ? 1 : 0;
  return n;
}

KVCache::Sequence& KVCache::sequence(int seq) {
  if (!has_sequence(seq)) fail(ErrorKind::InvalidArgument, "sequence ", seq, " does not exist");
  return sequences_[seq];
}

const KVCache::Sequence& KVCache::sequence(int seq) const {
  if (!has_sequence(seq)) fail(ErrorKind::InvalidArgument, "sequence ", seq, " does not exist");
  return sequences_[seq];
}

int KVCache::length(int seq) const { return sequence(seq).length; }

const std::vector<int32_t>& KVCache::block_table(int seq) const { return sequence(seq).blocks; }

void KVCache::grow(int seq, int n_new) {
  Sequence& s = sequence(seq);
  if (n_new < 0) fail(ErrorKind::InvalidArgument, "cannot grow a sequence by ", n_new);
  const int new_length = s.length + n_new;
  const size_t blocks_needed = static_cast<size_t>((new_length + shape_.block_size - 1) / shape_.block_size);
  if (blocks_needed > s.blocks.size()) {
    const size_t extra = blocks_needed - s.blocks.size();
    if (extra > free_list_.size()) {
      fail(ErrorKind::CapacityExceeded, "the KV cache is full: ", n_new, " more positions need ",
           extra, " blocks but only ", free_list_.size(), " of ", shape_.n_blocks,
           " are free; end other sequences or give the engine a larger kv_cache_tokens");
    }
    for (size_t i = 0; i < extra; ++i) {
      s.blocks.push_back(free_list_.back());
      free_list_.pop_back();
    }
  }
  s.length = new_length;
}

void KVCache::truncate(int seq, int new_length) {
  Sequence& s = sequence(seq);
  if (new_length < 0 || new_length > s.length) {
    fail(ErrorKind::InvalidArgument, "cannot truncate sequence ", seq, " of length ", s.length,
         " to ", new_length);
  }
  const size_t blocks_needed = static_cast<size_t>((new_length + shape_.block_size - 1) / shape_.block_size);
  while (s.blocks.size() > blocks_needed) {
    free_list_.push_back(s.blocks.back());
    s.blocks.pop_back();
  }
  s.length = new_length;
}

}  // namespace opencamp
