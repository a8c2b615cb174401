// The GGUF reader (include/opencamp/gguf.h): a valid file reads back exactly (metadata of every
// type, tensor shapes, data, alignment, v2 and v3), and every kind of damage is an
// opencamp::Error of the right kind whose message names the file and what is wrong: truncation
// at every byte, bad magic, unknown versions, big-endian files, counts and string lengths past
// the end, offsets outside the data, misalignment, unknown value and tensor types, nested
// arrays, duplicate keys and names. Random mutations of a valid header (and of the real
// SmolLM2 file's header) never crash: each opens or throws opencamp::Error.
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "gguf_writer.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;

namespace {

using Bytes = GgufWriter::Bytes;

// A small file with one of each metadata type and three tensors (f32, f16, q8_0).
GgufWriter sample_writer() {
  GgufWriter w;
  w.string("general.architecture", "llama");
  w.u32("llama.block_count", 2);
  w.i32("some.i32", -7);
  w.u64("some.u64", 1ull << 40);
  w.f32("some.f32", 0.5f);
  w.f64("some.f64", -2.25);
  w.boolean("some.bool", true);
  w.raw("some.u8", 0, Bytes{200});
  w.raw("some.i16", 3, GgufWriter::encode<int16_t>(-300));
  w.strings("tokenizer.ggml.tokens", {"<s>", "</s>", "hello", ""});
  w.array<float>("tokenizer.ggml.scores", 6, {0.0f, -1.0f, -2.5f, 3.0f});
  w.array<int32_t>("tokenizer.ggml.token_type", 5, {3, 3, 1, 1});
  std::vector<float> values(2 * 8);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.25f;
  w.tensor_f32("a.weight", {8, 2}, values);
  w.tensor("b.weight", 1, {3}, Bytes{0x00, 0x3c, 0x00, 0x40, 0x00, 0xc2});  // f16 1, 2, -3
  Bytes q8(34, 0);
  q8[0] = 0x00;
  q8[1] = 0x3c;  // scale 1.0
  for (int i = 0; i < 32; ++i) q8[2 + i] = static_cast<unsigned char>(i - 16);
  w.tensor("c.weight", 8, {32}, q8);
  return w;
}

fs::path write_file(const TempDir& dir, const Bytes& bytes, const std::string& name = "model.gguf") {
  const fs::path path = dir / name;
  GgufWriter::write_bytes(path, bytes);
  return path;
}

// Byte offset of the first occurrence of `needle` in `haystack` (the test's own files).
size_t find_bytes(const Bytes& haystack, const std::string& needle) {
  auto it = std::search(haystack.begin(), haystack.end(), needle.begin(), needle.end());
  if (it == haystack.end()) throw std::runtime_error("pattern not in file: " + needle);
  return static_cast<size_t>(it - haystack.begin());
}

template <class T>
void poke(Bytes& bytes, size_t at, T value) {
  std::memcpy(bytes.data() + at, &value, sizeof value);
}

}  // namespace

TEST_CASE(valid_file_reads_back) {
  TempDir tmp("gguf");
  for (uint32_t version : {2u, 3u}) {
    GgufWriter w = sample_writer();
    w.version = version;
    const fs::path path = write_file(tmp, w.bytes());
    auto file = GgufFile::open(path);
    CHECK_EQ(file->version(), version);
    CHECK_EQ(file->alignment(), 32u);
    CHECK_EQ(file->data_offset() % 32, 0u);
    CHECK_EQ(file->metadata().size(), 12u);
    CHECK_EQ(file->metadata()[0].first, std::string("general.architecture"));
    CHECK_EQ(file->string("general.architecture"), std::string("llama"));
    CHECK_EQ(file->integer("llama.block_count"), 2);
    CHECK_EQ(file->integer("some.i32"), -7);
    CHECK_EQ(file->integer("some.u64"), int64_t{1} << 40);
    CHECK_EQ(file->integer("some.u8"), 200);
    CHECK_EQ(file->integer("some.i16"), -300);
    CHECK_EQ(file->number("some.f32"), 0.5);
    CHECK_EQ(file->number("some.f64"), -2.25);
    CHECK_EQ(file->number("llama.block_count"), 2.0);  // integers are numbers too
    CHECK(file->optional_boolean("some.bool") == std::optional<bool>(true));
    CHECK(!file->optional_integer("absent.key"));
    const GgufValue* tokens = file->optional_array("tokenizer.ggml.tokens", GgufType::String);
    CHECK(tokens != nullptr && tokens->count == 4 && tokens->strings.size() == 4);
    if (tokens && tokens->strings.size() == 4) {
      CHECK_EQ(tokens->strings[2], std::string_view("hello"));
      CHECK_EQ(tokens->strings[3], std::string_view(""));
    }
    const GgufValue* scores = file->optional_array("tokenizer.ggml.scores", GgufType::F32);
    CHECK(scores != nullptr && scores->count == 4);
    if (scores) CHECK_EQ(scores->number_at(2), -2.5);
    const GgufValue* types = file->optional_array("tokenizer.ggml.token_type", GgufType::I32);
    CHECK(types != nullptr && types->integer_at(1) == std::optional<int64_t>(3));

    CHECK_EQ(file->tensors().size(), 3u);
    const GgufTensor* a = file->find_tensor("a.weight");
    CHECK(a != nullptr);
    if (a) {
      CHECK_EQ(a->ndim, 2);
      CHECK_EQ(a->shape[0], 2);  // numpy order: [rows, row length]
      CHECK_EQ(a->shape[1], 8);
      CHECK(a->dtype == std::optional<DType>(DType::F32));
      CHECK_EQ(a->nbytes, 64u);
      float v;
      std::memcpy(&v, a->data + 9 * sizeof(float), sizeof v);
      CHECK_EQ(v, 2.25f);
    }
    // Through the weight store, as the model loader sees them.
    WeightStore store = WeightStore::from_gguf(file);
    CHECK_EQ(load_as_f32(store.require("b.weight", {3}).data, DType::F16, 2), -3.0f);
    const Tensor c = store.require("c.weight", {32});
    CHECK(c.dtype == DType::Q8_0);
    CHECK_EQ(load_as_f32(c.data, DType::Q8_0, 31), 15.0f);
    CHECK_THROWS_WITH(store.require("a.weight", {8, 2}), ErrorKind::InvalidModel, "a.weight",
                      "[2, 8]", "GGUF metadata");
    CHECK_THROWS_WITH(store.require("blk.9.attn_q.weight", {8, 2}), ErrorKind::InvalidModel,
                      "blk.9.attn_q.weight", "missing", path.string());
  }
}

TEST_CASE(alignment_key_moves_the_data) {
  TempDir tmp("gguf");
  GgufWriter w = sample_writer();
  w.alignment = 64;
  w.u32("general.alignment", 64);
  auto file = GgufFile::open(write_file(tmp, w.bytes()));
  CHECK_EQ(file->alignment(), 64u);
  CHECK_EQ(file->data_offset() % 64, 0u);
  CHECK_EQ(file->find_tensor("b.weight")->offset, 64u);
}

TEST_CASE(every_truncation_is_refused) {
  TempDir tmp("gguf");
  const Bytes whole = sample_writer().bytes();
  const fs::path path = tmp / "cut.gguf";
  int refused = 0;
  for (size_t length = 0; length < whole.size(); ++length) {
    GgufWriter::write_bytes(path, Bytes(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(length)));
    const std::string message = check_throws_with([&] { GgufFile::open(path); }, ErrorKind::InvalidModel,
                                                  {path.string()}, __FILE__, __LINE__, "open(prefix)");
    refused += !message.empty();
  }
  CHECK_EQ(refused, static_cast<int>(whole.size()));
  // The message says what was being read.
  const auto in_tokens = static_cast<std::ptrdiff_t>(find_bytes(whole, "hello") + 2);
  GgufWriter::write_bytes(path, Bytes(whole.begin(), whole.begin() + in_tokens));
  CHECK_THROWS_WITH(GgufFile::open(path), ErrorKind::InvalidModel, "metadata key tokenizer.ggml.tokens[2]",
                    "truncated");
  GgufWriter::write_bytes(path, Bytes(whole.begin(), whole.end() - 1));
  CHECK_THROWS_WITH(GgufFile::open(path), ErrorKind::InvalidModel, "tensor c.weight", "34 bytes", "truncated");
}

TEST_CASE(bad_magic_and_versions) {
  TempDir tmp("gguf");
  GgufWriter w = sample_writer();
  w.magic = 0x4c4c5547;  // "GULL"
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "not a GGUF file", "model.gguf");
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, Bytes{'G', 'G'})), ErrorKind::InvalidModel,
                    "not a GGUF file", "shorter than 4 bytes");
  w = sample_writer();
  w.version = 1;
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::Unsupported, "version 1",
                    "versions 2 and 3");
  w.version = 4;
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::Unsupported, "version 4",
                    "versions 2 and 3");
  w.version = 0x03000000;  // 3, byte-swapped: a big-endian file
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::Unsupported, "big-endian");
  CHECK_THROWS_WITH(GgufFile::open(tmp.path()), ErrorKind::InvalidModel, "not a regular file");
  CHECK_THROWS_WITH(GgufFile::open(tmp / "absent.gguf"), ErrorKind::InvalidModel, "absent.gguf");
}

TEST_CASE(counts_and_lengths_past_the_end) {
  TempDir tmp("gguf");
  const Bytes good = sample_writer().bytes();
  Bytes b = good;
  poke<uint64_t>(b, 8, uint64_t{1} << 40);  // tensor count
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel, "1099511627776",
                    "tensors", "more than");
  b = good;
  poke<uint64_t>(b, 16, ~uint64_t{0});  // metadata count
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel, "metadata entries",
                    "more than");
  b = good;
  poke<uint64_t>(b, 16, 13);  // one more entry than the file has: reads into the tensor table
  CHECK(!check_throws_with([&] { GgufFile::open(write_file(tmp, b)); }, ErrorKind::InvalidModel, {"model.gguf"},
                           __FILE__, __LINE__, "one metadata entry too many").empty());
  // A key's length past the end.
  b = good;
  poke<uint64_t>(b, 24, uint64_t{1} << 50);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel, "metadata key #0",
                    "bytes long", "truncated or corrupt");
  // A string value's length past the end.
  b = good;
  poke<uint64_t>(b, find_bytes(b, "general.architecture") + 20 + 4, uint64_t{1} << 33);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel,
                    "metadata key general.architecture", "8589934592 bytes long");
  // An array's element count past the end (strings, and numbers).
  b = good;
  const size_t tokens = find_bytes(b, "tokenizer.ggml.tokens") + 21 + 4 + 4;
  poke<uint64_t>(b, tokens, uint64_t{1} << 60);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel,
                    "tokenizer.ggml.tokens", "strings, more than");
  b = good;
  poke<uint64_t>(b, tokens, 5);  // one string more than written: the next key is misread
  CHECK(!check_throws_with([&] { GgufFile::open(write_file(tmp, b)); }, ErrorKind::InvalidModel,
                           {"model.gguf"}, __FILE__, __LINE__, "one string too many").empty());
  b = good;
  poke<uint64_t>(b, find_bytes(b, "tokenizer.ggml.scores") + 21 + 4 + 4, uint64_t{1} << 62);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel,
                    "tokenizer.ggml.scores", "f32 values", "more than");
  // A tensor name's length past the end.
  b = good;
  poke<uint64_t>(b, find_bytes(b, "a.weight") - 8, uint64_t{1} << 45);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, b)), ErrorKind::InvalidModel, "tensor #0",
                    "bytes long");
}

TEST_CASE(tensor_offsets_sizes_and_alignment) {
  TempDir tmp("gguf");
  // An offset past the data.
  GgufWriter w = sample_writer();
  w.tensor("d.weight", 0, {4}, Bytes(16, 0), uint64_t{1} << 31);  // the writer leaves it out
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor d.weight",
                    "at offset 2147483648", "truncated or corrupt");
  // A huge offset does not wrap around.
  w = sample_writer();
  w.tensor("d.weight", 0, {4}, Bytes(16, 0), ~uint64_t{0} - 31);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "tensor d.weight", "data section");
  // An offset that is not a multiple of the alignment.
  w = sample_writer();
  w.tensor("d.weight", 0, {4}, Bytes(16, 0), 200);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "tensor d.weight", "data offset 200", "alignment 32");
  // Alignments that are not powers of two, or not integers.
  for (uint32_t alignment : {0u, 3u, 48u}) {
    w = sample_writer();
    w.u32("general.alignment", alignment);
    CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                      "general.alignment is " + std::to_string(alignment), "power of two");
  }
  w = sample_writer();
  w.string("general.alignment", "32");
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "general.alignment", "string");
  // A small alignment places an f32 tensor at an odd address: it is copied, not misread.
  bool tried_misaligned = false;
  for (int pad = 0; pad < 4 && !tried_misaligned; ++pad) {
    w = GgufWriter();
    w.alignment = 1;
    w.u32("general.alignment", 1);
    w.string("pad", std::string(static_cast<size_t>(pad), 'x'));
    w.tensor("odd", 24, {1}, Bytes{7});  // one I8 byte before the f32 tensor
    w.tensor_f32("f", {2}, {1.5f, -2.0f});
    auto file = GgufFile::open(write_file(tmp, w.bytes()));
    if (reinterpret_cast<uintptr_t>(file->find_tensor("f")->data) % 4 == 0) continue;
    tried_misaligned = true;
    WeightStore store = WeightStore::from_gguf(file);
    const Tensor f = store.require("f", {2});
    CHECK(reinterpret_cast<uintptr_t>(f.data) % 4 == 0);
    CHECK_EQ(f.ptr<float>()[1], -2.0f);
  }
  CHECK(tried_misaligned);
}

TEST_CASE(shapes_that_cannot_be) {
  TempDir tmp("gguf");
  GgufWriter w = sample_writer();
  w.tensor("huge", 0, {uint64_t{1} << 32, uint64_t{1} << 32}, Bytes(4, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor huge",
                    "overflows");
  w = sample_writer();
  w.tensor("huge", 0, {~uint64_t{0}}, Bytes(4, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor huge",
                    "overflows");
  w = sample_writer();
  w.tensor("big", 0, {uint64_t{1} << 40, uint64_t{1} << 20}, Bytes(4, 0));  // no overflow, no data
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor big",
                    "needs 4611686018427387904 bytes");
  w = sample_writer();
  w.tensor("scalar", 0, {}, Bytes(4, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor scalar",
                    "0 dimensions");
  w = sample_writer();
  w.tensor("five", 0, {1, 1, 1, 1, 1}, Bytes(4, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor five",
                    "5 dimensions");
  w = sample_writer();
  w.tensor("partial", 8, {16}, Bytes(34, 0));  // half a Q8_0 block per row
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor partial",
                    "rows of 16 values", "Q8_0 blocks of 32");
}

TEST_CASE(unknown_types_nested_arrays_duplicates) {
  TempDir tmp("gguf");
  GgufWriter w = sample_writer();
  w.tensor("strange", 99, {4}, Bytes(16, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "tensor strange", "unknown ggml type id 99");
  w = sample_writer();
  w.tensor("old", 4, {32}, Bytes(18, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "tensor old",
                    "Q4_2", "no longer defines");
  w = sample_writer();
  w.raw("weird.key", 13, Bytes(8, 0));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "weird.key",
                    "unknown value type 13");
  w = sample_writer();
  w.raw("weird.array", 9, GgufWriter::encode<uint32_t>(77));
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "weird.array",
                    "unknown value type 77");
  w = sample_writer();
  Bytes nested = GgufWriter::encode<uint32_t>(9);
  for (unsigned char c : GgufWriter::encode<uint64_t>(0)) nested.push_back(c);
  w.raw("nested.array", 9, nested);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::Unsupported, "nested.array",
                    "array of arrays");
  w = sample_writer();
  w.raw("odd.bool", 7, Bytes{2});
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel, "odd.bool",
                    "bool of value 2");
  w = sample_writer();
  w.u32("llama.block_count", 3);
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "metadata key llama.block_count appears twice");
  w = sample_writer();
  w.tensor_f32("a.weight", {1}, {0.0f});
  CHECK_THROWS_WITH(GgufFile::open(write_file(tmp, w.bytes())), ErrorKind::InvalidModel,
                    "tensor a.weight appears twice");
}

TEST_CASE(typed_lookups_name_the_key) {
  TempDir tmp("gguf");
  const fs::path path = write_file(tmp, sample_writer().bytes());
  auto file = GgufFile::open(path);
  CHECK_THROWS_WITH(file->integer("general.architecture"), ErrorKind::InvalidModel, path.string(),
                    "general.architecture", "a string, expected an integer");
  CHECK_THROWS_WITH(file->string("llama.block_count"), ErrorKind::InvalidModel, "llama.block_count",
                    "u32", "expected a string");
  CHECK_THROWS_WITH(file->integer("llama.context_length"), ErrorKind::InvalidModel,
                    "llama.context_length", "missing");
  CHECK_THROWS_WITH(file->optional_array("tokenizer.ggml.tokens", GgufType::F32), ErrorKind::InvalidModel,
                    "tokenizer.ggml.tokens", "array of string", "array of numbers");
  CHECK_THROWS_WITH(file->number("tokenizer.ggml.scores"), ErrorKind::InvalidModel,
                    "tokenizer.ggml.scores", "an array of f32", "expected a number");
}

TEST_CASE(unsupported_tensor_type_is_named_when_required) {
  TempDir tmp("gguf");
  GgufWriter w = sample_writer();
  w.tensor("blk.0.attn_q.weight", 11, {256}, Bytes(110, 0));  // Q3_K
  const fs::path path = write_file(tmp, w.bytes());
  auto file = GgufFile::open(path);  // readable: only loading it is refused
  CHECK(!file->find_tensor("blk.0.attn_q.weight")->dtype.has_value());
  CHECK_EQ(std::string(ggml_type_name(file->find_tensor("blk.0.attn_q.weight")->ggml_type)), std::string("Q3_K"));
  WeightStore store = WeightStore::from_gguf(file);
  CHECK_THROWS_WITH(store.require("blk.0.attn_q.weight", {256}), ErrorKind::InvalidModel,
                    "blk.0.attn_q.weight", "Q3_K", "cannot load", "supported: F32, F16, BF16, Q8_0");
}

// Random damage: overwrite 1-8 bytes, write a random u64 or a small count at a random place,
// or cut the file; every result opens or throws opencamp::Error, nothing else (no crash, no
// std::bad_alloc from a trusted count). Run under OPENCAMP_SANITIZE too.
void mutate_and_open(const Bytes& original, size_t header_bytes, int rounds, uint32_t seed,
                     const TempDir& tmp, int& opened, int& refused) {
  std::mt19937_64 rng(seed);
  const fs::path path = tmp / "mutated.gguf";
  for (int round = 0; round < rounds; ++round) {
    Bytes b = original;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = static_cast<size_t>(rng() % (header_bytes - 8));
      switch (rng() % 4) {
        case 0: b[at] = static_cast<unsigned char>(rng()); break;
        case 1: poke<uint64_t>(b, at, rng()); break;
        case 2: poke<uint64_t>(b, at, rng() % 64); break;
        case 3: b[at] ^= static_cast<unsigned char>(1u << (rng() % 8)); break;
      }
    }
    if (rng() % 8 == 0) b.resize(static_cast<size_t>(rng() % b.size()));
    GgufWriter::write_bytes(path, b);
    try {
      auto file = GgufFile::open(path);
      WeightStore store = WeightStore::from_gguf(file);  // and make every tensor a view
      ++opened;
    } catch (const Error&) {
      ++refused;
    }
  }
}

TEST_CASE(random_mutations_never_crash) {
  TempDir tmp("gguf");
  const Bytes good = sample_writer().bytes();
  int opened = 0, refused = 0;
  auto header_end = GgufFile::open(write_file(tmp, good))->data_offset();
  mutate_and_open(good, header_end, 600, 12345, tmp, opened, refused);
  std::printf("  sample file: %d mutations opened, %d refused with an opencamp::Error\n", opened, refused);
  CHECK_EQ(opened + refused, 600);
  CHECK(refused > 300);  // most damage is seen
}

TEST_CASE(random_mutations_of_the_real_header_never_crash) {
  const fs::path real = shared_models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf";
  // Required, as by the Python suite: the shared models folder is part of the test setup.
  CHECK_MSG(fs::exists(real), real.string() << " is missing: the tests need the shared models folder "
                                            "(../shared/models next to the repository, or OPENCAMP_SHARED_MODELS)");
  if (!fs::exists(real)) return;
  auto file = GgufFile::open(real);
  CHECK_EQ(file->tensors().size(), 272u);
  // The header (metadata + tensor table) and the first tensor's data region: small enough to
  // rewrite a few dozen times, and every tensor past it is out of range unless damage says so.
  const size_t header = static_cast<size_t>(file->data_offset());
  std::ifstream in(real, std::ios::binary);
  Bytes prefix(header + 4096);
  in.read(reinterpret_cast<char*>(prefix.data()), static_cast<std::streamsize>(prefix.size()));
  TempDir tmp("gguf");
  int opened = 0, refused = 0;
  mutate_and_open(prefix, header, 60, 777, tmp, opened, refused);
  std::printf("  SmolLM2 header (%zu bytes): %d mutations opened, %d refused\n", header, opened, refused);
  CHECK_EQ(opened + refused, 60);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
