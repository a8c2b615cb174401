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
      shape.block_size <= 0 || shape.n_blocks <= 0 || shape.sliding_blocks < 0) {
    fail(ErrorKind::InvalidArgument, "KV cache dimensions must be positive");
  }
  if (!shape.layer_windows.empty() &&
      static_cast<int>(shape.layer_windows.size()) != shape.n_layers) {
    fail(ErrorKind::InvalidArgument, "KV cache: ", shape.layer_windows.size(),
         " layer windows for ", shape.n_layers, " layers");
  }
  // Groups: the global one first, then each window, smallest first.
  std::vector<int> windows = shape.layer_windows;
  if (windows.empty()) windows.assign(static_cast<size_t>(shape.n_layers), 0);
  std::vector<int> distinct = windows;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  if (distinct.front() < 0) fail(ErrorKind::InvalidArgument, "KV cache: a negative layer window");
  for (int window : distinct) {
    Pool p;
    p.window = window;
    p.n_blocks = window > 0 && shape.sliding_blocks > 0 ? shape.sliding_blocks : shape.n_blocks;
    pools_.push_back(std::move(p));
  }
  for (int window : windows) {
    const int group = static_cast<int>(std::find(distinct.begin(), distinct.end(), window) - distinct.begin());
    layer_groups_.push_back(group);
    pools_[static_cast<size_t>(group)].layers += 1;
  }
  size_t total_positions = 0;
  for (int layer = 0; layer < shape.n_layers; ++layer) {
    total_positions += static_cast<size_t>(pools_[static_cast<size_t>(layer_groups_[layer])].n_blocks) * shape.block_size;
  }
  storage_ = backend.allocate(total_positions * bytes_per_position(1, shape.n_kv_heads, shape.head_dim, shape.dtype));
  // Per layer: keys, values, then (q8_0) their scales; element counts of the layer's pool.
  const bool quantised = shape.dtype == DType::Q8_0;
  const DType element = quantised ? DType::I8 : shape.dtype;
  const int64_t groups = quantised ? shape.head_dim / kKVQuantGroup : 0;
  char* base = static_cast<char*>(storage_->data());
  const bool transposed_keys = backend.transposed_keys();
  const int64_t bs = shape.block_size, heads = shape.n_kv_heads, hd = shape.head_dim;
  for (int layer = 0; layer < shape.n_layers; ++layer) {
    const int64_t n_blocks = pools_[static_cast<size_t>(layer_groups_[layer])].n_blocks;
    const int64_t positions = n_blocks * bs;
    KVLayerView view;
    view.dtype = shape.dtype;
    for (Tensor* t : {&view.keys, &view.values}) {
      *t = Tensor::contiguous(base, element, {n_blocks, bs, heads, hd}, backend.device());
      base += dtype_bytes(element, positions * heads * hd);
    }
    if (quantised) {
      for (Tensor* t : {&view.key_scales, &view.value_scales}) {
        *t = Tensor::contiguous(base, DType::F16, {n_blocks, bs, heads, groups}, backend.device());
        base += dtype_bytes(DType::F16, positions * heads * groups);
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
  for (Pool& p : pools_) {
    p.blocks.resize(static_cast<size_t>(p.n_blocks));
    p.block_tokens.assign(static_cast<size_t>(p.n_blocks) * shape.block_size, kUnknownToken);
    p.free_list.reserve(static_cast<size_t>(p.n_blocks));
    for (int block = p.n_blocks - 1; block >= 0; --block) p.free_list.push_back(block);
  }
}

size_t KVCache::bytes() const { return storage_->size(); }

size_t KVCache::bytes_per_position(int n_layers, int n_kv_heads, int head_dim, DType dtype) {
  return static_cast<size_t>(n_layers) * 2 * n_kv_heads * kv_head_bytes(dtype, head_dim);  // K and V
}

size_t KVCache::bytes_per_position() const {
  return bytes_per_position(shape_.n_layers, shape_.n_kv_heads, shape_.head_dim, shape_.dtype);
}

size_t KVCache::bytes_per_position(int group) const {
  return bytes_per_position(pool(group).layers, shape_.n_kv_heads, shape_.head_dim, shape_.dtype);
}

int KVCache::group_layers(int group) const { return pool(group).layers; }

const KVCache::Pool& KVCache::pool(int group) const {
  if (group < 0 || group >= group_count()) {
    fail(ErrorKind::InvalidArgument, "KV cache group ", group, " does not exist (", group_count(), " groups)");
  }
  return pools_[static_cast<size_t>(group)];
}

KVCache::Sequence KVCache::empty_sequence() const {
  Sequence s;
  s.live = true;
  s.tables.resize(pools_.size());
  s.released.assign(pools_.size(), 0);
  return s;
}

int KVCache::create_sequence() {
  for (size_t i = 0; i < sequences_.size(); ++i) {
    if (!sequences_[i].live) {
      sequences_[i] = empty_sequence();
      return static_cast<int>(i);
    }
  }
  sequences_.push_back(empty_sequence());
  return static_cast<int>(sequences_.size() - 1);
}

void KVCache::free_sequence(int seq) {
  Sequence& s = sequence(seq);
  for (size_t g = 0; g < pools_.size(); ++g) {
    for (int32_t b : s.tables[g]) {
      if (b != kReleasedBlock) release_block(pools_[g], b);
    }
  }
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

const std::vector<int32_t>& KVCache::block_table(int seq, int group) const {
  pool(group);  // checks the group
  return sequence(seq).tables[static_cast<size_t>(group)];
}

int KVCache::held_blocks(int seq, int group) const {
  const Sequence& s = sequence(seq);
  pool(group);
  const size_t g = static_cast<size_t>(group);
  return static_cast<int>(s.tables[g].size()) - s.released[g];
}

int KVCache::first_kept_block(int group, int64_t next_position) const {
  const int window = pools_[static_cast<size_t>(group)].window;
  if (window == 0) return 0;
  const int64_t first_key = std::max<int64_t>(0, next_position - window + 1);
  return static_cast<int>(first_key / kWindowKeyAlignment * kWindowKeyAlignment / shape_.block_size);
}

int KVCache::blocks_needed(int seq, int n_tokens, int group, int piece) const {
  const Sequence& s = sequence(seq);
  pool(group);
  const size_t g = static_cast<size_t>(group);
  const int64_t bs = shape_.block_size, length = static_cast<int64_t>(s.tokens.size());
  const int64_t table = static_cast<int64_t>(s.tables[g].size());
  const int64_t held = table - s.released[g];
  // In one append: the new blocks, less those released first.
  const int64_t taken = std::max<int64_t>(0, (length + n_tokens + bs - 1) / bs - table);
  const int64_t released = std::max<int64_t>(0, std::min<int64_t>(first_kept_block(group, length), table) - s.released[g]);
  int64_t needed = taken - released;
  if (piece > 0 && piece < n_tokens) {  // at most what the last piece's window spans
    needed = std::min(needed, static_cast<int64_t>(blocks_to_hold(static_cast<int>(length + n_tokens), group, piece)) - held);
  }
  return static_cast<int>(std::max<int64_t>(0, needed));
}

int KVCache::blocks_to_hold(int length, int group, int piece) const {
  const int window = pool(group).window;
  const int64_t bs = shape_.block_size;
  const int64_t all = (static_cast<int64_t>(length) + bs - 1) / bs;
  if (window == 0) return static_cast<int>(all);
  // Keys [first kept, length) of the last append: its first query's window (aligned down),
  // the positions it adds, and the block either end may share.
  const int64_t span = kWindowKeyAlignment - 1 + window - 1 + (piece > 0 ? piece : length);
  return static_cast<int>(std::min(all, (span + bs - 1) / bs + 1));
}

int32_t KVCache::take_block(Pool& p) {
  if (!p.free_list.empty()) {
    const int32_t b = p.free_list.back();
    p.free_list.pop_back();
    p.blocks[b].refs = 1;
    return b;
  }
  if (p.lru.empty()) fail(ErrorKind::Internal, "KV cache: no block to take (capacity was checked)");
  const int32_t b = p.lru.front();  // evict the least recently used cached block
  p.lru.pop_front();
  p.blocks[b].published = false;
  p.index.erase(p.blocks[b].hash);
  prefix_stats_.evictions += 1;
  p.blocks[b].refs = 1;
  return b;
}

void KVCache::release_block(Pool& p, int32_t b) {
  Block& block = p.blocks[b];
  if (--block.refs > 0) return;
  if (block.published) {
    p.lru.push_back(b);
    block.lru_position = std::prev(p.lru.end());
  } else {
    p.free_list.push_back(b);
  }
}

void KVCache::unpublish(Pool& p, int32_t b) {
  Block& block = p.blocks[b];
  if (!block.published) return;
  p.index.erase(block.hash);
  block.published = false;
}

void KVCache::release_behind_windows(int seq) {
  Sequence& s = sequence(seq);
  const int64_t next_position = static_cast<int64_t>(s.tokens.size());
  for (size_t g = 0; g < pools_.size(); ++g) {
    std::vector<int32_t>& table = s.tables[g];
    const int first_kept = std::min(first_kept_block(static_cast<int>(g), next_position), static_cast<int>(table.size()));
    for (int& i = s.released[g]; i < first_kept; ++i) {
      release_block(pools_[g], table[static_cast<size_t>(i)]);
      table[static_cast<size_t>(i)] = kReleasedBlock;
    }
  }
}

void KVCache::append(int seq, std::span<const int32_t> new_tokens) {
  Sequence& s = sequence(seq);
  release_behind_windows(seq);
  const int n = static_cast<int>(new_tokens.size());
  for (int g = 0; g < group_count(); ++g) {
    const int needed = blocks_needed(seq, n, g);
    if (needed > free_blocks(g)) {
      const Pool& p = pool(g);
      fail(ErrorKind::CapacityExceeded, "the KV cache is full: ", n, " more positions need ",
           needed, " blocks", p.window > 0 ? " of the sliding-window layers' pool" : "",
           " but only ", free_blocks(g), " of ", p.n_blocks, " are free (or cached and unused); "
           "end other sequences or give the engine a larger kv_cache_tokens");
    }
  }
  const int64_t bs = shape_.block_size;
  const size_t blocks = static_cast<size_t>((static_cast<int64_t>(s.tokens.size()) + n + bs - 1) / bs);
  for (size_t g = 0; g < pools_.size(); ++g) {
    while (s.tables[g].size() < blocks) s.tables[g].push_back(take_block(pools_[g]));
  }
  s.tokens.insert(s.tokens.end(), new_tokens.begin(), new_tokens.end());
}

void KVCache::grow(int seq, int n_new) {
  if (n_new < 0) fail(ErrorKind::InvalidArgument, "cannot grow a sequence by ", n_new);
  const std::vector<int32_t> unknown(static_cast<size_t>(n_new), kUnknownToken);
  append(seq, unknown);
}

int KVCache::truncated_length(int seq, int new_length) const {
  const Sequence& s = sequence(seq);
  if (new_length < 0 || new_length > static_cast<int>(s.tokens.size())) {
    fail(ErrorKind::InvalidArgument, "cannot truncate sequence ", seq, " of length ",
         s.tokens.size(), " to ", new_length);
  }
  const int bs = shape_.block_size;
  if (new_length % bs != 0) {
    // The block the cut falls in will be written again from the cut on: when another sequence
    // shares it (in any group), keep it out of this sequence altogether.
    for (size_t g = 0; g < pools_.size(); ++g) {
      const int32_t b = s.tables[g][static_cast<size_t>(new_length / bs)];
      if (b != kReleasedBlock && pools_[g].blocks[b].refs > 1) {
        new_length -= new_length % bs;
        break;
      }
    }
  }
  for (int g = 0; g < group_count(); ++g) {
    // The window of a query at new_length reaches back into released blocks: all must be
    // computed again.
    if (first_kept_block(g, new_length) < s.released[static_cast<size_t>(g)]) return 0;
  }
  return new_length;
}

int KVCache::truncate(int seq, int new_length) {
  new_length = truncated_length(seq, new_length);
  Sequence& s = sequence(seq);
  const int bs = shape_.block_size;
  const size_t keep_blocks = static_cast<size_t>((new_length + bs - 1) / bs);
  for (size_t g = 0; g < pools_.size(); ++g) {
    std::vector<int32_t>& table = s.tables[g];
    // Ours alone (truncated_length saw to that): it no longer holds what its hash says.
    if (new_length % bs != 0 && table[keep_blocks - 1] != kReleasedBlock) unpublish(pools_[g], table[keep_blocks - 1]);
    while (table.size() > keep_blocks) {
      if (table.back() != kReleasedBlock) release_block(pools_[g], table.back());
      table.pop_back();
    }
    s.released[g] = std::min(s.released[g], static_cast<int>(table.size()));
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

bool KVCache::block_holds(const Pool& p, int32_t b, std::span<const int32_t> block_tokens) const {
  const int32_t* stored = p.block_tokens.data() + static_cast<size_t>(b) * shape_.block_size;
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
    for (size_t g = 0; g < pools_.size(); ++g) {
      Pool& p = pools_[g];
      const int32_t b = s.tables[g][i];
      if (b == kReleasedBlock || p.blocks[b].published || p.index.count(h)) continue;  // already cached (maybe elsewhere)
      p.blocks[b].published = true;
      p.blocks[b].hash = h;
      std::copy(block_tokens.begin(), block_tokens.end(), p.block_tokens.begin() + static_cast<ptrdiff_t>(b) * bs);
      p.index.emplace(h, b);
    }
  }
}

KVCache::CachedPrefix KVCache::find_cached_prefix(std::span<const int32_t> prompt) const {
  CachedPrefix found;
  found.tables.resize(pools_.size());
  if (prompt.empty()) return found;
  const size_t bs = static_cast<size_t>(shape_.block_size);
  const size_t lookups = (prompt.size() - 1) / bs;  // whole blocks, one token left over
  // [group][i]: the group's cached block holding prompt block i, or kReleasedBlock.
  std::vector<std::vector<int32_t>> cached(pools_.size(), std::vector<int32_t>(lookups, kReleasedBlock));
  size_t limit = lookups;  // a global group needs every block
  uint64_t h = 0;
  for (size_t i = 0; i < lookups; ++i) {
    const std::span<const int32_t> block_tokens = prompt.subspan(i * bs, bs);
    h = chain_hash(h, block_tokens);
    found.hashes.push_back(h);
    for (size_t g = 0; g < pools_.size(); ++g) {
      const Pool& p = pools_[g];
      const auto it = p.index.find(h);
      if (it != p.index.end() && block_holds(p, it->second, block_tokens)) cached[g][i] = it->second;
      if (p.window == 0 && cached[g][i] == kReleasedBlock) limit = std::min(limit, i);
    }
  }
  // The longest prefix each sliding group holds the window of (its blocks before may be gone).
  size_t blocks = limit;
  for (; blocks > 0; --blocks) {
    bool every_window = true;
    for (int g = 0; g < group_count() && every_window; ++g) {
      const size_t first = static_cast<size_t>(first_kept_block(g, static_cast<int64_t>(blocks * bs)));
      for (size_t i = first; i < blocks && every_window; ++i) every_window = cached[static_cast<size_t>(g)][i] != kReleasedBlock;
    }
    if (every_window) break;
  }
  found.blocks = blocks;
  found.hashes.resize(blocks);
  for (int g = 0; g < group_count(); ++g) {
    const size_t first = static_cast<size_t>(first_kept_block(g, static_cast<int64_t>(blocks * bs)));
    auto& table = found.tables[static_cast<size_t>(g)];
    table.assign(cached[static_cast<size_t>(g)].begin(), cached[static_cast<size_t>(g)].begin() + static_cast<ptrdiff_t>(blocks));
    std::fill(table.begin(), table.begin() + static_cast<ptrdiff_t>(std::min(first, blocks)), kReleasedBlock);
  }
  return found;
}

int KVCache::cached_prefix_length(std::span<const int32_t> prompt) const {
  return static_cast<int>(find_cached_prefix(prompt).blocks) * shape_.block_size;
}

int KVCache::map_cached_prefix(int seq, std::span<const int32_t> prompt) {
  Sequence& s = sequence(seq);
  if (!s.tokens.empty()) fail(ErrorKind::Internal, "map_cached_prefix needs an empty sequence");
  if (prompt.empty()) return 0;
  const size_t bs = static_cast<size_t>(shape_.block_size);
  const size_t lookups = (prompt.size() - 1) / bs;
  const CachedPrefix found = find_cached_prefix(prompt);
  for (size_t g = 0; g < pools_.size(); ++g) {
    Pool& p = pools_[g];
    s.tables[g] = found.tables[g];
    s.released[g] = 0;
    for (int32_t b : s.tables[g]) {
      if (b == kReleasedBlock) {
        s.released[g] += 1;
      } else if (p.blocks[b].refs++ == 0) {
        p.lru.erase(p.blocks[b].lru_position);
      }
    }
  }
  s.hashes = found.hashes;
  s.tokens.assign(prompt.begin(), prompt.begin() + static_cast<ptrdiff_t>(found.blocks * bs));
  prefix_stats_.hit_blocks += static_cast<int64_t>(found.blocks);
  prefix_stats_.miss_blocks += static_cast<int64_t>(lookups - found.blocks);
  return static_cast<int>(found.blocks * bs);
}

}  // namespace opencamp
