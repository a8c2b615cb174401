// The hyper-parameters of a checkpoint, read from a Hugging Face config.json (and the end-of-
// sequence ids from generation_config.json) or from a GGUF file's metadata, normalised across
// the spellings found in the wild.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "opencamp/dtype.h"

namespace opencamp {

class GgufFile;

enum class RopeType { Default, Linear, Llama3 };
const char* rope_type_name(RopeType type);

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;                  // linear, llama3
  double low_freq_factor = 1.0;         // llama3
  double high_freq_factor = 4.0;        // llama3
  int original_max_position = 8192;     // llama3
};

struct ModelConfig {
  std::string model_type;  // "llama", "qwen2", "qwen3", "gemma3_text" (Hugging Face) / "gemma3" (GGUF)
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // from config when present, else hidden_size / num_heads
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v/o bias (llama, qwen3); qwen2 always has q/k/v bias
  bool mlp_bias = false;
  bool use_sliding_window = false;  // qwen2/qwen3 option; not supported, refused at load
  std::string hidden_act = "silu";  // the MLP's activation: "silu" or "gelu_pytorch_tanh" (gemma)
  // Attention scores are scaled by 1 / sqrt(query_pre_attn_scalar) (gemma); 0: by 1 / sqrt(head_dim).
  double query_pre_attn_scalar = 0;
  // Per layer: > 0 for a sliding-window layer that attends to the last `window` positions, 0
  // for a global one. Empty when no layer has a window.
  std::vector<int> layer_windows;
  RopeConfig rope;
  // The rope of the sliding-window layers when it differs from `rope` (Gemma 3's
  // rope_local_base_freq); has_local_rope false: every layer uses `rope`.
  bool has_local_rope = false;
  RopeConfig local_rope;
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;  // union of config.json and generation_config.json
  std::string torch_dtype;         // as written in config.json ("bfloat16", "float32", ...)

  int layer_window(int layer) const {
    return layer_windows.empty() ? 0 : layer_windows[static_cast<size_t>(layer)];
  }
};

// Limits on hyper-parameters, beyond any real model's (Llama 3 405B: 126 layers, 128 heads,
// hidden 16384; vocabularies up to ~262k; contexts up to 10M), so that a corrupt or hostile
// config fails at once instead of sizing gigabytes of bookkeeping before the weights disagree.
struct ModelConfigLimits {
  static constexpr int kMaxVocab = 1 << 26;
  static constexpr int kMaxHidden = 1 << 17;
  static constexpr int kMaxIntermediate = 1 << 20;
  static constexpr int kMaxLayers = 2048;
  static constexpr int kMaxHeads = 4096;
  static constexpr int kMaxHeadDim = 4096;
  static constexpr int kMaxContext = 1 << 27;
};

// Checks every field for range and finiteness (the limits above; rms_norm_eps, rope theta and
// scaling factors finite and positive; llama3's high_freq_factor > low_freq_factor): throws
// Error(InvalidModel) naming `source` and the field. load_model_config, parse_model_config and
// gguf_model_config call it before they return.
void validate_model_config(const ModelConfig& config, const std::string& source);

// Parses `dir`/config.json and, when present, `dir`/generation_config.json. Throws
// Error(InvalidModel) naming the file and the field when something is missing or malformed.
ModelConfig load_model_config(const std::filesystem::path& dir);
// The same from JSON text (the path is only used in messages).
ModelConfig parse_model_config(const std::string& json_text, const std::string& source_name);

// The same from a GGUF file's metadata: general.architecture, that architecture's keys
// ({arch}.block_count, .embedding_length, .attention.head_count, .rope.freq_base, ...), the
// vocabulary and special ids from tokenizer.ggml.*, tied output when output.weight is absent.
// Throws Error(InvalidModel) naming the file and the key, Error(Unsupported) for what opencamp
// cannot run (yarn rope scaling, partial rotary, key and value lengths that differ).
ModelConfig gguf_model_config(const GgufFile& file);

}  // namespace opencamp
