// Loading: config -> architecture -> memory-mapped weights -> tensors prepared on the backend.
// Every tensor is checked by name and shape against config.json before the model is usable.
#include <cmath>
#include <cstring>
#include <tuple>
#include <numbers>

#include "opencamp/backend.h"
#include "opencamp/error.h"
#include "opencamp/model.h"
#include "opencamp/weights.h"

namespace opencamp {
namespace {

DType resolve_dtype(const std::string& requested, DType checkpoint_dtype) {
  if (requested == "f32" || requested == "float32") return DType::F32;
  if (requested == "bf16" || requested == "bfloat16") return DType::BF16;
  if (requested != "auto") {
    fail(ErrorKind::InvalidArgument, "dtype '", requested, "' is not supported; use auto, f32 or bf16");
  }
  // Keep the checkpoint's precision: bf16 stays bf16; f16 widens to f32 (bf16 would lose bits).
  return checkpoint_dtype == DType::BF16 ? DType::BF16 : DType::F32;
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

Model::Model(const std::filesystem::path& model_dir, Backend& backend, const std::string& dtype)
    : directory_(model_dir) {
  config_ = load_model_config(model_dir);
  const std::string config_path = (model_dir / "config.json").string();
  const Architecture& architecture = find_architecture(config_.model_type, config_path);
  architecture.validate(config_, config_path);
  traits_ = architecture.traits(config_);
  store_ = std::make_unique<WeightStore>(WeightStore::open(model_dir));

  const ModelConfig& c = config_;
  const int64_t D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const int64_t q_dim = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;

  const Tensor embed_source = store_->require("model.embed_tokens.weight", {V, D});
  weight_dtype_ = resolve_dtype(dtype, embed_source.dtype);

  auto prepare_matrix = [&](const Tensor& source) {
    Tensor t = backend.prepare_weight(source, weight_dtype_, WeightUse::Matrix, owned_);
    weight_bytes_ += t.nbytes();
    return t;
  };
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    return prepare_matrix(store_->require(name, {rows, cols}));
  };
  // Norm weights and biases are held as f32. With bf16 weights they are first rounded to bf16,
  // so an f32 checkpoint loaded as bf16 computes what the same checkpoint saved in bf16 would.
  auto vector_values = [&](const std::string& name, int64_t n) {
    const Tensor source = store_->require(name, {n});
    std::vector<float> values(static_cast<size_t>(n));
    convert_dtype(source.data, source.dtype, values.data(), DType::F32, n);
    if (weight_dtype_ == DType::BF16) {
      for (float& v : values) v = bf16_to_f32(f32_to_bf16(v));
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
  // Several checkpoint vectors end to end (the biases of a fused projection).
  auto stacked_vector = [&](std::initializer_list<std::pair<std::string, int64_t>> parts) {
    std::vector<float> values;
    for (const auto& [name, n] : parts) {
      const std::vector<float> part = vector_values(name, n);
      values.insert(values.end(), part.begin(), part.end());
    }
    return host_vector(std::move(values));
  };
  // Several checkpoint matrices stacked by rows, as one matrix (a fused projection).
  auto stacked_matrix = [&](std::initializer_list<std::tuple<std::string, int64_t, int64_t>> parts) {
    std::vector<Tensor> sources;
    int64_t rows = 0, cols = 0;
    bool same_dtype = true;
    for (const auto& [name, r, k] : parts) {
      sources.push_back(store_->require(name, {r, k}));
      same_dtype = same_dtype && sources.back().dtype == sources.front().dtype;
      rows += r;
      cols = k;
    }
    const DType stacked_dtype = same_dtype ? sources.front().dtype : DType::F32;
    auto buffer = std::make_shared<HostBuffer>(dtype_bytes(stacked_dtype, rows * cols));
    char* next = static_cast<char*>(buffer->data());
    for (const Tensor& source : sources) {
      convert_dtype(source.data, source.dtype, next, stacked_dtype, source.numel());
      next += dtype_bytes(stacked_dtype, source.numel());
    }
    const Tensor host = Tensor::contiguous(buffer->data(), stacked_dtype, {rows, cols});
    const Tensor prepared = prepare_matrix(host);
    if (prepared.data == host.data) owned_.push_back(buffer);
    return prepared;
  };

  const bool fused = backend.fuses_projections();
  weights_.embed = backend.prepare_weight(embed_source, weight_dtype_, WeightUse::Table, owned_);
  weights_.layers.resize(static_cast<size_t>(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& L = weights_.layers[static_cast<size_t>(i)];
    const std::string q = p + "self_attn.q_proj.", k = p + "self_attn.k_proj.", v = p + "self_attn.v_proj.";
    const std::string gate = p + "mlp.gate_proj.", up = p + "mlp.up_proj.";
    L.attn_norm = vector(p + "input_layernorm.weight", D);
    if (fused) {
      L.wqkv = stacked_matrix({{q + "weight", q_dim, D}, {k + "weight", kv_dim, D}, {v + "weight", kv_dim, D}});
      if (traits_.qkv_bias) L.bqkv = stacked_vector({{q + "bias", q_dim}, {k + "bias", kv_dim}, {v + "bias", kv_dim}});
    } else {
      L.wq = matrix(q + "weight", q_dim, D);
      L.wk = matrix(k + "weight", kv_dim, D);
      L.wv = matrix(v + "weight", kv_dim, D);
      if (traits_.qkv_bias) {
        L.bq = vector(q + "bias", q_dim);
        L.bk = vector(k + "bias", kv_dim);
        L.bv = vector(v + "bias", kv_dim);
      }
    }
    L.wo = matrix(p + "self_attn.o_proj.weight", D, q_dim);
    if (traits_.o_bias) L.bo = vector(p + "self_attn.o_proj.bias", D);
    if (traits_.qk_norm) {
      L.q_norm = vector(p + "self_attn.q_norm.weight", c.head_dim);
      L.k_norm = vector(p + "self_attn.k_norm.weight", c.head_dim);
    }
    L.ffn_norm = vector(p + "post_attention_layernorm.weight", D);
    if (fused) {
      L.w_gate_up = stacked_matrix({{gate + "weight", F, D}, {up + "weight", F, D}});
      if (traits_.mlp_bias) L.b_gate_up = stacked_vector({{gate + "bias", F}, {up + "bias", F}});
    } else {
      L.w_gate = matrix(gate + "weight", F, D);
      L.w_up = matrix(up + "weight", F, D);
      if (traits_.mlp_bias) {
        L.b_gate = vector(gate + "bias", F);
        L.b_up = vector(up + "bias", F);
      }
    }
    L.w_down = matrix(p + "mlp.down_proj.weight", D, F);
    if (traits_.mlp_bias) L.b_down = vector(p + "mlp.down_proj.bias", D);
  }
  weights_.final_norm = vector("model.norm.weight", D);
  if (c.tie_word_embeddings) {  // the same checkpoint tensor, laid out for a matmul
    weights_.lm_head = prepare_matrix(embed_source);
  } else {
    weights_.lm_head = matrix("lm_head.weight", V, D);
  }

  const std::vector<float> inv_freq = rope_inverse_frequencies(c.rope, c.head_dim);
  auto inv_freq_buffer = backend.allocate(inv_freq.size() * sizeof(float));
  owned_.push_back(inv_freq_buffer);
  weights_.rope_inv_freq = Tensor::contiguous(inv_freq_buffer->data(), DType::F32,
                                              {static_cast<int64_t>(inv_freq.size())},
                                              backend.device());
  backend.from_host(weights_.rope_inv_freq, inv_freq.data());
}

Model::~Model() = default;

}  // namespace opencamp
