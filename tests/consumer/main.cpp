// Loads a model directory with the installed library, greedily generates 4 tokens from the
// prompt stored in its reference.safetensors (greedy_prompt), and prints them:
//   opencamp_consumer MODEL_DIR   ->   "opencamp <version>" and "tokens: 204 173 204 173"
#include <cstdio>
#include <exception>

#include "opencamp/opencamp.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: opencamp_consumer MODEL_DIR\n");
    return 2;
  }
  try {
    const std::filesystem::path model_dir = argv[1];
    auto reference = opencamp::SafetensorsFile::open(model_dir / "reference.safetensors");
    const opencamp::Tensor* prompt_tensor = reference->find("greedy_prompt");
    if (prompt_tensor == nullptr || prompt_tensor->dtype != opencamp::DType::I32) {
      std::fprintf(stderr, "reference.safetensors has no I32 greedy_prompt\n");
      return 1;
    }
    const int32_t* ids = prompt_tensor->ptr<const int32_t>();

    opencamp::EngineOptions options;
    options.threads = 1;
    opencamp::Engine engine(model_dir, options);
    opencamp::GenerationRequest request;
    request.prompt.assign(ids, ids + prompt_tensor->numel());
    request.sampling.temperature = 0.0f;
    request.max_tokens = 4;
    request.ignore_eos = true;
    const opencamp::GenerationResult result = engine.generate(engine.create_sequence(), request);

    std::printf("opencamp %s, backend %s, %s\n", OPENCAMP_VERSION, engine.backend_name().c_str(),
                opencamp::finish_reason_name(result.finish_reason));
    std::printf("tokens:");
    for (int32_t token : result.tokens) std::printf(" %d", token);
    std::printf("\n");
    return result.tokens.size() == 4 ? 0 : 1;
  } catch (const opencamp::Error& error) {
    std::fprintf(stderr, "opencamp error (%s): %s\n", opencamp::error_kind_name(error.kind()), error.what());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
  }
  return 1;
}
