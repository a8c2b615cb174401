// Gemma 3 (text): RMSNorm weights applied as (1 + w), norms before and after attention and the
// MLP, per-head q/k RMSNorm, GELU (tanh) gated MLP, the embedding scaled by sqrt(hidden),
// attention scaled by query_pre_attn_scalar, interleaved sliding-window (local) and global
// layers with their own rope bases, tied output. One architecture per name: "gemma3_text" in
// Hugging Face configs, "gemma3" in GGUF files (llama.cpp's converter has already added 1 to the
// norm weights there, so only Hugging Face checkpoints get the offset at load time).
#include "core/builtin.h"

namespace opencamp {
namespace {

Architecture gemma3_named(const char* model_type, const char* description) {
  Architecture a;
  a.model_type = model_type;
  a.description = description;
  a.traits = [](const ModelConfig&) {
    ArchitectureTraits t;
    t.qk_norm = true;
    t.sandwich_norms = true;
    t.norm_weight_offset = true;
    t.scaled_embedding = true;
    return t;
  };
  a.validate = [](const ModelConfig&, const std::string&) {};
  return a;
}

}  // namespace

Architecture gemma3_architecture() {
  return gemma3_named("gemma3_text", "Gemma 3 text (sliding-window + global layers)");
}
Architecture gemma3_gguf_architecture() {
  return gemma3_named("gemma3", "Gemma 3 text in GGUF files (sliding-window + global layers)");
}

}  // namespace opencamp
