// Helpers shared by the ctest executables: temporary directories, a small safetensors writer
// (to build valid and broken checkpoints on the fly) and access to the committed fixtures.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "opencamp/dtype.h"
#include "opencamp/engine.h"
#include "opencamp/weights.h"

#ifndef OPENCAMP_FIXTURES
#error "OPENCAMP_FIXTURES must point at tests/fixtures"
#endif

namespace opencamp_test {

namespace fs = std::filesystem;

inline fs::path fixtures_dir() { return fs::path(OPENCAMP_FIXTURES); }
inline fs::path fixture(const std::string& name) { return fixtures_dir() / name; }
// The shared real-model folder: $OPENCAMP_SHARED_MODELS, else ../shared/models next to the
// repository (as tests/run_all.sh and the Python tests find it).
inline fs::path shared_models_dir() {
  if (const char* env = std::getenv("OPENCAMP_SHARED_MODELS")) return fs::path(env);
  return fixtures_dir().parent_path().parent_path().parent_path() / "shared" / "models";
}

// A fresh directory under the system temp dir, removed (with its contents) on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "test") {
    static std::atomic<int> counter{0};
    const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
    std::ostringstream name;
    name << "opencamp-" << tag << "-" << ::getpid() << "-" << counter++ << "-"
         << std::hex << (static_cast<uint64_t>(ticks) & 0xffffff);
    path_ = fs::temp_directory_path() / name.str();
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

inline void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path.string());
  out << text;
}

inline std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// One tensor of a safetensors file being written: the dtype as the format spells it ("F32",
// "BF16", "F16", "I32", "I64", ...), the shape and the raw little-endian bytes.
struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
  // When set, written as-is instead of the computed [begin, end] (to make broken files).
  std::string data_offsets_override;
};

inline std::string shape_json(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  s += ']';
  return s;
}

// The header JSON and the data blob of a safetensors file (header padded to 8 bytes).
inline std::string safetensors_bytes(const std::vector<RawTensor>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const RawTensor& t : tensors) {
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
    std::string offsets = t.data_offsets_override;
    if (offsets.empty()) {  // appended piece by piece: GCC 12 misreports "[" + ... (-Wrestrict)
      offsets = "[";
      offsets += std::to_string(begin);
      offsets += ',';
      offsets += std::to_string(data.size());
      offsets += ']';
    }
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":" + offsets + "}";
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  std::string file(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return file + header + data;
}

inline void write_safetensors(const fs::path& path, const std::vector<RawTensor>& tensors) {
  write_text(path, safetensors_bytes(tensors));
}

// A safetensors file from a raw header text (for malformed headers): length prefix + text + data.
inline void write_raw_safetensors(const fs::path& path, const std::string& header,
                                  const std::string& data = {}) {
  std::string file(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  write_text(path, file + header + data);
}

inline const char* safetensors_dtype_name(opencamp::DType dtype) {
  switch (dtype) {
    case opencamp::DType::F32: return "F32";
    case opencamp::DType::BF16: return "BF16";
    case opencamp::DType::F16: return "F16";
    case opencamp::DType::I32: return "I32";
    default: break;  // safetensors holds no block formats
  }
  return "?";
}

// Every tensor of a safetensors file, copied out (in file-name order of the tensor map).
inline std::vector<RawTensor> read_all_tensors(const fs::path& path) {
  auto file = opencamp::SafetensorsFile::open(path);
  std::vector<RawTensor> result;
  for (const auto& [name, tensor] : file->tensors()) {
    RawTensor raw;
    raw.name = name;
    raw.dtype = safetensors_dtype_name(tensor.dtype);
    raw.shape.assign(tensor.shape.begin(), tensor.shape.begin() + tensor.ndim);
    const auto* begin = static_cast<const unsigned char*>(tensor.data);
    raw.bytes.assign(begin, begin + tensor.nbytes());
    result.push_back(std::move(raw));
  }
  return result;
}

// IEEE half from f32, round to nearest even (normal range and subnormals; our weights are small).
inline uint16_t f32_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = bits & 0x7fffffu;
  if (((bits >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0));
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (exponent <= 0) {                                                // subnormal or zero
    if (exponent < -10) return static_cast<uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent
  return static_cast<uint16_t>(sign | half);
}

// The same tensor with its F32 data converted to "BF16" or "F16" storage.
inline RawTensor convert_f32_tensor(const RawTensor& source, const std::string& dtype) {
  if (source.dtype != "F32" || dtype == "F32") return source;
  RawTensor out = source;
  out.dtype = dtype;
  const size_t n = source.bytes.size() / 4;
  out.bytes.resize(n * 2);
  for (size_t i = 0; i < n; ++i) {
    float value;
    std::memcpy(&value, source.bytes.data() + 4 * i, 4);
    const uint16_t bits = dtype == "BF16" ? opencamp::f32_to_bf16(value) : f32_to_f16(value);
    std::memcpy(out.bytes.data() + 2 * i, &bits, 2);
  }
  return out;
}

// Copies a fixture's config.json, generation_config.json and weights into `target`.
inline void copy_fixture(const std::string& name, const fs::path& target) {
  fs::create_directories(target);
  for (const auto& entry : fs::directory_iterator(fixture(name))) {
    const std::string file = entry.path().filename().string();
    if (file == "reference.safetensors") continue;
    fs::copy_file(entry.path(), target / file, fs::copy_options::overwrite_existing);
  }
}

// A tensor of the reference file copied out as floats / ints.
inline std::vector<float> tensor_floats(const opencamp::SafetensorsFile& file, const std::string& name) {
  const opencamp::Tensor* t = file.find(name);
  if (!t) throw std::runtime_error(file.path().string() + " lacks " + name);
  std::vector<float> out(static_cast<size_t>(t->numel()));
  for (int64_t i = 0; i < t->numel(); ++i) out[static_cast<size_t>(i)] = opencamp::load_as_f32(t->data, t->dtype, i);
  return out;
}

inline std::vector<int32_t> tensor_ints(const opencamp::SafetensorsFile& file, const std::string& name) {
  const opencamp::Tensor* t = file.find(name);
  if (!t || t->dtype != opencamp::DType::I32) {
    throw std::runtime_error(file.path().string() + " lacks I32 tensor " + name);
  }
  const int32_t* data = t->ptr<const int32_t>();
  return std::vector<int32_t>(data, data + t->numel());
}

// The logits of every position of `tokens` fed to a fresh sequence: [tokens, vocab].
// A one-layer random llama (hidden 256, 4 heads, 2 KV heads of head_dim 64, vocabulary 48,
// 64 positions) in `dir`, as safetensors; `transform` may change each matrix's values (given
// its shape) before they are written.
using Transform = std::function<std::vector<float>(std::vector<float>, const std::vector<int64_t>& shape)>;
inline void write_random_llama(const fs::path& dir, const Transform& transform) {
  fs::create_directories(dir);
  write_text(dir / "config.json", R"({"model_type": "llama", "vocab_size": 48, "hidden_size": 256,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false})");
  std::mt19937 rng(99);
  std::vector<RawTensor> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool norm) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::normal_distribution<float> normal(0.0f, norm ? 0.1f : 1.0f / std::sqrt(static_cast<float>(shape.back())));
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = (norm ? 1.0f : 0.0f) + normal(rng);
    if (!norm) v = transform(std::move(v), shape);
    RawTensor t{name, "F32", shape, std::vector<unsigned char>(v.size() * 4), ""};
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    tensors.push_back(std::move(t));
  };
  add("model.embed_tokens.weight", {48, 256}, false);
  add("lm_head.weight", {48, 256}, false);
  add("model.norm.weight", {256}, true);
  const std::string p = "model.layers.0.";
  add(p + "input_layernorm.weight", {256}, true);
  add(p + "post_attention_layernorm.weight", {256}, true);
  add(p + "self_attn.q_proj.weight", {256, 256}, false);
  add(p + "self_attn.k_proj.weight", {128, 256}, false);
  add(p + "self_attn.v_proj.weight", {128, 256}, false);
  add(p + "self_attn.o_proj.weight", {256, 256}, false);
  add(p + "mlp.gate_proj.weight", {64, 256}, false);
  add(p + "mlp.up_proj.weight", {64, 256}, false);
  add(p + "mlp.down_proj.weight", {256, 64}, false);
  write_safetensors(dir / "model.safetensors", tensors);
}

inline std::vector<float> all_logits(opencamp::Engine& engine, const std::vector<int32_t>& tokens) {
  const int seq = engine.create_sequence();
  std::vector<float> logits(tokens.size() * static_cast<size_t>(engine.config().vocab_size));
  engine.prefill(seq, tokens, logits, /*all_positions=*/true);
  engine.free_sequence(seq);
  return logits;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= worst)) worst = d;  // NaN propagates
  }
  return worst;
}

}  // namespace opencamp_test
