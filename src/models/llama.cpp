// Llama 2/3, SmolLM2, TinyLlama, Mistral-style checkpoints without sliding windows: GQA or MQA
// via num_key_value_heads, optional biases via attention_bias / mlp_bias.
#include "core/builtin.h"

namespace opencamp {

Architecture llama_architecture() {
  Architecture a;
  a.model_type = "llama";
  a.description = "Llama 2/3, SmolLM2, TinyLlama (GQA/MQA)";
  a.traits = [](const ModelConfig& config) {
    ArchitectureTraits t;
    t.qkv_bias = config.attention_bias;
    t.o_bias = config.attention_bias;
    t.mlp_bias = config.mlp_bias;
    return t;
  };
  a.validate = [](const ModelConfig&, const std::string&) {};
  return a;
}

}  // namespace opencamp
