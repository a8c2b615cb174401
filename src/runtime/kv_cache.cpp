#include "opencamp/kv_cache.h"

#include <algorithm>

#include "opencamp/error.h"

namespace opencamp {
namespace {

constexpr int32_t kUnknownToken = -1;  // positions added by grow(): never published

uint64_t mix(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

KVCache::KVCache(Backend& backend, const KVCacheShape& shape) : shape_(shape) {
  if (shape.n_layers <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_size <= 0 || shape.n_blocks <= 0) {
    fail(ErrorKind::InvalidArgument, "KV cache dimensions must be positive");
  }
  const size_t positions = static_cast<size_t>(shape.n_blocks) * shape.block_size;
  storage_ = backend.allocate(positions * bytes_per_position());
  // Per layer: keys, values, then (q8_0) their scales; element counts of one pool.
  const bool quantised = shape.dtype == DType::Q8_0;
  const DType element = quantised ? DType::I8 : shape.dtype;
  const int64_t groups = quantised ? shape.head_dim / kKVQuantGroup : 0;
  const int64_t elements = static_cast<int64_t>(positions) * shape.n_kv_heads * shape.head_dim;
  const int64_t scale_count = static_cast<int64_t>(positions) * shape.n_kv_heads * groups;
  char* base = static_cast<char*>(storage_->data());
  const bool transposed_keys = backend.transposed_keys();
  const int64_t bs = shape.block_size, heads = shape.n_kv_heads, hd = shape.head_dim;
  for (int layer = 0; layer < shape.n_layers; ++layer) {
    KVLayerView view;
    view.dtype = shape.dtype;
    for (Tensor* t : {&view.keys, &view.values}) {
      *t = Tensor::contiguous(base, element, {shape.n_blocks, bs, heads, hd}, backend.device());
      base += dtype_bytes(element, elements);
    }
    if (quantised) {
      for (Tensor* t : {&view.key_scales, &view.value_scales}) {
        *t = Tensor::contiguous(base, DType::F16, {shape.n_blocks, bs, heads, groups}, backend.device());
        base += dtype_bytes(DType::F16, scale_count);
      }
    }
    if (transposed_keys) {  // physically [block][head][dim][position], scales [block][head][group][position]
      view.keys.stride = {bs * heads * hd, 1, hd * bs, bs};
      if (quantised) view.key_scales.stride = {bs * heads * groups, 1, groups * bs, bs};
    }
    layers_.push_back(view);
  }
  if (base != static_cast<char*>(storage_->data()) + storage_->size()) {
    fail(ErrorKind::Internal, "KV cache layout disagrees with bytes_per_position");
  }
  blocks_.resize(static_cast<size_t>(shape.n_blocks));
  block_tokens_.assign(static_cast<size_t>(shape.n_blocks) * shape.block_size, kUnknownToken);
  free_list_.reserve(static_cast<size_t>(shape.n_blocks));
  for (int block = shape.n_blocks - 1; block >= 0; --block) free_list_.push_back(block);
}

size_t KVCache::bytes() const { return storage_->size(); }

size_t KVCache::bytes_per_position(int n_layers, int n_kv_heads, int head_dim, DType dtype) {
  return static_cast<size_t>(n_layers) * 2 * n_kv_heads * kv_head_bytes(dtype, head_dim);  // K and V
}

size_t KVCache::bytes_per_position() const {
  return bytes_per_position(shape_.n_layers, shape_.n_kv_heads, shape_.head_dim, shape_.dtype);
}

int KVCache::create_sequence() {
  for (size_t i = 0; i < sequences_.size(); ++i) {
    if (!sequences_[i].live) {
      sequences_[i] = Sequence{true, {}, {}, {}};
      return static_cast<int>(i);
    }
  }
  sequences_.push_back(Sequence{true, {}, {}, {}});
  return static_cast<int>(sequences_.size() - 1);
}

void KVCache::free_sequence(int seq) {
  Sequence& s = sequence(seq);
  for (int32_t b : s.blocks) release_block(b);
  s = Sequence{};
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

int KVCache::length(int seq) const { return static_cast<int>(sequence(seq).tokens.size()); }

const std::vector<int32_t>& KVCache::tokens(int seq) const { return sequence(seq).tokens; }

const std::vector<int32_t>& KVCache::block_table(int seq) const { return sequence(seq).blocks; }

int KVCache::blocks_needed(int seq, int n_tokens) const {
  const Sequence& s = sequence(seq);
  const int64_t new_length = static_cast<int64_t>(s.tokens.size()) + n_tokens;
  const int64_t total = (new_length + shape_.block_size - 1) / shape_.block_size;
  return static_cast<int>(std::max<int64_t>(0, total - static_cast<int64_t>(s.blocks.size())));
}

int32_t KVCache::take_block() {
  if (!free_list_.empty()) {
    const int32_t b = free_list_.back();
    free_list_.pop_back();
    blocks_[b].refs = 1;
    return b;
  }
  if (lru_.empty()) fail(ErrorKind::Internal, "KV cache: no block to take (capacity was checked)");
  const int32_t b = lru_.front();  // evict the least recently used cached block
  lru_.pop_front();
  blocks_[b].published = false;
  index_.erase(blocks_[b].hash);
  prefix_stats_.evictions += 1;
  blocks_[b].refs = 1;
  return b;
}

void KVCache::release_block(int32_t b) {
  Block& block = blocks_[b];
  if (--block.refs > 0) return;
  if (block.published) {
    lru_.push_back(b);
    block.lru_position = std::prev(lru_.end());
  } else {
    free_list_.push_back(b);
  }
}

void KVCache::unpublish(int32_t b) {
  Block& block = blocks_[b];
  if (!block.published) return;
  index_.erase(block.hash);
  block.published = false;
}

void KVCache::append(int seq, std::span<const int32_t> new_tokens) {
  Sequence& s = sequence(seq);
  const int needed = blocks_needed(seq, static_cast<int>(new_tokens.size()));
  if (needed > free_blocks()) {
    fail(ErrorKind::CapacityExceeded, "the KV cache is full: ", new_tokens.size(),
         " more positions need ", needed, " blocks but only ", free_blocks(), " of ",
         shape_.n_blocks, " are free (or cached and unused); end other sequences or give the "
         "engine a larger kv_cache_tokens");
  }
  for (int i = 0; i < needed; ++i) s.blocks.push_back(take_block());
  s.tokens.insert(s.tokens.end(), new_tokens.begin(), new_tokens.end());
}

void KVCache::grow(int seq, int n_new) {
  if (n_new < 0) fail(ErrorKind::InvalidArgument, "cannot grow a sequence by ", n_new);
  const std::vector<int32_t> unknown(static_cast<size_t>(n_new), kUnknownToken);
  append(seq, unknown);
}

int KVCache::truncate(int seq, int new_length) {
  Sequence& s = sequence(seq);
  if (new_length < 0 || new_length > static_cast<int>(s.tokens.size())) {
    fail(ErrorKind::InvalidArgument, "cannot truncate sequence ", seq, " of length ",
         s.tokens.size(), " to ", new_length);
  }
  const int bs = shape_.block_size;
  if (new_length % bs != 0) {
    // The block the cut falls in will be written again from the cut on. Shared: keep it out of
    // this sequence altogether. Ours alone: it no longer holds what its hash says.
    const int32_t b = s.blocks[static_cast<size_t>(new_length / bs)];
    if (blocks_[b].refs > 1) {
      new_length -= new_length % bs;
    } else {
      unpublish(b);
    }
  }
  const size_t keep_blocks = static_cast<size_t>((new_length + bs - 1) / bs);
  while (s.blocks.size() > keep_blocks) {
    release_block(s.blocks.back());
    s.blocks.pop_back();
  }
  s.tokens.resize(static_cast<size_t>(new_length));
  s.hashes.resize(std::min(s.hashes.size(), static_cast<size_t>(new_length / bs)));
  return new_length;
}

uint64_t KVCache::chain_hash(uint64_t previous, std::span<const int32_t> block_tokens) {
  uint64_t h = mix(previous ^ 0x9e3779b97f4a7c15ull);
  for (int32_t token : block_tokens) h = mix(h ^ static_cast<uint32_t>(token));
  return h;
}

bool KVCache::block_holds(int32_t b, std::span<const int32_t> block_tokens) const {
  const int32_t* stored = block_tokens_.data() + static_cast<size_t>(b) * shape_.block_size;
  return std::equal(block_tokens.begin(), block_tokens.end(), stored);
}

void KVCache::publish(int seq) {
  Sequence& s = sequence(seq);
  const int bs = shape_.block_size;
  const size_t full = s.tokens.size() / static_cast<size_t>(bs);
  while (s.hashes.size() < full) {
    const size_t i = s.hashes.size();
    const std::span<const int32_t> block_tokens(s.tokens.data() + i * bs, static_cast<size_t>(bs));
    if (std::find(block_tokens.begin(), block_tokens.end(), kUnknownToken) != block_tokens.end()) {
      break;  // positions of unknown tokens can never be matched
    }
    const uint64_t h = chain_hash(i == 0 ? 0 : s.hashes[i - 1], block_tokens);
    s.hashes.push_back(h);
    const int32_t b = s.blocks[i];
    if (blocks_[b].published || index_.count(h)) continue;  // already cached (maybe elsewhere)
    blocks_[b].published = true;
    blocks_[b].hash = h;
    std::copy(block_tokens.begin(), block_tokens.end(),
              block_tokens_.begin() + static_cast<ptrdiff_t>(b) * bs);
    index_.emplace(h, b);
  }
}

std::vector<KVCache::CachedBlock> KVCache::find_cached_prefix(std::span<const int32_t> prompt) const {
  std::vector<CachedBlock> found;
  if (prompt.empty()) return found;
  const size_t bs = static_cast<size_t>(shape_.block_size);
  const size_t lookups = (prompt.size() - 1) / bs;  // whole blocks, one token left over
  uint64_t h = 0;
  for (size_t i = 0; i < lookups; ++i) {
    const std::span<const int32_t> block_tokens = prompt.subspan(i * bs, bs);
    h = chain_hash(h, block_tokens);
    const auto it = index_.find(h);
    if (it == index_.end() || !block_holds(it->second, block_tokens)) break;
    found.push_back({it->second, h});
  }
  return found;
}

int KVCache::cached_prefix_length(std::span<const int32_t> prompt) const {
  return static_cast<int>(find_cached_prefix(prompt).size()) * shape_.block_size;
}

int KVCache::map_cached_prefix(int seq, std::span<const int32_t> prompt) {
  Sequence& s = sequence(seq);
  if (!s.tokens.empty()) fail(ErrorKind::Internal, "map_cached_prefix needs an empty sequence");
  if (prompt.empty()) return 0;
  const size_t bs = static_cast<size_t>(shape_.block_size);
  const size_t lookups = (prompt.size() - 1) / bs;
  const std::vector<CachedBlock> found = find_cached_prefix(prompt);
  for (const CachedBlock& c : found) {
    if (blocks_[c.block].refs++ == 0) lru_.erase(blocks_[c.block].lru_position);
    s.blocks.push_back(c.block);
    s.hashes.push_back(c.hash);
    const auto block_tokens = prompt.subspan(s.tokens.size(), bs);
    s.tokens.insert(s.tokens.end(), block_tokens.begin(), block_tokens.end());
  }
  prefix_stats_.hit_blocks += static_cast<int64_t>(found.size());
  prefix_stats_.miss_blocks += static_cast<int64_t>(lookups - found.size());
  return static_cast<int>(found.size() * bs);
}

}  // namespace opencamp
