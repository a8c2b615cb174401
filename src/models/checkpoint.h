// A checkpoint as the model loader sees it, whatever the files: its hyper-parameters, its named
// weights, and the names and quirks of its format. Two formats: a Hugging Face folder
// (config.json + safetensors) and a GGUF file (metadata + tensors in one file).
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "opencamp/model_config.h"
#include "opencamp/weights.h"

namespace opencamp {

enum class CheckpointFormat { HuggingFace, Gguf };

// The tensors of a model, named per format by Checkpoint::name.
enum class ModelTensor { Embedding, FinalNorm, Output, RopeFactors };
enum class LayerTensor { AttnNorm, Q, K, V, O, QNorm, KNorm, FfnNorm, Gate, Up, Down, PostAttnNorm, PostFfnNorm };

struct Checkpoint {
  CheckpointFormat format = CheckpointFormat::HuggingFace;
  std::filesystem::path path;  // the folder or the .gguf file
  std::string config_source;   // what the hyper-parameters come from, for messages
  ModelConfig config;
  std::unique_ptr<WeightStore> store;
  // llama.cpp's converter interleaves the rows of each head of attn_q / attn_k (and their
  // biases) in llama-architecture files, for its rope layout; the loader puts them back.
  bool interleaved_rope_rows = false;
  // Gemma's four norms per layer: Hugging Face calls the norm before the MLP
  // pre_feedforward_layernorm, and post_attention_layernorm the one after attention.
  bool sandwich_norms = false;

  std::string name(ModelTensor tensor) const;
  // `kind`: "weight", "bias", or "" for the name without that suffix.
  std::string name(int layer, LayerTensor tensor, const char* kind = "weight") const;
};

// `path`: a Hugging Face folder (config.json + model.safetensors or its index), a .gguf file,
// or a folder holding exactly one .gguf file and no safetensors. Throws Error(InvalidModel)
// saying what was found and what to pass instead. The architecture is checked (and its own
// validation run) before the weights are opened; a GGUF file's even before its
// hyper-parameters are read, so another architecture's keys do not give a confusing error.
Checkpoint open_checkpoint(const std::filesystem::path& path);

}  // namespace opencamp
