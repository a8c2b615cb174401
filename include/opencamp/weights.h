// Memory-mapped safetensors checkpoints: a single model.safetensors or shards listed in
// model.safetensors.index.json. Tensors are views into the mapping (zero-copy); every header
// is validated before anything is read.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "opencamp/tensor.h"

namespace opencamp {

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

class WeightStore {
 public:
  // Opens model.safetensors or model.safetensors.index.json (and its shards) in `model_dir`.
  static WeightStore open(const std::filesystem::path& model_dir);

  bool contains(const std::string& name) const;
  // The tensor, which must exist and have exactly `expected_shape`; otherwise an error that
  // names the tensor, the file, and expected vs found.
  Tensor require(const std::string& name, std::initializer_list<int64_t> expected_shape) const;
  std::vector<std::string> names() const;
  // Where the tensors came from, for messages ("model.safetensors" or the index).
  const std::string& source() const { return source_; }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<Tensor, const SafetensorsFile*>> tensors_;
  std::map<std::string, std::string> unsupported_;  // tensor name -> why it cannot be loaded
  std::string source_;
};

}  // namespace opencamp
