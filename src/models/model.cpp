// Loading: config -> architecture -> memory-mapped weights -> tensors prepared on the backend.
// Every tensor is checked by name and shape against config.json before the model is usable.
#include <cmath>
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

  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    Tensor t = backend.prepare_weight(store_->require(name, {rows, cols}), weight_dtype_, owned_);
    weight_bytes_ += t.nbytes();
    return t;
  };
  // Norm weights and biases are held as f32. With bf16 weights they are first rounded to bf16,
  // so an f32 checkpoint loaded as bf16 computes what the same checkpoint saved in bf16 would.
  auto vector = [&](const std::string& name, int64_t n) {
    Tensor source = store_->require(name, {n});
    if (weight_dtype_ == DType::BF16 && source.dtype != DType::BF16) {
      auto rounded = std::make_shared<HostBuffer>(static_cast<size_t>(n) * dtype_size(DType::BF16));
      convert_dtype(source.data, source.dtype, rounded->data(), DType::BF16, n);
      owned_.push_back(rounded);
      source = Tensor::contiguous(rounded->data(), DType::BF16, {n});
    }
    return backend.prepare_weight(source, DType::F32, owned_);
  };

  weights_.embed = backend.prepare_weight(embed_source, weight_dtype_, owned_);
  weights_.layers.resize(static_cast<size_t>(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& L = weights_.layers[static_cast<size_t>(i)];
    L.attn_norm = vector(p + "input_layernorm.weight", D);
    L.wq = matrix(p + "self_attn.q_proj.weight", q_dim, D);
    L.wk = matrix(p + "self_attn.k_proj.weight", kv_dim, D);
    L.wv = matrix(p + "self_attn.v_proj.weight", kv_dim, D);
    L.wo = matrix(p + "self_attn.o_proj.weight", D, q_dim);
    if (traits_.qkv_bias) {
      L.bq = vector(p + "self_attn.q_proj.bias", q_dim);
      L.bk = vector(p + "self_attn.k_proj.bias", kv_dim);
      L.bv = vector(p + "self_attn.v_proj.bias", kv_dim);
    }
    if (traits_.o_bias) L.bo = vector(p + "self_attn.o_proj.bias", D);
    if (traits_.qk_norm) {
      L.q_norm = vector(p + "self_attn.q_norm.weight", c.head_dim);
      L.k_norm = vector(p + "self_attn.k_norm.weight", c.head_dim);
    }
    L.ffn_norm = vector(p + "post_attention_layernorm.weight", D);
    L.w_gate = matrix(p + "mlp.gate_proj.weight", F, D);
    L.w_up = matrix(p + "mlp.up_proj.weight", F, D);
    L.w_down = matrix(p + "mlp.down_proj.weight", D, F);
    if (traits_.mlp_bias) {
      L.b_gate = vector(p + "mlp.gate_proj.bias", F);
      L.b_up = vector(p + "mlp.up_proj.bias", F);
      L.b_down = vector(p + "mlp.down_proj.bias", D);
    }
  }
  weights_.final_norm = vector("model.norm.weight", D);
  if (c.tie_word_embeddings) {
    weights_.lm_head = weights_.embed;
    weight_bytes_ += weights_.embed.nbytes();
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
