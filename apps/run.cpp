// opencamp-run: load a model, prefill token ids, decode greedily, print the ids and tokens/s.
// Built on the public C++ API alone (include/opencamp), as a user's program would be.
//
//   opencamp-run MODEL_DIR [--tokens 1,2,3] [--prompt-tokens N] [--gen N] [--threads N]
//                [--backend NAME] [--dtype auto|f32|bf16]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "opencamp/opencamp.h"

namespace {

int usage() {
  std::cerr << "usage: opencamp-run MODEL_DIR [--tokens 1,2,3] [--prompt-tokens N] [--gen N]\n"
               "                    [--threads N] [--backend auto|cpu] [--dtype auto|f32|bf16]\n";
  return 2;
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) ids.push_back(static_cast<int32_t>(std::stol(item)));
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string model_dir = argv[1];
  opencamp::EngineOptions options;
  std::vector<int32_t> prompt;
  int prompt_tokens = 0, gen = 32;
  try {
    for (int i = 2; i < argc; ++i) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) return usage();
      const std::string value = argv[++i];
      if (flag == "--tokens") prompt = parse_ids(value);
      else if (flag == "--prompt-tokens") prompt_tokens = std::stoi(value);
      else if (flag == "--gen") gen = std::stoi(value);
      else if (flag == "--threads") options.threads = std::stoi(value);
      else if (flag == "--backend") options.backend = value;
      else if (flag == "--dtype") options.dtype = value;
      else return usage();
    }
  } catch (const std::exception&) {
    return usage();
  }

  try {
    opencamp::Engine engine(model_dir, options);
    const auto& config = engine.config();
    if (prompt.empty()) {  // a synthetic prompt of the requested length
      const int n = prompt_tokens > 0 ? prompt_tokens : 16;
      for (int i = 0; i < n; ++i) prompt.push_back((i * 7919 + 13) % config.vocab_size);
    }
    std::printf("model %s: %s, %d layers, hidden %d, vocab %d; backend %s, weights %s, %d threads\n",
                model_dir.c_str(), config.model_type.c_str(), config.num_layers,
                config.hidden_size, config.vocab_size, engine.backend_name().c_str(),
                opencamp::dtype_name(engine.weight_dtype()), engine.threads());

    opencamp::GenerationRequest request;
    request.prompt = prompt;
    request.max_tokens = gen;
    request.ignore_eos = true;  // time a fixed number of decode steps
    const int seq = engine.create_sequence();
    const opencamp::GenerationResult result = engine.generate(seq, request);

    std::printf("generated:");
    for (int32_t id : result.tokens) std::printf(" %d", id);
    std::printf("\n");
    const double decode_steps = static_cast<double>(result.tokens.size() - 1);
    const double decode_tps = result.decode_seconds > 0 ? decode_steps / result.decode_seconds : 0;
    std::printf("prefill: %d tokens in %.3f s = %.1f tokens/s\n", result.prompt_tokens,
                result.prefill_seconds, result.prompt_tokens / result.prefill_seconds);
    std::printf("decode:  %.0f tokens in %.3f s = %.1f tokens/s, %.1f GB/s of weights\n",
                decode_steps, result.decode_seconds, decode_tps,
                decode_tps * static_cast<double>(engine.model().weight_bytes()) / 1e9);
  } catch (const opencamp::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
