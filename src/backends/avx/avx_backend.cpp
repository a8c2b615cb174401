// The avx backend: the cpu backend's ops on SIMD kernels chosen at run time (AVX2+FMA,
// AVX-512, AVX-512 BF16), with matmul weights packed into panels at load time and q/k/v and
// gate/up fused into single matrices. Inputs the kernels do not take (unusual strides, weights
// in the row-major layout) go to the cpu reference implementation, so every op always works.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backends/avx/cpu_features.h"
#include "backends/avx/kernels.h"
#include "backends/avx/quant_tiles.h"
#include "backends/cpu/cpu_backend.h"
#include "core/builtin.h"
#include "opencamp/error.h"

namespace opencamp {
namespace {

using avx::KernelTable;
using avx::kPanel;

// Below this many multiply-adds (or elements) an op runs on the calling thread: waking the
// pool would cost more than the work.
constexpr int64_t kParallelMacs = 1 << 15;
constexpr int64_t kParallelElements = 1 << 14;
// Split-K attention only when each part still reads this many keys.
constexpr int64_t kMinKeysPerSplit = 256;
// From this many tokens a block-format matmul dequantises weight panels once and reuses them
// across the tokens; below, it streams the blocks once per 4 tokens.
constexpr int64_t kQuantPrefillTokens = 16;

int64_t panel_count(int64_t n) { return (n + kPanel - 1) / kPanel; }
int64_t bf16_pairs(int64_t k) { return (k + 1) / 2; }

// Elements per packed panel: f32 [K][16]; bf16 [ceil(K/2)][16][2].
int64_t panel_stride(const Tensor& weight) {
  return weight.dtype == DType::F32 ? weight.shape[1] * kPanel : bf16_pairs(weight.shape[1]) * 2 * kPanel;
}

bool unit_inner(const Tensor& t) { return t.dtype == DType::F32 && t.stride[t.ndim - 1] == 1; }

class AvxBackend final : public CpuBackend {
 public:
  AvxBackend(ThreadPool* pool, const KernelTable* kernels, std::string name)
      : CpuBackend(pool), kernels_(kernels), name_(std::move(name)) {}

  std::string name() const override { return name_; }
  bool fuses_projections() const override { return true; }
  bool transposed_keys() const override { return true; }
  DType matmul_activation_dtype(DType weight_dtype) const override {
    if (const avx::QuantKernels* quant = quant_kernels(weight_dtype)) {
      return quant->matvec_bf16 || quant->matmul_bf16 ? DType::BF16 : DType::F32;
    }
    return weight_dtype == DType::BF16 && kernels_->matmul_bf16_dot ? DType::BF16 : DType::F32;
  }

  // The kernels of a block format, or nullptr.
  const avx::QuantKernels* quant_kernels(DType dtype) const {
    const int format = static_cast<int>(dtype) - static_cast<int>(DType::Q8_0);
    return format >= 0 && format < avx::kQuantFormats ? &kernels_->quant[format] : nullptr;
  }

  Tensor prepare_weight(const Tensor& source, DType dtype, WeightUse use,
                        std::vector<std::shared_ptr<Buffer>>& owned) override {
    if (use == WeightUse::Table || source.ndim != 2) return Backend::prepare_weight(source, dtype, use, owned);
    if (is_block_format(dtype)) {
      // In 16-row tiles where this instruction set's kernels read them so; else the file's
      // row-major blocks, which the other quantised kernels read in place.
      const avx::QuantKernels* quant = quant_kernels(dtype);
      if (quant && quant->tiled) return tile(source, dtype, owned);
      return Backend::prepare_weight(source, dtype, use, owned);
    }
    return pack(source, dtype, owned);
  }

  // Rows of a packed f32/bf16 matrix are gathered from their panel (one lane of each word), and
  // rows of a tiled block-format matrix from their tile.
  bool embeds_from(const Tensor& matrix) const override {
    if (matrix.layout == Layout::Packed) {
      return matrix.dtype == DType::F32 || matrix.dtype == DType::BF16 || avx::has_tile_layout(matrix.dtype);
    }
    return CpuBackend::embeds_from(matrix);
  }

  void embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) override {
    if (table.layout == Layout::Packed && is_block_format(table.dtype)) return tiled_embedding(out, table, ids);
    if (table.layout == Layout::Packed) return packed_embedding(out, table, ids);
    if (!unit_inner(out) || table.layout != Layout::Strided || table.stride[1] != 1 ||
        (table.dtype != DType::F32 && table.dtype != DType::BF16) || out.ndim != 2 || out.shape[1] != table.shape[1] ||
        out.shape[0] != static_cast<int64_t>(ids.size())) {
      return CpuBackend::embedding(out, table, ids);
    }
    for (int32_t id : ids) {
      if (id < 0 || id >= table.shape[0]) return CpuBackend::embedding(out, table, ids);  // its error
    }
    const int64_t dim = table.shape[1];
    rows(static_cast<int64_t>(ids.size()), dim, [&](int64_t t) {
      float* row = out.ptr<float>() + t * out.stride[0];
      if (table.dtype == DType::F32) {
        std::memcpy(row, table.ptr<float>() + ids[t] * table.stride[0], dim * sizeof(float));
      } else {
        kernels_->bf16_to_f32_row(row, table.ptr<uint16_t>() + ids[t] * table.stride[0], dim);
      }
    });
  }

  void rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    if (!unit_inner(out) || !unit_inner(x) || out.ndim != x.ndim || out.shape != x.shape ||
        (x.ndim != 2 && x.ndim != 3) || weight.stride[0] != 1 || weight.dtype != DType::F32 ||
        weight.shape[0] != x.shape[x.ndim - 1]) {
      return CpuBackend::rmsnorm(out, x, weight, eps);
    }
    const int64_t dim = x.shape[x.ndim - 1];
    const int64_t heads = x.ndim == 3 ? x.shape[1] : 1;
    const int64_t x_head = x.ndim == 3 ? x.stride[1] : 0, out_head = x.ndim == 3 ? out.stride[1] : 0;
    rows(x.shape[0] * heads, dim, [&](int64_t item) {
      const int64_t r = item / heads, h = item % heads;
      const float* in = x.ptr<float>() + r * x.stride[0] + h * x_head;
      const float mean = kernels_->sum_squares(in, dim) / static_cast<float>(dim);
      kernels_->scale_mul(out.ptr<float>() + r * out.stride[0] + h * out_head, in,
                          1.0f / std::sqrt(mean + eps), weight.ptr<float>(), dim);
    });
  }

  void matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) override {
    if (is_block_format(weight.dtype)) {
      if (quant_matmul(out, x, weight, bias)) return;
      if (weight.layout == Layout::Packed) {
        fail(ErrorKind::InvalidArgument, name_, " backend, op matmul: out [T, N] and x [T, K] must be "
             "f32 with contiguous rows matching the tiled weight [N, K] ", shape_string(weight));
      }
      return CpuBackend::matmul(out, x, weight, bias);
    }
    if (weight.layout != Layout::Packed) return CpuBackend::matmul(out, x, weight, bias);
    if (out.ndim != 2 || x.ndim != 2 || !unit_inner(out) || !unit_inner(x) ||
        x.shape[1] != weight.shape[1] || out.shape[0] != x.shape[0] ||
        out.shape[1] != weight.shape[0] ||
        (bias && (bias->ndim != 1 || bias->shape[0] != weight.shape[0] || bias->stride[0] != 1 ||
                  bias->dtype != DType::F32))) {
      fail(ErrorKind::InvalidArgument, name_, " backend, op matmul: out [T, N] and x [T, K] must be "
           "f32 with contiguous rows matching the packed weight [N, K] ", shape_string(weight));
    }
    avx::MatmulArgs args;
    args.x = x.data;
    args.x_stride = x.stride[0];
    args.tokens = x.shape[0];
    args.k = x.shape[1];
    args.n = weight.shape[0];
    args.panels = weight.data;
    args.panel_stride = panel_stride(weight);
    args.out = out.ptr<float>();
    args.out_stride = out.stride[0];
    args.bias = bias ? bias->ptr<float>() : nullptr;
    auto kernel = weight.dtype == DType::F32 ? kernels_->matmul_f32 : kernels_->matmul_bf16;
    if (matmul_activation_dtype(weight.dtype) == DType::BF16) {
      // Round the activations to bf16 pairs once; the dot-product kernel reads those.
      const int64_t pairs = bf16_pairs(args.k);
      bf16_activations_.resize(static_cast<size_t>(args.tokens * pairs * 2));
      rows(args.tokens, args.k, [&](int64_t t) {
        kernels_->to_bf16_row(bf16_activations_.data() + t * pairs * 2, x.ptr<float>() + t * x.stride[0], args.k);
      });
      args.x = bf16_activations_.data();
      args.x_stride = pairs;
      kernel = kernels_->matmul_bf16_dot;
    }
    const int64_t panels = panel_count(args.n);
    if (args.tokens * args.n * args.k < kParallelMacs || pool().size() == 1) {
      kernel(args, 0, panels);
      return;
    }
    // Long contiguous panel ranges: each chunk streams its own part of the weights.
    pool().parallel_for(panels, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  }

  // A block-format weight [N, K], in 16-row tiles (prepare_weight) or in the file's row-major
  // blocks: decode (few tokens) streams the weights once per 4 tokens, dequantising in
  // registers; prefill dequantises 16 rows at a time into a panel and runs every token through
  // the matmul tiles. False: not a shape the kernels take (the cpu oracle runs a row-major
  // weight, or says what is wrong).
  bool quant_matmul(const Tensor& out, const Tensor& x, const Tensor& weight, const Tensor* bias) {
    const avx::QuantKernels* kernels = quant_kernels(weight.dtype);
    const bool tiled = weight.layout == Layout::Packed;
    if (!kernels || tiled != kernels->tiled || weight.ndim != 2 || weight.stride[1] != 1 ||
        weight.stride[0] != weight.shape[1] ||
        out.ndim != 2 || x.ndim != 2 || !unit_inner(out) || !unit_inner(x) ||
        x.shape[1] != weight.shape[1] || out.shape[0] != x.shape[0] || out.shape[1] != weight.shape[0] ||
        weight.shape[1] % dtype_traits(weight.dtype).block_elements != 0 ||
        (bias && (bias->ndim != 1 || bias->shape[0] != weight.shape[0] || bias->stride[0] != 1 ||
                  bias->dtype != DType::F32))) {
      return false;
    }
    avx::QuantMatmulArgs args;
    args.x = x.data;
    args.x_stride = x.stride[0];
    args.tokens = x.shape[0];
    args.k = x.shape[1];
    args.n = weight.shape[0];
    args.weight = weight.data;
    args.row_bytes = static_cast<int64_t>(dtype_bytes(weight.dtype, args.k));
    args.out = out.ptr<float>();
    args.out_stride = out.stride[0];
    args.bias = bias ? bias->ptr<float>() : nullptr;
    const bool single = args.tokens * args.n * args.k < kParallelMacs || pool().size() == 1;
    const bool decode = args.tokens < kQuantPrefillTokens;
    const auto kernel = decode ? kernels->matvec : kernels->matmul;
    if (decode ? kernels->matvec_bf16 : kernels->matmul_bf16) {
      // Rounded to bf16 once (K is a multiple of 32: no padding), as the BF16 path does.
      bf16_activations_.resize(static_cast<size_t>(args.tokens * args.k));
      rows(args.tokens, args.k, [&](int64_t t) {
        kernels_->to_bf16_row(bf16_activations_.data() + t * args.k, x.ptr<float>() + t * x.stride[0], args.k);
      });
      args.x = bf16_activations_.data();
      args.x_stride = args.k;
    }
    const int64_t items = decode && !tiled ? args.n : panel_count(args.n);  // rows, or 16-row panels / tiles
    if (single) {
      kernel(args, 0, items);
    } else {
      pool().parallel_for(items, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
    }
    return true;
  }

  void rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) override {
    if (x.ndim != 3 || !unit_inner(x) || inv_freq.stride[0] != 1 || inv_freq.dtype != DType::F32 ||
        inv_freq.shape[0] * 2 != x.shape[2] || static_cast<int64_t>(positions.size()) != x.shape[0]) {
      return CpuBackend::rope(x, positions, inv_freq);
    }
    const int64_t half = x.shape[2] / 2;
    const RopeTable& table = rope_table(inv_freq, positions);
    rows(x.shape[0], x.shape[1] * x.shape[2], [&](int64_t t) {
      const int64_t p = positions[t];
      kernels_->rope(x.ptr<float>() + t * x.stride[0], x.shape[1], x.stride[1], half,
                     table.cos.data() + p * half, table.sin.data() + p * half);
    });
  }

  void kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
                std::span<const KVSlot> slots) override {
    const Tensor& pool_keys = cache.keys;
    const int64_t heads = pool_keys.shape[2], hd = pool_keys.shape[3];
    const bool fast = keys.ndim == 3 && values.ndim == 3 && unit_inner(keys) && unit_inner(values) &&
                      keys.shape[1] == heads && keys.shape[2] == hd && values.shape == keys.shape &&
                      keys.shape[0] == static_cast<int64_t>(slots.size()) &&
                      cache.values.is_contiguous() && pool_keys.stride[3] > 0;
    if (!fast) return CpuBackend::kv_store(cache, keys, values, slots);
    const int64_t block_size = pool_keys.shape[1];
    if (cache.dtype != DType::F32) {  // rounded or quantised by the one definition of each type
      if (!(cache.keys.dtype == (cache.dtype == DType::Q8_0 ? DType::I8 : cache.dtype))) {
        return CpuBackend::kv_store(cache, keys, values, slots);  // its error
      }
      rows(static_cast<int64_t>(slots.size()), 2 * heads * hd, [&](int64_t t) {
        const int64_t block = slots[t].block_table[slots[t].position / block_size];
        const int64_t slot = slots[t].position % block_size;
        for (int64_t h = 0; h < heads; ++h) {
          kv_store_row(cache, KVPart::Keys, block, slot, h, keys.ptr<float>() + t * keys.stride[0] + h * keys.stride[1]);
          kv_store_row(cache, KVPart::Values, block, slot, h,
                       values.ptr<float>() + t * values.stride[0] + h * values.stride[1]);
        }
      });
      return;
    }
    for (size_t t = 0; t < slots.size(); ++t) {
      const int64_t block = slots[t].block_table[slots[t].position / block_size];
      const int64_t slot = slots[t].position % block_size;
      for (int64_t h = 0; h < heads; ++h) {
        const float* k = keys.ptr<float>() + t * keys.stride[0] + h * keys.stride[1];
        float* key_out = pool_keys.ptr<float>() + block * pool_keys.stride[0] + slot * pool_keys.stride[1] +
                         h * pool_keys.stride[2];
        for (int64_t d = 0; d < hd; ++d) key_out[d * pool_keys.stride[3]] = k[d];
        std::memcpy(static_cast<float*>(cache.values.at({block, slot, h})),
                    values.ptr<float>() + t * values.stride[0] + h * values.stride[1], hd * sizeof(float));
      }
    }
  }

  // The views the kernels take: a KV type with its element type, values [.., position, head,
  // dim] contiguous, q8_0 value scales with contiguous groups.
  static bool kv_view_for_kernels(const KVLayerView& cache) {
    if (!is_kv_dtype(cache.dtype) || cache.keys.ndim != 4 || cache.values.shape != cache.keys.shape) return false;
    const DType element = cache.dtype == DType::Q8_0 ? DType::I8 : cache.dtype;
    if (cache.keys.dtype != element || cache.values.dtype != element) return false;
    if (cache.dtype != DType::Q8_0) return true;
    const Tensor& ks = cache.key_scales;
    const Tensor& vs = cache.value_scales;
    return ks.dtype == DType::F16 && vs.dtype == DType::F16 && ks.ndim == 4 && vs.is_contiguous() &&
           vs.shape == ks.shape && ks.shape[3] * kKVQuantGroup == cache.keys.shape[3] &&
           ks.shape[0] == cache.keys.shape[0] && ks.shape[1] == cache.keys.shape[1] &&
           ks.shape[2] == cache.keys.shape[2];
  }

  void attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
                 std::span<const KVSlot> slots, float scale, int32_t window) override {
    const int64_t T = queries.shape[0], Hq = queries.shape[1], hd = queries.shape[2];
    const int64_t Hkv = cache.keys.shape[2];
    if (queries.ndim != 3 || out.ndim != 3 || !unit_inner(queries) || !unit_inner(out) ||
        out.shape != queries.shape || hd > avx::kMaxHeadDim || hd != cache.keys.shape[3] ||
        Hq % Hkv != 0 || T != static_cast<int64_t>(slots.size()) || !cache.values.is_contiguous() ||
        window < 0 || !kv_view_for_kernels(cache)) {
      return CpuBackend::attention(out, queries, cache, slots, scale, window);
    }
    // The first key a token sees, rounded down to the 16-key chunks split-K works in.
    auto first_key = [&](int64_t position) {
      return window > 0 ? std::max<int64_t>(0, position - window + 1) / 16 * 16 : int64_t{0};
    };
    // Groups of query rows (token, head) that share a sequence and a KV head, lanes at a time:
    // each group reads its keys and values once.
    const int64_t group = Hq / Hkv, lanes = kernels_->lanes;
    query_rows_.clear();
    output_rows_.clear();
    row_positions_.clear();
    groups_.clear();
    for (int64_t kv_head = 0; kv_head < Hkv; ++kv_head) {
      for (int64_t t = 0; t < T;) {
        int64_t run_end = t + 1;
        while (run_end < T && slots[run_end].block_table == slots[t].block_table) ++run_end;
        for (int64_t h0 = kv_head * group; h0 < (kv_head + 1) * group; h0 += lanes) {
          const int64_t h1 = std::min(h0 + lanes, (kv_head + 1) * group);
          // Rows ordered token by token within the run, so a group spans few positions.
          AttentionGroup current{query_rows_.size(), 0, kv_head, slots[t].block_table, 0, 0, 1 << 30, -1};
          int64_t last_key = 0;  // of the group's rows: cost = last_key + 1 - key_begin
          auto close_group = [&] {
            current.cost = last_key + 1 - current.key_begin;
            groups_.push_back(current);
          };
          for (int64_t tt = t; tt < run_end; ++tt) {
            for (int64_t h = h0; h < h1; ++h) {
              if (current.rows == lanes) {
                close_group();
                current = {query_rows_.size(), 0, kv_head, slots[t].block_table, 0, 0, 1 << 30, -1};
              }
              const int64_t row_first = first_key(slots[tt].position);
              current.key_begin = current.rows == 0 ? row_first : std::min(current.key_begin, row_first);
              query_rows_.push_back(static_cast<const float*>(queries.at({tt, h})));
              output_rows_.push_back(static_cast<float*>(out.at({tt, h})));
              row_positions_.push_back(slots[tt].position);
              current.rows += 1;
              last_key = current.rows == 1 ? slots[tt].position : std::max<int64_t>(last_key, slots[tt].position);
            }
          }
          if (current.rows > 0) close_group();
        }
        t = run_end;
      }
    }
    const int64_t block_size = cache.keys.shape[1];
    auto run_group = [&](const AttentionGroup& g) {
      avx::AttentionArgs args;
      args.rows = static_cast<int>(g.rows);
      args.queries = query_rows_.data() + g.first_row;
      args.outputs = output_rows_.data() + g.first_row;
      args.positions = row_positions_.data() + g.first_row;
      args.block_table = g.block_table;
      const Tensor& k = cache.keys;
      args.kv_type = cache.dtype == DType::BF16  ? avx::kKVBF16
                     : cache.dtype == DType::F16 ? avx::kKVF16
                     : cache.dtype == DType::Q8_0 ? avx::kKVQ8_0
                                                  : avx::kKVF32;
      args.keys = k.data;
      args.key_block_stride = k.stride[0];
      args.key_position_stride = k.stride[1];
      args.key_head_offset = g.kv_head * k.stride[2];
      args.key_dim_stride = k.stride[3];
      args.values = cache.values.data;
      if (cache.dtype == DType::Q8_0) {
        const Tensor& ks = cache.key_scales;
        args.key_scales = ks.ptr<uint16_t>();
        args.key_scale_block_stride = ks.stride[0];
        args.key_scale_position_stride = ks.stride[1];
        args.key_scale_head_offset = g.kv_head * ks.stride[2];
        args.key_scale_group_stride = ks.stride[3];
        const Tensor& vs = cache.value_scales;
        args.value_scales = vs.ptr<uint16_t>();
        args.value_scale_block_stride = vs.stride[0];
        args.value_scale_position_stride = vs.stride[1];
        args.value_scale_head_offset = g.kv_head * vs.stride[2];
      }
      args.value_block_stride = block_size * Hkv * hd;
      args.value_position_stride = Hkv * hd;
      args.value_head_offset = g.kv_head * hd;
      args.head_dim = static_cast<int>(hd);
      args.block_size = static_cast<int>(block_size);
      args.scale = scale;
      args.window = window;
      args.key_begin = static_cast<int>(g.key_begin);
      args.key_end = static_cast<int>(std::min<int64_t>(g.key_end, 1 << 30));
      if (g.partial >= 0) {
        const int64_t lanes_ = kernels_->lanes;
        args.partial_out = partial_out_.data() + g.partial * lanes_ * hd;
        args.partial_max = partial_max_.data() + g.partial * lanes_;
        args.partial_sum = partial_sum_.data() + g.partial * lanes_;
      }
      kernels_->attention(args);
    };
    int64_t total_cost = 0, longest = 0;
    for (const auto& g : groups_) {
      total_cost += g.cost * g.rows * hd;
      longest = std::max(longest, g.cost);
    }
    const int threads = pool().size();
    if (total_cost < kParallelMacs || threads == 1) {
      for (const auto& g : groups_) run_group(g);
      return;
    }
    // Few groups over long contexts (decoding a long chat): split each group's keys so every
    // thread has work, then merge the partial softmaxes (flash-decoding).
    const int64_t wanted_items = 4 * static_cast<int64_t>(threads);
    const int64_t splits = std::min<int64_t>((wanted_items + static_cast<int64_t>(groups_.size()) - 1) /
                                                 static_cast<int64_t>(groups_.size()),
                                             longest / kMinKeysPerSplit);
    if (splits >= 2) {
      attention_split_k(splits, longest, hd, run_group);
      return;
    }
    // Longest groups first; the pool hands them out one at a time, so threads finish together.
    std::stable_sort(groups_.begin(), groups_.end(),
                     [](const AttentionGroup& a, const AttentionGroup& b) { return a.cost > b.cost; });
    pool().run(static_cast<int64_t>(groups_.size()), [&](int64_t i, int64_t) { run_group(groups_[i]); });
  }

  // Each group's keys in `splits` ranges of whole 16-key chunks; item (group, split) writes its
  // unnormalised partial result, then each row merges its splits: out = sum_s o_s e^(m_s - M) /
  // sum_s l_s e^(m_s - M), M = max_s m_s.
  template <class RunGroup>
  void attention_split_k(int64_t splits, int64_t longest, int64_t hd, const RunGroup& run_group) {
    const int64_t lanes = kernels_->lanes;
    const int64_t span = (longest + splits - 1) / splits;
    const int64_t keys_per_split = (span + 15) / 16 * 16;
    const int64_t items = static_cast<int64_t>(groups_.size()) * splits;
    partial_out_.resize(static_cast<size_t>(items * lanes * hd));
    partial_max_.resize(static_cast<size_t>(items * lanes));
    partial_sum_.resize(static_cast<size_t>(items * lanes));
    pool().run(items, [&](int64_t item, int64_t) {
      const AttentionGroup& g = groups_[static_cast<size_t>(item / splits)];
      const int64_t split = item % splits;
      AttentionGroup part = g;
      part.key_begin = g.key_begin + split * keys_per_split;
      part.key_end = g.key_begin + (split + 1) * keys_per_split;
      part.partial = item;
      run_group(part);
    });
    pool().parallel_for(static_cast<int64_t>(groups_.size()), [&](int64_t begin, int64_t end) {
      for (int64_t gi = begin; gi < end; ++gi) {
        const AttentionGroup& g = groups_[static_cast<size_t>(gi)];
        for (int64_t r = 0; r < g.rows; ++r) {
          float highest = -INFINITY;
          for (int64_t s = 0; s < splits; ++s) {
            highest = std::max(highest, partial_max_[static_cast<size_t>((gi * splits + s) * lanes + r)]);
          }
          float total = 0.0f;
          float* result = output_rows_[g.first_row + static_cast<size_t>(r)];
          std::fill(result, result + hd, 0.0f);
          for (int64_t s = 0; s < splits; ++s) {
            const int64_t item = gi * splits + s;
            const float weight = std::exp(partial_max_[static_cast<size_t>(item * lanes + r)] - highest);
            if (weight == 0.0f) continue;  // a split with no key this row may see
            total += partial_sum_[static_cast<size_t>(item * lanes + r)] * weight;
            const float* o = partial_out_.data() + (item * lanes + r) * hd;
            for (int64_t d = 0; d < hd; ++d) result[d] += o[d] * weight;
          }
          for (int64_t d = 0; d < hd; ++d) result[d] /= total;
        }
      }
    });
  }

  void silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override {
    if (out.ndim != 2 || !unit_inner(out) || !unit_inner(gate) || !unit_inner(up) ||
        out.shape != gate.shape || gate.shape != up.shape) {
      return CpuBackend::silu_mul(out, gate, up);
    }
    rows(out.shape[0], out.shape[1], [&](int64_t t) {
      kernels_->silu_mul(out.ptr<float>() + t * out.stride[0], gate.ptr<float>() + t * gate.stride[0],
                         up.ptr<float>() + t * up.stride[0], out.shape[1]);
    });
  }

  void gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) override {
    if (out.ndim != 2 || !unit_inner(out) || !unit_inner(gate) || !unit_inner(up) ||
        out.shape != gate.shape || gate.shape != up.shape) {
      return CpuBackend::gelu_tanh_mul(out, gate, up);
    }
    rows(out.shape[0], out.shape[1], [&](int64_t t) {
      kernels_->gelu_tanh_mul(out.ptr<float>() + t * out.stride[0], gate.ptr<float>() + t * gate.stride[0],
                              up.ptr<float>() + t * up.stride[0], out.shape[1]);
    });
  }

  void add(const Tensor& out, const Tensor& a, const Tensor& b) override {
    if (out.ndim != 2 || !unit_inner(out) || !unit_inner(a) || !unit_inner(b) ||
        out.shape != a.shape || a.shape != b.shape) {
      return CpuBackend::add(out, a, b);
    }
    rows(out.shape[0], out.shape[1], [&](int64_t t) {
      kernels_->add(out.ptr<float>() + t * out.stride[0], a.ptr<float>() + t * a.stride[0],
                    b.ptr<float>() + t * b.stride[0], out.shape[1]);
    });
  }

 private:
  struct AttentionGroup {
    size_t first_row;
    int64_t rows;
    int64_t kv_head;
    const int32_t* block_table;
    int64_t cost;                  // keys the group reads, from key_begin on
    int64_t key_begin = 0;         // the first key any row sees (a multiple of 16); split-K: this part's
    int64_t key_end = 1 << 30;
    int64_t partial = -1;          // split-K: index of this part's partial results, or -1
  };

  struct RopeTable {
    std::vector<float> inv_freq;  // [half]: what the table was computed for
    std::vector<float> cos, sin;  // [positions][half]
    int64_t positions = 0;
  };

  // body(row) for rows [0, n) of `width` elements each, on the pool when there is enough work.
  template <class Body>
  void rows(int64_t n, int64_t width, const Body& body) {
    if (n * width < kParallelElements || n == 1 || pool().size() == 1) {
      for (int64_t r = 0; r < n; ++r) body(r);
      return;
    }
    pool().parallel_for(n, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r);
    });
  }

  // cos / sin of every position so far, computed once per position exactly as the cpu backend
  // computes them (f32 angle, then std::cos / std::sin).
  const RopeTable& rope_table(const Tensor& inv_freq, std::span<const int32_t> positions) {
    // Found by the frequencies themselves (a few dozen floats), not by address: memory of a
    // freed model can hold another model's frequencies later.
    const float* freq = inv_freq.ptr<float>();
    auto it = std::find_if(rope_tables_.begin(), rope_tables_.end(), [&](const RopeTable& t) {
      return t.inv_freq.size() == static_cast<size_t>(inv_freq.shape[0]) &&
             std::equal(t.inv_freq.begin(), t.inv_freq.end(), freq);
    });
    if (it == rope_tables_.end()) {
      if (rope_tables_.size() >= 4) rope_tables_.erase(rope_tables_.begin());
      rope_tables_.push_back(RopeTable{std::vector<float>(freq, freq + inv_freq.shape[0]), {}, {}, 0});
      it = std::prev(rope_tables_.end());
    }
    RopeTable& table = *it;
    int64_t needed = 0;
    for (int32_t p : positions) {
      if (p < 0) fail(ErrorKind::InvalidArgument, "rope: negative position ", p);
      needed = std::max<int64_t>(needed, p + 1);
    }
    if (needed > table.positions) {
      const int64_t half = inv_freq.shape[0];
      const int64_t grown = std::max<int64_t>(needed, 2 * table.positions);
      table.cos.resize(static_cast<size_t>(grown * half));
      table.sin.resize(static_cast<size_t>(grown * half));
      for (int64_t p = table.positions; p < grown; ++p) {
        for (int64_t i = 0; i < half; ++i) {
          const float angle = static_cast<float>(p) * inv_freq.ptr<float>()[i];
          table.cos[p * half + i] = std::cos(angle);
          table.sin[p * half + i] = std::sin(angle);
        }
      }
      table.positions = grown;
    }
    return table;
  }

  // What packed_embedding and tiled_embedding take: out [T, D] f32 with contiguous rows, a
  // packed or tiled table [V, D], ids in the vocabulary.
  void check_packed_embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) const {
    if (!embeds_from(table) || !unit_inner(out) || out.ndim != 2 || out.shape[1] != table.shape[1] ||
        out.shape[0] != static_cast<int64_t>(ids.size())) {
      fail(ErrorKind::InvalidArgument, name_, " backend, op embedding: out [T, D] f32 with contiguous rows "
           "for a ", is_block_format(table.dtype) ? "tiled " : "packed f32/bf16 ", "table ", shape_string(table));
    }
    for (int32_t id : ids) {
      if (id < 0 || id >= table.shape[0]) {
        fail(ErrorKind::InvalidArgument, "token id ", id, " is outside the vocabulary [0, ", table.shape[0], ")");
      }
    }
  }

  // out[t, :] = row ids[t] of a matrix packed by pack() (f32 [K][16] or bf16 [ceil(K/2)][16][2]
  // panels of 16 rows).
  void packed_embedding(const Tensor& out,    // [T, D] f32
                        const Tensor& table,  // [V, D] packed f32 or bf16
                        std::span<const int32_t> ids) {
    check_packed_embedding(out, table, ids);
    const int64_t dim = table.shape[1], stride = panel_stride(table);
    rows(static_cast<int64_t>(ids.size()), dim, [&](int64_t t) {
      float* row = out.ptr<float>() + t * out.stride[0];
      const int64_t panel = ids[t] / kPanel, lane = ids[t] % kPanel;
      if (table.dtype == DType::F32) {
        const float* values = table.ptr<float>() + panel * stride + lane;
        for (int64_t c = 0; c < dim; ++c) row[c] = values[c * kPanel];
      } else {
        const uint16_t* values = table.ptr<uint16_t>() + panel * stride + lane * 2;
        for (int64_t c = 0; c < dim; ++c) row[c] = bf16_to_f32(values[(c / 2) * 2 * kPanel + c % 2]);
      }
    });
  }

  // out[t, :] = row ids[t] of a matrix tiled by tile(), dequantised as the format defines.
  void tiled_embedding(const Tensor& out,    // [T, D] f32
                       const Tensor& table,  // [V, D] tiled block format
                       std::span<const int32_t> ids) {
    check_packed_embedding(out, table, ids);
    const int64_t dim = table.shape[1];
    const size_t row_bytes = dtype_bytes(table.dtype, dim), tile_bytes = avx::kTileRows * row_bytes;
    rows(static_cast<int64_t>(ids.size()), dim, [&](int64_t t) {
      std::vector<uint8_t> row(row_bytes);
      const uint8_t* tile = static_cast<const uint8_t*>(table.data) + (ids[t] / avx::kTileRows) * tile_bytes;
      avx::untile_row(table.dtype, tile, dim, ids[t] % avx::kTileRows, row.data());
      dtype_traits(table.dtype).to_f32(row.data(), out.ptr<float>() + t * out.stride[0], dim);
    });
  }

  // A block-format matrix [N, K] (converted to `dtype` first where it is not in it) in 16-row
  // tiles (quant_tiles.h), the last tile padded with zero rows.
  Tensor tile(const Tensor& source, DType dtype, std::vector<std::shared_ptr<Buffer>>& owned) {
    if (!source.is_contiguous()) fail(ErrorKind::Internal, "weights must be contiguous");
    const int64_t n = source.shape[0], k = source.shape[1], tiles = panel_count(n);
    if (k % dtype_traits(dtype).block_elements != 0) {
      fail(ErrorKind::InvalidArgument, "a ", dtype_name(dtype), " matrix needs rows that are a multiple of ",
           dtype_traits(dtype).block_elements, " values, not ", k);
    }
    const size_t row_bytes = dtype_bytes(dtype, k), tile_bytes = avx::kTileRows * row_bytes;
    Tensor tiled = source;
    tiled.dtype = dtype;
    tiled.layout = Layout::Packed;
    auto buffer = allocate(static_cast<size_t>(tiles) * tile_bytes);
    owned.push_back(buffer);
    tiled.data = buffer->data();
    const size_t source_row_bytes = dtype_bytes(source.dtype, k);
    pool().parallel_for(tiles, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> converted(source.dtype == dtype ? 0 : tile_bytes);
      for (int64_t t = begin; t < end; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(avx::kTileRows, n - t * avx::kTileRows));
        const uint8_t* first = static_cast<const uint8_t*>(source.data) + t * avx::kTileRows * source_row_bytes;
        if (source.dtype != dtype) {
          convert_dtype(first, source.dtype, converted.data(), dtype, rows * k);
          first = converted.data();
        }
        avx::tile_rows(dtype, first, rows, k, static_cast<uint8_t*>(tiled.data) + t * tile_bytes);
      }
    });
    return tiled;
  }

  Tensor pack(const Tensor& source, DType dtype, std::vector<std::shared_ptr<Buffer>>& owned) {
    if (dtype != DType::F32 && dtype != DType::BF16) {
      fail(ErrorKind::InvalidArgument, name_, " backend holds weights as f32 or bf16, not ", dtype_name(dtype));
    }
    if (!source.is_contiguous()) fail(ErrorKind::Internal, "weights must be contiguous");
    const int64_t n = source.shape[0], k = source.shape[1], panels = panel_count(n);
    Tensor packed = source;
    packed.dtype = dtype;
    packed.layout = Layout::Packed;
    const int64_t stride = panel_stride(packed);
    auto buffer = allocate(static_cast<size_t>(panels * stride) * dtype_size(dtype));
    owned.push_back(buffer);
    packed.data = buffer->data();
    // A panel is a transpose of 32-bit words: f32 [K][16] holds element c of row i at
    // [c][i]; bf16 [ceil(K/2)][16][2] holds the pair of columns (2c, 2c + 1) of row i as one word
    // at [c][i]. Rows are read in place when already in `dtype` (converted once otherwise), and
    // each panel is written front to back, one 64-byte line per word column.
    const int64_t words = dtype == DType::F32 ? k : k / 2;  // whole words in a row
    const bool odd_tail = dtype == DType::BF16 && k % 2 != 0;
    const size_t source_row_bytes = dtype_bytes(source.dtype, k);
    pool().parallel_for(panels, [&](int64_t begin, int64_t end) {
      std::vector<unsigned char> converted(source.dtype == dtype ? 0 : kPanel * dtype_bytes(dtype, k + 1));
      const unsigned char* rows[kPanel];
      for (int64_t p = begin; p < end; ++p) {
        int64_t present = 0;  // rows of this panel that exist (the last panel pads with zeros)
        for (int64_t i = 0; i < kPanel && p * kPanel + i < n; ++i, ++present) {
          const unsigned char* row = static_cast<const unsigned char*>(source.data) + (p * kPanel + i) * source_row_bytes;
          if (source.dtype != dtype) {
            unsigned char* target = converted.data() + i * dtype_bytes(dtype, k + 1);
            convert_dtype(row, source.dtype, target, dtype, k);
            row = target;
          }
          rows[i] = row;
        }
        uint32_t* panel = reinterpret_cast<uint32_t*>(static_cast<unsigned char*>(packed.data) +
                                                      p * stride * dtype_size(dtype));
        for (int64_t c = 0; c < words; ++c) {
          uint32_t* line = panel + c * kPanel;
          for (int64_t i = 0; i < present; ++i) std::memcpy(&line[i], rows[i] + 4 * c, 4);
          for (int64_t i = present; i < kPanel; ++i) line[i] = 0;
        }
        if (odd_tail) {  // the last column pairs with a zero
          uint32_t* line = panel + words * kPanel;
          for (int64_t i = 0; i < kPanel; ++i) {
            uint16_t last = 0;
            if (i < present) std::memcpy(&last, rows[i] + 2 * (k - 1), 2);
            line[i] = last;  // low half: column k - 1; high half: zero padding
          }
        }
      }
    });
    return packed;
  }

  const KernelTable* kernels_;
  std::string name_;
  std::vector<RopeTable> rope_tables_;  // one per model, usually
  std::vector<uint16_t> bf16_activations_;
  std::vector<const float*> query_rows_;
  std::vector<float*> output_rows_;
  std::vector<int32_t> row_positions_;
  std::vector<AttentionGroup> groups_;
  std::vector<float> partial_out_, partial_max_, partial_sum_;  // split-K attention
};

BackendInfo avx_info(std::string name, int score, std::string description,
                     bool (*usable)(), const KernelTable* (*kernels)()) {
  BackendInfo info;
  info.name = name;
  info.score = score;
  info.description = std::move(description);
  info.usable = usable;
  info.create = [name, kernels](const BackendOptions& options) -> std::unique_ptr<Backend> {
    return std::make_unique<AvxBackend>(options.pool, kernels(), name);
  };
  return info;
}

bool avx2_usable() { return cpu_features().has_avx2_level(); }
bool avx512_usable() { return cpu_features().has_avx512_level(); }
bool avx512_bf16_usable() { return cpu_features().has_avx512_bf16_level(); }
bool amx_bf16_usable() { return cpu_features().has_amx_bf16_level(); }

const KernelTable* best_kernels() {
  if (amx_bf16_usable()) return avx::kernels_amx_bf16();
  if (avx512_bf16_usable()) return avx::kernels_avx512_bf16();
  if (avx512_usable()) return avx::kernels_avx512();
  return avx::kernels_avx2();
}

}  // namespace

std::string avx_isa_in_use() { return avx2_usable() ? best_kernels()->isa : "none"; }

std::vector<BackendInfo> avx_backend_infos() {
  std::vector<BackendInfo> infos;
  // "avx" takes the widest instruction set the CPU has; the others pin one, so tests can run
  // every kernel set the machine supports against the cpu oracle.
  infos.push_back(avx_info("avx", 100,
                           "SIMD kernels for the widest instruction set this CPU has (here: " +
                               avx_isa_in_use() + ")",
                           avx2_usable, best_kernels));
  infos.push_back(avx_info("avx:amx_bf16", 53, "AVX-512 BF16 with AMX tile multiplies for prefills",
                           amx_bf16_usable, avx::kernels_amx_bf16));
  infos.push_back(avx_info("avx:avx512_bf16", 52, "AVX-512 with BF16 and VNNI dot products",
                           avx512_bf16_usable, avx::kernels_avx512_bf16));
  infos.push_back(avx_info("avx:avx512", 51, "AVX-512 (F, BW, VL, DQ)", avx512_usable, avx::kernels_avx512));
  infos.push_back(avx_info("avx:avx2", 50, "AVX2 + FMA + F16C", avx2_usable, avx::kernels_avx2));
  return infos;
}

}  // namespace opencamp
