// GGUF files (llama.cpp's format, versions 2 and 3), memory-mapped and read in place: a header
// (magic "GGUF", version, tensor and metadata counts), typed metadata key/value pairs, tensor
// descriptions (name, dims, ggml type, offset), then the aligned tensor data. Every count,
// length, offset, size and the alignment is checked against the file before it is used, so a
// truncated or corrupt file is an Error naming the file, the key or tensor and what is wrong,
// never a crash. Values and tensor data stay in the mapping (zero-copy).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "opencamp/dtype.h"

namespace opencamp {

class MappedFile;

// Metadata value types, numbered as the format numbers them.
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7, String = 8,
  Array = 9, U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType type);  // "u32", "string", "array", ...

// One metadata value, viewing the mapped file (little-endian, not necessarily aligned: read
// elements through the accessors). A scalar has count 1; an array has element_type and count.
struct GgufValue {
  GgufType type = GgufType::U8;
  GgufType element_type = GgufType::U8;  // arrays only
  uint64_t count = 1;                    // elements of an array; 1 for a scalar
  const unsigned char* data = nullptr;   // the scalar, the string's bytes, or element 0
  uint64_t bytes = 0;                    // of the scalar / string / whole numeric array
  std::vector<std::string_view> strings; // a string array's elements (views of the file)

  bool is_array() const { return type == GgufType::Array; }
  // The scalar type, or an array's element type.
  GgufType value_type() const { return is_array() ? element_type : type; }
  bool is_integer() const;  // an integer scalar (not bool)
  bool is_number() const;   // an integer or float scalar

  // Scalars (the caller checks the type first; GgufFile's lookups do and name the key).
  // integer(): any integer type as int64 (a u64 above INT64_MAX is nullopt); number(): any
  // integer or float as double.
  std::optional<int64_t> integer() const;
  double number() const;
  bool boolean() const;
  std::string_view string() const;
  // Element i of a numeric or bool array, as integer() / number() read a scalar.
  std::optional<int64_t> integer_at(uint64_t i) const;
  double number_at(uint64_t i) const;
};

// ggml's tensor type ids as GGUF stores them (F32 = 0, F16 = 1, Q4_0 = 2, ... BF16 = 30).
// The name ("Q3_K") of any type id ggml has defined, or nullptr for an unknown id.
const char* ggml_type_name(uint32_t type);
// The opencamp format of a ggml type, or nullopt where opencamp has none (Q3_K, IQ4_XS, ...).
std::optional<DType> dtype_from_ggml_type(uint32_t type);
// The ggml types that map to an opencamp format, for messages: "F32, F16, BF16, Q8_0, ...".
const char* supported_ggml_types();

struct GgufTensor {
  std::string name;
  uint32_t ggml_type = 0;
  std::optional<DType> dtype;           // nullopt: a ggml type opencamp cannot load
  int ndim = 0;
  std::array<int64_t, 4> shape{};       // numpy order (ggml's ne reversed): shape[ndim-1] is a row
  uint64_t offset = 0;                  // from the start of the data section
  uint64_t nbytes = 0;
  const unsigned char* data = nullptr;  // in the mapping
};

class GgufFile {
 public:
  // Maps and validates the whole file: throws Error(InvalidModel) naming the file (and the key
  // or tensor) when it is truncated, corrupt or inconsistent, Error(Unsupported) for a valid
  // file this reader does not handle (version 1, big-endian, arrays of arrays).
  static std::shared_ptr<GgufFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // where the tensor data begins

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const GgufValue* find(std::string_view key) const;
  // Typed lookups: the value must exist (or be absent, for the optional ones) and have a
  // fitting type, else Error(InvalidModel) naming the file and the key.
  std::string string(std::string_view key) const;
  std::optional<std::string> optional_string(std::string_view key) const;
  int64_t integer(std::string_view key) const;
  std::optional<int64_t> optional_integer(std::string_view key) const;
  double number(std::string_view key) const;
  std::optional<double> optional_number(std::string_view key) const;
  std::optional<bool> optional_boolean(std::string_view key) const;
  // An array of `element` values (String: strings; a numeric type: any numeric element type).
  const GgufValue* optional_array(std::string_view key, GgufType element) const;

  // Tensors in file order.
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(std::string_view name) const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::map<std::string, size_t, std::less<>> metadata_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
  friend class GgufParser;
};

}  // namespace opencamp
