// Mutation fuzzing of the loaders, bounded to run in a few seconds: seeded random damage to a
// real checkpoint's safetensors header, its config.json, and a GGUF model's header. Each mutant
// is loaded by the Engine (the whole path a user takes): it must either load or be refused with
// an opencamp::Error; any other exception fails the test, and a crash or a hang fails ctest.
// The counts are printed. (The longer libFuzzer target is tests/fuzz/fuzz_loader.cpp.)
#include <cstdio>
#include <random>
#include <string>

#include "check.h"
#include "opencamp/opencamp.h"
#include "test_util.h"

using namespace opencamp;
using namespace opencamp_test;

namespace {

EngineOptions engine_options() {
  EngineOptions options;
  options.backend = "cpu";
  options.threads = 1;
  return options;
}

// Numbers that sit on the edges of the checks: zero, one past sizes, 2^31, 2^32, 2^63, 2^64.
const char* const kEdgeNumbers[] = {"0", "1", "-1", "7", "4096", "2147483648", "4294967296",
                                    "9223372036854775807", "18446744073709551616", "1e308",
                                    "NaN", "Infinity", "3000000", "0.5", "\"x\"", "[]", "{}", "null"};

// One random change to `text` within [begin, end): flip a byte, replace a run of digits by an
// edge number, delete or duplicate a slice, or cut the text short.
std::string mutate(std::string text, size_t begin, size_t end, std::mt19937_64& rng) {
  auto pick = [&](size_t lo, size_t hi) { return lo + static_cast<size_t>(rng() % (hi - lo)); };
  if (end <= begin + 1) return text;
  switch (rng() % 6) {
    case 0: {  // a few random bytes
      for (int i = 0, n = 1 + static_cast<int>(rng() % 3); i < n; ++i) {
        text[pick(begin, end)] = static_cast<char>(rng() & 0xff);
      }
      break;
    }
    case 1: case 2: {  // a number replaced by an edge value
      size_t at = pick(begin, end);
      while (at < end && !(text[at] >= '0' && text[at] <= '9')) ++at;
      if (at == end) break;
      size_t stop = at;
      while (stop < end && ((text[stop] >= '0' && text[stop] <= '9') || text[stop] == '.')) ++stop;
      text.replace(at, stop - at, kEdgeNumbers[rng() % std::size(kEdgeNumbers)]);
      break;
    }
    case 3: {  // a slice deleted
      const size_t at = pick(begin, end);
      text.erase(at, std::min<size_t>(1 + rng() % 16, end - at));
      break;
    }
    case 4: {  // a slice duplicated (repeated keys, shifted offsets)
      const size_t at = pick(begin, end);
      const size_t length = std::min<size_t>(1 + rng() % 64, end - at);
      text.insert(at, text.substr(at, length));
      break;
    }
    default: text.resize(pick(0, text.size())); break;  // truncated anywhere
  }
  return text;
}

// The safetensors header length field of `file` set to match a header now `header_bytes` long.
void set_header_length(std::string& file, uint64_t header_bytes) {
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header_bytes >> (8 * i)) & 0xff);
}

uint64_t header_length(const std::string& file) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[i]);
  return n;
}

struct Counts {
  int loaded = 0;
  int refused = 0;
};

// Loads `model` (a folder or a .gguf file), counting the outcome; anything but success or an
// opencamp::Error is a failure naming the mutant.
void try_load(const fs::path& model, Counts& counts, const std::string& mutant) {
  try {
    Engine engine(model, engine_options());
    ++counts.loaded;
  } catch (const opencamp::Error&) {
    ++counts.refused;
  } catch (const std::exception& e) {
    CHECK_MSG(false, mutant << ": not an opencamp::Error: " << e.what());
  }
}

}  // namespace

TEST_CASE(safetensors_header_mutants_load_or_are_refused) {
  TempDir tmp("fuzz");
  copy_fixture("tiny-llama", tmp.path());
  const std::string good = read_text(fixture("tiny-llama") / "model.safetensors");
  const uint64_t header = header_length(good);
  std::mt19937_64 rng(20261202);
  Counts counts;
  constexpr int kMutants = 300;
  for (int i = 0; i < kMutants; ++i) {
    std::string bad = mutate(good, 8, 8 + header, rng);
    // Most mutants keep the length field consistent, so the damage reaches the JSON and the
    // tensor table instead of stopping at the length check.
    const int64_t grown = static_cast<int64_t>(bad.size()) - static_cast<int64_t>(good.size());
    const int64_t new_header = static_cast<int64_t>(header) + grown;
    if (rng() % 4 != 0 && bad.size() >= 8 && new_header >= 0 &&
        new_header <= static_cast<int64_t>(bad.size()) - 8) {
      set_header_length(bad, static_cast<uint64_t>(new_header));
    }
    write_text(tmp / "model.safetensors", bad);
    try_load(tmp.path(), counts, "safetensors mutant " + std::to_string(i));
  }
  std::printf("  safetensors header: %d mutants, %d loaded, %d refused with an opencamp::Error\n",
              kMutants, counts.loaded, counts.refused);
  CHECK_EQ(counts.loaded + counts.refused, kMutants);
  CHECK(counts.refused > kMutants / 2);  // most damage is seen
}

TEST_CASE(config_json_mutants_load_or_are_refused) {
  TempDir tmp("fuzz");
  copy_fixture("tiny-llama", tmp.path());
  const std::string good = read_text(fixture("tiny-llama") / "config.json");
  std::mt19937_64 rng(777);
  Counts counts;
  constexpr int kMutants = 300;
  for (int i = 0; i < kMutants; ++i) {
    std::string bad = mutate(good, 0, good.size(), rng);
    if (rng() % 3 == 0) bad = mutate(bad, 0, bad.size(), rng);  // two changes
    write_text(tmp / "config.json", bad);
    try_load(tmp.path(), counts, "config.json mutant " + std::to_string(i) + ": " + bad);
  }
  std::printf("  config.json: %d mutants, %d loaded, %d refused with an opencamp::Error\n", kMutants,
              counts.loaded, counts.refused);
  CHECK_EQ(counts.loaded + counts.refused, kMutants);
  CHECK(counts.refused > kMutants / 4);
  CHECK(counts.loaded > 0);  // harmless changes (a digit of an unused field) still load
}

TEST_CASE(gguf_header_mutants_load_or_are_refused) {
  TempDir tmp("fuzz");
  const fs::path source = fixture("tiny-gguf") / "tiny-qwen2.q8_0.gguf";
  const std::string good = read_text(source);
  const size_t header = static_cast<size_t>(GgufFile::open(source)->data_offset());
  std::mt19937_64 rng(4242);
  Counts counts;
  constexpr int kMutants = 300;
  for (int i = 0; i < kMutants; ++i) {
    std::string bad = good;
    if (rng() % 2 == 0) {
      bad = mutate(bad, 0, header, rng);
    } else {  // a little-endian u64 / u32 count, length, dim or offset set to an edge value
      const uint64_t edges[] = {0, 1, 31, 32, 255, 1ull << 31, 1ull << 32, 1ull << 62, ~0ull};
      const size_t at = static_cast<size_t>(rng() % (header - 8));
      const uint64_t value = edges[rng() % std::size(edges)];
      for (int b = 0; b < (rng() % 2 ? 8 : 4); ++b) bad[at + b] = static_cast<char>((value >> (8 * b)) & 0xff);
    }
    write_text(tmp / "model.gguf", bad);
    try_load(tmp / "model.gguf", counts, "GGUF mutant " + std::to_string(i));
  }
  std::printf("  GGUF header: %d mutants, %d loaded, %d refused with an opencamp::Error\n", kMutants,
              counts.loaded, counts.refused);
  CHECK_EQ(counts.loaded + counts.refused, kMutants);
  CHECK(counts.refused > kMutants / 2);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
