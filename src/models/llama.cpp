// Llama 2/3, SmolLM2, TinyLlama and Mistral checkpoints: GQA or MQA
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

// Mistral: the llama decoder; with `sliding_window` set (Mistral 7B v0.1), every layer attends
// to the last sliding_window positions. (llama.cpp writes Mistral GGUF files as llama.)
Architecture mistral_architecture() {
  Architecture a = llama_architecture();
  a.model_type = "mistral";
  a.description = "Mistral (the llama decoder, sliding window on every layer when set)";
  return a;
}

}  // namespace opencamp
