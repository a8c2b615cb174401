// Loading: checkpoint (HF folder or GGUF file) -> architecture -> memory-mapped weights ->
// tensors prepared on the backend in the precision asked for. Every tensor is checked by name
// and shape against the hyper-parameters before the model is usable.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <numbers>

#include "opencamp/backend.h"
#include "opencamp/error.h"
#include "opencamp/model.h"
#include "opencamp/weights.h"
#include "io/mapped_file.h"
#include "models/checkpoint.h"

namespace opencamp {
namespace {

// The 32-value formats llama.cpp falls back to when a row is not a whole number of a K
// format's 256-value super-blocks (llama_tensor_get_type): Q4_K -> Q5_0, Q5_K -> Q5_1,
// Q6_K -> Q8_0, each at least as precise as the format asked for.
DType row_fallback(DType dtype) {
  switch (dtype) {
    case DType::Q4_K: return DType::Q5_0;
    case DType::Q5_K: return DType::Q5_1;
    case DType::Q6_K: return DType::Q8_0;
    default: return dtype;
  }
}

std::string quantized_dtype_names() {
  std::string names;
  for (int i = 0; i < kDTypeCount; ++i) {
    const DTypeTraits& t = dtype_traits(static_cast<DType>(i));
    if (t.block_elements > 1 && t.from_f32) names += std::string(", ") + t.name;
  }
  return names;
}

// How a requested dtype applies to each matrix the checkpoint has. "auto" keeps the file's
// format (block formats as they are, bf16 as bf16, f32 and f16 as f32); "f32" / "bf16" hold
// everything so (dequantising block formats); a block format ("q8_0", "q4_k", ...) quantises
// every matrix to it, with llama.cpp's 32-value fallback for rows that do not fit a K format
// and the auto rule for rows that fit no block at all.
class Precision {
 public:
  explicit Precision(const std::string& requested) : requested_(requested) {
    if (requested == "auto") return;
    if (requested == "f32" || requested == "float32") {
      fixed_ = DType::F32;
    } else if (requested == "bf16" || requested == "bfloat16") {
      fixed_ = DType::BF16;
    } else if (const std::optional<DType> dtype = dtype_from_name(requested);
               dtype && is_block_format(*dtype) && dtype_traits(*dtype).from_f32) {
      quantize_ = *dtype;
    } else {
      fail(ErrorKind::InvalidArgument, "dtype '", requested, "' is not supported; use auto, f32, bf16",
           quantized_dtype_names());
    }
  }

  DType matrix(DType source, int64_t row_length) const {
    if (fixed_) return *fixed_;
    if (quantize_ && source != *quantize_) {
      for (DType candidate : {*quantize_, row_fallback(*quantize_)}) {
        if (row_length % dtype_traits(candidate).block_elements == 0) return candidate;
      }
    }
    if (is_block_format(source)) return source;
    return source == DType::BF16 ? DType::BF16 : DType::F32;
  }

  // Norm weights and biases stay f32, rounded to bf16 first when the weights are bf16, so an
  // f32 checkpoint loaded as bf16 computes what the same checkpoint saved in bf16 would.
  bool round_vectors_to_bf16(DType embedding_source) const {
    return fixed_ == DType::BF16 || (requested_ == "auto" && embedding_source == DType::BF16);
  }

 private:
  std::string requested_;
  std::optional<DType> fixed_;
  std::optional<DType> quantize_;
};

// llama.cpp's converter stores each head's rows of a llama attn_q / attn_k as (pair, half)
// instead of Hugging Face's (half, pair): HF row h*hd + half*hd/2 + i is file row
// h*hd + 2i + half. Rows are moved whole, so block formats are moved as they are.
void deinterleave_rope_rows(const unsigned char* source, unsigned char* target, int64_t rows,
                            size_t row_bytes, int64_t heads) {
  const int64_t head_dim = rows / heads, half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t part = 0; part < 2; ++part) {
      for (int64_t i = 0; i < half; ++i) {
        const int64_t to = h * head_dim + part * half + i, from = h * head_dim + 2 * i + part;
        std::memcpy(target + to * row_bytes, source + from * row_bytes, row_bytes);
      }
    }
  }
}

// A tensor the file has but the model does not read means the config describes another model
// (qwen2's q/k/v biases under model_type llama, attention_bias left out): running without it
// would give wrong answers that look right, so it is an error naming the tensors. Ignored by
// name only: the rotary_emb buffers (inv_freq, position_ids) older transformers saved, which
// the config determines, and lm_head.weight of a tied model (transformers ties it to the embedding too).
void refuse_unused_tensors(const Checkpoint& checkpoint, const WeightStore& store) {
  std::vector<std::string> unused;
  for (const std::string& name : store.unrequired()) {
    const bool rotary_buffer = name.find("rotary_emb.") != std::string::npos;
    const bool tied_head = checkpoint.config.tie_word_embeddings && name == checkpoint.name(ModelTensor::Output);
    if (!rotary_buffer && !tied_head) unused.push_back(name);
  }
  if (unused.empty()) return;
  std::string listed;
  for (size_t i = 0; i < unused.size() && i < 8; ++i) listed += (i ? ", " : "") + unused[i];
  if (unused.size() > 8) listed += ", ... (" + std::to_string(unused.size()) + " in all)";
  fail(ErrorKind::InvalidModel, store.source(), " has ", unused.size(), " tensor",
       unused.size() == 1 ? "" : "s", " that a '", checkpoint.config.model_type, "' model with ",
       checkpoint.config_source == store.source() ? "this metadata" : checkpoint.config_source,
       " does not use: ", listed, ". The weights belong to another architecture, or the config "
       "leaves out a part they have (attention_bias, mlp_bias, tie_word_embeddings, the layer count?)");
}

}  // namespace

std::vector<float> rope_inverse_frequencies(const RopeConfig& rope, int head_dim) {
  std::vector<float> inv_freq(static_cast<size_t>(head_dim / 2));
  for (int i = 0; i < head_dim / 2; ++i) {
    // As transformers: computed in float32 from an int64 arange.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.0f / std::pow(static_cast<float>(rope.theta), exponent);
  }
  if (rope.type == RopeType::Linear) {
    for (float& f : inv_freq) f = static_cast<float>(f / rope.factor);
  } else if (rope.type == RopeType::Llama3) {
    // Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    const double old_context = rope.original_max_position;
    const double low_freq_wavelen = old_context / rope.low_freq_factor;
    const double high_freq_wavelen = old_context / rope.high_freq_factor;
    for (float& f : inv_freq) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_freq_wavelen) {
        f = static_cast<float>(f / rope.factor);
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (old_context / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  }
  return inv_freq;
}

Model::Model(const std::filesystem::path& model_path, Backend& backend, const std::string& dtype)
    : path_(model_path) {
  const Precision precision(dtype);  // a bad dtype fails before anything is read
  Checkpoint checkpoint = open_checkpoint(model_path);
  config_ = checkpoint.config;
  traits_ = find_architecture(config_.model_type, checkpoint.config_source).traits(config_);
  // The files stay mapped only while the weights are read from them.
  const std::unique_ptr<WeightStore> store = std::move(checkpoint.store);
  const Checkpoint& names = checkpoint;

  const ModelConfig& c = config_;
  const int64_t D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const int64_t q_dim = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t q_heads = checkpoint.interleaved_rope_rows ? c.num_heads : 0;
  const int64_t k_heads = checkpoint.interleaved_rope_rows ? c.num_kv_heads : 0;

  // A checkpoint tensor on the host, and the memory that holds it when it is not the file's.
  struct HostTensor {
    Tensor tensor;
    std::shared_ptr<Buffer> memory;
  };
  // `heads` > 0: rows interleaved for llama.cpp's rope, put back in Hugging Face order.
  auto source_matrix = [&](const std::string& name, int64_t rows, int64_t cols, int64_t heads) {
    HostTensor source{store->require(name, {rows, cols}), nullptr};
    if (heads > 0) {
      source.memory = std::make_shared<HostBuffer>(source.tensor.nbytes());
      deinterleave_rope_rows(static_cast<const unsigned char*>(source.tensor.data),
                             static_cast<unsigned char*>(source.memory->data()), rows,
                             dtype_bytes(source.tensor.dtype, cols), heads);
      release_file_pages(source.tensor.data, source.tensor.nbytes());
      source.tensor.data = source.memory->data();
    }
    return source;
  };
  auto count_weight = [&](DType held, const Tensor& source) {
    WeightTypeUse& use = weight_types_[held];
    use.tensors += 1;
    use.bytes += dtype_bytes(held, source.numel());
  };
  // The engine never computes from the file's pages: a weight the backend would use in place
  // (same format, host memory) is copied into memory of its own, so changing or truncating the
  // file after load cannot touch it, and the file's pages are dropped once they have been read,
  // so they do not count in resident memory next to the weights made from them.
  auto hold = [&](Tensor prepared, const HostTensor& source) {
    if (prepared.data == source.tensor.data) {
      if (source.memory) {
        owned_.push_back(source.memory);
      } else {
        auto copy = std::make_shared<HostBuffer>(source.tensor.nbytes());
        std::memcpy(copy->data(), source.tensor.data, source.tensor.nbytes());
        owned_.push_back(copy);
        prepared.data = copy->data();
      }
    }
    if (!source.memory) release_file_pages(source.tensor.data, source.tensor.nbytes());
    return prepared;
  };
  auto prepare_matrix = [&](const HostTensor& source, DType held) {
    Tensor t = hold(backend.prepare_weight(source.tensor, held, WeightUse::Matrix, owned_), source);
    weight_bytes_ += t.nbytes();
    return t;
  };
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, int64_t heads = 0) {
    const HostTensor source = source_matrix(name, rows, cols, heads);
    const DType held = precision.matrix(source.tensor.dtype, cols);
    count_weight(held, source.tensor);
    return prepare_matrix(source, held);
  };

  const Tensor embed_source = store->require(names.name(ModelTensor::Embedding), {V, D});
  const bool round_vectors = precision.round_vectors_to_bf16(embed_source.dtype);
  // Norm weights and biases are held as f32 (see Precision::round_vectors_to_bf16).
  auto vector_values = [&](const std::string& name, int64_t n, int64_t heads = 0) {
    const Tensor source = store->require(name, {n});
    std::vector<float> values(static_cast<size_t>(n));
    convert_dtype(source.data, source.dtype, values.data(), DType::F32, n);
    release_file_pages(source.data, source.nbytes());
    if (round_vectors) {
      for (float& v : values) v = bf16_to_f32(f32_to_bf16(v));
    }
    if (heads > 0) {
      std::vector<float> ordered(values.size());
      deinterleave_rope_rows(reinterpret_cast<const unsigned char*>(values.data()),
                             reinterpret_cast<unsigned char*>(ordered.data()), n, sizeof(float), heads);
      values = std::move(ordered);
    }
    return values;
  };
  auto host_vector = [&](std::vector<float> values) {
    auto buffer = std::make_shared<HostBuffer>(values.size() * sizeof(float));
    std::memcpy(buffer->data(), values.data(), values.size() * sizeof(float));
    const Tensor host = Tensor::contiguous(buffer->data(), DType::F32, {static_cast<int64_t>(values.size())});
    const Tensor prepared = backend.prepare_weight(host, DType::F32, WeightUse::Table, owned_);
    if (prepared.data == host.data) owned_.push_back(buffer);  // zero-copy: keep it alive
    return prepared;
  };
  auto vector = [&](const std::string& name, int64_t n) { return host_vector(vector_values(name, n)); };
  // RMSNorm weights; Gemma's multiply by (1 + w), which GGUF files already hold. The 1 is added
  // in f32 after any bf16 rounding, as transformers computes 1.0 + weight.float().
  const bool add_one_to_norms = traits_.norm_weight_offset && checkpoint.format == CheckpointFormat::HuggingFace;
  auto norm = [&](const std::string& name, int64_t n) {
    std::vector<float> values = vector_values(name, n);
    if (add_one_to_norms) {
      for (float& v : values) v += 1.0f;
    }
    return host_vector(std::move(values));
  };

  // q/k/v or gate/up of one layer: one stacked matrix (and bias) when the backend fuses
  // projections and every part is held in the same format; otherwise each part on its own
  // (a Q4_K_M file holds v in Q6_K next to q and k in Q4_K: stacking them would mean
  // converting one, which changes the weights). The decoder runs either, layer by layer.
  struct Projection {
    std::string name;  // without ".weight" / ".bias"
    int64_t rows;
    int64_t heads;     // > 0: rope rows to put back in order
    Tensor* weight;    // where the separate matrix goes
    Tensor* bias;      // where the separate bias goes (nullptr: no bias)
  };
  std::shared_ptr<HostBuffer> stacking_scratch;
  auto projections = [&](const std::vector<Projection>& parts, Tensor& fused, Tensor& fused_bias) {
    std::vector<HostTensor> sources;
    std::vector<DType> held;
    for (const Projection& p : parts) {
      sources.push_back(source_matrix(p.name + ".weight", p.rows, D, p.heads));
      held.push_back(precision.matrix(sources.back().tensor.dtype, D));
      count_weight(held.back(), sources.back().tensor);
    }
    const bool one_format = std::all_of(held.begin(), held.end(), [&](DType d) { return d == held.front(); });
    if (!backend.fuses_projections() || !one_format) {
      for (size_t i = 0; i < parts.size(); ++i) {
        *parts[i].weight = prepare_matrix(sources[i], held[i]);
        if (parts[i].bias) *parts[i].bias = host_vector(vector_values(parts[i].name + ".bias", parts[i].rows, parts[i].heads));
      }
      return;
    }
    int64_t rows = 0;
    for (const Projection& p : parts) rows += p.rows;
    // Every layer stacks into the same scratch memory (fresh memory costs a page fault and a
    // zeroed page per 4 KiB, much of a load), unless a backend kept the last one as its weight.
    const size_t stacked_bytes = dtype_bytes(held.front(), rows * D);
    if (!stacking_scratch || stacking_scratch->size() < stacked_bytes) {
      stacking_scratch = std::make_shared<HostBuffer>(stacked_bytes);
    }
    HostTensor stacked{{}, stacking_scratch};
    char* next = static_cast<char*>(stacked.memory->data());
    for (const HostTensor& source : sources) {
      convert_dtype(source.tensor.data, source.tensor.dtype, next, held.front(), source.tensor.numel());
      if (!source.memory) release_file_pages(source.tensor.data, source.tensor.nbytes());
      next += dtype_bytes(held.front(), source.tensor.numel());
    }
    stacked.tensor = Tensor::contiguous(stacked.memory->data(), held.front(), {rows, D});
    fused = prepare_matrix(stacked, held.front());
    if (fused.data == stacking_scratch->data()) stacking_scratch.reset();  // now the weight's own
    if (parts.front().bias) {
      std::vector<float> values;
      for (const Projection& p : parts) {
        const std::vector<float> part = vector_values(p.name + ".bias", p.rows, p.heads);
        values.insert(values.end(), part.begin(), part.end());
      }
      fused_bias = host_vector(std::move(values));
    }
  };

  const DType embed_held = precision.matrix(embed_source.dtype, D);
  count_weight(embed_held, embed_source);
  // A tied output layer is the embedding laid out for a matmul; where the backend can read
  // embedding rows from that layout, the table is held once.
  if (c.tie_word_embeddings) weights_.lm_head = prepare_matrix({embed_source, nullptr}, embed_held);
  if (c.tie_word_embeddings && backend.embeds_from(weights_.lm_head)) {
    weights_.embed = weights_.lm_head;
  } else {
    weights_.embed = hold(backend.prepare_weight(embed_source, embed_held, WeightUse::Table, owned_),
                          {embed_source, nullptr});
  }
  weights_.layers.resize(static_cast<size_t>(c.num_layers));
  auto base = [&](int layer, LayerTensor t) { return names.name(layer, t, ""); };
  for (int i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = weights_.layers[static_cast<size_t>(i)];
    L.attn_norm = norm(names.name(i, LayerTensor::AttnNorm), D);
    const bool qkv_bias = traits_.qkv_bias;
    projections({{base(i, LayerTensor::Q), q_dim, q_heads, &L.wq, qkv_bias ? &L.bq : nullptr},
                 {base(i, LayerTensor::K), kv_dim, k_heads, &L.wk, qkv_bias ? &L.bk : nullptr},
                 {base(i, LayerTensor::V), kv_dim, 0, &L.wv, qkv_bias ? &L.bv : nullptr}},
                L.wqkv, L.bqkv);
    L.wo = matrix(names.name(i, LayerTensor::O), D, q_dim);
    if (traits_.o_bias) L.bo = vector(names.name(i, LayerTensor::O, "bias"), D);
    if (traits_.qk_norm) {
      L.q_norm = norm(names.name(i, LayerTensor::QNorm), c.head_dim);
      L.k_norm = norm(names.name(i, LayerTensor::KNorm), c.head_dim);
    }
    L.ffn_norm = norm(names.name(i, LayerTensor::FfnNorm), D);
    if (traits_.sandwich_norms) {
      L.post_attn_norm = norm(names.name(i, LayerTensor::PostAttnNorm), D);
      L.post_ffn_norm = norm(names.name(i, LayerTensor::PostFfnNorm), D);
    }
    const bool mlp_bias = traits_.mlp_bias;
    projections({{base(i, LayerTensor::Gate), F, 0, &L.w_gate, mlp_bias ? &L.b_gate : nullptr},
                 {base(i, LayerTensor::Up), F, 0, &L.w_up, mlp_bias ? &L.b_up : nullptr}},
                L.w_gate_up, L.b_gate_up);
    L.w_down = matrix(names.name(i, LayerTensor::Down), D, F);
    if (mlp_bias) L.b_down = vector(names.name(i, LayerTensor::Down, "bias"), D);
  }
  weights_.final_norm = norm(names.name(ModelTensor::FinalNorm), D);
  if (!c.tie_word_embeddings) weights_.lm_head = matrix(names.name(ModelTensor::Output), V, D);
  weight_dtype_ = std::max_element(weight_types_.begin(), weight_types_.end(), [](const auto& a, const auto& b) {
                    return a.second.bytes < b.second.bytes;
                  })->first;

  std::vector<float> inv_freq = rope_inverse_frequencies(c.rope, c.head_dim);
  if (checkpoint.format == CheckpointFormat::Gguf && store->contains(names.name(ModelTensor::RopeFactors))) {
    // llama.cpp's Llama 3 rope scaling: each frequency divided by its factor.
    const Tensor factors = store->require(names.name(ModelTensor::RopeFactors), {c.head_dim / 2});
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      const float factor = load_as_f32(factors.data, factors.dtype, static_cast<int64_t>(i));
      if (!(factor > 0.0f)) {
        fail(ErrorKind::InvalidModel, path_.string(), ": rope_freqs.weight[", i, "] is ", factor,
             "; rope frequency factors must be positive");
      }
      inv_freq[i] /= factor;
    }
  }
  refuse_unused_tensors(checkpoint, *store);

  auto device_vector = [&](const std::vector<float>& values) {
    auto buffer = backend.allocate(values.size() * sizeof(float));
    owned_.push_back(buffer);
    const Tensor t = Tensor::contiguous(buffer->data(), DType::F32, {static_cast<int64_t>(values.size())},
                                        backend.device());
    backend.from_host(t, values.data());
    return t;
  };
  weights_.rope_inv_freq = device_vector(inv_freq);
  if (c.has_local_rope && !c.layer_windows.empty()) {
    weights_.rope_inv_freq_local = device_vector(rope_inverse_frequencies(c.local_rope, c.head_dim));
  }
  if (traits_.scaled_embedding) {
    // As transformers: sqrt(hidden_size) as a float32 tensor, cast to the embedding's dtype.
    const float scale = static_cast<float>(std::sqrt(static_cast<double>(D)));
    weights_.embedding_scale = embed_held == DType::BF16 ? bf16_to_f32(f32_to_bf16(scale)) : scale;
  }
  weights_.attention_scale = c.query_pre_attn_scalar > 0
                                 ? static_cast<float>(1.0 / std::sqrt(c.query_pre_attn_scalar))
                                 : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
}

std::string Model::weight_format() const {
  if (weight_types_.size() <= 1) return dtype_name(weight_dtype_);
  std::vector<std::pair<DType, WeightTypeUse>> uses(weight_types_.begin(), weight_types_.end());
  std::sort(uses.begin(), uses.end(), [](const auto& a, const auto& b) {
    return a.second.tensors != b.second.tensors ? a.second.tensors > b.second.tensors : a.first < b.first;
  });
  std::string text = std::string(dtype_name(weight_dtype_)) + " (mixed:";
  for (size_t i = 0; i < uses.size(); ++i) {
    text += (i ? ", " : " ") + std::to_string(uses[i].second.tensors) + " " + dtype_name(uses[i].first);
  }
  return text + ")";
}

Model::~Model() = default;

}  // namespace opencamp
