// Qwen2 / Qwen2.5 (bias on q/k/v, never on o) and Qwen3 (RMSNorm over each q and k head before
// rope, head_dim independent of hidden_size / num_heads, optional attention_bias).
#include "core/builtin.h"
#include "opencamp/error.h"

namespace opencamp {
namespace {

// Sliding-window attention changes which keys a query sees; silently ignoring it would give
// wrong answers on long prompts, so refuse instead.
void reject_sliding_window(const ModelConfig& config, const std::string& config_path) {
  if (config.use_sliding_window) {
    fail(ErrorKind::Unsupported, config_path,
         ": use_sliding_window is true; sliding-window attention is not supported yet");
  }
}

}  // namespace

Architecture qwen2_architecture() {
  Architecture a;
  a.model_type = "qwen2";
  a.description = "Qwen2, Qwen2.5 (q/k/v bias)";
  a.traits = [](const ModelConfig&) {
    ArchitectureTraits t;
    t.qkv_bias = true;
    return t;
  };
  a.validate = reject_sliding_window;
  return a;
}

Architecture qwen3_architecture() {
  Architecture a;
  a.model_type = "qwen3";
  a.description = "Qwen3 dense (per-head q/k RMSNorm)";
  a.traits = [](const ModelConfig& config) {
    ArchitectureTraits t;
    t.qk_norm = true;
    t.qkv_bias = config.attention_bias;
    t.o_bias = config.attention_bias;
    return t;
  };
  a.validate = reject_sliding_window;
  return a;
}

}  // namespace opencamp
