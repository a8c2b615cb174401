// Loading checkpoints: every malformed-file case must raise opencamp::Error of the right kind
// whose message names the file (and the tensor where one is at fault), never crash; and the
// spellings found in the wild (rope, head_dim, eos ids, F32/BF16/F16 storage) must all load.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <numbers>

#include <sys/stat.h>

#include "check.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;

namespace {

// Engines in this file run on one thread: the models are tiny.
EngineOptions engine_options(const std::string& dtype = "auto") {
  EngineOptions options;
  options.backend = "cpu";
  options.threads = 1;
  options.dtype = dtype;
  options.kv_cache_dtype = "f32";  // these compare weights; test_kv_cache checks the KV types
  return options;
}

std::string replace_once(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  if (at == std::string::npos) throw std::runtime_error("test setup: '" + from + "' not found");
  return text.replace(at, from.size(), to);
}

// Rewrites `dir`/config.json, replacing `from` by `to`.
void edit_config(const fs::path& dir, const std::string& from, const std::string& to) {
  write_text(dir / "config.json", replace_once(read_text(dir / "config.json"), from, to));
}

RawTensor* find_raw(std::vector<RawTensor>& tensors, const std::string& name) {
  for (auto& t : tensors) {
    if (t.name == name) return &t;
  }
  throw std::runtime_error("test setup: no tensor " + name);
}


// A single-tensor safetensors file: "weird.tensor" F32 [2, 3] with the given data_offsets text.
void write_one_tensor(const fs::path& path, const std::string& offsets, size_t data_bytes = 24) {
  const std::string header = "{\"weird.tensor\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":" +
                             offsets + "}}";
  write_raw_safetensors(path, header, std::string(data_bytes, '\0'));
}

}  // namespace

// ---- directories and config.json -------------------------------------------------------------

TEST_CASE(missing_model_directory) {
  TempDir tmp("loader");
  const fs::path missing = tmp / "no-such-model";
  CHECK_THROWS_WITH(load_model_config(missing), ErrorKind::InvalidModel, missing.string(),
                    "does not exist");
  CHECK_THROWS_WITH(Engine(missing, engine_options()), ErrorKind::InvalidModel, missing.string());
}

TEST_CASE(missing_config_json) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  fs::remove(tmp / "config.json");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json",
                    tmp.path().string());
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "config.json");
}

TEST_CASE(malformed_config_json_reports_line_and_column) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  // Line 3 has a doubled comma.
  write_text(tmp / "config.json", "{\n  \"model_type\": \"llama\",\n  \"vocab_size\": 256,,\n}\n");
  const std::string message = CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel,
                                                (tmp / "config.json").string(), "line 3", "column");
  CHECK(message.find("malformed JSON") != std::string::npos);
  // Not an object at all.
  write_text(tmp / "config.json", "[1, 2]");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json", "object");
  // A required field missing.
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"num_hidden_layers\": 2,", "");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json",
                    "num_hidden_layers");
  // A malformed generation_config.json is named too.
  copy_fixture("tiny-llama", tmp.path());
  write_text(tmp / "generation_config.json", "{\"eos_token_id\": [2,");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "generation_config.json",
                    "line 1");
}

TEST_CASE(unknown_model_type_lists_supported_types) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "config.json",
                    "'gpt2'", "llama, qwen2, qwen3");
}

TEST_CASE(unsupported_rope_type_is_unsupported) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::Unsupported, "config.json", "yarn");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::Unsupported, "yarn");
  // The old spelling too.
  const std::string text = "{\"model_type\":\"llama\",\"vocab_size\":10,\"hidden_size\":8,"
                           "\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                           "\"rope_scaling\":{\"type\":\"dynamic\",\"factor\":2.0}}";
  CHECK_THROWS_WITH(parse_model_config(text, "some/config.json"), ErrorKind::Unsupported,
                    "some/config.json", "dynamic");
}

TEST_CASE(sliding_window_qwen2_is_unsupported) {
  TempDir tmp("loader");
  copy_fixture("tiny-qwen2", tmp.path());
  edit_config(tmp.path(), "\"use_sliding_window\": false", "\"use_sliding_window\": true");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::Unsupported, "config.json",
                    "use_sliding_window");
}

TEST_CASE(activations_other_than_silu_are_unsupported) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  for (const std::string act : {"gelu", "gelu_pytorch_tanh", "relu"}) {
    write_text(tmp / "config.json", replace_once(read_text(fixture("tiny-llama") / "config.json"),
                                                 "\"hidden_act\": \"silu\"", "\"hidden_act\": \"" + act + "\""));
    CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::Unsupported, "config.json", "hidden_act",
                      "'" + act + "'", "only silu");
    CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::Unsupported, "hidden_act", act);
  }
  edit_config(tmp.path(), "\"hidden_act\": \"relu\"", "\"hidden_act\": 7");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::Unsupported, "hidden_act", "only silu");
}

// Pre-quantised Hugging Face checkpoints (GPTQ / AWQ / bitsandbytes / FP8: a quantization_config
// in config.json, packed integer tensors in the safetensors) are refused as such, not reported
// as a mismatch between weights and config; so are quantised tensor dtypes without one.
TEST_CASE(quantised_safetensors_checkpoints_are_unsupported) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  // GPTQ layout: q_proj.weight replaced by 4-bit codes packed in I32 plus f16 scales.
  auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  std::erase_if(tensors, [](const RawTensor& t) { return t.name == "model.layers.0.self_attn.q_proj.weight"; });
  tensors.push_back({"model.layers.0.self_attn.q_proj.qweight", "I32", {4, 32}, std::vector<unsigned char>(512, 0), ""});
  tensors.push_back({"model.layers.0.self_attn.q_proj.scales", "F16", {1, 32}, std::vector<unsigned char>(64, 0), ""});
  tensors.push_back({"model.layers.0.self_attn.q_proj.qzeros", "I32", {1, 4}, std::vector<unsigned char>(16, 0), ""});
  write_safetensors(tmp / "model.safetensors", tensors);
  edit_config(tmp.path(), "\"hidden_act\": \"silu\",",
              "\"hidden_act\": \"silu\", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4, "
              "\"group_size\": 32},");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::Unsupported, "config.json",
                    "quantization_config", "'gptq'", "unquantised");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::Unsupported, "quantization_config",
                    "gptq");
  // A null quantization_config means none: the unquantised weights load.
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"hidden_act\": \"silu\",", "\"hidden_act\": \"silu\", \"quantization_config\": null,");
  CHECK_NOTHROW(Engine(tmp.path(), engine_options()));

  // FP8 and bitsandbytes-style byte tensors where a weight should be, without a
  // quantization_config: the tensor and its dtype are named.
  copy_fixture("tiny-llama", tmp.path());
  for (const std::string dtype : {"F8_E4M3", "U8"}) {
    tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
    RawTensor* up = find_raw(tensors, "model.layers.1.mlp.up_proj.weight");
    up->dtype = dtype;
    up->bytes.resize(up->bytes.size() / 4);
    write_safetensors(tmp / "model.safetensors", tensors);
    CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                      "model.layers.1.mlp.up_proj.weight", dtype, "cannot load", "F32, BF16, F16");
  }
}

// ---- weights ----------------------------------------------------------------------------------

TEST_CASE(missing_weights) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  fs::remove(tmp / "model.safetensors");
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel, tmp.path().string(),
                    "model.safetensors");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.safetensors");
  // Weights in a format we do not read are pointed out.
  write_text(tmp / "pytorch_model.bin", "not really");
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel, "pytorch_model.bin");
}

TEST_CASE(missing_tensor_is_named) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  const std::string victim = "model.layers.1.mlp.up_proj.weight";
  std::erase_if(tensors, [&](const RawTensor& t) { return t.name == victim; });
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, victim,
                    (tmp / "model.safetensors").string());
  // lm_head of an untied model is required too.
  tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  std::erase_if(tensors, [&](const RawTensor& t) { return t.name == "lm_head.weight"; });
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "lm_head.weight");
}

TEST_CASE(shape_mismatch_names_expected_and_found) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  RawTensor* q = find_raw(tensors, "model.layers.0.self_attn.q_proj.weight");  // [32, 32]
  q->shape = {32, 31};
  q->bytes.resize(32 * 31 * 4);
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.layers.0.self_attn.q_proj.weight", "model.safetensors", "[32, 31]",
                    "[32, 32]");
  // A wrong rank is a mismatch too.
  q->shape = {32 * 31};
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.layers.0.self_attn.q_proj.weight", "[992]", "[32, 32]");
}

TEST_CASE(truncated_file_offsets_outside_the_file) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  const auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  write_safetensors(tmp / "model.safetensors", tensors);
  const auto size = fs::file_size(tmp / "model.safetensors");
  fs::resize_file(tmp / "model.safetensors", size - 100);
  // The last tensor in the data (model.norm.weight, 128 bytes) now ends past the file's end.
  CHECK_EQ(tensors.back().name, std::string("model.norm.weight"));
  CHECK_THROWS_WITH(SafetensorsFile::open(tmp / "model.safetensors"), ErrorKind::InvalidModel,
                    (tmp / "model.safetensors").string(), "model.norm.weight", "truncated");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.safetensors", "model.norm.weight");
  // Cut in the middle of the header.
  fs::resize_file(tmp / "model.safetensors", 200);
  CHECK_THROWS_WITH(SafetensorsFile::open(tmp / "model.safetensors"), ErrorKind::InvalidModel,
                    "model.safetensors", "header length");
}

TEST_CASE(header_length_larger_than_file) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  std::string bytes = safetensors_bytes(read_all_tensors(fixture("tiny-llama") / "model.safetensors"));
  const uint64_t lie = bytes.size() + 10;
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((lie >> (8 * i)) & 0xff);
  write_text(path, bytes);
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                    "header length", std::to_string(lie));
  // An absurd length (near 2^64) must not overflow into a "valid" one.
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(0xff);
  write_text(path, bytes);
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "header length");
}

TEST_CASE(malformed_header_json) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  write_raw_safetensors(path, "{\"a\": {\"dtype\": \"F32\",, }}    ");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                    "malformed JSON", "line 1, column");
  write_raw_safetensors(path, "[1, 2, 3]");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "object");
  // Entries lacking fields, with bad ranks, with non-integer offsets.
  write_raw_safetensors(path, "{\"t\": {\"dtype\": \"F32\", \"shape\": [1]}}");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "'t'",
                    "data_offsets");
  write_raw_safetensors(path, "{\"t\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1], \"data_offsets\": [0, 4]}}",
                        std::string(4, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "'t'", "dims");
  write_raw_safetensors(path, "{\"t\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
                        std::string(4, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "'t'", "shape");
  write_one_tensor(path, "[0, 2.5]");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, "weird.tensor", "data_offsets");
}

TEST_CASE(data_offsets_end_before_begin) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  write_one_tensor(path, "[24, 0]");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                    "weird.tensor", "[24, 0]", "end before");
  // And a valid one is accepted (the writer itself is sound).
  write_one_tensor(path, "[0, 24]");
  CHECK_NOTHROW(SafetensorsFile::open(path));
  auto file = SafetensorsFile::open(path);
  CHECK(file->find("weird.tensor") != nullptr);
  CHECK_EQ(file->find("weird.tensor")->numel(), 6);
}

TEST_CASE(data_offsets_span_wrong_byte_count) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  write_one_tensor(path, "[0, 20]");  // [2, 3] f32 needs 24
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                    "weird.tensor", "24", "20");
  write_one_tensor(path, "[0, 28]", 28);
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, "weird.tensor", "28");
}

TEST_CASE(unsupported_dtype_of_required_tensor) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  RawTensor* embed = find_raw(tensors, "model.embed_tokens.weight");
  embed->dtype = "I64";
  embed->bytes.resize(embed->bytes.size() * 2);
  // An unneeded tensor of an unsupported dtype is fine (e.g. rotary position ids).
  RawTensor extra{"model.rotary_emb.position_ids", "I64", {4}, std::vector<unsigned char>(32, 0), ""};
  tensors.push_back(extra);
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_NOTHROW(WeightStore::open(tmp.path()));
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.embed_tokens.weight", "I64", "model.safetensors");

  // I32 is readable (reference files hold token ids) but never a weight.
  tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  find_raw(tensors, "model.layers.0.mlp.up_proj.weight")->dtype = "I32";
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model.layers.0.mlp.up_proj.weight", "I32", "model.safetensors");

  // Only the unneeded one: the model loads.
  tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  tensors.push_back(extra);
  write_safetensors(tmp / "model.safetensors", tensors);
  CHECK_NOTHROW(Engine(tmp.path(), engine_options()));
}

TEST_CASE(empty_file) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  write_text(tmp / "model.safetensors", "");
  CHECK_THROWS_WITH(SafetensorsFile::open(tmp / "model.safetensors"), ErrorKind::InvalidModel,
                    (tmp / "model.safetensors").string(), "too short");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "model.safetensors");
  // Not a file at all.
  CHECK_THROWS_WITH(SafetensorsFile::open(tmp.path()), ErrorKind::InvalidModel, tmp.path().string());
}

TEST_CASE(sharded_index_missing_shard) {
  TempDir tmp("loader");
  copy_fixture("tiny-qwen3", tmp.path());
  CHECK_NOTHROW(Engine(tmp.path(), engine_options()));  // the copy is sound
  fs::remove(tmp / "model-00002-of-00003.safetensors");
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel,
                    "model.safetensors.index.json", "model-00002-of-00003.safetensors", "missing");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    "model-00002-of-00003.safetensors");
}

TEST_CASE(sharded_index_shard_lacks_tensor) {
  TempDir tmp("loader");
  copy_fixture("tiny-qwen3", tmp.path());
  // model.norm.weight lives in shard 3; claim it is in shard 1.
  const std::string index = read_text(tmp / "model.safetensors.index.json");
  write_text(tmp / "model.safetensors.index.json",
             replace_once(index, "\"model.norm.weight\": \"model-00003-of-00003.safetensors\"",
                          "\"model.norm.weight\": \"model-00001-of-00003.safetensors\""));
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel,
                    "model.safetensors.index.json", "model.norm.weight",
                    "model-00001-of-00003.safetensors");
  // An index without weight_map, and one escaping the directory.
  write_text(tmp / "model.safetensors.index.json", "{\"metadata\": {}}");
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel,
                    "model.safetensors.index.json", "weight_map");
  write_text(tmp / "model.safetensors.index.json",
             "{\"weight_map\": {\"model.norm.weight\": \"../elsewhere.safetensors\"}}");
  CHECK_THROWS_WITH(WeightStore::open(tmp.path()), ErrorKind::InvalidModel, "../elsewhere.safetensors");
}

// ---- spellings that must load ----------------------------------------------------------------

TEST_CASE(rope_spellings_parse) {
  const std::string base = "{\"model_type\":\"llama\",\"vocab_size\":10,\"hidden_size\":8,"
                           "\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":2,";
  // Old: top-level rope_theta + rope_scaling {"type": "linear"}.
  ModelConfig old_style = parse_model_config(
      base + "\"rope_theta\": 5000.0, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.5}}", "a");
  CHECK(old_style.rope.type == RopeType::Linear);
  CHECK_NEAR(old_style.rope.theta, 5000.0, 0);
  CHECK_NEAR(old_style.rope.factor, 2.5, 0);
  // Old with rope_type as the key.
  ModelConfig old_key = parse_model_config(
      base + "\"rope_theta\": 5000.0, \"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 3}}", "a");
  CHECK(old_key.rope.type == RopeType::Linear);
  CHECK_NEAR(old_key.rope.factor, 3.0, 0);
  // New: rope_parameters {"rope_type": "llama3", ...} carrying rope_theta.
  ModelConfig new_style = parse_model_config(
      base + "\"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, \"factor\": 8.0,"
             "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}}",
      "b");
  CHECK(new_style.rope.type == RopeType::Llama3);
  CHECK_NEAR(new_style.rope.theta, 500000.0, 0);
  CHECK_NEAR(new_style.rope.factor, 8.0, 0);
  CHECK_NEAR(new_style.rope.low_freq_factor, 1.0, 0);
  CHECK_NEAR(new_style.rope.high_freq_factor, 4.0, 0);
  CHECK_EQ(new_style.rope.original_max_position, 8192);
  // Default with only a theta, and nothing at all.
  ModelConfig plain = parse_model_config(
      base + "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 1000000.0}}", "c");
  CHECK(plain.rope.type == RopeType::Default);
  CHECK_NEAR(plain.rope.theta, 1e6, 0);
  ModelConfig none = parse_model_config(base + "\"rms_norm_eps\": 1e-5}", "d");
  CHECK(none.rope.type == RopeType::Default);
  CHECK_NEAR(none.rope.theta, 10000.0, 0);
  // A scaled rope without a factor is malformed, not silently unscaled.
  CHECK_THROWS_WITH(parse_model_config(base + "\"rope_scaling\": {\"type\": \"linear\"}}", "e"),
                    ErrorKind::InvalidModel, "e", "factor");

  // The fixtures: llama (new spelling, llama3), qwen2 (old spelling, linear), qwen3 (default).
  const ModelConfig llama = load_model_config(fixture("tiny-llama"));
  CHECK(llama.rope.type == RopeType::Llama3);
  CHECK_NEAR(llama.rope.theta, 100.0, 0);
  CHECK_NEAR(llama.rope.factor, 8.0, 0);
  CHECK_EQ(llama.rope.original_max_position, 32);
  const ModelConfig qwen2 = load_model_config(fixture("tiny-qwen2"));
  CHECK(qwen2.rope.type == RopeType::Linear);
  CHECK_NEAR(qwen2.rope.theta, 10000.0, 0);
  CHECK_NEAR(qwen2.rope.factor, 2.0, 0);
  const ModelConfig qwen3 = load_model_config(fixture("tiny-qwen3"));
  CHECK(qwen3.rope.type == RopeType::Default);
  CHECK_NEAR(qwen3.rope.theta, 1e6, 0);
}

TEST_CASE(rope_inverse_frequencies_follow_the_formulas) {
  // tiny-llama: theta 100, head_dim 8, llama3 factor 8, low 1, high 4, original 32. The README
  // lists 1, 0.0958 (smoothed), 0.0125 and 0.00395 (divided by 8).
  const ModelConfig llama = load_model_config(fixture("tiny-llama"));
  const std::vector<float> inv = rope_inverse_frequencies(llama.rope, llama.head_dim);
  CHECK_EQ(inv.size(), size_t(4));
  const double expected[] = {1.0, 0.0958, 0.0125, 0.00395};
  for (size_t i = 0; i < 4; ++i) CHECK_NEAR(inv[i], expected[i], expected[i] * 2e-3);
  // Exact formula in double for the smoothed band.
  const double base = std::pow(100.0, -2.0 / 8.0);
  const double wavelen = 2 * std::numbers::pi / base;
  const double smooth = (32.0 / wavelen - 1.0) / (4.0 - 1.0);
  CHECK_NEAR(inv[1], (1 - smooth) * base / 8 + smooth * base, 1e-6);

  // linear: every frequency divided by the factor.
  RopeConfig linear;
  linear.type = RopeType::Linear;
  linear.theta = 10000.0;
  linear.factor = 2.0;
  const std::vector<float> lin = rope_inverse_frequencies(linear, 8);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(lin[i], std::pow(10000.0, -2.0 * i / 8) / 2.0, 1e-7);
  RopeConfig plain;
  plain.theta = 1e6;
  const std::vector<float> def = rope_inverse_frequencies(plain, 16);
  for (int i = 0; i < 8; ++i) CHECK_NEAR(def[i], std::pow(1e6, -2.0 * i / 16), 1e-7 * def[0]);
}

TEST_CASE(head_dim_from_config_or_derived) {
  const ModelConfig qwen3 = load_model_config(fixture("tiny-qwen3"));
  CHECK_EQ(qwen3.head_dim, 16);  // from config, != hidden / heads = 8
  CHECK_EQ(qwen3.hidden_size / qwen3.num_heads, 8);
  const std::string base = "{\"model_type\":\"llama\",\"vocab_size\":10,\"hidden_size\":48,"
                           "\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":4";
  CHECK_EQ(parse_model_config(base + "}", "x").head_dim, 12);
  CHECK_EQ(parse_model_config(base + ",\"head_dim\":20}", "x").head_dim, 20);
  CHECK_EQ(parse_model_config(base + ",\"head_dim\":null}", "x").head_dim, 12);
  CHECK_EQ(parse_model_config(base + "}", "x").num_kv_heads, 4);  // defaults to num_heads
  CHECK_THROWS_WITH(parse_model_config(base + ",\"head_dim\":7}", "x"), ErrorKind::InvalidModel, "head_dim");
  CHECK_THROWS_WITH(parse_model_config(base + ",\"num_key_value_heads\":3}", "x"), ErrorKind::InvalidModel,
                    "num_key_value_heads");

  // A head_dim derived from hidden / heads loads the llama fixture all the same.
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"head_dim\": 8,", "");
  const ModelConfig derived = load_model_config(tmp.path());
  CHECK_EQ(derived.head_dim, 8);
  Engine engine(tmp.path(), engine_options());
  auto reference = SafetensorsFile::open(fixture("tiny-llama") / "reference.safetensors");
  const double err = max_abs_diff(all_logits(engine, tensor_ints(*reference, "input_ids")),
                                  tensor_floats(*reference, "logits"));
  CHECK_MSG(err <= 1e-4, "derived head_dim: logits differ from transformers' by " << err);
}

TEST_CASE(eos_token_ids_int_list_and_generation_config_union) {
  CHECK(load_model_config(fixture("tiny-llama")).eos_token_ids == std::vector<int>{2});
  CHECK(load_model_config(fixture("tiny-qwen3")).eos_token_ids == (std::vector<int>{1, 2}));

  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  write_text(tmp / "generation_config.json", "{\"eos_token_id\": [2, 7, 9]}");
  CHECK(load_model_config(tmp.path()).eos_token_ids == (std::vector<int>{2, 7, 9}));
  write_text(tmp / "generation_config.json", "{\"eos_token_id\": 5}");
  CHECK(load_model_config(tmp.path()).eos_token_ids == (std::vector<int>{2, 5}));
  edit_config(tmp.path(), "\"eos_token_id\": 2,", "\"eos_token_id\": [3, 4],");
  CHECK(load_model_config(tmp.path()).eos_token_ids == (std::vector<int>{3, 4, 5}));
  fs::remove(tmp / "generation_config.json");
  CHECK(load_model_config(tmp.path()).eos_token_ids == (std::vector<int>{3, 4}));
  // Outside the vocabulary (256) is an error naming the file.
  write_text(tmp / "generation_config.json", "{\"eos_token_id\": 256}");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json", "256");
}

// F32, BF16 and F16 storage of the same weights load and give the same logits: bf16 storage
// equals f32 storage run with dtype "bf16" (the same rounding), f16 storage is close to f32.
TEST_CASE(f32_bf16_f16_storage_give_the_same_logits) {
  TempDir tmp("loader");
  const auto source = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  auto reference = SafetensorsFile::open(fixture("tiny-llama") / "reference.safetensors");
  const std::vector<int32_t> ids = tensor_ints(*reference, "input_ids");
  const std::vector<float> hf_logits = tensor_floats(*reference, "logits");
  const std::vector<float> hf_bf16 = tensor_floats(*reference, "logits_bf16_weights");

  std::map<std::string, std::vector<float>> logits;
  for (const std::string dtype : {"F32", "BF16", "F16"}) {
    const fs::path dir = tmp / dtype;
    copy_fixture("tiny-llama", dir);
    std::vector<RawTensor> converted;
    for (const RawTensor& t : source) converted.push_back(convert_f32_tensor(t, dtype));
    write_safetensors(dir / "model.safetensors", converted);
    auto file = SafetensorsFile::open(dir / "model.safetensors");
    CHECK_EQ(std::string(dtype_name(file->find("model.embed_tokens.weight")->dtype)),
             std::string(dtype == "F32" ? "f32" : dtype == "BF16" ? "bf16" : "f16"));
    Engine engine(dir, engine_options());
    // auto keeps bf16 as bf16 and widens f16 to f32.
    CHECK(engine.weight_dtype() == (dtype == "BF16" ? DType::BF16 : DType::F32));
    logits[dtype] = all_logits(engine, ids);
  }
  const double f32_vs_hf = max_abs_diff(logits["F32"], hf_logits);
  const double bf16_vs_hf = max_abs_diff(logits["BF16"], hf_bf16);
  const double bf16_vs_f32 = max_abs_diff(logits["BF16"], logits["F32"]);
  const double f16_vs_f32 = max_abs_diff(logits["F16"], logits["F32"]);
  std::printf("  tiny-llama storage (max abs): f32 vs HF f32 %.3g, bf16 vs HF bf16-weights %.3g, "
              "bf16 vs f32 %.3g, f16 vs f32 %.3g\n", f32_vs_hf, bf16_vs_hf, bf16_vs_f32, f16_vs_f32);
  CHECK(f32_vs_hf <= 1e-4);
  CHECK(bf16_vs_hf <= 1e-4);       // every weight rounded to bf16, exactly as the reference did
  CHECK(bf16_vs_f32 > 1e-3);       // the bf16 file really was used
  // An f32 checkpoint run with dtype "bf16" rounds exactly as a bf16 checkpoint stores.
  Engine f32_as_bf16(tmp / "F32", engine_options("bf16"));
  CHECK(f32_as_bf16.weight_dtype() == DType::BF16);
  CHECK(max_abs_diff(all_logits(f32_as_bf16, ids), logits["BF16"]) <= 1e-6);
  CHECK(f16_vs_f32 <= 2e-2);       // f16 keeps 11 significant bits
  CHECK(f16_vs_f32 > 0.0);         // and it did change something: the f16 file was really used
}

namespace {

// The address ranges at which `file` is mapped into this process (from /proc/self/maps).
std::vector<std::pair<uintptr_t, uintptr_t>> mappings_of(const fs::path& file) {
  const std::string wanted = fs::canonical(file).string();
  std::ifstream maps("/proc/self/maps");
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (std::string line; std::getline(maps, line);) {
    const size_t path_at = line.find('/');
    if (path_at == std::string::npos || line.substr(path_at) != wanted) continue;
    unsigned long begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &begin, &end) == 2) ranges.emplace_back(begin, end);
  }
  return ranges;
}

}  // namespace

// The engine holds every weight in memory of its own, even where the file's bytes are already
// in the weights' format (bf16 file, dtype "auto"): when the engine is built, no weight lies
// in a mapping of model.safetensors and the file is no longer mapped at all, so a file that is
// changed or truncated after load (as `cp` over it does) changes nothing, and its pages do not
// count in resident memory next to the weights made from them. On every backend.
// A tied model (tiny-qwen2: lm_head is the embedding) holds the table once on the CPU
// backends: the embedding rows are read from the matmul layout of the output layer.
TEST_CASE(a_tied_table_is_held_once) {
  for (const std::string& backend : usable_backends()) {
    EngineOptions options = engine_options();
    options.backend = backend;
    Engine engine(fixture("tiny-qwen2"), options);
    const ModelWeights& w = engine.model().weights();
    if (w.embed.device != Device::CPU) continue;  // a GPU backend lays out its own copies
    CHECK_MSG(w.embed.data == w.lm_head.data, backend << ": the tied table is held twice");
  }
}

TEST_CASE(weights_are_held_in_the_engines_own_memory) {
  TempDir tmp("loader");
  std::vector<RawTensor> bf16;
  for (const RawTensor& t : read_all_tensors(fixture("tiny-llama") / "model.safetensors")) {
    bf16.push_back(convert_f32_tensor(t, "BF16"));
  }
  const std::vector<int32_t> ids = {1, 5, 9, 2, 7, 3};
  for (const std::string& backend : usable_backends()) {
    copy_fixture("tiny-llama", tmp / backend);
    const fs::path file = tmp / backend / "model.safetensors";
    write_safetensors(file, bf16);
    EngineOptions options = engine_options();
    options.backend = backend;
    Engine engine(tmp / backend, options);
    CHECK(engine.weight_dtype() == DType::BF16);
    CHECK_MSG(mappings_of(file).empty(), backend << ": the file is still mapped after load");
    const std::vector<float> before = all_logits(engine, ids);
    fs::resize_file(file, 0);  // truncated under the running engine
    CHECK_MSG(all_logits(engine, ids) == before, backend << ": logits changed after the file did");
  }
  // A GGUF file in a block format (which backends without kernels for it compute from as is).
  for (const std::string& backend : usable_backends()) {
    const fs::path file = tmp / (backend + ".q8_0.gguf");
    fs::copy_file(fixture("tiny-gguf") / "tiny-llama.q8_0.gguf", file);
    EngineOptions options = engine_options();
    options.backend = backend;
    Engine engine(file, options);
    CHECK_MSG(mappings_of(file).empty(), backend << ": the GGUF file is still mapped after load");
    const std::vector<float> before = all_logits(engine, ids);
    fs::resize_file(file, 0);
    CHECK_MSG(all_logits(engine, ids) == before, backend << ": logits changed after the GGUF file did");
  }
}


// ---- hardening: headers that say two things, bytes that belong to no tensor ------------------

TEST_CASE(duplicate_tensor_names_are_refused) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  // Two entries named "t" over the two halves of the data: neither may silently win.
  write_raw_safetensors(path,
                        "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                        std::string(8, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "\"t\"",
                    "appears twice");
  // In config.json too (Python's json would take the last, others the first).
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"vocab_size\"", "\"num_hidden_layers\": 1, \"vocab_size\"");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json",
                    "num_hidden_layers", "appears twice");
}

TEST_CASE(invalid_utf8_and_lone_surrogates_are_refused) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  // A tensor name with a bare 0xff byte, an overlong '/', a UTF-8-encoded surrogate, a cut-off
  // sequence; and escapes of unpaired surrogates. Names reach Python as str: all are errors.
  for (const std::string& name : {std::string("bad\xff"), std::string("over\xc0\xaflong"),
                                 std::string("sur\xed\xa0\x80"), std::string("cut\xe2\x82"),
                                 std::string("\\ud800x"), std::string("\\udc00")}) {
    write_raw_safetensors(path, "{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                          std::string(4, '\0'));
    CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                      "malformed JSON");
  }
  // Valid multi-byte names and paired escapes still load.
  write_raw_safetensors(path, "{\"caf\xc3\xa9.\xf0\x9f\x98\x80.\\ud83d\\ude00\":{\"dtype\":\"F32\",\"shape\":[1],"
                              "\"data_offsets\":[0,4]}}", std::string(4, '\0'));
  auto file = SafetensorsFile::open(path);
  CHECK(file->find("caf\xc3\xa9.\xf0\x9f\x98\x80.\xf0\x9f\x98\x80") != nullptr);
  // A model_type that is not UTF-8.
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"llama\"", "\"lla\xfe\x6d\x61\"");
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json", "UTF-8");
}

TEST_CASE(overlapping_shifted_and_trailing_data_are_refused) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  const std::string a = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":";
  const std::string b = ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":";
  // b reads a's last 4 bytes.
  write_raw_safetensors(path, "{" + a + "[0,8]}" + b + "[4,12]}}", std::string(12, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "'a'", "'b'",
                    "overlap");
  // Both name the same bytes.
  write_raw_safetensors(path, "{" + a + "[0,8]}" + b + "[0,8]}}", std::string(8, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, "overlap");
  // Shifted: nothing covers the first 4 bytes.
  write_raw_safetensors(path, "{" + a + "[4,12]}" + b + "[12,20]}}", std::string(20, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(),
                    "4 bytes at data offset 0", "'a'");
  // Trailing garbage after the last tensor.
  write_raw_safetensors(path, "{" + a + "[0,8]}" + b + "[8,16]}}", std::string(17, '\0'));
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "1 bytes after",
                    "trailing");
  // Exactly tiled (in any header order) loads.
  write_raw_safetensors(path, "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}," + a + "[0,8]}}",
                        std::string(16, '\0'));
  CHECK_NOTHROW(SafetensorsFile::open(path));
}

TEST_CASE(shape_whose_byte_count_wraps_is_refused) {
  TempDir tmp("loader");
  const fs::path path = tmp / "model.safetensors";
  // 2^31 * 2^31 * 4 bytes = 2^64, which wraps to 0 in 64 bits: must not pass as an empty span.
  write_raw_safetensors(path, "{\"big\":{\"dtype\":\"F32\",\"shape\":[2147483648,2147483648],"
                              "\"data_offsets\":[0,0]}}");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, path.string(), "'big'",
                    "[2147483648");
  write_raw_safetensors(path, "{\"big\":{\"dtype\":\"BF16\",\"shape\":[4294967296,4294967296,1,1],"
                              "\"data_offsets\":[0,0]}}");
  CHECK_THROWS_WITH(SafetensorsFile::open(path), ErrorKind::InvalidModel, "'big'");
}

TEST_CASE(fifo_and_symlink_loop_are_refused_without_blocking) {
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  // A FIFO no one writes to: open() without O_NONBLOCK would wait forever (ctest's timeout
  // would then fail this test).
  fs::remove(tmp / "model.safetensors");
  CHECK(::mkfifo((tmp / "model.safetensors").c_str(), 0600) == 0);
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    (tmp / "model.safetensors").string(), "FIFO", "not a regular file");
  fs::remove(tmp / "config.json");
  CHECK(::mkfifo((tmp / "config.json").c_str(), 0600) == 0);
  CHECK_THROWS_WITH(load_model_config(tmp.path()), ErrorKind::InvalidModel, "config.json", "FIFO");
  // A symlink loop: an Error naming it, not a std::filesystem exception.
  fs::remove(tmp / "model.safetensors");
  fs::create_symlink(tmp / "loop-b", tmp / "model.safetensors");
  fs::create_symlink(tmp / "model.safetensors", tmp / "loop-b");
  fs::remove(tmp / "config.json");
  copy_fixture("tiny-llama", tmp / "copy");
  fs::copy_file(tmp / "copy" / "config.json", tmp / "config.json");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel,
                    (tmp / "model.safetensors").string(), "symlink loop");
  // The model path itself a FIFO (named like a GGUF file, too).
  CHECK(::mkfifo((tmp / "model.gguf").c_str(), 0600) == 0);
  CHECK_THROWS_WITH(Engine(tmp / "model.gguf", engine_options()), ErrorKind::InvalidModel, "model.gguf",
                    "not a regular file or a directory");
  fs::create_symlink(tmp / "loop-d", tmp / "loop-c");
  fs::create_symlink(tmp / "loop-c", tmp / "loop-d");
  CHECK_THROWS_WITH(Engine(tmp / "loop-c", engine_options()), ErrorKind::InvalidModel, "loop-c",
                    "symlink loop");
}

// ---- hardening: hyper-parameters out of range ------------------------------------------------

TEST_CASE(config_values_out_of_range_or_not_finite_are_refused) {
  const std::string base = "{\"model_type\":\"llama\",\"vocab_size\":10,\"hidden_size\":8,"
                           "\"intermediate_size\":16,\"num_attention_heads\":2,";
  const std::string one_layer = base + "\"num_hidden_layers\":1,";
  auto config = [&](const std::string& rest) { return parse_model_config(one_layer + rest + "}", "cfg.json"); };
  CHECK_NOTHROW(config("\"rms_norm_eps\": 1e-6"));
  // Three million layers: refused at once by name, before any per-layer bookkeeping is sized.
  CHECK_THROWS_WITH(parse_model_config(base + "\"num_hidden_layers\": 3000000}", "cfg.json"),
                    ErrorKind::InvalidModel, "cfg.json", "num_hidden_layers", "3000000", "2048");
  CHECK_THROWS_WITH(config("\"vocab_size\": 100000000"), ErrorKind::InvalidModel, "appears twice");
  CHECK_THROWS_WITH(parse_model_config("{\"model_type\":\"llama\",\"vocab_size\":100000000,\"hidden_size\":8,"
                                       "\"intermediate_size\":16,\"num_attention_heads\":2,\"num_hidden_layers\":1}",
                                       "cfg.json"),
                    ErrorKind::InvalidModel, "vocab_size", "100000000");
  CHECK_THROWS_WITH(config("\"max_position_embeddings\": 1000000000"), ErrorKind::InvalidModel,
                    "max_position_embeddings", "1000000000");
  CHECK_THROWS_WITH(config("\"head_dim\": 8192"), ErrorKind::InvalidModel, "head_dim", "8192");
  // Norm epsilon and rope base: finite and positive (NaN gave NaN logits, then only EOS).
  for (const char* eps : {"-1", "0", "NaN", "Infinity", "1e300"}) {
    CHECK_THROWS_WITH(config(std::string("\"rms_norm_eps\": ") + eps), ErrorKind::InvalidModel,
                      "cfg.json", "rms_norm_eps", "finite positive");
  }
  for (const char* theta : {"0", "-1", "NaN", "Infinity"}) {
    CHECK_THROWS_WITH(config(std::string("\"rope_theta\": ") + theta), ErrorKind::InvalidModel,
                      "cfg.json", "rope_theta", "finite positive");
    CHECK_THROWS_WITH(config(std::string("\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": ") +
                             theta + "}"),
                      ErrorKind::InvalidModel, "rope_theta");
  }
  // Rope scaling: the type must be a string (a number was read as "default"), factors finite.
  CHECK_THROWS_WITH(config("\"rope_scaling\": {\"rope_type\": 3, \"factor\": 2}"), ErrorKind::InvalidModel,
                    "cfg.json", "rope_type", "a number", "expected a string");
  CHECK_THROWS_WITH(config("\"rope_scaling\": {\"type\": [\"linear\"], \"factor\": 2}"),
                    ErrorKind::InvalidModel, "'type'", "an array");
  CHECK_THROWS_WITH(config("\"rope_scaling\": {\"type\": \"linear\", \"factor\": Infinity}"),
                    ErrorKind::InvalidModel, "factor", "finite positive");
  const std::string llama3 = "\"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8, ";
  CHECK_THROWS_WITH(config(llama3 + "\"low_freq_factor\": 1, \"high_freq_factor\": Infinity}"),
                    ErrorKind::InvalidModel, "high_freq_factor", "finite positive");
  CHECK_THROWS_WITH(config(llama3 + "\"original_max_position_embeddings\": 1e300}"),
                    ErrorKind::InvalidModel, "original_max_position_embeddings");
  // Through the engine as well, on a real fixture.
  TempDir tmp("loader");
  copy_fixture("tiny-llama", tmp.path());
  edit_config(tmp.path(), "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": NaN");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "config.json", "rms_norm_eps");
}

// ---- hardening: weights the model would ignore ------------------------------------------------

TEST_CASE(tensors_the_model_does_not_use_are_refused_by_name) {
  TempDir tmp("loader");
  // qwen2 weights (q/k/v biases) under model_type llama: the biases would be dropped silently.
  copy_fixture("tiny-qwen2", tmp.path());
  edit_config(tmp.path(), "\"model_type\": \"qwen2\"", "\"model_type\": \"llama\"");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "model.safetensors",
                    "'llama'", "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
                    "attention_bias");
  // With attention_bias the biases are read (llama's bias on o_proj is then required, and absent).
  edit_config(tmp.path(), "\"model_type\": \"llama\"", "\"model_type\": \"llama\", \"attention_bias\": true");
  CHECK_THROWS_WITH(Engine(tmp.path(), engine_options()), ErrorKind::InvalidModel, "o_proj.bias", "missing");

  // Any other extra tensor; rotary_emb buffers (derived from the config) are ignored by name.
  TempDir llama("loader");
  copy_fixture("tiny-llama", llama.path());
  auto tensors = read_all_tensors(fixture("tiny-llama") / "model.safetensors");
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {4}, std::vector<unsigned char>(16, 0), ""});
  write_safetensors(llama / "model.safetensors", tensors);
  CHECK_NOTHROW(Engine(llama.path(), engine_options()));
  tensors.push_back({"model.layers.1.mlp.extra.weight", "F32", {2}, std::vector<unsigned char>(8, 0), ""});
  tensors.push_back({"model.layers.5.input_layernorm.weight", "F32", {32}, std::vector<unsigned char>(128, 0), ""});
  write_safetensors(llama / "model.safetensors", tensors);
  const std::string message = CHECK_THROWS_WITH(Engine(llama.path(), engine_options()), ErrorKind::InvalidModel,
                                                "2 tensors", "model.layers.1.mlp.extra.weight",
                                                "model.layers.5.input_layernorm.weight");
  CHECK(message.find("rotary_emb") == std::string::npos);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
