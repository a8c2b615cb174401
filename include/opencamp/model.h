// Architectures and loaded models. Llama, Qwen and Gemma share one decoder block; an Architecture
// only says which optional parts a checkpoint has (biases, q/k norms, sandwich norms) and how its
// tensors are named.
// Quirks are normalised at load time so the forward pass has no per-architecture branches.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "opencamp/model_config.h"
#include "opencamp/tensor.h"

namespace opencamp {

class Backend;

// Which optional tensors a checkpoint of this architecture carries.
struct ArchitectureTraits {
  bool qkv_bias = false;  // q/k/v projections have a bias (qwen2 always; llama/qwen3 via config)
  bool o_bias = false;    // output projection has a bias
  bool mlp_bias = false;  // gate/up/down projections have a bias
  bool qk_norm = false;   // RMSNorm over each head of q and k before rope (qwen3, gemma3)
  // Norms after attention and after the MLP too, before each adds to the residual (gemma).
  bool sandwich_norms = false;
  // RMSNorm multiplies by (1 + weight) (gemma): Hugging Face checkpoints get 1 added to every
  // norm weight at load (GGUF files already hold 1 + weight).
  bool norm_weight_offset = false;
  // The embedding is multiplied by sqrt(hidden_size), rounded to the embedding's dtype (gemma).
  bool scaled_embedding = false;
};

struct Architecture {
  std::string model_type;   // the config.json model_type this handles
  std::string description;  // e.g. "Llama 2/3, SmolLM2, TinyLlama (GQA/MQA)"
  std::function<ArchitectureTraits(const ModelConfig&)> traits;
  // Checks architecture-specific config fields (e.g. sliding windows we do not support).
  std::function<void(const ModelConfig&, const std::string& config_path)> validate;
};

void register_architecture(Architecture architecture);
const std::vector<Architecture>& registered_architectures();
// Throws Error(InvalidModel) listing the supported model types when none matches.
const Architecture& find_architecture(const std::string& model_type,
                                      const std::string& config_path);

// A backend that fuses projections (Backend::fuses_projections) gets wqkv / w_gate_up and
// their biases, except in a layer whose parts are held in different formats (a Q4_K_M file's
// Q6_K v next to Q4_K q and k): that layer has the separate matrices, as every layer has for a
// backend that does not fuse. Unused ones stay empty.
struct LayerWeights {
  Tensor attn_norm;           // [D] f32
  Tensor wq, wk, wv, wo;      // [Hq*hd, D], [Hkv*hd, D], [Hkv*hd, D], [D, Hq*hd]
  Tensor bq, bk, bv, bo;      // [Hq*hd], [Hkv*hd], [Hkv*hd], [D] f32, or empty
  Tensor wqkv, bqkv;          // [(Hq + 2 Hkv) * hd, D], [(Hq + 2 Hkv) * hd] f32 or empty
  Tensor q_norm, k_norm;      // [hd] f32, or empty
  Tensor ffn_norm;            // [D] f32
  Tensor post_attn_norm, post_ffn_norm;  // [D] f32 (sandwich norms), or empty
  Tensor w_gate, w_up, w_down;  // [F, D], [F, D], [D, F]
  Tensor b_gate, b_up, b_down;  // [F], [F], [D] f32, or empty
  Tensor w_gate_up, b_gate_up;  // [2F, D] (gate rows, then up rows), [2F] f32 or empty
};

struct ModelWeights {
  Tensor embed;       // [V, D]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [D] f32
  Tensor lm_head;     // [V, D]; the embedding matrix again when embeddings are tied (the
                      // same memory unless the backend lays matmul weights out its own way)
  Tensor rope_inv_freq;  // [hd / 2] f32, rope scaling already applied
  Tensor rope_inv_freq_local;  // [hd / 2] f32 for sliding-window layers, or empty (rope_inv_freq)
  float embedding_scale = 1.0f;  // the embedding is multiplied by this (gemma: sqrt(D))
  float attention_scale = 1.0f;  // attention scores are multiplied by this
};

// How many of a model's weight matrices (embedding included) are held in one format.
struct WeightTypeUse {
  int tensors = 0;
  size_t bytes = 0;
};

class Model {
 public:
  // Opens the checkpoint at `model_path` (a Hugging Face folder, a .gguf file, or a folder
  // holding one .gguf), checks the architecture, maps the weights and prepares them on
  // `backend` in `dtype`: "auto" keeps the file's formats (bf16 stays bf16, f32 and f16 -> f32,
  // block formats as they are), "f32" / "bf16" convert everything, a block format with a
  // quantiser ("q8_0", "q4_0", "q4_k", ...) quantises every matrix (see README).
  Model(const std::filesystem::path& model_path, Backend& backend, const std::string& dtype);
  ~Model();

  const ModelConfig& config() const { return config_; }
  const ArchitectureTraits& traits() const { return traits_; }
  const ModelWeights& weights() const { return weights_; }
  // The format holding most of the weight bytes; weight_types() has every format in use.
  DType weight_dtype() const { return weight_dtype_; }
  const std::map<DType, WeightTypeUse>& weight_types() const { return weight_types_; }
  // "bf16", or for a mixed file e.g. "q4_k (mixed: 169 q4_k, 43 q6_k)" (matrices per format).
  std::string weight_format() const;
  const std::filesystem::path& path() const { return path_; }
  // Bytes of weights read per decoded token (every matrix once), for GB/s reports.
  size_t weight_bytes() const { return weight_bytes_; }

 private:
  std::filesystem::path path_;
  ModelConfig config_;
  ArchitectureTraits traits_;
  DType weight_dtype_ = DType::F32;
  std::map<DType, WeightTypeUse> weight_types_;
  std::vector<std::shared_ptr<Buffer>> owned_;  // every weight's memory (the files are closed after load)
  ModelWeights weights_;
  size_t weight_bytes_ = 0;
};

// inv_freq[i] = theta^(-2i / head_dim), then scaled per rope type (linear, llama3).
std::vector<float> rope_inverse_frequencies(const RopeConfig& rope, int head_dim);

}  // namespace opencamp
