// Models from GGUF files (tests/fixtures/tiny-gguf, written by make_tiny_gguf.py with
// transformers' logits on each file): the hyper-parameters read from the metadata, the llama
// q/k rows put back in order (logits equal transformers'), formats kept as the file has them,
// q/k/v fused only where their formats agree, rope frequency factors, and the errors for what
// cannot be loaded (missing keys and tensors, other architectures, unsupported tensor types and
// rope scalings, folders with several files). Then quantising safetensors at load: exactly the
// model whose weights went through the quantiser, with llama.cpp's fallback for short rows.
// (Every backend against every fixture file: tests/python/test_gguf_models.py.)
#include <cmath>
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

fs::path tiny_gguf(const std::string& name) { return fixture("tiny-gguf") / name; }

EngineOptions options(const std::string& backend = "cpu", const std::string& dtype = "auto") {
  EngineOptions o;
  o.backend = backend;
  o.dtype = dtype;
  o.threads = 2;
  o.kv_cache_dtype = "f32";  // these compare weights; test_kv_cache checks the KV types
  return o;
}

struct Reference {
  std::vector<int32_t> ids;
  std::vector<float> logits;
};

Reference reference(const std::string& model, const std::string& file_stem) {
  auto file = SafetensorsFile::open(fixture("tiny-gguf") / "reference.safetensors");
  return {tensor_ints(*file, model + ".input_ids"), tensor_floats(*file, file_stem + ".logits")};
}

// `f32_bound` for engines that multiply f32 activations; a backend whose quantised kernels round
// activations to bf16 (avx on AVX512_BF16) moves these tiny models' logits by up to ~0.03, a
// broken kernel by far more.
double logit_tolerance(const Engine& engine, double f32_bound) {
  return engine.matmul_activation_dtype() == DType::BF16 ? 0.1 : f32_bound;
}

// Whether any backend name other than "cpu" is usable here (the fused-projection checks).
bool has_avx() {
  for (const std::string& name : usable_backends()) if (name == "avx") return true;
  return false;
}

}  // namespace

TEST_CASE(llama_config_from_metadata) {
  Engine engine(tiny_gguf("tiny-llama.f32.gguf"), options());
  const ModelConfig& c = engine.config();
  CHECK_EQ(c.model_type, std::string("llama"));
  CHECK_EQ(c.num_layers, 1);
  CHECK_EQ(c.hidden_size, 32);
  CHECK_EQ(c.intermediate_size, 32);
  CHECK_EQ(c.num_heads, 4);
  CHECK_EQ(c.num_kv_heads, 2);
  CHECK_EQ(c.head_dim, 8);
  CHECK_EQ(c.vocab_size, 32);
  CHECK_EQ(c.max_position_embeddings, 64);
  CHECK_NEAR(c.rms_norm_eps, 1e-5, 1e-12);
  CHECK_EQ(c.rope.theta, 500.0);
  CHECK(!c.tie_word_embeddings);
  CHECK_EQ(c.bos_token_id, 1);
  CHECK(c.eos_token_ids == std::vector<int>{2});
  CHECK(engine.weight_dtype() == DType::F32);
  Engine qwen(tiny_gguf("tiny-qwen2.q8_0.gguf"), options());
  CHECK(qwen.config().tie_word_embeddings);
  CHECK(qwen.model().traits().qkv_bias);
  Engine qwen3(tiny_gguf("tiny-qwen3.f32.gguf"), options());
  CHECK_EQ(qwen3.config().head_dim, 128);  // attention.key_length (hidden / heads is 32)
  CHECK(qwen3.model().traits().qk_norm);
}

TEST_CASE(llama_rows_are_put_back_in_order) {
  // The file stores attn_q / attn_k with llama.cpp's interleaved rows; the logits only match
  // transformers' (which undoes the same permutation) when the loader undoes it too.
  const Reference ref = reference("tiny-llama", "tiny-llama.f32");
  Engine engine(tiny_gguf("tiny-llama.f32.gguf"), options());
  CHECK(max_abs_diff(all_logits(engine, ref.ids), ref.logits) < 1e-4);
  const Reference k = reference("tiny-llama-256", "tiny-llama-256.q4_k_m");
  Engine quantized(tiny_gguf("tiny-llama-256.q4_k_m.gguf"), options());
  CHECK(max_abs_diff(all_logits(quantized, k.ids), k.logits) < 2e-4);
}

TEST_CASE(formats_stay_as_the_file_has_them_and_fuse_only_when_equal) {
  if (!has_avx()) {
    std::printf("  (no avx backend on this machine: the fusing checks need it)\n");
    return;
  }
  Engine uniform(tiny_gguf("tiny-llama.q8_0.gguf"), options("avx"));
  const LayerWeights& u = uniform.model().weights().layers[0];
  CHECK(!u.wqkv.empty() && u.wqkv.dtype == DType::Q8_0);  // fused, still Q8_0
  CHECK(!u.w_gate_up.empty() && u.w_gate_up.dtype == DType::Q8_0);
  CHECK(uniform.model().weights().embed.dtype == DType::Q8_0);

  // Q4_K_M: q and k in Q4_K, v in Q6_K. Stacking them would convert one: they stay apart.
  Engine mixed(tiny_gguf("tiny-llama-256.q4_k_m.gguf"), options("avx"));
  const LayerWeights& m = mixed.model().weights().layers[0];
  CHECK(m.wqkv.empty());
  CHECK(m.wq.dtype == DType::Q4_K && m.wk.dtype == DType::Q4_K && m.wv.dtype == DType::Q6_K);
  CHECK(!m.w_gate_up.empty() && m.w_gate_up.dtype == DType::Q4_K);
  const Reference ref = reference("tiny-llama-256", "tiny-llama-256.q4_k_m");
  CHECK(max_abs_diff(all_logits(mixed, ref.ids), ref.logits) < logit_tolerance(mixed, 2e-4));
  const std::string format = mixed.model().weight_format();
  CHECK_MSG(format.find("q4_k (mixed: ") == 0 && format.find(" q6_k") != std::string::npos, format);
}

TEST_CASE(rope_frequency_factors_divide_the_frequencies) {
  // llama.cpp writes Llama 3's rope scaling as rope_freqs.weight; factors of 2 everywhere are
  // linear scaling by 2.
  TempDir tmp("gguf-models");
  GgufCopy with_factors = GgufCopy::read(tiny_gguf("tiny-llama.f32.gguf"));
  const std::vector<float> twos(4, 2.0f);
  GgufWriter::Bytes bytes(twos.size() * sizeof(float));
  std::memcpy(bytes.data(), twos.data(), bytes.size());
  with_factors.tensors.push_back({"rope_freqs.weight", 0, {4}, bytes});
  with_factors.write(tmp / "factors.gguf");
  GgufCopy linear = GgufCopy::read(tiny_gguf("tiny-llama.f32.gguf"));
  linear.set_string("llama.rope.scaling.type", "linear");
  linear.set("llama.rope.scaling.factor", 6, GgufWriter::encode<float>(2.0f));
  linear.write(tmp / "linear.gguf");

  const Reference ref = reference("tiny-llama", "tiny-llama.f32");
  Engine a(tmp / "factors.gguf", options()), b(tmp / "linear.gguf", options());
  CHECK(b.config().rope.type == RopeType::Linear && b.config().rope.factor == 2.0);
  const std::vector<float> la = all_logits(a, ref.ids), lb = all_logits(b, ref.ids);
  CHECK(max_abs_diff(la, lb) < 1e-5);
  CHECK(max_abs_diff(la, ref.logits) > 1e-2);  // the scaling did change something
}

// tiny-llama.f32.gguf with `edit` applied, written as edited.gguf in `dir`.
fs::path edited_tiny_llama(const fs::path& dir, const std::function<void(GgufCopy&)>& edit) {
  GgufCopy copy = GgufCopy::read(tiny_gguf("tiny-llama.f32.gguf"));
  edit(copy);
  const fs::path path = dir / "edited.gguf";
  copy.write(path);
  return path;
}

TEST_CASE(what_cannot_be_loaded_is_named) {
  TempDir tmp("gguf-models");
  auto edited = [&](const std::function<void(GgufCopy&)>& edit) { return edited_tiny_llama(tmp.path(), edit); };
  fs::path p = edited([](GgufCopy& c) { c.set_string("general.architecture", "gemma2"); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, p.string(), "'gemma2' is not supported",
                    "llama, qwen2, qwen3");
  p = edited([](GgufCopy& c) { c.remove("llama.block_count"); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, p.string(), "llama.block_count", "missing");
  p = edited([](GgufCopy& c) { c.set_string("llama.embedding_length", "32"); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "llama.embedding_length", "expected an integer");
  p = edited([](GgufCopy& c) { c.set_string("llama.rope.scaling.type", "yarn"); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::Unsupported, "llama.rope.scaling.type", "yarn");
  p = edited([](GgufCopy& c) { c.set("llama.attention.value_length", 4, GgufWriter::encode<uint32_t>(16)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::Unsupported, "value_length", "differs");
  p = edited([](GgufCopy& c) { c.set("llama.rope.dimension_count", 4, GgufWriter::encode<uint32_t>(4)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::Unsupported, "partial rotary");
  p = edited([](GgufCopy& c) { c.remove_tensor("blk.0.ffn_up.weight"); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "'blk.0.ffn_up.weight' is missing",
                    "GGUF metadata");
  p = edited([](GgufCopy& c) { c.set("llama.feed_forward_length", 4, GgufWriter::encode<uint32_t>(48)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "blk.0.ffn_gate.weight", "[32, 32]",
                    "[48, 32]", "GGUF metadata");
  p = edited([](GgufCopy& c) { c.set("tokenizer.ggml.eos_token_id", 4, GgufWriter::encode<uint32_t>(99)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "eos_token_id 99", "vocabulary");
  // A tensor type opencamp has no format for: named with the tensor, when the model needs it.
  GgufCopy q3 = GgufCopy::read(tiny_gguf("tiny-llama-256.q5_k_m.gguf"));
  GgufCopy::Tensor* q = q3.tensor("blk.0.attn_q.weight");
  CHECK(q != nullptr);
  if (q) {
    q->type = 11;  // Q3_K: 110 bytes per 256 values
    q->data.assign(q->ne[1] * 110, 0);
  }
  q3.write(tmp / "q3_k.gguf");
  CHECK_THROWS_WITH(Engine(tmp / "q3_k.gguf", options()), ErrorKind::InvalidModel, "blk.0.attn_q.weight",
                    "Q3_K", "cannot load", "supported: F32, F16, BF16, Q8_0, Q4_0");
}

TEST_CASE(paths_files_and_folders) {
  TempDir tmp("gguf-models");
  // A folder with one GGUF and no safetensors is that model; the file under another name too
  // (recognised by its magic bytes).
  fs::create_directories(tmp / "one");
  fs::copy_file(tiny_gguf("tiny-qwen2.q4_0.gguf"), tmp / "one" / "model.gguf");
  CHECK(Engine(tmp / "one", options()).weight_dtype() == DType::Q4_0);
  fs::copy_file(tiny_gguf("tiny-qwen2.q4_0.gguf"), tmp / "model.bin");
  CHECK(Engine(tmp / "model.bin", options()).config().model_type == "qwen2");
  // Several: an error that lists them (and says split files need merging).
  fs::create_directories(tmp / "split");
  for (const char* name : {"m-00001-of-00002.gguf", "m-00002-of-00002.gguf"}) {
    fs::copy_file(tiny_gguf("tiny-qwen2.q4_0.gguf"), tmp / "split" / name);
  }
  CHECK_THROWS_WITH(Engine(tmp / "split", options()), ErrorKind::InvalidModel, "2 GGUF files",
                    "m-00001-of-00002.gguf, m-00002-of-00002.gguf", "pass the one", "gguf-split --merge");
  write_text(tmp / "notes.txt", "not a model");
  CHECK_THROWS_WITH(Engine(tmp / "notes.txt", options()), ErrorKind::InvalidModel, "notes.txt",
                    "neither a GGUF file nor a model folder");
  // A folder with safetensors is a Hugging Face folder even with a GGUF next to it.
  copy_fixture("tiny-llama", tmp / "both");
  fs::copy_file(tiny_gguf("tiny-qwen2.q4_0.gguf"), tmp / "both" / "extra.gguf");
  CHECK(Engine(tmp / "both", options()).config().vocab_size == 256);
}

// write_random_llama (test_util.h): rows of 256 values (q/k/v/o/gate/up) and of 64 (down).
TEST_CASE(quantizing_safetensors_at_load_is_the_quantized_model) {
  // dtype "q4_k" holds rows of 256 in Q4_K and the 64-value rows of down_proj in Q5_0
  // (llama.cpp's fallback); the logits equal those of the f32 model whose weights went through
  // the same quantisers beforehand, so exactly those tensors were quantised, to those formats.
  TempDir tmp("gguf-models");
  write_random_llama(tmp / "f32", [](std::vector<float> v, const std::vector<int64_t>&) { return v; });
  auto round_trip = [](std::vector<float> v, DType dtype) {
    std::vector<unsigned char> blocks(dtype_bytes(dtype, static_cast<int64_t>(v.size())));
    convert_dtype(v.data(), DType::F32, blocks.data(), dtype, static_cast<int64_t>(v.size()));
    convert_dtype(blocks.data(), dtype, v.data(), DType::F32, static_cast<int64_t>(v.size()));
    return v;
  };
  write_random_llama(tmp / "expected", [&](std::vector<float> v, const std::vector<int64_t>& shape) {
    return round_trip(std::move(v), shape.back() % 256 == 0 ? DType::Q4_K : DType::Q5_0);  // down: rows of 64
  });
  const std::vector<int32_t> ids = {3, 17, 42, 5, 0, 29, 11};
  for (const std::string backend : {"cpu", "auto"}) {
    Engine quantized(tmp / "f32", options(backend, "q4_k"));
    const auto& types = quantized.model().weight_types();
    CHECK(types.size() == 2 && types.count(DType::Q4_K) && types.count(DType::Q5_0));
    if (types.count(DType::Q5_0)) CHECK_EQ(types.at(DType::Q5_0).tensors, 1);
    CHECK_EQ(quantized.model().weight_format(), std::string("q4_k (mixed: 8 q4_k, 1 q5_0)"));
    Engine expected(tmp / "expected", options(backend, "f32"));
    CHECK(max_abs_diff(all_logits(quantized, ids), all_logits(expected, ids)) < logit_tolerance(quantized, 1e-4));
  }
  Engine q8(tmp / "f32", options("cpu", "q8_0"));
  CHECK_EQ(q8.model().weight_format(), std::string("q8_0"));
  CHECK_THROWS_WITH(Engine(tmp / "f32", options("cpu", "f16")), ErrorKind::InvalidArgument, "dtype 'f16'",
                    "auto, f32, bf16, q8_0, q4_0");
}

TEST_CASE(hardening_metadata_ranges_utf8_and_unused_tensors) {
  TempDir tmp("gguf-models");
  auto edited = [&](const std::function<void(GgufCopy&)>& edit) { return edited_tiny_llama(tmp.path(), edit); };
  // The same range and finiteness checks as config.json (validate_model_config).
  fs::path p = edited([](GgufCopy& c) { c.set("llama.block_count", 4, GgufWriter::encode<uint32_t>(3000000)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, p.string(), "block_count", "3000000");
  p = edited([](GgufCopy& c) {
    c.set("llama.attention.layer_norm_rms_epsilon", 6, GgufWriter::encode<float>(std::nanf("")));
  });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "layer_norm_rms_epsilon", "finite positive");
  p = edited([](GgufCopy& c) { c.set("llama.rope.freq_base", 6, GgufWriter::encode<float>(-1.0f)); });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "rope.freq_base", "finite positive");
  // Strings that are not UTF-8: refused by position, their bytes never reach a message.
  p = edited([](GgufCopy& c) { c.set_string("general.architecture", "lla\xffma"); });
  std::string message = CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel,
                                          "general.architecture", "not valid UTF-8");
  CHECK(message.find('\xff') == std::string::npos);
  p = edited([](GgufCopy& c) { c.tensors.back().name += "\xc0\xaf"; });
  message = CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, "name of tensor #", "not valid UTF-8");
  CHECK(message.find('\xc0') == std::string::npos);
  // A tensor the model would not read.
  p = edited([](GgufCopy& c) {
    GgufCopy::Tensor extra = c.tensors.back();
    extra.name = "blk.0.attn_q.bias_extra";
    c.tensors.push_back(extra);
  });
  CHECK_THROWS_WITH(Engine(p, options()), ErrorKind::InvalidModel, p.string(), "blk.0.attn_q.bias_extra",
                    "does not use");
  CHECK_NOTHROW(Engine(edited([](GgufCopy&) {}), options()));  // the copy itself is sound
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
