// libFuzzer target for the model loaders, run by hand (not part of ctest): each input is one
// model file handed to the Engine the way a user's would be. The first byte picks the file:
//   0: model.safetensors next to tiny-llama's config.json
//   1: config.json next to tiny-llama's model.safetensors
//   2: a .gguf file
// The rest of the input is the file's bytes. Loading must succeed or throw opencamp::Error;
// any other exception, a crash or a sanitizer report is a finding. Build and run: see
// tests/fuzz/README.md.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "opencamp/opencamp.h"

#ifndef OPENCAMP_FIXTURES
#error "OPENCAMP_FIXTURES must point at tests/fixtures"
#endif

namespace fs = std::filesystem;

namespace {

// A private folder per fuzzing process (libFuzzer -jobs runs several), with the files that
// each mode keeps intact.
struct Workspace {
  fs::path root, safetensors_dir, config_dir, gguf_file;

  Workspace() {
    root = fs::temp_directory_path() / ("opencamp-fuzz-" + std::to_string(::getpid()));
    safetensors_dir = root / "safetensors";
    config_dir = root / "config";
    gguf_file = root / "model.gguf";
    const fs::path tiny = fs::path(OPENCAMP_FIXTURES) / "tiny-llama";
    fs::create_directories(safetensors_dir);
    fs::create_directories(config_dir);
    fs::copy_file(tiny / "config.json", safetensors_dir / "config.json", fs::copy_options::overwrite_existing);
    fs::copy_file(tiny / "model.safetensors", config_dir / "model.safetensors", fs::copy_options::overwrite_existing);
  }
  ~Workspace() {
    std::error_code ignored;
    fs::remove_all(root, ignored);
  }
};

void write_file(const fs::path& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Workspace workspace;
  if (size == 0) return 0;
  const int mode = data[0] % 3;
  fs::path model;
  if (mode == 0) {
    write_file(workspace.safetensors_dir / "model.safetensors", data + 1, size - 1);
    model = workspace.safetensors_dir;
  } else if (mode == 1) {
    write_file(workspace.config_dir / "config.json", data + 1, size - 1);
    model = workspace.config_dir;
  } else {
    write_file(workspace.gguf_file, data + 1, size - 1);
    model = workspace.gguf_file;
  }
  opencamp::EngineOptions options;
  options.backend = "cpu";
  options.threads = 1;
  try {
    opencamp::Engine engine(model, options);
  } catch (const opencamp::Error&) {
    // refused with a clear error: what every bad file must get
  }
  return 0;
}
