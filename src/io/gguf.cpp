// The GGUF reader: one bounds-checked pass over the mapped header, then the tensor table checked
// against the data section. Nothing is read before its length has been checked against what is
// left of the file, and no count is trusted to size an allocation before that check.
#include "opencamp/gguf.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

#include "io/file_tensor.h"
#include "io/json.h"
#include "io/mapped_file.h"
#include "opencamp/error.h"
#include "opencamp/weights.h"

namespace opencamp {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;              // ggml's GGML_MAX_DIMS
constexpr uint64_t kDefaultAlignment = 32;

struct GgmlType {
  const char* name;
  int64_t block_elements;  // 0: an id ggml no longer defines
  uint64_t block_bytes;
  std::optional<DType> dtype;
};

// Indexed by ggml type id (ggml.h `enum ggml_type`; block sizes from ggml's type traits).
constexpr GgmlType kGgmlTypes[] = {
    {"F32", 1, 4, DType::F32},       {"F16", 1, 2, DType::F16},
    {"Q4_0", 32, 18, DType::Q4_0},   {"Q4_1", 32, 20, DType::Q4_1},
    {"Q4_2", 0, 0, {}},              {"Q4_3", 0, 0, {}},
    {"Q5_0", 32, 22, DType::Q5_0},   {"Q5_1", 32, 24, DType::Q5_1},
    {"Q8_0", 32, 34, DType::Q8_0},   {"Q8_1", 32, 36, {}},
    {"Q2_K", 256, 84, {}},           {"Q3_K", 256, 110, {}},
    {"Q4_K", 256, 144, DType::Q4_K}, {"Q5_K", 256, 176, DType::Q5_K},
    {"Q6_K", 256, 210, DType::Q6_K}, {"Q8_K", 256, 292, {}},
    {"IQ2_XXS", 256, 66, {}},        {"IQ2_XS", 256, 74, {}},
    {"IQ3_XXS", 256, 98, {}},        {"IQ1_S", 256, 50, {}},
    {"IQ4_NL", 32, 18, {}},          {"IQ3_S", 256, 110, {}},
    {"IQ2_S", 256, 82, {}},          {"IQ4_XS", 256, 136, {}},
    {"I8", 1, 1, {}},                {"I16", 1, 2, {}},
    {"I32", 1, 4, {}},               {"I64", 1, 8, {}},
    {"F64", 1, 8, {}},               {"IQ1_M", 256, 56, {}},
    {"BF16", 1, 2, DType::BF16},     {"Q4_0_4_4", 0, 0, {}},
    {"Q4_0_4_8", 0, 0, {}},          {"Q4_0_8_8", 0, 0, {}},
    {"TQ1_0", 256, 54, {}},          {"TQ2_0", 256, 66, {}},
    {"IQ4_NL_4_4", 0, 0, {}},        {"IQ4_NL_4_8", 0, 0, {}},
    {"IQ4_NL_8_8", 0, 0, {}},        {"MXFP4", 32, 17, {}},
};

const GgmlType* ggml_type(uint32_t id) {
  if (id >= std::size(kGgmlTypes)) return nullptr;
  return &kGgmlTypes[id];
}

// Bytes of one scalar of a fixed-size metadata type; 0 for string / array / unknown.
uint64_t scalar_bytes(GgufType type) {
  switch (type) {
    case GgufType::U8: case GgufType::I8: case GgufType::Bool: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    case GgufType::String: case GgufType::Array: return 0;
  }
  return 0;
}

bool known_value_type(uint32_t raw) { return raw <= static_cast<uint32_t>(GgufType::F64); }

template <class T>
T load(const unsigned char* p) {
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

bool integer_type(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16:
    case GgufType::U32: case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
    default: return false;
  }
}

std::optional<int64_t> read_integer(GgufType t, const unsigned char* p) {
  switch (t) {
    case GgufType::U8: return load<uint8_t>(p);
    case GgufType::I8: return load<int8_t>(p);
    case GgufType::U16: return load<uint16_t>(p);
    case GgufType::I16: return load<int16_t>(p);
    case GgufType::U32: return load<uint32_t>(p);
    case GgufType::I32: return load<int32_t>(p);
    case GgufType::I64: return load<int64_t>(p);
    case GgufType::U64: {
      const uint64_t v = load<uint64_t>(p);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return static_cast<int64_t>(v);
    }
    case GgufType::Bool: return load<uint8_t>(p);
    default: return std::nullopt;
  }
}

double read_number(GgufType t, const unsigned char* p) {
  if (t == GgufType::F32) return load<float>(p);
  if (t == GgufType::F64) return load<double>(p);
  if (t == GgufType::U64) return static_cast<double>(load<uint64_t>(p));
  const std::optional<int64_t> v = read_integer(t, p);
  return v ? static_cast<double>(*v) : 0.0;
}

}  // namespace

const char* gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::U8: return "u8";
    case GgufType::I8: return "i8";
    case GgufType::U16: return "u16";
    case GgufType::I16: return "i16";
    case GgufType::U32: return "u32";
    case GgufType::I32: return "i32";
    case GgufType::F32: return "f32";
    case GgufType::Bool: return "bool";
    case GgufType::String: return "string";
    case GgufType::Array: return "array";
    case GgufType::U64: return "u64";
    case GgufType::I64: return "i64";
    case GgufType::F64: return "f64";
  }
  return "?";
}

const char* ggml_type_name(uint32_t type) {
  const GgmlType* t = ggml_type(type);
  return t ? t->name : nullptr;
}

std::optional<DType> dtype_from_ggml_type(uint32_t type) {
  const GgmlType* t = ggml_type(type);
  return t ? t->dtype : std::nullopt;
}

const char* supported_ggml_types() {
  return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";
}

bool GgufValue::is_integer() const { return integer_type(type); }
bool GgufValue::is_number() const {
  return integer_type(type) || type == GgufType::F32 || type == GgufType::F64;
}
std::optional<int64_t> GgufValue::integer() const { return read_integer(type, data); }
double GgufValue::number() const { return read_number(type, data); }
bool GgufValue::boolean() const { return data[0] != 0; }
std::string_view GgufValue::string() const {
  return {reinterpret_cast<const char*>(data), static_cast<size_t>(bytes)};
}
std::optional<int64_t> GgufValue::integer_at(uint64_t i) const {
  return read_integer(element_type, data + i * scalar_bytes(element_type));
}
double GgufValue::number_at(uint64_t i) const {
  return read_number(element_type, data + i * scalar_bytes(element_type));
}

// Reads the mapped bytes front to back; every read checks what is left first.
class GgufParser {
 public:
  GgufParser(GgufFile& file, const unsigned char* bytes, uint64_t size)
      : file_(file), name_(file.path_.string()), bytes_(bytes), size_(size) {}

  void parse() {
    if (size_ < 4 || load<uint32_t>(bytes_) != kMagic) {
      fail(ErrorKind::InvalidModel, name_, " is not a GGUF file (it does not start with the magic "
           "bytes \"GGUF\"", size_ < 4 ? "; it is shorter than 4 bytes" : "", ")");
    }
    pos_ = 4;
    const uint32_t version = u32("the version");
    if (version == 1) {
      fail(ErrorKind::Unsupported, name_, " is GGUF version 1 (2023's first format, 32-bit counts); "
           "opencamp reads versions 2 and 3: convert the model again with a current llama.cpp");
    }
    if (version != 2 && version != 3) {
      const uint32_t swapped = __builtin_bswap32(version);  // std::byteswap is C++23
      if (swapped >= 1 && swapped <= 3) {
        fail(ErrorKind::Unsupported, name_, " is a big-endian GGUF file; opencamp reads little-endian "
             "ones (convert it with gguf-convert-endian from the gguf package)");
      }
      fail(ErrorKind::Unsupported, name_, " has GGUF version ", version,
           "; opencamp reads versions 2 and 3 (a newer file needs a newer opencamp)");
    }
    file_.version_ = version;
    const uint64_t n_tensors = u64("the tensor count");
    const uint64_t n_metadata = u64("the metadata count");
    // The smallest metadata entry takes 13 bytes (an empty key's length, the type, a u8), the
    // smallest tensor description 32 (name length, 1 dim, the dim, type, offset): larger counts
    // cannot be true, and are refused before anything is sized by them.
    if (n_metadata > remaining() / 13) {
      fail(ErrorKind::InvalidModel, name_, ": the header says ", n_metadata,
           " metadata entries, more than the file's ", size_, " bytes can hold (truncated or corrupt)");
    }
    if (n_tensors > remaining() / 32) {
      fail(ErrorKind::InvalidModel, name_, ": the header says ", n_tensors,
           " tensors, more than the file's ", size_, " bytes can hold (truncated or corrupt)");
    }
    file_.metadata_.reserve(static_cast<size_t>(n_metadata));
    for (uint64_t i = 0; i < n_metadata; ++i) read_metadata_entry(i);
    read_alignment();

    file_.tensors_.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) read_tensor_info(i);

    // The data section starts at the next multiple of the alignment.
    const uint64_t pad = (file_.alignment_ - pos_ % file_.alignment_) % file_.alignment_;
    const uint64_t data_offset = pos_ + pad;
    if (data_offset > size_ && !file_.tensors_.empty()) {
      fail(ErrorKind::InvalidModel, name_, ": the tensor data would start at byte ", data_offset,
           ", past the end of the file (", size_, " bytes); the file is truncated");
    }
    file_.data_offset_ = data_offset;
    const uint64_t data_bytes = data_offset <= size_ ? size_ - data_offset : 0;
    for (GgufTensor& t : file_.tensors_) {
      if (t.offset % file_.alignment_ != 0) {
        fail(ErrorKind::InvalidModel, name_, ": tensor ", t.name, " has data offset ", t.offset,
             ", not a multiple of the file's alignment ", file_.alignment_, " (corrupt file)");
      }
      if (t.offset > data_bytes || t.nbytes > data_bytes - t.offset) {
        fail(ErrorKind::InvalidModel, name_, ": tensor ", t.name, " needs ", t.nbytes, " bytes at offset ", t.offset,
             " of the data section, which has only ", data_bytes,
             " bytes; the file is truncated or corrupt, download it again");
      }
      t.data = bytes_ + data_offset + t.offset;
    }
  }

 private:
  uint64_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const std::string& what) {
    if (n > remaining()) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " needs ", n, " bytes at byte ", pos_,
           " but the file ends after ", remaining(), " more (truncated or corrupt)");
    }
  }
  uint32_t u32(const std::string& what) {
    need(4, what);
    const uint32_t v = load<uint32_t>(bytes_ + pos_);
    pos_ += 4;
    return v;
  }
  uint64_t u64(const std::string& what) {
    need(8, what);
    const uint64_t v = load<uint64_t>(bytes_ + pos_);
    pos_ += 8;
    return v;
  }
  std::string_view str(const std::string& what) {
    const uint64_t length = u64(what + "'s length");
    if (length > remaining()) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " is ", length, " bytes long at byte ", pos_,
           " but the file ends after ", remaining(), " more (truncated or corrupt)");
    }
    const std::string_view s(reinterpret_cast<const char*>(bytes_ + pos_), static_cast<size_t>(length));
    pos_ += length;
    return s;
  }

  // GGUF strings are UTF-8; a key or name that is not would reach messages and Python as bytes
  // no str can hold, so it is refused here, by position (its bytes cannot be printed).
  std::string utf8_name(std::string_view s, const std::string& what) {
    if (!json::is_valid_utf8(s)) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " is not valid UTF-8 (corrupt file)");
    }
    return std::string(s);
  }

  void read_metadata_entry(uint64_t index) {
    const std::string number = "metadata key #" + std::to_string(index);
    const std::string key = utf8_name(str(number), number);
    const std::string what = "metadata key " + key;
    GgufValue value;
    const uint32_t raw_type = u32(what + "'s type");
    if (!known_value_type(raw_type)) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " has unknown value type ", raw_type,
           " (GGUF defines 0 to 12; corrupt file?)");
    }
    value.type = static_cast<GgufType>(raw_type);
    if (value.type == GgufType::Array) {
      const uint32_t raw_element = u32(what + "'s element type");
      if (!known_value_type(raw_element)) {
        fail(ErrorKind::InvalidModel, name_, ": ", what, " is an array of unknown value type ",
             raw_element, " (GGUF defines 0 to 12; corrupt file?)");
      }
      value.element_type = static_cast<GgufType>(raw_element);
      if (value.element_type == GgufType::Array) {
        fail(ErrorKind::Unsupported, name_, ": ", what,
             " is an array of arrays, which opencamp does not read");
      }
      value.count = u64(what + "'s element count");
      if (value.element_type == GgufType::String) {
        if (value.count > remaining() / 8) {  // each string has at least its 8-byte length
          fail(ErrorKind::InvalidModel, name_, ": ", what, " says it holds ", value.count,
               " strings, more than the rest of the file can (truncated or corrupt)");
        }
        value.data = bytes_ + pos_;
        value.strings.reserve(static_cast<size_t>(value.count));
        for (uint64_t i = 0; i < value.count; ++i) {
          value.strings.push_back(str(what + "[" + std::to_string(i) + "]"));
        }
        value.bytes = pos_ - static_cast<uint64_t>(value.data - bytes_);
      } else {
        const uint64_t element = scalar_bytes(value.element_type);
        if (value.count > remaining() / element) {
          fail(ErrorKind::InvalidModel, name_, ": ", what, " says it holds ", value.count, " ",
               gguf_type_name(value.element_type), " values (", element,
               " bytes each), more than the file has left after byte ", pos_, " (truncated or corrupt)");
        }
        value.bytes = value.count * element;
        value.data = bytes_ + pos_;
        if (value.element_type == GgufType::Bool) {
          for (uint64_t i = 0; i < value.count; ++i) check_bool(value.data[i], what);
        }
        pos_ += value.bytes;
      }
    } else if (value.type == GgufType::String) {
      const std::string_view s = str(what);
      value.data = reinterpret_cast<const unsigned char*>(s.data());
      value.bytes = s.size();
    } else {
      value.bytes = scalar_bytes(value.type);
      need(value.bytes, what + "'s " + gguf_type_name(value.type) + " value");
      value.data = bytes_ + pos_;
      if (value.type == GgufType::Bool) check_bool(value.data[0], what);
      pos_ += value.bytes;
    }
    if (!file_.metadata_index_.emplace(key, file_.metadata_.size()).second) {
      fail(ErrorKind::InvalidModel, name_, ": metadata key ", key, " appears twice (corrupt file)");
    }
    file_.metadata_.emplace_back(key, std::move(value));
  }

  void check_bool(unsigned char byte, const std::string& what) {
    if (byte > 1) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " holds a bool of value ",
           static_cast<int>(byte), " (must be 0 or 1; corrupt file)");
    }
  }

  void read_alignment() {
    const GgufValue* v = file_.find("general.alignment");
    if (!v) return;
    if (v->is_array() || !v->is_integer()) {
      fail(ErrorKind::InvalidModel, name_, ": general.alignment is a ", gguf_type_name(v->type),
           ", expected an integer");
    }
    const std::optional<int64_t> alignment = v->integer();
    if (!alignment || *alignment <= 0 || !std::has_single_bit(static_cast<uint64_t>(*alignment)) ||
        *alignment > (int64_t{1} << 30)) {
      fail(ErrorKind::InvalidModel, name_, ": general.alignment is ",
           alignment ? std::to_string(*alignment) : std::string("out of range"),
           "; it must be a power of two (32 by default)");
    }
    file_.alignment_ = static_cast<uint64_t>(*alignment);
  }

  void read_tensor_info(uint64_t index) {
    GgufTensor t;
    const std::string number = "the name of tensor #" + std::to_string(index);
    t.name = utf8_name(str(number), number);
    const std::string what = "tensor " + t.name;
    const uint32_t n_dims = u32(what + "'s dimension count");
    if (n_dims == 0 || n_dims > kMaxDims) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " has ", n_dims,
           " dimensions; GGUF tensors have 1 to ", kMaxDims);
    }
    t.ndim = static_cast<int>(n_dims);
    std::array<uint64_t, kMaxDims> ne{};  // ggml order: ne[0] is the row length
    for (uint32_t d = 0; d < n_dims; ++d) ne[d] = u64(what + "'s dimension " + std::to_string(d));
    t.ggml_type = u32(what + "'s type");
    t.offset = u64(what + "'s data offset");

    const GgmlType* type = ggml_type(t.ggml_type);
    if (!type || type->block_elements == 0) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " has unknown ggml type id ", t.ggml_type,
           type ? std::string(" (") + type->name + ", which ggml no longer defines)" : std::string(),
           "; corrupt file, or a type newer than this opencamp");
    }
    t.dtype = type->dtype;
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      if (ne[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (ne[d] != 0 && numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ne[d])) {
        fail(ErrorKind::InvalidModel, name_, ": ", what, " has dimensions whose product overflows ",
             "(dimension ", d, " is ", ne[d], "; corrupt file)");
      }
      numel *= ne[d];
      t.shape[n_dims - 1 - d] = static_cast<int64_t>(ne[d]);
    }
    if (ne[0] % static_cast<uint64_t>(type->block_elements) != 0) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, " has rows of ", ne[0], " values, not a "
           "whole number of ", type->name, " blocks of ", type->block_elements, " (corrupt file)");
    }
    const uint64_t blocks = numel / static_cast<uint64_t>(type->block_elements);
    if (blocks > std::numeric_limits<uint64_t>::max() / type->block_bytes) {
      fail(ErrorKind::InvalidModel, name_, ": ", what, "'s size overflows (corrupt file)");
    }
    t.nbytes = blocks * type->block_bytes;
    if (!file_.tensor_index_.emplace(t.name, file_.tensors_.size()).second) {
      fail(ErrorKind::InvalidModel, name_, ": tensor ", t.name, " appears twice (corrupt file)");
    }
    file_.tensors_.push_back(std::move(t));
  }

  GgufFile& file_;
  std::string name_;
  const unsigned char* bytes_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

std::shared_ptr<GgufFile> GgufFile::open(const std::filesystem::path& path) {
  auto result = std::shared_ptr<GgufFile>(new GgufFile());
  result->path_ = path;
  result->file_ = std::make_shared<MappedFile>(path);
  GgufParser(*result, result->file_->data(), result->file_->size()).parse();
  return result;
}

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = metadata_index_.find(key);
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].second;
}

const GgufTensor* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

[[noreturn]] void wrong_type(const GgufFile& file, std::string_view key, const GgufValue& v,
                             const char* expected) {
  fail(ErrorKind::InvalidModel, file.path().string(), ": metadata key ", key, " is ",
       v.is_array() ? std::string("an array of ") + gguf_type_name(v.element_type)
                    : std::string("a ") + gguf_type_name(v.type),
       ", expected ", expected);
}

[[noreturn]] void missing(const GgufFile& file, std::string_view key) {
  fail(ErrorKind::InvalidModel, file.path().string(), ": metadata key ", key,
       " is missing; the file is incomplete or was not written for this architecture");
}

}  // namespace

std::optional<std::string> GgufFile::optional_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufType::String) wrong_type(*this, key, *v, "a string");
  if (!json::is_valid_utf8(v->string())) {
    fail(ErrorKind::InvalidModel, path_.string(), ": metadata key ", key, " is not valid UTF-8 (corrupt file)");
  }
  return std::string(v->string());
}

std::string GgufFile::string(std::string_view key) const {
  std::optional<std::string> s = optional_string(key);
  if (!s) missing(*this, key);
  return *s;
}

std::optional<int64_t> GgufFile::optional_integer(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_array() || !v->is_integer()) wrong_type(*this, key, *v, "an integer");
  const std::optional<int64_t> value = v->integer();
  if (!value) {
    fail(ErrorKind::InvalidModel, path_.string(), ": metadata key ", key, " is out of range");
  }
  return value;
}

int64_t GgufFile::integer(std::string_view key) const {
  std::optional<int64_t> v = optional_integer(key);
  if (!v) missing(*this, key);
  return *v;
}

std::optional<double> GgufFile::optional_number(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_array() || !v->is_number()) wrong_type(*this, key, *v, "a number");
  return v->number();
}

double GgufFile::number(std::string_view key) const {
  std::optional<double> v = optional_number(key);
  if (!v) missing(*this, key);
  return *v;
}

std::optional<bool> GgufFile::optional_boolean(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufType::Bool) wrong_type(*this, key, *v, "a bool");
  return v->boolean();
}

const GgufValue* GgufFile::optional_array(std::string_view key, GgufType element) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  const bool numeric = element != GgufType::String;
  if (!v->is_array() || (numeric ? v->element_type == GgufType::String : v->element_type != element)) {
    wrong_type(*this, key, *v, numeric ? "an array of numbers" : "an array of strings");
  }
  return v;
}

WeightStore WeightStore::from_gguf(std::shared_ptr<const GgufFile> file) {
  WeightStore store;
  store.source_ = file->path().string();
  store.shapes_from_ = "the GGUF metadata";
  for (const GgufTensor& t : file->tensors()) {
    if (!t.dtype) {
      store.unsupported_[t.name] = std::string(store.source_) + " stores it as " +
                                   ggml_type_name(t.ggml_type) + ", which opencamp cannot load; supported: " +
                                   supported_ggml_types();
      continue;
    }
    store.tensors_[t.name] = {tensor_from_file(t.data, *t.dtype, t.ndim, t.shape, store.copies_), store.source_};
  }
  store.files_.push_back(std::move(file));
  return store;
}

}  // namespace opencamp
