#include "models/checkpoint.h"

#include <algorithm>
#include <fstream>
#include <vector>

#include "io/mapped_file.h"
#include "opencamp/error.h"
#include "opencamp/gguf.h"
#include "opencamp/model.h"

namespace opencamp {
namespace {

namespace fs = std::filesystem;

// Layer tensor names: Hugging Face after "model.layers.N.", GGUF after "blk.N.".
struct LayerName {
  const char* hugging_face;
  const char* gguf;
};
constexpr LayerName kLayerNames[] = {  // indexed by LayerTensor
    {"input_layernorm", "attn_norm"},
    {"self_attn.q_proj", "attn_q"},
    {"self_attn.k_proj", "attn_k"},
    {"self_attn.v_proj", "attn_v"},
    {"self_attn.o_proj", "attn_output"},
    {"self_attn.q_norm", "attn_q_norm"},
    {"self_attn.k_norm", "attn_k_norm"},
    {"post_attention_layernorm", "ffn_norm"},
    {"mlp.gate_proj", "ffn_gate"},
    {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"},
    {"post_attention_layernorm", "post_attention_norm"},  // sandwich norms (gemma)
    {"post_feedforward_layernorm", "post_ffw_norm"},
};
constexpr LayerName kSandwichFfnNorm = {"pre_feedforward_layernorm", "ffn_norm"};
constexpr LayerName kModelNames[] = {  // indexed by ModelTensor
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
    {"", "rope_freqs.weight"},  // llama.cpp's per-frequency rope divisors (Llama 3 scaling)
};

bool starts_with_gguf_magic(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

bool is_gguf_name(const fs::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".gguf";
}

Checkpoint open_gguf(const fs::path& file_path) {
  Checkpoint c;
  c.format = CheckpointFormat::Gguf;
  c.path = file_path;
  c.config_source = file_path.string();
  std::shared_ptr<GgufFile> file = GgufFile::open(file_path);
  // The architecture first: another architecture's keys would only give a confusing error.
  const Architecture& architecture = find_architecture(file->string("general.architecture"), c.config_source);
  c.config = gguf_model_config(*file);
  architecture.validate(c.config, c.config_source);
  c.interleaved_rope_rows = c.config.model_type == "llama";
  c.sandwich_norms = architecture.traits(c.config).sandwich_norms;
  c.store = std::make_unique<WeightStore>(WeightStore::from_gguf(std::move(file)));
  return c;
}

Checkpoint open_hugging_face(const fs::path& dir) {
  Checkpoint c;
  c.format = CheckpointFormat::HuggingFace;
  c.path = dir;
  c.config_source = (dir / "config.json").string();
  c.config = load_model_config(dir);
  const Architecture& architecture = find_architecture(c.config.model_type, c.config_source);
  architecture.validate(c.config, c.config_source);
  c.sandwich_norms = architecture.traits(c.config).sandwich_norms;
  c.store = std::make_unique<WeightStore>(WeightStore::open(dir));
  return c;
}

}  // namespace

std::string Checkpoint::name(ModelTensor tensor) const {
  const LayerName& n = kModelNames[static_cast<size_t>(tensor)];
  return format == CheckpointFormat::Gguf ? n.gguf : n.hugging_face;
}

std::string Checkpoint::name(int layer, LayerTensor tensor, const char* kind) const {
  const LayerName& n = sandwich_norms && tensor == LayerTensor::FfnNorm ? kSandwichFfnNorm
                                                                        : kLayerNames[static_cast<size_t>(tensor)];
  const std::string suffix = *kind ? std::string(".") + kind : std::string();
  if (format == CheckpointFormat::Gguf) return "blk." + std::to_string(layer) + "." + n.gguf + suffix;
  return "model.layers." + std::to_string(layer) + "." + n.hugging_face + suffix;
}

Checkpoint open_checkpoint(const fs::path& path) {
  if (is_regular_path(path)) {
    if (is_gguf_name(path) || starts_with_gguf_magic(path)) return open_gguf(path);
    fail(ErrorKind::InvalidModel, path.string(), " is neither a GGUF file nor a model folder; pass a "
         ".gguf file, or a Hugging Face folder with config.json and model.safetensors");
  }
  const fs::file_type type = path_type(path);
  if (type != fs::file_type::not_found && type != fs::file_type::directory) {
    fail(ErrorKind::InvalidModel, path.string(), " is not a regular file or a directory; pass a "
         ".gguf file, or a Hugging Face folder with config.json and model.safetensors");
  }
  if (type == fs::file_type::directory && !path_exists(path / "model.safetensors") &&
      !path_exists(path / "model.safetensors.index.json")) {
    std::vector<fs::path> ggufs;
    std::error_code unreadable;
    for (const auto& entry : fs::directory_iterator(path, unreadable)) {
      std::error_code broken;  // a dangling or looping link is not a candidate
      if (entry.is_regular_file(broken) && is_gguf_name(entry.path())) ggufs.push_back(entry.path());
    }
    std::sort(ggufs.begin(), ggufs.end());
    if (ggufs.size() == 1) return open_gguf(ggufs.front());
    if (ggufs.size() > 1) {
      std::string names;
      bool split = false;
      for (const fs::path& p : ggufs) {
        names += (names.empty() ? "" : ", ") + p.filename().string();
        split = split || p.filename().string().find("-of-0") != std::string::npos;
      }
      fail(ErrorKind::InvalidModel, path.string(), " holds ", ggufs.size(), " GGUF files (", names,
           "); pass the one to load as the model path",
           split ? " (GGUF files split into parts are not supported: merge them with llama.cpp's "
                   "gguf-split --merge)" : "");
    }
  }
  return open_hugging_face(path);
}

}  // namespace opencamp
