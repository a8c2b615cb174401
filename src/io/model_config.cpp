#include "opencamp/model_config.h"

#include <algorithm>
#include <cmath>

#include "io/json.h"
#include "opencamp/gguf.h"
#include "io/mapped_file.h"
#include "opencamp/error.h"

namespace opencamp {

const char* rope_type_name(RopeType type) {
  switch (type) {
    case RopeType::Default: return "default";
    case RopeType::Linear: return "linear";
    case RopeType::Llama3: return "llama3";
  }
  return "?";
}

namespace {

class ConfigReader {
 public:
  ConfigReader(const json::Value& root, const std::string& source) : root_(root), source_(source) {}

  const json::Value* find(const char* key) const {
    const json::Value* v = root_.find(key);
    return (v && !v->is_null()) ? v : nullptr;
  }

  int positive_int(const char* key) const {
    const json::Value* v = find(key);
    if (!v) fail(ErrorKind::InvalidModel, source_, ": required field '", key, "' is missing");
    return checked_int(*v, key, 1);
  }

  int int_or(const char* key, int fallback, int minimum = 0) const {
    const json::Value* v = find(key);
    return v ? checked_int(*v, key, minimum) : fallback;
  }

  double number_or(const json::Value& object, const char* key, double fallback) const {
    const json::Value* v = object.find(key);
    if (!v || v->is_null()) return fallback;
    if (!v->is_number()) fail(ErrorKind::InvalidModel, source_, ": '", key, "' must be a number");
    return v->as_number();
  }

  bool bool_or(const char* key, bool fallback) const {
    const json::Value* v = find(key);
    if (!v) return fallback;
    if (!v->is_bool()) fail(ErrorKind::InvalidModel, source_, ": '", key, "' must be true or false");
    return v->as_bool();
  }

  // An id or a list of ids (eos_token_id is either in the wild).
  void token_ids(const char* key, std::vector<int>& out) const {
    const json::Value* v = find(key);
    if (!v) return;
    if (v->is_array()) {
      for (const auto& item : v->as_array()) out.push_back(checked_int(item, key, 0));
    } else {
      out.push_back(checked_int(*v, key, 0));
    }
  }

  int checked_int(const json::Value& v, const char* key, int minimum) const {
    if (!v.is_number() || v.as_number() != std::floor(v.as_number()) || v.as_number() < minimum ||
        v.as_number() > 1e9) {
      fail(ErrorKind::InvalidModel, source_, ": '", key, "' must be an integer >= ", minimum);
    }
    return static_cast<int>(v.as_number());
  }

  const std::string& source() const { return source_; }

 private:
  const json::Value& root_;
  const std::string& source_;
};

// Both spellings: `rope_parameters` {rope_type, rope_theta, ...} (transformers 5) and top-level
// `rope_theta` + `rope_scaling` {type | rope_type, factor, ...} (older checkpoints).
RopeConfig parse_rope_settings(const ConfigReader& reader, const json::Value* settings, double theta,
                               const char* where);

RopeConfig parse_rope(const ConfigReader& reader, const json::Value& root) {
  const json::Value* params = reader.find("rope_parameters");
  const json::Value* scaling = reader.find("rope_scaling");
  const json::Value* settings = params ? params : scaling;
  if (settings && !settings->is_object()) {
    fail(ErrorKind::InvalidModel, reader.source(), ": '", params ? "rope_parameters" : "rope_scaling",
         "' must be an object");
  }
  // Per layer type (Gemma 3 in transformers 5): the global layers' rope here.
  if (params && params->find("full_attention")) settings = params->find("full_attention");
  if (settings && !settings->is_object()) {
    fail(ErrorKind::InvalidModel, reader.source(), ": 'rope_parameters.full_attention' must be an object");
  }
  return parse_rope_settings(reader, settings, reader.number_or(root, "rope_theta", 10000.0),
                             params ? "rope_parameters" : "rope_scaling");
}

// `settings`: {rope_type | type, rope_theta, factor, ...} or nullptr (default rope at `theta`);
// `where` names it in messages.
RopeConfig parse_rope_settings(const ConfigReader& reader, const json::Value* settings, double theta,
                               const char* where) {
  RopeConfig rope;
  rope.theta = theta;
  if (!settings) return rope;
  rope.theta = reader.number_or(*settings, "rope_theta", rope.theta);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    const json::Value* v = settings->find(key);
    if (!v || v->is_null()) continue;
    if (!v->is_string()) {
      fail(ErrorKind::InvalidModel, reader.source(), ": '", key, "' in '", where, "' is ", json::type_name(v->type()),
           ", expected a string such as \"default\", \"linear\" or \"llama3\"");
    }
    type = v->as_string();
    break;
  }
  if (type == "default") return rope;
  rope.factor = reader.number_or(*settings, "factor", 0.0);
  if (!(rope.factor > 0)) {
    fail(ErrorKind::InvalidModel, reader.source(), ": rope type '", type, "' needs a positive 'factor'");
  }
  if (type == "linear") {
    rope.type = RopeType::Linear;
  } else if (type == "llama3") {
    rope.type = RopeType::Llama3;
    rope.low_freq_factor = reader.number_or(*settings, "low_freq_factor", 1.0);
    rope.high_freq_factor = reader.number_or(*settings, "high_freq_factor", 4.0);
    const double original = reader.number_or(*settings, "original_max_position_embeddings", 8192);
    if (!(original >= 1 && original <= ModelConfigLimits::kMaxContext) || original != std::floor(original)) {
      fail(ErrorKind::InvalidModel, reader.source(), ": original_max_position_embeddings must be an "
           "integer from 1 to ", ModelConfigLimits::kMaxContext);
    }
    rope.original_max_position = static_cast<int>(original);
    if (!(rope.high_freq_factor > rope.low_freq_factor) || rope.original_max_position <= 0) {
      fail(ErrorKind::InvalidModel, reader.source(),
           ": llama3 rope needs high_freq_factor > low_freq_factor and a positive "
           "original_max_position_embeddings");
    }
  } else {
    fail(ErrorKind::Unsupported, reader.source(), ": rope type '", type,
         "' is not supported yet (supported: default, linear, llama3)");
  }
  return rope;
}

void check_heads(const ModelConfig& config, const std::string& source, const char* heads_key,
                 const char* kv_heads_key) {
  if (config.num_kv_heads <= 0 || config.num_heads % config.num_kv_heads != 0) {
    fail(ErrorKind::InvalidModel, source, ": ", heads_key, " (", config.num_heads,
         ") must be a multiple of ", kv_heads_key, " (", config.num_kv_heads, ")");
  }
}

void check_head_dim(const ModelConfig& config, const std::string& source) {
  if (config.head_dim % 2 != 0) {
    fail(ErrorKind::InvalidModel, source, ": head_dim ", config.head_dim, " must be even for rope");
  }
}

void check_special_ids(const ModelConfig& config, const std::string& source) {
  for (int id : config.eos_token_ids) {
    if (id >= config.vocab_size) {
      fail(ErrorKind::InvalidModel, source, ": eos_token_id ", id, " is outside the vocabulary (",
           config.vocab_size, ")");
    }
  }
}

// Gemma 3's interleaved local (sliding-window) and global layers: `layer_types`, or older
// configs' sliding_window_pattern (every pattern-th layer global); the local layers' rope
// (rope_parameters.sliding_attention, or rope_local_base_freq); the attention scale.
void parse_gemma3(const ConfigReader& reader, const json::Value& root, ModelConfig& config) {
  const std::string& source = reader.source();
  for (const char* key : {"final_logit_softcapping", "attn_logit_softcapping"}) {
    if (reader.find(key)) {
      fail(ErrorKind::Unsupported, source, ": ", key, " is set; logit soft-capping (Gemma 2) is not supported");
    }
  }
  if (reader.bool_or("use_bidirectional_attention", false)) {
    fail(ErrorKind::Unsupported, source, ": use_bidirectional_attention is true; only causal attention is supported");
  }
  config.query_pre_attn_scalar = reader.number_or(root, "query_pre_attn_scalar", 256.0);
  if (!(config.query_pre_attn_scalar > 0)) {
    fail(ErrorKind::InvalidModel, source, ": 'query_pre_attn_scalar' must be positive");
  }
  const int window = reader.int_or("sliding_window", 0, 1);
  std::vector<bool> sliding(static_cast<size_t>(config.num_layers));
  if (const json::Value* types = reader.find("layer_types")) {
    if (!types->is_array() || types->as_array().size() != sliding.size()) {
      fail(ErrorKind::InvalidModel, source, ": 'layer_types' must list one type per layer (", config.num_layers, ")");
    }
    for (size_t i = 0; i < sliding.size(); ++i) {
      const json::Value& type = types->as_array()[i];
      const std::string name = type.is_string() ? type.as_string() : "?";
      if (name != "sliding_attention" && name != "full_attention") {
        fail(ErrorKind::InvalidModel, source, ": layer_types[", i, "] is '", name,
             "'; expected sliding_attention or full_attention");
      }
      sliding[i] = name == "sliding_attention";
    }
  } else {
    int pattern = reader.int_or("sliding_window_pattern", 6, 1);
    pattern = reader.int_or("_sliding_window_pattern", pattern, 1);
    for (size_t i = 0; i < sliding.size(); ++i) sliding[i] = (i + 1) % static_cast<size_t>(pattern) != 0;
  }
  if (std::find(sliding.begin(), sliding.end(), true) != sliding.end()) {
    if (window <= 0) fail(ErrorKind::InvalidModel, source, ": sliding_attention layers need a positive 'sliding_window'");
    config.layer_windows.assign(sliding.size(), 0);
    for (size_t i = 0; i < sliding.size(); ++i) config.layer_windows[i] = sliding[i] ? window : 0;
  }
  config.has_local_rope = true;
  const json::Value* params = reader.find("rope_parameters");
  const json::Value* local = params && params->is_object() ? params->find("sliding_attention") : nullptr;
  if (local && !local->is_object()) {
    fail(ErrorKind::InvalidModel, source, ": 'rope_parameters.sliding_attention' must be an object");
  }
  config.local_rope = parse_rope_settings(reader, local, reader.number_or(root, "rope_local_base_freq", 10000.0),
                                          "rope_parameters.sliding_attention");
  // Older configs: top-level rope_theta is the global layers' base (default 1e6, not 1e4).
  if (!(params && params->find("full_attention"))) {
    config.rope.theta = reader.number_or(root, "rope_theta", 1000000.0);
  }
}

void check_finite_positive(double value, const std::string& source, const char* field) {
  if (!std::isfinite(value) || !(value > 0)) {
    fail(ErrorKind::InvalidModel, source, ": ", field, " is ", value,
         "; it must be a finite positive number");
  }
}

}  // namespace

void validate_model_config(const ModelConfig& c, const std::string& source) {
  using L = ModelConfigLimits;
  struct Bounded {
    int value;
    int limit;
    const char* field;  // config.json's name (and GGUF's, where it differs)
  };
  for (const Bounded& b : {Bounded{c.vocab_size, L::kMaxVocab, "vocab_size"},
                           {c.hidden_size, L::kMaxHidden, "hidden_size (GGUF: embedding_length)"},
                           {c.intermediate_size, L::kMaxIntermediate, "intermediate_size (GGUF: feed_forward_length)"},
                           {c.num_layers, L::kMaxLayers, "num_hidden_layers (GGUF: block_count)"},
                           {c.num_heads, L::kMaxHeads, "num_attention_heads (GGUF: attention.head_count)"},
                           {c.num_kv_heads, L::kMaxHeads, "num_key_value_heads (GGUF: attention.head_count_kv)"},
                           {c.head_dim, L::kMaxHeadDim, "head_dim (GGUF: attention.key_length)"},
                           {c.max_position_embeddings, L::kMaxContext, "max_position_embeddings (GGUF: context_length)"}}) {
    if (b.value < 1 || b.value > b.limit) {
      fail(ErrorKind::InvalidModel, source, ": ", b.field, " is ", b.value, "; opencamp accepts 1 to ", b.limit,
           b.value > b.limit ? " (a corrupt or hostile config?)" : "");
    }
  }
  check_finite_positive(c.rms_norm_eps, source, "rms_norm_eps (GGUF: attention.layer_norm_rms_epsilon)");
  check_finite_positive(c.rope.theta, source, "rope_theta (GGUF: rope.freq_base)");
  if (c.rope.type != RopeType::Default) check_finite_positive(c.rope.factor, source, "the rope scaling factor");
  if (c.rope.type == RopeType::Llama3) {
    check_finite_positive(c.rope.low_freq_factor, source, "low_freq_factor");
    check_finite_positive(c.rope.high_freq_factor, source, "high_freq_factor");
    if (!(c.rope.high_freq_factor > c.rope.low_freq_factor)) {
      fail(ErrorKind::InvalidModel, source, ": llama3 rope needs high_freq_factor > low_freq_factor");
    }
    if (c.rope.original_max_position < 1 || c.rope.original_max_position > L::kMaxContext) {
      fail(ErrorKind::InvalidModel, source, ": original_max_position_embeddings is ",
           c.rope.original_max_position, "; it must be from 1 to ", L::kMaxContext);
    }
  }
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json::Value root = json::parse(json_text, source);
  if (!root.is_object()) fail(ErrorKind::InvalidModel, source, ": expected a JSON object");
  const ConfigReader reader(root, source);

  ModelConfig config;
  const json::Value* model_type = reader.find("model_type");
  if (!model_type || !model_type->is_string()) {
    fail(ErrorKind::InvalidModel, source,
         ": 'model_type' is missing; is this a Hugging Face transformers config.json?");
  }
  config.model_type = model_type->as_string();
  if (config.model_type == "gemma3") {
    fail(ErrorKind::Unsupported, source, ": model_type 'gemma3' is the multimodal Gemma 3 (text_config inside); "
         "load a text-only checkpoint (Gemma3ForCausalLM, model_type 'gemma3_text') or its GGUF file");
  }
  config.vocab_size = reader.positive_int("vocab_size");
  config.hidden_size = reader.positive_int("hidden_size");
  config.intermediate_size = reader.positive_int("intermediate_size");
  config.num_layers = reader.positive_int("num_hidden_layers");
  config.num_heads = reader.positive_int("num_attention_heads");
  config.num_kv_heads = reader.int_or("num_key_value_heads", config.num_heads, 1);
  check_heads(config, source, "num_attention_heads", "num_key_value_heads");
  if (reader.find("head_dim")) {
    config.head_dim = reader.positive_int("head_dim");
  } else if (config.hidden_size % config.num_heads == 0) {
    config.head_dim = config.hidden_size / config.num_heads;
  } else {
    fail(ErrorKind::InvalidModel, source, ": hidden_size (", config.hidden_size,
         ") is not a multiple of num_attention_heads (", config.num_heads, ") and head_dim is absent");
  }
  check_head_dim(config, source);
  config.max_position_embeddings = reader.int_or("max_position_embeddings", 2048, 1);
  config.rms_norm_eps = static_cast<float>(reader.number_or(root, "rms_norm_eps", 1e-6));
  config.tie_word_embeddings = reader.bool_or("tie_word_embeddings", false);
  config.attention_bias = reader.bool_or("attention_bias", false);
  config.mlp_bias = reader.bool_or("mlp_bias", false);
  config.use_sliding_window = reader.bool_or("use_sliding_window", false);
  // Gemma names it hidden_activation (older Gemma configs carry both spellings) and uses GELU.
  const bool gemma = config.model_type == "gemma3_text";
  for (const char* key : {"hidden_activation", "hidden_act"}) {
    const json::Value* act = reader.find(key);
    if (!act) continue;
    const std::string name = act->is_string() ? act->as_string() : std::string("?");
    if (name != (gemma ? "gelu_pytorch_tanh" : "silu")) {
      fail(ErrorKind::Unsupported, source, ": ", key, " '", name, "' is not supported (only ",
           gemma ? "gelu_pytorch_tanh for gemma3_text" : "silu", ")");
    }
    config.hidden_act = name;
    break;
  }
  if (gemma) config.hidden_act = "gelu_pytorch_tanh";  // transformers' default for Gemma 3
  // Pre-quantised checkpoints (GPTQ, AWQ, bitsandbytes, FP8, ...) keep packed integer tensors
  // in place of the weights: say so, rather than report the weights as not matching config.json.
  if (const json::Value* quant = reader.find("quantization_config")) {
    const json::Value* method = quant->find("quant_method");
    fail(ErrorKind::Unsupported, source, ": quantization_config",
         method && method->is_string() ? " (quant_method '" + method->as_string() + "')" : std::string(),
         ": pre-quantised checkpoints are not supported; use the unquantised model (safetensors in "
         "F32, BF16 or F16)");
  }
  config.rope = parse_rope(reader, root);
  if (config.model_type == "gemma3_text") parse_gemma3(reader, root, config);
  if (config.model_type == "mistral") {  // one window for every layer, when set
    if (const int window = reader.int_or("sliding_window", 0, 1); window > 0) {
      config.layer_windows.assign(static_cast<size_t>(config.num_layers), window);
    }
  }
  config.bos_token_id = reader.int_or("bos_token_id", -1);
  reader.token_ids("eos_token_id", config.eos_token_ids);
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (const json::Value* v = reader.find(key); v && v->is_string()) config.torch_dtype = v->as_string();
  }
  validate_model_config(config, source);
  return config;
}

ModelConfig load_model_config(const std::filesystem::path& dir) {
  if (!is_directory_path(dir)) {
    fail(ErrorKind::InvalidModel, "model directory ", dir.string(),
         path_exists(dir) ? " is not a directory" : " does not exist",
         "; pass a folder holding config.json and model.safetensors, or a .gguf file");
  }
  const auto config_path = dir / "config.json";
  if (!path_exists(config_path)) {
    fail(ErrorKind::InvalidModel, "config.json is missing from ", dir.string(),
         "; a Hugging Face model directory needs config.json next to its weights");
  }
  ModelConfig config = parse_model_config(read_text_file(config_path), config_path.string());
  const auto generation_path = dir / "generation_config.json";
  if (path_exists(generation_path)) {
    const std::string source = generation_path.string();
    const json::Value root = json::parse(read_text_file(generation_path), source);
    if (root.is_object()) {
      std::vector<int> ids;
      ConfigReader(root, source).token_ids("eos_token_id", ids);
      for (int id : ids) {
        if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) ==
            config.eos_token_ids.end()) {
          config.eos_token_ids.push_back(id);
        }
      }
    }
  }
  check_special_ids(config, config_path.string());
  return config;
}

namespace {

// `{arch}.key` of a GGUF file, as an int within [minimum, 1e9].
class GgufConfigReader {
 public:
  GgufConfigReader(const GgufFile& file, std::string arch) : file_(file), arch_(std::move(arch)) {}

  std::string key(const char* suffix) const { return arch_ + "." + suffix; }
  int required_int(const char* suffix, int minimum = 1) const {
    return checked(key(suffix), file_.integer(key(suffix)), minimum);
  }
  std::optional<int> optional_int(const std::string& full_key, int minimum = 0) const {
    const std::optional<int64_t> v = file_.optional_integer(full_key);
    if (!v) return std::nullopt;
    return checked(full_key, *v, minimum);
  }
  int checked(const std::string& full_key, int64_t v, int minimum) const {
    if (v < minimum || v > 1000000000) {
      fail(ErrorKind::InvalidModel, file_.path().string(), ": metadata key ", full_key, " is ", v,
           "; expected an integer >= ", minimum);
    }
    return static_cast<int>(v);
  }

 private:
  const GgufFile& file_;
  std::string arch_;
};

}  // namespace

ModelConfig gguf_model_config(const GgufFile& file) {
  const std::string source = file.path().string();
  ModelConfig config;
  config.model_type = file.string("general.architecture");
  const GgufConfigReader r(file, config.model_type);
  config.num_layers = r.required_int("block_count");
  config.hidden_size = r.required_int("embedding_length");
  config.intermediate_size = r.required_int("feed_forward_length");
  config.num_heads = r.required_int("attention.head_count");
  config.num_kv_heads = r.optional_int(r.key("attention.head_count_kv"), 1).value_or(config.num_heads);
  check_heads(config, source, r.key("attention.head_count").c_str(), r.key("attention.head_count_kv").c_str());
  const std::optional<int> key_length = r.optional_int(r.key("attention.key_length"), 1);
  const std::optional<int> value_length = r.optional_int(r.key("attention.value_length"), 1);
  if (key_length) {
    config.head_dim = *key_length;
  } else if (config.hidden_size % config.num_heads == 0) {
    config.head_dim = config.hidden_size / config.num_heads;
  } else {
    fail(ErrorKind::InvalidModel, source, ": ", r.key("embedding_length"), " (", config.hidden_size,
         ") is not a multiple of ", r.key("attention.head_count"), " (", config.num_heads, ") and ",
         r.key("attention.key_length"), " is absent");
  }
  if (value_length && *value_length != config.head_dim) {
    fail(ErrorKind::Unsupported, source, ": ", r.key("attention.value_length"), " (", *value_length,
         ") differs from the key length (", config.head_dim, "); opencamp needs them equal");
  }
  check_head_dim(config, source);
  if (const std::optional<int> rotary = r.optional_int(r.key("rope.dimension_count"), 0);
      rotary && *rotary != config.head_dim) {
    fail(ErrorKind::Unsupported, source, ": ", r.key("rope.dimension_count"), " is ", *rotary,
         " but heads have ", config.head_dim, " dimensions; partial rotary embeddings are not supported");
  }
  config.max_position_embeddings = r.required_int("context_length");
  config.rms_norm_eps = static_cast<float>(file.number(r.key("attention.layer_norm_rms_epsilon")));

  // RoPE: the base, and linear scaling (llama.cpp writes Llama 3's scaling as the rope_freqs
  // tensor instead, which the model applies).
  config.rope.theta = file.optional_number(r.key("rope.freq_base")).value_or(10000.0);
  const std::string scaling = file.optional_string(r.key("rope.scaling.type")).value_or("none");
  const std::optional<double> old_linear = file.optional_number(r.key("rope.scale_linear"));
  if (scaling == "linear" || (scaling == "none" && old_linear && *old_linear != 1.0)) {
    config.rope.type = RopeType::Linear;
    config.rope.factor = scaling == "linear" ? file.number(r.key("rope.scaling.factor")) : *old_linear;
    if (!(config.rope.factor > 0)) {
      fail(ErrorKind::InvalidModel, source, ": linear rope scaling needs a positive ",
           r.key("rope.scaling.factor"));
    }
  } else if (scaling != "none") {
    fail(ErrorKind::Unsupported, source, ": ", r.key("rope.scaling.type"), " is '", scaling,
         "'; opencamp supports none and linear rope scaling in GGUF files");
  }

  if (config.model_type == "gemma3") {
    // What llama.cpp (and transformers' GGUF loader) assume for Gemma 3, which the converter
    // does not write: GELU, every sixth layer global, local layers' rope base 10000 without
    // scaling, attention scaled by 1 / sqrt(head_dim) (query_pre_attn_scalar = head_dim
    // except for the 27B model, whose files llama.cpp recognises by size).
    config.hidden_act = "gelu_pytorch_tanh";
    config.query_pre_attn_scalar = config.num_layers == 62 ? static_cast<double>(config.hidden_size) / config.num_heads
                                                           : config.head_dim;
    const int window = r.required_int("attention.sliding_window");
    config.layer_windows.assign(static_cast<size_t>(config.num_layers), 0);
    for (int i = 0; i < config.num_layers; ++i) config.layer_windows[static_cast<size_t>(i)] = (i + 1) % 6 != 0 ? window : 0;
    config.has_local_rope = true;
    config.local_rope.theta = 10000.0;
  }

  // The vocabulary: {arch}.vocab_size when written, else the tokenizer's token list.
  if (const std::optional<int> vocab = r.optional_int(r.key("vocab_size"), 1)) {
    config.vocab_size = *vocab;
  } else if (const GgufValue* tokens = file.optional_array("tokenizer.ggml.tokens", GgufType::String)) {
    config.vocab_size = r.checked("tokenizer.ggml.tokens (its length)", static_cast<int64_t>(tokens->count), 1);
  } else {
    fail(ErrorKind::InvalidModel, source, ": neither ", r.key("vocab_size"),
         " nor tokenizer.ggml.tokens says how large the vocabulary is");
  }
  config.bos_token_id = r.optional_int("tokenizer.ggml.bos_token_id").value_or(-1);
  // End of generation: EOS, and the end-of-turn / end-of-message ids where they differ.
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                          "tokenizer.ggml.eom_token_id"}) {
    if (const std::optional<int> id = r.optional_int(key)) {
      if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), *id) == config.eos_token_ids.end()) {
        config.eos_token_ids.push_back(*id);
      }
    }
  }
  check_special_ids(config, source);
  validate_model_config(config, source);

  // What the tensors say: an absent output matrix means the embedding is reused (tied); biases.
  config.tie_word_embeddings = file.find_tensor("output.weight") == nullptr;
  config.attention_bias = file.find_tensor("blk.0.attn_q.bias") != nullptr;
  config.mlp_bias = file.find_tensor("blk.0.ffn_up.bias") != nullptr;
  return config;
}

}  // namespace opencamp
