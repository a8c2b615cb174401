// Memory-mapped weights: safetensors checkpoints (a single model.safetensors or shards listed
// in model.safetensors.index.json) and GGUF files (opencamp/gguf.h). Tensors are views into the
// mapping (zero-copy); every header is validated before anything is read. Both readers take a
// weight's bytes from the file in one place (src/io/file_tensor.h).
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "opencamp/tensor.h"

namespace opencamp {

class GgufFile;
class MappedFile;

class SafetensorsFile {
 public:
  // Maps the file and validates its header: throws Error(InvalidModel) naming the file.
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  const Tensor* find(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, Tensor> tensors_;  // views into file_
  std::map<std::string, std::string> unsupported_;  // tensor name -> dtype we cannot load
  std::vector<std::shared_ptr<Buffer>> copies_;  // misaligned tensors, copied once
  friend class WeightStore;
};

// The named weights of one checkpoint, whatever its file format, as the model loader asks for
// them. Names are the file's own (model.layers.0.self_attn.q_proj.weight in safetensors,
// blk.0.attn_q.weight in GGUF).
class WeightStore {
 public:
  // Opens model.safetensors or model.safetensors.index.json (and its shards) in `model_dir`.
  static WeightStore open(const std::filesystem::path& model_dir);
  // The tensors of an open GGUF file; a tensor of a ggml type opencamp cannot load is an error
  // naming it and its type once it is required.
  static WeightStore from_gguf(std::shared_ptr<const GgufFile> file);

  bool contains(const std::string& name) const;
  // The tensor, which must exist and have exactly `expected_shape`; otherwise an error that
  // names the tensor, the file, and expected vs found.
  Tensor require(const std::string& name, std::initializer_list<int64_t> expected_shape) const;
  std::vector<std::string> names() const;
  // The names (those of tensors opencamp cannot load included) that require() was never asked
  // for: what the loaded model would silently ignore.
  std::vector<std::string> unrequired() const;
  // Where the tensors came from, for messages ("model.safetensors", the index, the .gguf).
  const std::string& source() const { return source_; }

 private:
  struct Entry {
    Tensor tensor;
    std::string file;  // the file holding it, for messages
  };
  std::vector<std::shared_ptr<const void>> files_;  // the open readers the views point into
  std::vector<std::shared_ptr<Buffer>> copies_;     // misaligned tensors, copied once
  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> unsupported_;  // tensor name -> why it cannot be loaded
  std::string source_;
  std::string shapes_from_ = "config.json";         // what expected shapes derive from
  mutable std::set<std::string> required_;          // every name require() was asked for
};

}  // namespace opencamp
