#include <algorithm>
#include <mutex>

#include "core/builtin.h"
#include "opencamp/error.h"
#include "opencamp/model.h"

namespace opencamp {
namespace {

std::mutex registry_mutex;

std::vector<Architecture>& registry_locked() {
  static std::vector<Architecture> architectures{llama_architecture(), qwen2_architecture(),
                                                 qwen3_architecture(), gemma3_architecture(),
                                                 gemma3_gguf_architecture(), mistral_architecture()};
  return architectures;
}

}  // namespace

void register_architecture(Architecture architecture) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& architectures = registry_locked();
  std::erase_if(architectures,
                [&](const Architecture& a) { return a.model_type == architecture.model_type; });
  architectures.push_back(std::move(architecture));
}

const std::vector<Architecture>& registered_architectures() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return registry_locked();
}

const Architecture& find_architecture(const std::string& model_type,
                                      const std::string& config_path) {
  const auto& architectures = registered_architectures();
  std::string supported;
  for (const auto& a : architectures) {
    if (a.model_type == model_type) return a;
    supported += (supported.empty() ? "" : ", ") + a.model_type;
  }
  fail(ErrorKind::InvalidModel, config_path, ": model_type '", model_type,
       "' is not supported; supported model types: ", supported);
}

}  // namespace opencamp
