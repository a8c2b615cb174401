// Turns logits into the next token. The stages apply in this order, as in llama.cpp:
//
//   1. penalties   repetition_penalty (divide positive / multiply negative logits of tokens
//                  already in the sequence, prompt included, as transformers does), then
//                  presence_penalty and frequency_penalty (subtract, OpenAI style)
//   2. greedy      temperature == 0 -> the highest logit wins (ties: lowest id); stop here
//   3. top_k       keep the k highest logits (0 = off)
//   4. top_p       keep the smallest set whose probability reaches top_p (1 = off)
//   5. min_p       drop tokens whose probability is below min_p * the top probability (0 = off)
//   6. temperature divide the surviving logits by temperature
//   7. draw        softmax and draw with a seeded generator (same seed, same tokens)
//
// top_p and min_p see the probabilities at temperature 1, so changing the temperature never
// changes which tokens are candidates, only how likely each is.
//
// Log-probabilities (token_logprobs, for OpenAI's logprobs) are the log-softmax of the logits
// after stage 1 and before stages 2-7, as OpenAI and vLLM document: what the model (with its
// penalties) thinks of each token, whatever temperature, top-k or top-p then did with it.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

namespace opencamp {

// Every numeric sampling parameter, once: X(type, name, default). The struct's members and the
// Python binding (opencamp._core.SamplingParams) are generated from this list; the Python
// table of options (python/opencamp/sampling.py) is tested against it. A new parameter is
// added here, in validate(), in its stage of Sampler::sample, and in that table.
#define OPENCAMP_SAMPLING_PARAMS(X)      \
  X(float, temperature, 0.0f)            \
  X(int, top_k, 0)                       \
  X(float, top_p, 1.0f)                  \
  X(float, min_p, 0.0f)                  \
  X(float, repetition_penalty, 1.0f)     \
  X(float, presence_penalty, 0.0f)       \
  X(float, frequency_penalty, 0.0f)

struct SamplingParams {
#define OPENCAMP_SAMPLING_MEMBER(type, name, default_value) type name = default_value;
  OPENCAMP_SAMPLING_PARAMS(OPENCAMP_SAMPLING_MEMBER)
#undef OPENCAMP_SAMPLING_MEMBER
  std::optional<uint64_t> seed;  // none: a random seed

  // Throws Error(InvalidArgument) naming the first out-of-range parameter.
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  const SamplingParams& params() const { return params_; }
  // Takes effect from the next token on; reseeds only when the seed changes.
  void set_params(const SamplingParams& params);

  // logits: [vocab], modified in place: afterwards it holds the logits after the penalties
  // (stage 1), what token_logprobs takes. history: the tokens of the sequence so far.
  int32_t sample(std::span<float> logits, std::span<const int32_t> history);

  // Stages 3-7 (top_k, top_p, min_p, temperature > 0, the draw) with a given draw in [0, 1):
  // what sample() does after the penalties, and what device sampling is checked against. Also
  // says the cumulative probability just before and after the token picked.
  struct Pick {
    int32_t id;
    double before, after;
  };
  struct Candidate {
    int32_t id;
    float logit;
  };
  struct Scratch {  // reused between calls
    std::vector<Candidate> candidates;
    std::vector<float> probabilities;
  };
  static Pick pick(std::span<const float> logits, int top_k, float top_p, float min_p,
                   float temperature, double draw, Scratch& scratch);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  Scratch scratch_;
};

void apply_penalties(std::span<float> logits, std::span<const int32_t> history,
                     float repetition_penalty, float presence_penalty, float frequency_penalty);
int32_t argmax(std::span<const float> logits);

// The most alternatives token_logprobs reports (OpenAI's top_logprobs limit).
inline constexpr int kMaxTopLogprobs = 20;

struct TokenLogprob {
  int32_t id;
  float logprob;
};
// One sampled token's log-probability and the `top_n` most likely tokens with theirs (highest
// first, ties by lowest id, so at temperature 0 the chosen token is top[0]).
struct TokenLogprobs {
  float logprob;
  std::vector<TokenLogprob> top;
};
// log-softmax of `logits` [vocab] at `chosen`, and the top_n (0..kMaxTopLogprobs) best; NaN
// logits count as impossible (-inf). Computed in double, O(vocab) (a partial sort for top_n).
TokenLogprobs token_logprobs(std::span<const float> logits, int32_t chosen, int top_n);

}  // namespace opencamp
