// A small GGUF writer for the ctest executables: builds valid files in memory (GGUF v2 / v3,
// any metadata, tensors with their data), and lets a test break them on purpose (raw values,
// explicit offsets, odd alignment) to check that the reader refuses each kind of damage.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "opencamp/gguf.h"

namespace opencamp_test {

class GgufWriter {
 public:
  using Bytes = std::vector<unsigned char>;

  uint32_t magic = 0x46554747;  // "GGUF"
  uint32_t version = 3;
  uint64_t alignment = 32;      // where tensor data is placed (write general.alignment to change it)

  // Metadata: any value type, the payload already encoded (the helpers below encode them).
  void raw(const std::string& key, uint32_t type, const Bytes& payload) {
    put_string(metadata_, key);
    put(metadata_, type);
    metadata_.insert(metadata_.end(), payload.begin(), payload.end());
    ++metadata_count_;
  }
  void u32(const std::string& key, uint32_t v) { raw(key, 4, encode(v)); }
  void i32(const std::string& key, int32_t v) { raw(key, 5, encode(v)); }
  void u64(const std::string& key, uint64_t v) { raw(key, 10, encode(v)); }
  void f32(const std::string& key, float v) { raw(key, 6, encode(v)); }
  void f64(const std::string& key, double v) { raw(key, 12, encode(v)); }
  void boolean(const std::string& key, bool v) { raw(key, 7, Bytes{static_cast<unsigned char>(v)}); }
  void string(const std::string& key, const std::string& v) {
    Bytes b;
    put_string(b, v);
    raw(key, 8, b);
  }
  void strings(const std::string& key, const std::vector<std::string>& values) {
    Bytes b;
    put(b, uint32_t{8});
    put(b, static_cast<uint64_t>(values.size()));
    for (const auto& v : values) put_string(b, v);
    raw(key, 9, b);
  }
  template <class T>
  void array(const std::string& key, uint32_t element_type, const std::vector<T>& values) {
    Bytes b;
    put(b, element_type);
    put(b, static_cast<uint64_t>(values.size()));
    for (const T& v : values) put(b, v);
    raw(key, 9, b);
  }

  // A tensor with its ggml dims (ne[0] = row length first) and data; `offset` overrides where
  // its data is said to lie (otherwise the next aligned place).
  void tensor(const std::string& name, uint32_t ggml_type, const std::vector<uint64_t>& ne,
              const Bytes& data, std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({name, ggml_type, ne, data, offset});
  }
  void tensor_f32(const std::string& name, const std::vector<uint64_t>& ne, const std::vector<float>& values) {
    Bytes data(values.size() * sizeof(float));
    std::memcpy(data.data(), values.data(), data.size());
    tensor(name, 0, ne, data);
  }

  Bytes bytes() const {
    Bytes out;
    put(out, magic);
    put(out, version);
    put(out, static_cast<uint64_t>(tensors_.size()));
    put(out, metadata_count_);
    out.insert(out.end(), metadata_.begin(), metadata_.end());
    uint64_t next = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      put_string(out, t.name);
      put(out, static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) put(out, d);
      put(out, t.type);
      const uint64_t offset = t.offset.value_or(next);
      put(out, offset);
      offsets.push_back(offset);
      next = round_up(offset + t.data.size());
    }
    out.resize(round_up(out.size()), 0);
    const size_t data_start = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      if (offsets[i] > (uint64_t{1} << 30)) continue;  // a test's impossible offset: no data
      if (data_start + offsets[i] + t.data.size() > out.size()) out.resize(data_start + offsets[i] + t.data.size(), 0);
      std::memcpy(out.data() + data_start + offsets[i], t.data.data(), t.data.size());
    }
    return out;
  }

  void write(const std::filesystem::path& path) const { write_bytes(path, bytes()); }

  static void write_bytes(const std::filesystem::path& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }

  template <class T>
  static Bytes encode(T v) {
    Bytes b;
    put(b, v);
    return b;
  }

 private:
  struct PendingTensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> ne;
    Bytes data;
    std::optional<uint64_t> offset;
  };

  template <class T>
  static void put(Bytes& b, T v) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  }
  static void put_string(Bytes& b, const std::string& s) {
    put(b, static_cast<uint64_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
  }
  uint64_t round_up(uint64_t n) const { return (n + alignment - 1) / alignment * alignment; }

  Bytes metadata_;
  uint64_t metadata_count_ = 0;
  std::vector<PendingTensor> tensors_;
};

// An existing GGUF file, metadata and tensors copied out, to be edited and written again.
struct GgufCopy {
  using Bytes = GgufWriter::Bytes;
  struct Entry {
    std::string key;
    uint32_t type;
    Bytes payload;  // as the writer's raw() takes it
  };
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> ne;
    Bytes data;
  };
  std::vector<Entry> metadata;
  std::vector<Tensor> tensors;

  static GgufCopy read(const std::filesystem::path& path) {
    auto file = opencamp::GgufFile::open(path);
    GgufCopy copy;
    for (const auto& [key, v] : file->metadata()) {
      Bytes payload;
      auto append = [&](const void* p, size_t n) {
        const auto* b = static_cast<const unsigned char*>(p);
        payload.insert(payload.end(), b, b + n);
      };
      auto append_string = [&](std::string_view s) {
        const uint64_t n = s.size();
        append(&n, 8);
        append(s.data(), s.size());
      };
      if (v.is_array()) {
        const auto element = static_cast<uint32_t>(v.element_type);
        append(&element, 4);
        append(&v.count, 8);
        if (v.element_type == opencamp::GgufType::String) {
          for (std::string_view s : v.strings) append_string(s);
        } else {
          append(v.data, v.bytes);
        }
      } else if (v.type == opencamp::GgufType::String) {
        append_string(v.string());
      } else {
        append(v.data, v.bytes);
      }
      copy.metadata.push_back({key, static_cast<uint32_t>(v.type), payload});
    }
    for (const auto& t : file->tensors()) {
      std::vector<uint64_t> ne;
      for (int d = t.ndim - 1; d >= 0; --d) ne.push_back(static_cast<uint64_t>(t.shape[d]));
      copy.tensors.push_back({t.name, t.ggml_type, ne, Bytes(t.data, t.data + t.nbytes)});
    }
    return copy;
  }

  Entry* find(const std::string& key) {
    for (auto& e : metadata) if (e.key == key) return &e;
    return nullptr;
  }
  Tensor* tensor(const std::string& name) {
    for (auto& t : tensors) if (t.name == name) return &t;
    return nullptr;
  }
  void remove(const std::string& key) {
    std::erase_if(metadata, [&](const Entry& e) { return e.key == key; });
  }
  void remove_tensor(const std::string& name) {
    std::erase_if(tensors, [&](const Tensor& t) { return t.name == name; });
  }
  // Replaces (or adds) a key with a writer-encoded value: set("k", 4, GgufWriter::encode<uint32_t>(7)).
  void set(const std::string& key, uint32_t type, const Bytes& payload) {
    if (Entry* e = find(key)) {
      e->type = type;
      e->payload = payload;
    } else {
      metadata.push_back({key, type, payload});
    }
  }
  void set_string(const std::string& key, const std::string& value) {
    Bytes b = GgufWriter::encode<uint64_t>(value.size());
    b.insert(b.end(), value.begin(), value.end());
    set(key, 8, b);
  }

  void write(const std::filesystem::path& path) const {
    GgufWriter w;
    for (const auto& e : metadata) w.raw(e.key, e.type, e.payload);
    for (const auto& t : tensors) w.tensor(t.name, t.type, t.ne, t.data);
    w.write(path);
  }
};

}  // namespace opencamp_test
