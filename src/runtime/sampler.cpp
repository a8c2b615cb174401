#include "opencamp/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>

#include "opencamp/error.h"

namespace opencamp {

void SamplingParams::validate() const {
  auto bad = [](const char* name, const char* rule, float value) {
    fail(ErrorKind::InvalidArgument, name, " must be ", rule, ", got ", value);
  };
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) bad("temperature", ">= 0", temperature);
  if (top_k < 0) bad("top_k", ">= 0 (0 turns it off)", static_cast<float>(top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) bad("top_p", "in (0, 1]", top_p);
  if (!(min_p >= 0.0f && min_p <= 1.0f)) bad("min_p", "in [0, 1]", min_p);
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    bad("repetition_penalty", "> 0 (1 turns it off)", repetition_penalty);
  }
  if (!(std::fabs(presence_penalty) <= 2.0f)) bad("presence_penalty", "in [-2, 2]", presence_penalty);
  if (!(std::fabs(frequency_penalty) <= 2.0f)) bad("frequency_penalty", "in [-2, 2]", frequency_penalty);
}

void apply_penalties(std::span<float> logits, std::span<const int32_t> history,
                     float repetition_penalty, float presence_penalty, float frequency_penalty) {
  if (repetition_penalty == 1.0f && presence_penalty == 0.0f && frequency_penalty == 0.0f) return;
  std::unordered_map<int32_t, int> counts;
  for (int32_t token : history) {
    if (token >= 0 && static_cast<size_t>(token) < logits.size()) ++counts[token];
  }
  for (const auto& [token, count] : counts) {
    float& logit = logits[static_cast<size_t>(token)];
    logit = logit > 0.0f ? logit / repetition_penalty : logit * repetition_penalty;
    logit -= presence_penalty + frequency_penalty * static_cast<float>(count);
  }
}

int32_t argmax(std::span<const float> logits) {
  size_t best = 0;
  float best_logit = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > best_logit) {  // NaN never wins
      best_logit = logits[i];
      best = i;
    }
  }
  return static_cast<int32_t>(best);
}

void apply_token_mask(std::span<float> logits, std::span<const uint32_t> allowed) {
  const float masked = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (size_t i = 0; i < logits.size(); ++i) {
    const size_t word = i / 32;
    if (word < allowed.size() && (allowed[word] >> (i % 32) & 1u) != 0) {
      any = true;
    } else {
      logits[i] = masked;
    }
  }
  if (!any) fail(ErrorKind::InvalidArgument, "the token mask allows no token of the vocabulary");
}

TokenLogprobs token_logprobs(std::span<const float> logits, int32_t chosen, int top_n) {
  if (logits.empty()) fail(ErrorKind::InvalidArgument, "cannot take log-probabilities of empty logits");
  if (chosen < 0 || static_cast<size_t>(chosen) >= logits.size()) {
    fail(ErrorKind::InvalidArgument, "token ", chosen, " is outside the logits [0, ", logits.size(), ")");
  }
  if (top_n < 0 || top_n > kMaxTopLogprobs) {
    fail(ErrorKind::InvalidArgument, "top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", top_n);
  }
  constexpr float kImpossible = -std::numeric_limits<float>::infinity();
  float max_logit = kImpossible;
  for (float x : logits) {
    if (x > max_logit) max_logit = x;  // NaN never wins
  }
  double total = 0.0;
  if (max_logit != kImpossible) {
    for (float x : logits) {
      if (!std::isnan(x)) total += std::exp(static_cast<double>(x) - max_logit);
    }
  }
  // log p(x) = x - max - log(sum exp(x - max)); all -inf (or NaN): nothing is possible.
  const double log_total = max_logit == kImpossible ? 0.0 : std::log(total);
  auto logprob = [&](float x) -> float {
    if (std::isnan(x) || max_logit == kImpossible || x == kImpossible) return kImpossible;
    return static_cast<float>(static_cast<double>(x) - max_logit - log_total);
  };
  TokenLogprobs out{logprob(logits[static_cast<size_t>(chosen)]), {}};
  if (top_n > 0) {
    std::vector<TokenLogprob> all;
    all.reserve(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      all.push_back({static_cast<int32_t>(i), std::isnan(logits[i]) ? kImpossible : logits[i]});
    }
    const size_t n = std::min(static_cast<size_t>(top_n), all.size());
    std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(),
                      [](const TokenLogprob& a, const TokenLogprob& b) {
                        return a.logprob > b.logprob || (a.logprob == b.logprob && a.id < b.id);
                      });
    all.resize(n);
    for (TokenLogprob& t : all) t.logprob = logprob(t.logprob);  // the logit, until here
    out.top = std::move(all);
  }
  return out;
}

Sampler::Sampler(const SamplingParams& params) {
  params.validate();
  params_ = params;
  rng_.seed(params.seed ? *params.seed : std::random_device{}());
}

void TokenRules::check(size_t vocab) const {
  for (int32_t id : allowed_token_ids) {
    if (id < 0 || static_cast<size_t>(id) >= vocab) {
      fail(ErrorKind::InvalidArgument, "allowed_token_ids holds ", id,
           ", outside the vocabulary [0, ", vocab, ")");
    }
  }
  for (const auto& [id, bias] : logit_bias) {
    if (id < 0 || static_cast<size_t>(id) >= vocab) {
      fail(ErrorKind::InvalidArgument, "logit_bias names token ", id,
           ", outside the vocabulary [0, ", vocab, ")");
    }
    if (!std::isfinite(bias)) fail(ErrorKind::InvalidArgument, "logit_bias must be finite, got ", bias);
  }
}

Sampler::Sampler(const SamplingParams& params, const TokenRules& rules, size_t vocab)
    : Sampler(params) {
  rules.check(vocab);
  if (!rules.allowed_token_ids.empty()) {
    allowed_.assign(mask_words(vocab), 0u);
    for (int32_t id : rules.allowed_token_ids) allowed_[static_cast<size_t>(id) / 32] |= 1u << (id % 32);
  }
  logit_bias_ = rules.logit_bias;
}

void Sampler::set_params(const SamplingParams& params) {
  params.validate();
  if (params.seed != params_.seed) rng_.seed(params.seed ? *params.seed : std::random_device{}());
  params_ = params;
}

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> history,
                        std::span<const uint32_t> constraint_mask) {
  if (logits.empty()) fail(ErrorKind::InvalidArgument, "cannot sample from empty logits");
  const SamplingParams& p = params_;
  if (!allowed_.empty()) apply_token_mask(logits, allowed_);
  if (!constraint_mask.empty()) apply_token_mask(logits, constraint_mask);
  // After the masks: -infinity plus any bias stays -infinity.
  for (const auto& [id, bias] : logit_bias_) {
    if (static_cast<size_t>(id) < logits.size()) logits[static_cast<size_t>(id)] += bias;
  }
  if ((!allowed_.empty() || !constraint_mask.empty()) && !std::isfinite(logits[static_cast<size_t>(argmax(logits))])) {
    fail(ErrorKind::InvalidArgument, "the token masks together allow no token");
  }
  apply_penalties(logits, history, p.repetition_penalty, p.presence_penalty, p.frequency_penalty);
  if (p.temperature == 0.0f) return argmax(logits);
  // 53 random bits -> [0, 1), the same on every standard library (distributions are not).
  const double draw = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  return pick(logits, p.top_k, p.top_p, p.min_p, p.temperature, draw, scratch_).id;
}

Sampler::Pick Sampler::pick(std::span<const float> logits, int top_k, float top_p, float min_p,
                            float temperature, double draw, Scratch& scratch) {
  std::vector<Candidate>& candidates = scratch.candidates;
  std::vector<float>& probabilities = scratch.probabilities;
  candidates.clear();
  // Masked tokens (-infinity) are never candidates: a constrained step sorts only what it allows.
  const float masked = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (!std::isnan(logits[i]) && logits[i] != masked) {
      candidates.push_back({static_cast<int32_t>(i), logits[i]});
    }
  }
  if (candidates.empty()) fail(ErrorKind::Internal, "every logit is NaN or masked");
  // Highest first; ties broken by id so the order (and thus the draw) is reproducible.
  auto higher = [](const Candidate& a, const Candidate& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };
  if (top_k > 0 && static_cast<size_t>(top_k) < candidates.size()) {
    std::partial_sort(candidates.begin(), candidates.begin() + top_k, candidates.end(), higher);
    candidates.resize(static_cast<size_t>(top_k));
  } else {
    std::sort(candidates.begin(), candidates.end(), higher);
  }

  // Probabilities at temperature 1 for top_p and min_p.
  auto softmax = [&](float t) {
    probabilities.resize(candidates.size());
    const float max_logit = candidates.front().logit;
    double total = 0.0;
    for (size_t i = 0; i < candidates.size(); ++i) {
      probabilities[i] = std::exp((candidates[i].logit - max_logit) / t);
      total += probabilities[i];
    }
    for (float& prob : probabilities) prob = static_cast<float>(prob / total);
  };
  softmax(1.0f);
  if (top_p < 1.0f) {
    double cumulative = 0.0;
    size_t keep = 0;
    while (keep < candidates.size()) {
      cumulative += probabilities[keep++];
      if (cumulative >= top_p - 1e-6) break;  // tolerance: 0.5 + 0.3 reaches top_p 0.8f
    }
    candidates.resize(keep);
    probabilities.resize(keep);
  }
  if (min_p > 0.0f) {
    const float threshold = min_p * probabilities.front();
    size_t keep = 1;  // the top candidate always survives
    while (keep < candidates.size() && probabilities[keep] >= threshold) ++keep;
    candidates.resize(keep);
  }

  softmax(temperature);
  double cumulative = 0.0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const double before = cumulative;
    cumulative += probabilities[i];
    if (draw < cumulative) return {candidates[i].id, before, cumulative};
  }
  return {candidates.back().id, cumulative, cumulative};  // rounding left the total a hair under 1
}

}  // namespace opencamp
