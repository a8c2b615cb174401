// The engine end to end on the committed tiny models (tests/fixtures/tiny-*), whose
// reference.safetensors were made by Hugging Face transformers: logits in f32 and bf16, greedy
// generation through the decode path (plain, and under transformers' repetition penalty, which
// counts the prompt's tokens too), and the engine's own consistency (prefill == token by
// token decode, batched decode == alone, chunked prefill, prefix reuse, limits, streaming).
// Every check runs on every usable backend.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <map>
#include <thread>

#include "check.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;

namespace {

const std::vector<std::string> kModels = {"tiny-llama", "tiny-qwen2", "tiny-qwen3"};

// HF logits with f32 weights vs ours: f32 math in another order only.
constexpr double kF32Tolerance = 1e-4;
// Our engine against itself along different paths (prefill/decode, batch, chunk): the same
// kernels, so only accumulation order may differ.
constexpr double kSelfTolerance = 1e-5;
// bf16 weights vs the f32 reference: measured 0.049 / 0.058 / 0.126 (llama / qwen2 / qwen3), the
// README of the fixtures says up to 0.05 / 0.06 / 0.13.
constexpr double kBF16VsF32Tolerance = 0.2;
// Backends that also round activations to bf16 in their matmuls (AVX512_BF16 dot products):
// against HF's bf16 weights computed in f32, measured 0.040 / 0.052 / 0.101; against the f32
// model, 0.066 / 0.072 / 0.19.
constexpr double kBF16ActivationsTolerance = 0.2;
constexpr double kBF16ActivationsVsF32Tolerance = 0.3;

struct Reference {
  std::vector<int32_t> input_ids;
  std::vector<float> logits;             // [T, V] f32 weights
  std::vector<float> logits_bf16;        // [T, V] weights rounded to bf16
  std::vector<int32_t> greedy_prompt;
  std::vector<int32_t> greedy_tokens;    // [16]
  float repetition_penalty = 1.0f;
  std::vector<int32_t> penalty_prompt;
  std::vector<int32_t> penalty_tokens;   // [16] greedy under the repetition penalty
  std::vector<float> penalty_logits;     // [16, V] each step's logits after the penalty
};

const Reference& reference(const std::string& model) {
  static std::map<std::string, Reference> cache;
  auto it = cache.find(model);
  if (it != cache.end()) return it->second;
  auto file = SafetensorsFile::open(fixture(model) / "reference.safetensors");
  Reference r;
  r.input_ids = tensor_ints(*file, "input_ids");
  r.logits = tensor_floats(*file, "logits");
  r.logits_bf16 = tensor_floats(*file, "logits_bf16_weights");
  r.greedy_prompt = tensor_ints(*file, "greedy_prompt");
  r.greedy_tokens = tensor_ints(*file, "greedy_tokens");
  r.repetition_penalty = tensor_floats(*file, "repetition_penalty").at(0);
  r.penalty_prompt = tensor_ints(*file, "penalty_prompt");
  r.penalty_tokens = tensor_ints(*file, "penalty_tokens");
  r.penalty_logits = tensor_floats(*file, "penalty_logits");
  return cache.emplace(model, std::move(r)).first->second;
}

EngineOptions options_for(const std::string& backend, const std::string& dtype = "f32") {
  EngineOptions options;
  options.backend = backend;
  options.dtype = dtype;
  options.threads = 2;
  options.kv_cache_dtype = "f32";  // these compare weights and ops; test_kv_cache checks the KV types
  return options;
}

size_t vocab(const Engine& engine) { return static_cast<size_t>(engine.config().vocab_size); }

std::vector<float> prefill_all(Engine& engine, int seq, std::span<const int32_t> tokens) {
  std::vector<float> logits(tokens.size() * vocab(engine));
  engine.prefill(seq, tokens, logits, /*all_positions=*/true);
  return logits;
}

std::vector<float> prefill_last(Engine& engine, int seq, std::span<const int32_t> tokens) {
  std::vector<float> logits(vocab(engine));
  engine.prefill(seq, tokens, logits);
  return logits;
}

std::vector<float> decode_one(Engine& engine, int seq, int32_t token) {
  std::vector<float> logits(vocab(engine));
  const int seqs[] = {seq};
  engine.decode(seqs, std::span(&token, 1), logits);
  return logits;
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= worst)) worst = d;  // NaN propagates as the worst
  }
  return worst;
}

GenerationRequest greedy_request(const std::vector<int32_t>& prompt, int max_tokens = 16) {
  GenerationRequest request;
  request.prompt = prompt;
  request.sampling.temperature = 0.0f;
  request.max_tokens = max_tokens;
  request.ignore_eos = true;
  return request;
}

// Runs `body(model, backend)` for every fixture on every usable backend.
template <class Body>
void for_each_model(Body body) {
  for (const std::string& backend : usable_backends()) {
    for (const std::string& model : kModels) body(model, backend);
  }
}

}  // namespace

TEST_CASE(reference_fixtures_read) {
  for (const std::string& model : kModels) {
    const Reference& r = reference(model);
    const ModelConfig config = load_model_config(fixture(model));
    CHECK_EQ(r.logits.size(), r.input_ids.size() * static_cast<size_t>(config.vocab_size));
    CHECK_EQ(r.logits_bf16.size(), r.logits.size());
    CHECK_EQ(r.greedy_tokens.size(), size_t(16));
    CHECK(!r.greedy_prompt.empty());
    CHECK_EQ(r.penalty_tokens.size(), size_t(16));
    CHECK_EQ(r.penalty_logits.size(), size_t(16) * static_cast<size_t>(config.vocab_size));
    CHECK(r.repetition_penalty > 1.0f);
  }
}

TEST_CASE(f32_prefill_matches_hf_logits) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend, "f32"));
    CHECK(engine.weight_dtype() == DType::F32);
    const auto logits = prefill_all(engine, engine.create_sequence(), r.input_ids);
    const double err = max_abs_diff(logits, r.logits);
    std::printf("  %-10s %-5s f32 vs HF f32: max abs %.3g\n", model.c_str(), backend.c_str(), err);
    CHECK_MSG(err <= kF32Tolerance, model << " on " << backend << ": max abs " << err);
    // "auto" keeps the f32 checkpoint in f32.
    Engine automatic(fixture(model), options_for(backend, "auto"));
    CHECK(automatic.weight_dtype() == DType::F32);
  });
}

TEST_CASE(bf16_prefill_matches_hf_bf16_logits) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend, "bf16"));
    CHECK(engine.weight_dtype() == DType::BF16);
    const auto logits = prefill_all(engine, engine.create_sequence(), r.input_ids);
    const double vs_bf16 = max_abs_diff(logits, r.logits_bf16);
    const double vs_f32 = max_abs_diff(logits, r.logits);
    std::printf("  %-10s %-5s bf16 vs HF bf16-weights: max abs %.3g; vs HF f32: %.3g\n", model.c_str(),
                backend.c_str(), vs_bf16, vs_f32);
    // HF rounded every weight (norm weights and biases included) to bf16 and computed in f32:
    // exact agreement, unless the backend also rounds activations to bf16 in its matmuls.
    const bool bf16_activations = engine.matmul_activation_dtype() == DType::BF16;
    const double bound = bf16_activations ? kBF16ActivationsTolerance : kF32Tolerance;
    CHECK_MSG(vs_bf16 <= bound, model << " on " << backend << ": bf16 max abs " << vs_bf16);
    const double bound_vs_f32 = bf16_activations ? kBF16ActivationsVsF32Tolerance : kBF16VsF32Tolerance;
    CHECK_MSG(vs_f32 <= bound_vs_f32, model << " on " << backend << ": vs f32 max abs " << vs_f32);
    CHECK(vs_f32 > 1e-3);  // the weights really were rounded
  });
}

TEST_CASE(greedy_generation_matches_hf) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    for (const std::string dtype : {"f32", "bf16"}) {
      Engine engine(fixture(model), options_for(backend, dtype));
      const int seq = engine.create_sequence();
      const GenerationResult result = engine.generate(seq, greedy_request(r.greedy_prompt));
      CHECK_MSG(result.tokens == r.greedy_tokens, model << " " << dtype << " on " << backend
                                                        << ": greedy tokens differ from HF");
      CHECK(result.finish_reason == FinishReason::Length);
      CHECK_EQ(result.prompt_tokens, static_cast<int>(r.greedy_prompt.size()));
      CHECK_EQ(result.cached_tokens, 0);
      // The sequence holds the prompt and every generated token but the last.
      std::vector<int32_t> expected = r.greedy_prompt;
      expected.insert(expected.end(), r.greedy_tokens.begin(), r.greedy_tokens.end() - 1);
      CHECK(engine.sequence_tokens(seq) == expected);
      // Without ignore_eos the same: no EOS among the reference tokens.
      GenerationRequest with_eos = greedy_request(r.greedy_prompt);
      with_eos.ignore_eos = false;
      const int other = engine.create_sequence();
      CHECK(engine.generate(other, with_eos).tokens == r.greedy_tokens);
    }
  });
}

// transformers' RepetitionPenaltyLogitsProcessor penalises every token of the sequence, the
// prompt's included. The fixture's prompt is chosen so that a penalty blind to the prompt, or
// none, gives other tokens. Step by step, the engine's logits after apply_penalties equal the
// processor's output; and generate() with repetition_penalty yields transformers' tokens.
TEST_CASE(repetition_penalty_matches_hf_prompt_included) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    const size_t V = vocab(engine);
    const int seq = engine.create_sequence();
    std::vector<int32_t> history = r.penalty_prompt;
    std::vector<float> logits = prefill_last(engine, seq, r.penalty_prompt);
    double worst = 0.0;
    for (size_t step = 0; step < r.penalty_tokens.size(); ++step) {
      apply_penalties(logits, history, r.repetition_penalty, 0.0f, 0.0f);
      worst = std::max(worst, max_abs_diff(logits, std::span(r.penalty_logits).subspan(step * V, V)));
      const int32_t token = r.penalty_tokens[step];
      CHECK_MSG(argmax(logits) == token, model << " on " << backend << ": step " << step);
      history.push_back(token);
      logits = decode_one(engine, seq, token);
    }
    std::printf("  %-10s %-5s penalised logits vs HF: max abs %.3g\n", model.c_str(), backend.c_str(),
                worst);
    CHECK_MSG(worst <= kF32Tolerance, model << " on " << backend << ": penalised logits, max abs " << worst);

    GenerationRequest request = greedy_request(r.penalty_prompt);
    request.sampling.repetition_penalty = r.repetition_penalty;
    const GenerationResult result = engine.generate(engine.create_sequence(), request);
    CHECK_MSG(result.tokens == r.penalty_tokens,
              model << " on " << backend << ": tokens under repetition_penalty differ from HF");
  });
}

// One prefill pass over the prompt and prefill(first token) + one decode() per later token must
// agree: the two paths write and read the KV cache the same way.
TEST_CASE(prefill_and_token_by_token_decode_agree) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    const auto all = prefill_all(engine, engine.create_sequence(), r.input_ids);
    const int seq = engine.create_sequence();
    const size_t V = vocab(engine);
    double worst = 0.0;
    std::vector<float> step = prefill_last(engine, seq, std::span(r.input_ids).first(1));
    worst = std::max(worst, max_abs_diff(step, std::span(all).first(V)));
    for (size_t t = 1; t < r.input_ids.size(); ++t) {
      step = decode_one(engine, seq, r.input_ids[t]);
      worst = std::max(worst, max_abs_diff(step, std::span(all).subspan(t * V, V)));
    }
    std::printf("  %-10s %-5s prefill vs token-by-token: max abs %.3g\n", model.c_str(), backend.c_str(), worst);
    CHECK_MSG(worst <= kSelfTolerance, model << " on " << backend << ": " << worst);
    CHECK(engine.sequence_tokens(seq) == r.input_ids);
    // A second prefill continues a sequence too (prefill of the rest after the first 5 tokens).
    const int split = engine.create_sequence();
    prefill_last(engine, split, std::span(r.input_ids).first(5));
    const auto rest = prefill_all(engine, split, std::span(r.input_ids).subspan(5));
    CHECK(max_abs_diff(rest, std::span(all).subspan(5 * V)) <= kSelfTolerance);
  });
}

TEST_CASE(batched_decode_equals_each_alone) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    const size_t V = vocab(engine);
    // Sequences of different lengths, in a batch and alone.
    const std::vector<int32_t> prompt_a(r.input_ids.begin(), r.input_ids.begin() + 4);
    const std::vector<int32_t> prompt_b(r.input_ids.begin() + 2, r.input_ids.end());
    const int a = engine.create_sequence(), b = engine.create_sequence();
    const int a_alone = engine.create_sequence(), b_alone = engine.create_sequence();
    prefill_last(engine, a, prompt_a);
    prefill_last(engine, b, prompt_b);
    prefill_last(engine, a_alone, prompt_a);
    prefill_last(engine, b_alone, prompt_b);
    double worst = 0.0;
    for (int step = 0; step < 4; ++step) {
      const int32_t token_a = r.greedy_tokens[static_cast<size_t>(step)];
      const int32_t token_b = r.greedy_tokens[static_cast<size_t>(15 - step)];
      std::vector<float> batched(2 * V);
      const int seqs[] = {b, a};  // not in creation order
      const int32_t tokens[] = {token_b, token_a};
      engine.decode(seqs, tokens, batched);
      const auto alone_a = decode_one(engine, a_alone, token_a);
      const auto alone_b = decode_one(engine, b_alone, token_b);
      worst = std::max(worst, max_abs_diff(std::span(batched).first(V), alone_b));
      worst = std::max(worst, max_abs_diff(std::span(batched).subspan(V), alone_a));
      CHECK(max_abs_diff(alone_a, alone_b) > 1e-3);  // the two rows really differ
    }
    std::printf("  %-10s %-5s batched vs alone decode: max abs %.3g\n", model.c_str(), backend.c_str(), worst);
    CHECK_MSG(worst <= kSelfTolerance, model << " on " << backend << ": " << worst);
    CHECK(engine.sequence_tokens(a) == engine.sequence_tokens(a_alone));
    CHECK(engine.sequence_tokens(b) == engine.sequence_tokens(b_alone));

    // Malformed batches are argument errors that change nothing.
    const auto before = engine.sequence_tokens(a);
    std::vector<float> two(2 * V), one(V);
    const int dup[] = {a, a};
    const int32_t dup_tokens[] = {1, 2};
    CHECK_THROWS_WITH(engine.decode(dup, dup_tokens, two), ErrorKind::InvalidArgument, "twice");
    const int empty = engine.create_sequence();
    const int seqs_empty[] = {empty};
    const int32_t token[] = {1};
    CHECK_THROWS_WITH(engine.decode(seqs_empty, token, one), ErrorKind::InvalidArgument, "empty");
    const int seqs_a[] = {a};
    CHECK_THROWS_WITH(engine.decode(seqs_a, token, two), ErrorKind::InvalidArgument, "decode");
    CHECK(engine.sequence_tokens(a) == before);
  });
}

TEST_CASE(chunked_prefill_gives_the_same_logits) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine whole(fixture(model), options_for(backend));
    EngineOptions chunked_options = options_for(backend);
    chunked_options.prefill_chunk = 3;  // prompts of 13..19 tokens: several chunks and a ragged end
    Engine chunked(fixture(model), chunked_options);
    const auto expected = prefill_all(whole, whole.create_sequence(), r.input_ids);
    const auto got = prefill_all(chunked, chunked.create_sequence(), r.input_ids);
    const double err = max_abs_diff(got, expected);
    CHECK_MSG(err <= kSelfTolerance, model << " on " << backend << ": chunked prefill max abs " << err);
    CHECK(max_abs_diff(got, r.logits) <= kF32Tolerance);
    // Last-position logits only (most chunks produce no logits at all).
    const auto last = prefill_last(chunked, chunked.create_sequence(), r.input_ids);
    const size_t V = vocab(chunked);
    CHECK(max_abs_diff(last, std::span(expected).last(V)) <= kSelfTolerance);
    // Greedy generation through a chunked prefill.
    CHECK(chunked.generate(chunked.create_sequence(), greedy_request(r.greedy_prompt)).tokens ==
          r.greedy_tokens);
  });
}

TEST_CASE(generate_reuses_a_cached_prefix) {
  for_each_model([](const std::string& model, const std::string& backend) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    const int seq = engine.create_sequence();
    const GenerationResult first = engine.generate(seq, greedy_request(r.greedy_prompt, 6));
    CHECK_EQ(first.cached_tokens, 0);
    // The next turn: the whole first exchange plus new tokens. The cache holds the prompt and
    // all generated tokens but the last, so that many are reused.
    std::vector<int32_t> turn2 = r.greedy_prompt;
    turn2.insert(turn2.end(), first.tokens.begin(), first.tokens.end());
    turn2.insert(turn2.end(), r.input_ids.begin(), r.input_ids.begin() + 3);
    const GenerationResult second = engine.generate(seq, greedy_request(turn2, 8));
    CHECK_EQ(second.cached_tokens, static_cast<int>(r.greedy_prompt.size() + first.tokens.size() - 1));
    CHECK_EQ(second.prompt_tokens, static_cast<int>(turn2.size()));
    Engine fresh(fixture(model), options_for(backend));
    const GenerationResult expected = fresh.generate(fresh.create_sequence(), greedy_request(turn2, 8));
    CHECK_MSG(second.tokens == expected.tokens, model << " on " << backend << ": reused prefix changed the result");

    // A prompt that diverges after 3 tokens reuses exactly those 3.
    std::vector<int32_t> diverged(turn2.begin(), turn2.begin() + 3);
    diverged.insert(diverged.end(), r.input_ids.begin(), r.input_ids.begin() + 6);
    if (diverged[3] == turn2[3]) diverged[3] = (diverged[3] + 1) % engine.config().vocab_size;
    const GenerationResult third = engine.generate(seq, greedy_request(diverged, 5));
    CHECK_EQ(third.cached_tokens, 3);
    CHECK(third.tokens == fresh.generate(fresh.create_sequence(), greedy_request(diverged, 5)).tokens);
    // The identical prompt again: all but its last token are reused (its logits are needed).
    const GenerationResult again = engine.generate(seq, greedy_request(diverged, 5));
    CHECK_EQ(again.cached_tokens, static_cast<int>(diverged.size()) - 1);
    CHECK(again.tokens == third.tokens);
  });
}

TEST_CASE(context_and_cache_limits_throw_capacity_exceeded_and_change_nothing) {
  const std::string backend = usable_backends().front();
  const Reference& r = reference("tiny-llama");
  EngineOptions options = options_for(backend);
  options.max_context = 20;
  options.kv_cache_tokens = 128;  // room for several full sequences
  Engine engine(fixture("tiny-llama"), options);
  CHECK_EQ(engine.max_context(), 20);
  const int seq = engine.create_sequence();
  const std::vector<int32_t> first15(r.input_ids.begin(), r.input_ids.begin() + 15);
  prefill_last(engine, seq, first15);
  const auto stats = engine.cache_stats();
  std::vector<int32_t> six(6, 5);
  std::vector<float> logits(vocab(engine));
  CHECK_THROWS_WITH(engine.prefill(seq, six, logits), ErrorKind::CapacityExceeded, "20");
  CHECK(engine.sequence_tokens(seq) == first15);
  CHECK_EQ(engine.cache_stats().used_blocks, stats.used_blocks);
  // Filling exactly to the limit works; one more decode does not.
  const std::vector<int32_t> five(5, 7);
  prefill_last(engine, seq, five);
  CHECK_EQ(engine.sequence_tokens(seq).size(), size_t(20));
  CHECK_THROWS_WITH(decode_one(engine, seq, 3), ErrorKind::CapacityExceeded, "context");
  CHECK_EQ(engine.sequence_tokens(seq).size(), size_t(20));
  // generate: a prompt longer than the context is refused before anything happens...
  const int other = engine.create_sequence();
  prefill_last(engine, other, std::span(r.input_ids).first(4));
  std::vector<int32_t> long_prompt(21, 9);
  CHECK_THROWS_WITH(engine.generate(other, greedy_request(long_prompt)), ErrorKind::CapacityExceeded,
                    "21", "20");
  CHECK(engine.sequence_tokens(other) == std::vector<int32_t>(r.input_ids.begin(), r.input_ids.begin() + 4));
  // ...and generation stops with "length" when the context fills up: 18 + 2 fed back = 20.
  const int third = engine.create_sequence();
  std::vector<int32_t> prompt18(r.input_ids.begin(), r.input_ids.begin() + 16);
  prompt18.push_back(3);
  prompt18.push_back(4);
  const GenerationResult result = engine.generate(third, greedy_request(prompt18, 10));
  CHECK(result.finish_reason == FinishReason::Length);
  CHECK_EQ(result.tokens.size(), size_t(3));
  CHECK_EQ(engine.sequence_tokens(third).size(), size_t(20));

  // The shared KV pool: 32 positions (2 blocks of 16) for sequences of up to 128.
  EngineOptions pool_options = options_for(backend);
  pool_options.kv_cache_tokens = 32;
  Engine small(fixture("tiny-llama"), pool_options);
  CHECK_EQ(small.cache_stats().total_blocks, 2);
  const int a = small.create_sequence(), b = small.create_sequence();
  prefill_last(small, a, std::span(r.input_ids).first(16));
  prefill_last(small, b, std::span(r.input_ids).first(16));
  const auto full = small.cache_stats();
  CHECK_EQ(full.used_blocks, 2);
  CHECK_THROWS_WITH(prefill_last(small, b, std::span(r.input_ids).first(1)), ErrorKind::CapacityExceeded,
                    "KV cache");
  CHECK_EQ(small.sequence_tokens(b).size(), size_t(16));
  // generate() refuses a prompt that cannot fit before it drops any of the cached prefix.
  std::vector<int32_t> diverging(r.input_ids.begin(), r.input_ids.begin() + 4);
  diverging.resize(20, 9);
  CHECK_THROWS_WITH(small.generate(b, greedy_request(diverging)), ErrorKind::CapacityExceeded, "KV cache");
  CHECK(small.sequence_tokens(b) == std::vector<int32_t>(r.input_ids.begin(), r.input_ids.begin() + 16));
  CHECK_EQ(small.cache_stats().used_blocks, 2);
  small.free_sequence(a);
  CHECK_EQ(small.cache_stats().used_blocks, 1);
  CHECK_NOTHROW(prefill_last(small, b, std::span(r.input_ids).first(1)));
  // The state after a refused step is still correct: b's logits match a fresh run.
  Engine fresh(fixture("tiny-llama"), options_for(backend));
  std::vector<int32_t> b_tokens(r.input_ids.begin(), r.input_ids.begin() + 16);
  b_tokens.push_back(r.input_ids[0]);
  const int fresh_seq = fresh.create_sequence();
  prefill_last(fresh, fresh_seq, b_tokens);
  CHECK(max_abs_diff(decode_one(small, b, 11), decode_one(fresh, fresh_seq, 11)) <= kSelfTolerance);
}

TEST_CASE(bad_token_ids_and_arguments_are_invalid_argument) {
  const std::string backend = usable_backends().front();
  const Reference& r = reference("tiny-qwen2");
  Engine engine(fixture("tiny-qwen2"), options_for(backend));
  const int V = engine.config().vocab_size;  // 200
  const int seq = engine.create_sequence();
  prefill_last(engine, seq, std::span(r.input_ids).first(3));
  const auto before = engine.sequence_tokens(seq);
  std::vector<float> logits(vocab(engine));
  for (int32_t bad : {V, -1, 1 << 30}) {
    const std::vector<int32_t> tokens = {5, bad, 6};
    CHECK_THROWS_WITH(engine.prefill(seq, tokens, logits), ErrorKind::InvalidArgument, std::to_string(bad),
                      "vocabulary");
    CHECK_THROWS_WITH(decode_one(engine, seq, bad), ErrorKind::InvalidArgument, std::to_string(bad));
    CHECK_THROWS_WITH(engine.generate(seq, greedy_request(tokens)), ErrorKind::InvalidArgument,
                      std::to_string(bad));
    GenerationRequest stop = greedy_request({5, 6});
    stop.stop_token_ids = {bad};
    CHECK_THROWS_WITH(engine.generate(seq, stop), ErrorKind::InvalidArgument, std::to_string(bad));
  }
  CHECK(engine.sequence_tokens(seq) == before);
  // Other malformed calls.
  CHECK_THROWS_WITH(engine.prefill(seq, {}, logits), ErrorKind::InvalidArgument, "at least one");
  const std::vector<int32_t> two = {1, 2};
  CHECK_THROWS_WITH(engine.prefill(seq, two, logits, true), ErrorKind::InvalidArgument, "logits");
  CHECK_THROWS_WITH(engine.prefill(99, two, logits), ErrorKind::InvalidArgument, "99");
  CHECK_THROWS_WITH(engine.generate(seq, greedy_request({})), ErrorKind::InvalidArgument, "empty");
  CHECK_THROWS_WITH(engine.generate(seq, greedy_request({1}, 0)), ErrorKind::InvalidArgument, "max_tokens");
  GenerationRequest bad_sampling = greedy_request({1});
  bad_sampling.sampling.top_p = 0.0f;
  CHECK_THROWS_WITH(engine.generate(seq, bad_sampling), ErrorKind::InvalidArgument, "top_p");
  CHECK(engine.sequence_tokens(seq) == before);
  engine.free_sequence(seq);
  CHECK_THROWS_WITH(engine.sequence_tokens(seq), ErrorKind::InvalidArgument, "sequence");
  CHECK_THROWS_WITH(Engine(fixture("tiny-qwen2"), options_for(backend, "f64")), ErrorKind::InvalidArgument, "f64");
  CHECK_THROWS_WITH(Engine(fixture("tiny-qwen2"), options_for("no-such-backend")), ErrorKind::InvalidArgument,
                    "no-such-backend");
}

TEST_CASE(stop_tokens_and_callback_cancellation) {
  const std::string backend = usable_backends().front();
  for (const std::string& model : kModels) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    // Stop at the first token (after two) that has not appeared before.
    size_t stop_at = 2;
    while (std::count(r.greedy_tokens.begin(), r.greedy_tokens.begin() + stop_at, r.greedy_tokens[stop_at])) {
      ++stop_at;
    }
    GenerationRequest request = greedy_request(r.greedy_prompt);
    request.stop_token_ids = {r.greedy_tokens[stop_at]};
    std::vector<std::pair<int32_t, bool>> seen;
    const GenerationResult result = engine.generate(engine.create_sequence(), request, [&](int32_t t, bool stop) {
      seen.push_back({t, stop});
      return true;
    });
    CHECK(result.finish_reason == FinishReason::Stop);
    CHECK(result.tokens == std::vector<int32_t>(r.greedy_tokens.begin(), r.greedy_tokens.begin() + stop_at + 1));
    CHECK_EQ(seen.size(), stop_at + 1);
    CHECK(seen.back().second);
    CHECK(std::none_of(seen.begin(), seen.end() - 1, [](const auto& e) { return e.second; }));
    // The callback returning false cancels after that token.
    int calls = 0;
    const GenerationResult cancelled = engine.generate(engine.create_sequence(), greedy_request(r.greedy_prompt),
                                                       [&](int32_t, bool) { return ++calls < 3; });
    CHECK(cancelled.finish_reason == FinishReason::Cancelled);
    CHECK_EQ(cancelled.tokens.size(), size_t(3));
    // A raised cancel flag stops after the first token.
    std::atomic<bool> flag{true};
    const GenerationResult flagged = engine.generate(engine.create_sequence(), greedy_request(r.greedy_prompt), {}, &flag);
    CHECK(flagged.finish_reason == FinishReason::Cancelled);
    CHECK_EQ(flagged.tokens.size(), size_t(1));
    CHECK_EQ(std::string(finish_reason_name(FinishReason::Cancelled)), std::string("cancelled"));
  }
}

// The streaming side of the one generation loop (formerly GenerationStream's test, now on the
// Scheduler's request handle that every streamed generation uses).
TEST_CASE(scheduled_request_streams_and_cancels) {
  const std::string backend = usable_backends().front();
  for (const std::string& model : kModels) {
    const Reference& r = reference(model);
    Engine engine(fixture(model), options_for(backend));
    const GenerationResult direct = engine.generate(engine.create_sequence(), greedy_request(r.greedy_prompt));
    std::vector<int32_t> streamed;
    {
      Scheduler scheduler(engine);
      auto stream = scheduler.submit(greedy_request(r.greedy_prompt), engine.create_sequence());
      while (auto event = stream->next()) {
        streamed.push_back(event->token);
        CHECK(!event->is_stop);
      }
      CHECK(!stream->timed_out());
      CHECK(stream->finished());
      const GenerationResult& result = stream->wait();
      CHECK(result.tokens == direct.tokens);
      CHECK(result.finish_reason == FinishReason::Length);
      CHECK(!stream->next().has_value());  // stays finished
    }
    CHECK(streamed == direct.tokens);
    CHECK(streamed == r.greedy_tokens);

    // cancel(): a long generation (up to the context limit) stops right after the token in
    // flight; had it not, it would end with Length instead of Cancelled.
    EngineOptions long_options = options_for(backend);
    long_options.kv_cache_tokens = 4 * 128;  // the context of this model is 128
    Engine long_engine(fixture(model), long_options);
    GenerationRequest request = greedy_request(r.greedy_prompt, 1000);
    request.sampling.temperature = 1.0f;  // keep it from settling into a loop; any tokens will do
    request.sampling.seed = 1;
    // 4 unread tokens pause the request, so it is still running when cancel() comes, however
    // slow this thread is.
    SchedulerOptions paced;
    paced.max_unread_tokens = 4;
    Scheduler scheduler(long_engine, paced);
    auto stream = scheduler.submit(request);
    const auto first = stream->next(30.0);
    CHECK(first.has_value());
    stream->cancel();
    int drained = 0;
    while (stream->next(30.0)) ++drained;
    CHECK(!stream->timed_out());
    const GenerationResult& result = stream->wait();
    CHECK(result.finish_reason == FinishReason::Cancelled);
    CHECK_MSG(result.tokens.size() < 1000, "cancel did not stop the stream: " << result.tokens.size() << " tokens");
    CHECK_EQ(result.tokens.size(), size_t(drained) + 1);
    // A scheduler destroyed mid-generation cancels and joins (no hang, no crash), and the
    // handle it leaves behind says so.
    std::shared_ptr<ScheduledRequest> abandoned;
    {
      Scheduler doomed(long_engine, paced);
      abandoned = doomed.submit(request);
    }
    CHECK(abandoned->finished());
    CHECK(abandoned->wait().finish_reason == FinishReason::Cancelled);
    // A sequence that does not exist is refused when the request is submitted.
    CHECK_THROWS_WITH(scheduler.submit(request, 12345), ErrorKind::InvalidArgument, "12345");
  }
}

TEST_CASE(concurrent_generations_on_two_threads_match_sequential) {
  const std::string backend = usable_backends().front();
  const Reference& r = reference("tiny-qwen3");
  Engine engine(fixture("tiny-qwen3"), options_for(backend));
  const std::vector<int32_t> prompt_b(r.input_ids.begin(), r.input_ids.begin() + 7);
  const auto expected_a = engine.generate(engine.create_sequence(), greedy_request(r.greedy_prompt, 24)).tokens;
  const auto expected_b = engine.generate(engine.create_sequence(), greedy_request(prompt_b, 24)).tokens;
  std::vector<int32_t> got_a, got_b;
  const int sa = engine.create_sequence(), sb = engine.create_sequence();
  std::thread ta([&] { got_a = engine.generate(sa, greedy_request(r.greedy_prompt, 24)).tokens; });
  std::thread tb([&] { got_b = engine.generate(sb, greedy_request(prompt_b, 24)).tokens; });
  ta.join();
  tb.join();
  CHECK(got_a == expected_a);
  CHECK(got_b == expected_b);
  CHECK(std::vector<int32_t>(got_a.begin(), got_a.begin() + 16) == r.greedy_tokens);
}

// The tiny Gemma 3 (five layers with a window of 5, one global) 120 positions long, with a
// sliding pool sized for one sequence: a prefill of all of it in passes of 16 and a greedy
// generation far past the window give what an engine with room to spare gives, while the
// sliding layers hold at most 2 blocks. Models without windows keep one pool of every layer.
TEST_CASE(sliding_window_layers_hold_their_window_however_long_the_sequence) {
  for (const std::string& backend : usable_backends()) {
    EngineOptions small_options = options_for(backend);
    small_options.prefill_chunk = 16;
    small_options.kv_cache_tokens = 1024;
    small_options.kv_window_sequences = 1;
    Engine small(fixture("tiny-gemma3"), small_options);
    Engine roomy(fixture("tiny-gemma3"), options_for(backend));
    const Engine::CacheStats before = small.cache_stats();
    CHECK_EQ(before.groups.size(), size_t{2});
    CHECK_EQ(before.groups[1].window, 5);
    CHECK_EQ(before.groups[1].total_blocks, 4 + 1);  // one window and one pass
    CHECK_EQ(before.total_blocks, 64);
    CHECK_EQ(before.bytes_per_position, before.groups[0].bytes_per_position);
    CHECK_EQ(before.groups[1].bytes_per_position, 5 * before.groups[0].bytes_per_position);

    std::vector<int32_t> tokens;
    for (int i = 0; i < 120; ++i) tokens.push_back(3 + (i * 37) % (small.config().vocab_size - 3));
    const int roomy_seq = roomy.create_sequence();
    const auto expected = prefill_all(roomy, roomy_seq, tokens);
    roomy.free_sequence(roomy_seq);
    const int seq = small.create_sequence();
    const double err = max_abs_diff(prefill_all(small, seq, tokens), expected);
    CHECK_MSG(err <= kF32Tolerance, backend << ": max abs " << err);
    CHECK_EQ(small.cache_stats().groups[1].used_blocks, 1);
    CHECK_EQ(small.cache_stats().used_blocks, 8);
    small.free_sequence(seq);

    const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 10);
    const GenerationResult got = small.generate(small.create_sequence(), greedy_request(prompt, 100));
    CHECK(got.tokens == roomy.generate(roomy.create_sequence(), greedy_request(prompt, 100)).tokens);
    CHECK(small.cache_stats().groups[1].used_blocks <= 2);
  }
  Engine llama(fixture("tiny-llama"), options_for("cpu"));
  const Engine::CacheStats plain = llama.cache_stats();
  CHECK_EQ(plain.groups.size(), size_t{1});
  CHECK_EQ(plain.bytes_per_position,
           KVCache::bytes_per_position(llama.config().num_layers, llama.config().num_kv_heads,
                                       llama.config().head_dim, DType::F32));
  CHECK_EQ(plain.bytes, plain.bytes_per_position * plain.total_blocks * plain.block_size);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
