// Turns logits into the next token. The stages apply in this order, as in llama.cpp:
//
//   0. mask        tokens that may not come next get -infinity, so no later stage can bring
//                  them back: allowed_token_ids, then the request's constraint (a grammar's
//                  mask for this position); then logit_bias is added (OpenAI's -100..100)
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
#include <utility>
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

// Which tokens may come next, as a bitmask over the vocabulary: bit t % 32 of words[t / 32]
// (least significant first) set means token t is allowed.
inline size_t mask_words(size_t vocab) { return (vocab + 31) / 32; }
// Stage 0: every token the mask does not allow gets -infinity (ids past the mask's end too).
// Throws Error(InvalidArgument) when the mask allows no token of the vocabulary.
void apply_token_mask(std::span<float> logits, std::span<const uint32_t> allowed);

// A constraint on what a sequence may generate (a grammar): it says which tokens may come next
// and is told each token sampled. One per request; the scheduler calls it from one thread at a
// time, but not always the same one (it computes the next mask while the forward pass runs).
class TokenConstraint {
 public:
  virtual ~TokenConstraint() = default;
  // Writes the mask of the next token into `allowed` (mask_words(vocab) words, zeroed).
  virtual void fill_mask(std::span<uint32_t> allowed) = 0;
  // The token sampled at the position the last mask was for.
  virtual void accept(int32_t token) = 0;
};

// The request's fixed token rules (stage 0 without the constraint).
struct TokenRules {
  std::vector<int32_t> allowed_token_ids;               // empty: every token
  std::vector<std::pair<int32_t, float>> logit_bias;   // (id, added to its logit)
  // Throws Error(InvalidArgument) for an id outside [0, vocab) or a bias that is not finite.
  void check(size_t vocab) const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // With fixed token rules (stage 0) over a vocabulary of `vocab` tokens.
  Sampler(const SamplingParams& params, const TokenRules& rules, size_t vocab);

  const SamplingParams& params() const { return params_; }
  // Takes effect from the next token on; reseeds only when the seed changes.
  void set_params(const SamplingParams& params);

  // logits: [vocab], modified in place: afterwards it holds the logits after the mask and the
  // penalties (stages 0-1), what token_logprobs takes. history: the tokens of the sequence so
  // far. constraint_mask: the constraint's mask for this token (mask_words(vocab) words), or
  // empty.
  int32_t sample(std::span<float> logits, std::span<const int32_t> history,
                 std::span<const uint32_t> constraint_mask = {});

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
  std::vector<uint32_t> allowed_;  // allowed_token_ids as a mask; empty: every token
  std::vector<std::pair<int32_t, float>> logit_bias_;
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
