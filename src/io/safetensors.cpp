// safetensors: an 8-byte little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets}, then the raw data. Everything in the header is checked against
// the file before a tensor view is handed out, so a corrupt file is an error, never a crash.
#include <algorithm>
#include <cstring>
#include <set>

#include "io/file_tensor.h"
#include "io/json.h"
#include "io/mapped_file.h"
#include "opencamp/error.h"
#include "opencamp/weights.h"

namespace opencamp {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit
constexpr const char* kSafetensorsSupported = ", which opencamp cannot load (supported: F32, BF16, F16)";

bool parse_dtype(const std::string& name, DType& dtype) {
  if (name == "F32") dtype = DType::F32;
  else if (name == "BF16") dtype = DType::BF16;
  else if (name == "F16") dtype = DType::F16;
  else if (name == "I32") dtype = DType::I32;  // token ids in reference files
  else return false;
  return true;
}

int64_t as_index(const json::Value& v, const std::string& file, const std::string& tensor,
                 const char* field) {
  if (!v.is_number() || v.as_number() < 0 || v.as_number() != static_cast<double>(static_cast<int64_t>(v.as_number()))) {
    fail(ErrorKind::InvalidModel, file, ": tensor '", tensor, "' has a malformed ", field,
         " (expected non-negative integers)");
  }
  return static_cast<int64_t>(v.as_number());
}

// The first `known` extents of a shape being read, "..." for the rest: "[2147483648, 2147483648]".
std::string shape_text(const Tensor& tensor, size_t known, size_t ndim) {
  std::string text = "[";
  for (size_t d = 0; d < known; ++d) text += (d ? ", " : "") + std::to_string(tensor.shape[d]);
  return text + (known < ndim ? ", ...]" : "]");
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  auto result = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  result->path_ = path;
  result->file_ = std::make_shared<MappedFile>(path);
  const std::string file = path.string();
  const unsigned char* bytes = result->file_->data();
  const size_t size = result->file_->size();

  if (size < 8) {
    fail(ErrorKind::InvalidModel, file, ": ", size,
         " bytes is too short for a safetensors file (truncated or empty)");
  }
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | bytes[i];
  if (header_bytes > kMaxHeaderBytes || header_bytes > size - 8) {
    fail(ErrorKind::InvalidModel, file, ": the header length field says ", header_bytes,
         " bytes but the file has ", size - 8,
         " bytes after it; the file is truncated or not a safetensors file");
  }
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + 8), header_bytes);
  const json::Value header = json::parse(header_text, file + " (safetensors header)");
  if (!header.is_object()) {
    fail(ErrorKind::InvalidModel, file, ": the safetensors header is ", json::type_name(header.type()),
         ", expected an object of tensors");
  }
  const unsigned char* data_start = bytes + 8 + header_bytes;
  const uint64_t data_bytes = size - 8 - header_bytes;

  // Every tensor's [begin, end), to check that together they tile the data section exactly.
  struct Extent {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Extent> extents;
  for (const auto& [name, entry] : header.as_object()) {
    if (name == "__metadata__") continue;
    if (!entry.is_object()) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' is ", json::type_name(entry.type()),
           ", expected {dtype, shape, data_offsets}");
    }
    const json::Value* dtype_value = entry.find("dtype");
    const json::Value* shape_value = entry.find("shape");
    const json::Value* offsets_value = entry.find("data_offsets");
    if (!dtype_value || !dtype_value->is_string() || !shape_value || !shape_value->is_array() ||
        !offsets_value || !offsets_value->is_array() || offsets_value->as_array().size() != 2) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name,
           "' needs dtype (string), shape (array) and data_offsets ([begin, end])");
    }
    const uint64_t begin = as_index(offsets_value->as_array()[0], file, name, "data_offsets");
    const uint64_t end = as_index(offsets_value->as_array()[1], file, name, "data_offsets");
    if (end < begin) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' has data_offsets [", begin, ", ",
           end, "] that end before they begin");
    }
    if (end > data_bytes) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' has data_offsets [", begin, ", ",
           end, "] outside the file's data (", data_bytes,
           " bytes); the file is truncated or corrupt, download it again");
    }
    extents.push_back({begin, end, &name});
    DType dtype;
    if (!parse_dtype(dtype_value->as_string(), dtype)) {
      result->unsupported_[name] = dtype_value->as_string();
      continue;  // only an error if the model needs this tensor
    }
    const auto& dims = shape_value->as_array();
    if (dims.size() > static_cast<size_t>(Tensor::kMaxDims) || dims.empty()) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' has ", dims.size(),
           " dims; opencamp handles 1 to 4");
    }
    Tensor tensor;
    tensor.dtype = dtype;
    tensor.ndim = static_cast<int>(dims.size());
    // The byte count is computed without wrapping: [2^31, 2^31] F32 is 2^64 bytes, not 0.
    uint64_t nbytes = dtype_size(dtype);
    for (size_t d = 0; d < dims.size(); ++d) {
      tensor.shape[d] = as_index(dims[d], file, name, "shape");
      const uint64_t extent = static_cast<uint64_t>(tensor.shape[d]);
      if (extent > 0 && nbytes > data_bytes / extent) {
        fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' of shape ", shape_text(tensor, d + 1, dims.size()),
             " and dtype ", dtype_value->as_string(), " would need more bytes than the file's data (",
             data_bytes, ")");
      }
      nbytes *= extent;
    }
    if (end - begin != nbytes) {
      fail(ErrorKind::InvalidModel, file, ": tensor '", name, "' of shape ", shape_string(tensor),
           " and dtype ", dtype_value->as_string(), " needs ", nbytes,
           " bytes but data_offsets span ", end - begin);
    }
    result->tensors_.emplace(name, tensor_from_file(data_start + begin, dtype, tensor.ndim,
                                                    tensor.shape, result->copies_));
  }
  // As the safetensors library requires: the tensors, in offset order, cover the data section
  // from its first byte to its last with no overlap (two names for the same bytes, or bytes
  // shared by two tensors) and no gap or trailing bytes (a shifted or padded file).
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const Extent& e : extents) {
    if (e.begin < covered) {
      fail(ErrorKind::InvalidModel, file, ": tensors '", *previous, "' and '", *e.name,
           "' overlap (data_offsets up to ", covered, " and from ", e.begin,
           "); the header is corrupt");
    }
    if (e.begin > covered) {
      fail(ErrorKind::InvalidModel, file, ": ", e.begin - covered, " bytes at data offset ", covered,
           " belong to no tensor (the next, '", *e.name, "', starts at ", e.begin,
           "); the header is corrupt or the data shifted");
    }
    covered = e.end;
    previous = e.name;
  }
  if (covered != data_bytes) {
    fail(ErrorKind::InvalidModel, file, ": ", data_bytes - covered, " bytes after the last tensor's data (",
         data_bytes, " bytes of data, tensors end at ", covered,
         "); the file has trailing garbage or the header is wrong");
  }
  return result;
}

const Tensor* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

WeightStore WeightStore::open(const std::filesystem::path& model_dir) {
  WeightStore store;
  const auto index_path = model_dir / "model.safetensors.index.json";
  const auto single_path = model_dir / "model.safetensors";
  if (path_exists(index_path)) {
    store.source_ = index_path.string();
    const json::Value index = json::parse(read_text_file(index_path), store.source_);
    const json::Value* weight_map = index.find("weight_map");
    if (!weight_map || !weight_map->is_object()) {
      fail(ErrorKind::InvalidModel, store.source_, ": missing the \"weight_map\" object");
    }
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (const auto& [name, shard_value] : weight_map->as_object()) {
      if (!shard_value.is_string()) {
        fail(ErrorKind::InvalidModel, store.source_, ": weight_map entry '", name, "' is not a file name");
      }
      const std::string& shard = shard_value.as_string();
      const std::filesystem::path shard_path(shard);
      if (shard_path.is_absolute() || shard_path.filename() != shard_path) {
        fail(ErrorKind::InvalidModel, store.source_, ": shard '", shard,
             "' must be a file name inside the model directory");
      }
      auto it = shards.find(shard);
      if (it == shards.end()) {
        if (!path_exists(model_dir / shard_path)) {
          fail(ErrorKind::InvalidModel, store.source_, " lists shard '", shard,
               "', which is missing from ", model_dir.string(), "; download the complete model");
        }
        auto opened = SafetensorsFile::open(model_dir / shard_path);
        store.files_.push_back(opened);
        it = shards.emplace(shard, opened).first;
      }
      const Tensor* tensor = it->second->find(name);
      if (!tensor) {
        if (it->second->unsupported_.count(name)) {
          store.unsupported_[name] = it->second->path().string() + " stores it as " +
                                     it->second->unsupported_.at(name) + kSafetensorsSupported;
          continue;
        }
        fail(ErrorKind::InvalidModel, store.source_, " maps tensor '", name, "' to ", shard,
             ", which does not contain it");
      }
      store.tensors_[name] = {*tensor, it->second->path().string()};
    }
  } else if (path_exists(single_path)) {
    store.source_ = single_path.string();
    auto opened = SafetensorsFile::open(single_path);
    store.files_.push_back(opened);
    for (const auto& [name, tensor] : opened->tensors()) store.tensors_[name] = {tensor, single_path.string()};
    for (const auto& [name, dtype] : opened->unsupported_) {
      store.unsupported_[name] = single_path.string() + " stores it as " + dtype + kSafetensorsSupported;
    }
  } else {
    std::string found;
    std::error_code unreadable;  // an unlistable folder only loses the hint
    if (is_directory_path(model_dir)) {
      for (const auto& entry : std::filesystem::directory_iterator(model_dir, unreadable)) {
        const std::string ext = entry.path().extension().string();
        if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".safetensors") {
          found += (found.empty() ? "" : ", ") + entry.path().filename().string();
        }
      }
    }
    fail(ErrorKind::InvalidModel, "no weights in ", model_dir.string(),
         ": expected model.safetensors or model.safetensors.index.json",
         found.empty() ? std::string() : " (found " + found + "; convert them to safetensors)");
  }
  return store;
}

bool WeightStore::contains(const std::string& name) const { return tensors_.count(name) > 0; }

Tensor WeightStore::require(const std::string& name, std::initializer_list<int64_t> expected) const {
  required_.insert(name);
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    auto unsupported = unsupported_.find(name);
    if (unsupported != unsupported_.end()) {
      fail(ErrorKind::InvalidModel, "tensor '", name, "': ", unsupported->second);
    }
    fail(ErrorKind::InvalidModel, "tensor '", name, "' is missing from ", source_,
         "; the weights do not match ", shapes_from_, " (wrong architecture or layer count?)");
  }
  const Tensor& tensor = it->second.tensor;
  if (tensor.dtype == DType::I32) {  // readable (reference files), but never a weight
    fail(ErrorKind::InvalidModel, "tensor '", name, "': ", it->second.file,
         " stores it as I32, which opencamp cannot load as a weight");
  }
  bool matches = tensor.ndim == static_cast<int>(expected.size());
  int d = 0;
  for (int64_t extent : expected) matches = matches && tensor.shape[d++] == extent;
  if (!matches) {
    std::string wanted = "[";
    d = 0;
    for (int64_t extent : expected) wanted += (d++ ? ", " : "") + std::to_string(extent);
    fail(ErrorKind::InvalidModel, "tensor '", name, "' in ", it->second.file, " has shape ",
         shape_string(tensor), " but ", shapes_from_, " implies ", wanted, "]");
  }
  return tensor;
}

std::vector<std::string> WeightStore::unrequired() const {
  std::vector<std::string> result;
  for (const auto& [name, entry] : tensors_) {
    if (!required_.count(name)) result.push_back(name);
  }
  for (const auto& [name, why] : unsupported_) {
    if (!required_.count(name)) result.push_back(name);
  }
  std::sort(result.begin(), result.end());
  return result;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> result;
  for (const auto& [name, entry] : tensors_) result.push_back(name);
  return result;
}

}  // namespace opencamp
