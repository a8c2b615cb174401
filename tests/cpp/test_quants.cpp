// Weight formats (include/opencamp/dtype.h): the f16 conversion against the compiler's own
// _Float16, sizes and whole-block checks, quantise -> dequantise error per block format, block
// addressing of tensor views, and the cpu oracle's matmul and embedding on quantised weights.
// (Bit-exact agreement of the dequantisers with the gguf package is tests/python/test_quants.py.)
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "opencamp/opencamp.h"

using namespace opencamp;

namespace {

const DType kBlockFormats[] = {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0,
                               DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};

std::vector<float> random_values(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<unsigned char> quantized(const std::vector<float>& values, DType dtype) {
  std::vector<unsigned char> blocks(dtype_bytes(dtype, static_cast<int64_t>(values.size())));
  convert_dtype(values.data(), DType::F32, blocks.data(), dtype, static_cast<int64_t>(values.size()));
  return blocks;
}

std::vector<float> dequantized(const std::vector<unsigned char>& blocks, DType dtype, int64_t n) {
  std::vector<float> values(static_cast<size_t>(n));
  convert_dtype(blocks.data(), dtype, values.data(), DType::F32, n);
  return values;
}

// ||a - b|| / ||b||
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    norm += double(b[i]) * b[i];
  }
  return std::sqrt(diff / norm);
}

// The relative RMS error each format's quantiser must stay within on normal data (the formats'
// usual figures: about 2^-bits of the block's range, with slack).
double error_bound(DType dtype) {
  switch (dtype) {
    case DType::Q8_0: return 0.01;
    case DType::Q6_K: return 0.03;
    case DType::Q5_0: case DType::Q5_1: case DType::Q5_K: return 0.06;
    default: return 0.12;  // the 4-bit formats
  }
}

}  // namespace

TEST_CASE(f16_conversion_matches_the_compiler) {
  // Every f16 bit pattern survives f16 -> f32 -> f16 (NaNs stay NaN).
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float value = f16_to_f32(static_cast<uint16_t>(bits));
    const uint16_t back = f32_to_f16(value);
    if (std::isnan(value)) {
      CHECK(std::isnan(f16_to_f32(back)));
    } else if (back != bits) {
      CHECK_MSG(false, "f16 bits " << bits << " -> " << value << " -> " << back);
      break;
    }
  }
  // Rounding of f32 values between f16 values, overflow and subnormals, as _Float16 rounds.
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any_bits;
  int mismatches = 0;
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = any_bits(rng);
    bits = (bits & 0x80000000u) | (0x30000000u + (bits & 0x1fffffffu) % 0x18000000u);  // ~2^-31 .. 2^17
    float value;
    std::memcpy(&value, &bits, sizeof value);
    const _Float16 reference = static_cast<_Float16>(value);
    uint16_t reference_bits;
    std::memcpy(&reference_bits, &reference, sizeof reference_bits);
    if (f32_to_f16(value) != reference_bits && ++mismatches < 5) {
      CHECK_MSG(false, "f32_to_f16(" << value << ") = " << f32_to_f16(value) << ", _Float16 gives "
                                     << reference_bits);
    }
  }
  CHECK_EQ(mismatches, 0);
}

TEST_CASE(format_table_sizes_and_names) {
  CHECK_EQ(dtype_bytes(DType::Q8_0, 64), size_t{68});
  CHECK_EQ(dtype_bytes(DType::Q4_K, 512), size_t{288});
  CHECK_EQ(dtype_bytes(DType::Q6_K, 256), size_t{210});
  CHECK_EQ(dtype_bytes(DType::BF16, 3), size_t{6});
  CHECK(is_block_format(DType::Q5_1));
  CHECK(!is_block_format(DType::F16));
  for (int i = 0; i < kDTypeCount; ++i) {
    const DType dtype = static_cast<DType>(i);
    CHECK(dtype_from_name(dtype_name(dtype)) == dtype);
  }
  CHECK(dtype_from_name("Q4_K") == DType::Q4_K);
  CHECK(!dtype_from_name("q3_k").has_value());
  CHECK_THROWS_WITH(dtype_bytes(DType::Q4_K, 100), ErrorKind::InvalidArgument, "blocks of 256");
  CHECK_THROWS_WITH(dtype_size(DType::Q8_0), ErrorKind::Internal, "block format");
  float one = 1.0f;
  int32_t id = 0;
  CHECK_THROWS_WITH(convert_dtype(&one, DType::F32, &id, DType::I32, 1), ErrorKind::Unsupported, "i32");
}

TEST_CASE(quantize_then_dequantize_stays_within_each_formats_error) {
  const int64_t n = 4096;
  for (DType dtype : kBlockFormats) {
    const std::vector<float> values = random_values(n, 11, 0.05f);
    const std::vector<float> back = dequantized(quantized(values, dtype), dtype, n);
    const double error = relative_error(back, values);
    CHECK_MSG(error < error_bound(dtype), dtype_name(dtype) << ": relative error " << error);
    CHECK_MSG(error > 0.0, dtype_name(dtype) << " reproduced random data exactly: not quantising?");
  }
  // Constant, all-zero and one-sign blocks quantise without NaN (zero scales, zero ranges).
  for (DType dtype : kBlockFormats) {
    for (float fill : {0.0f, 0.5f, -2.0f}) {
      const std::vector<float> values(256, fill);
      const std::vector<float> back = dequantized(quantized(values, dtype), dtype, 256);
      for (float v : back) {
        if (!(std::fabs(v - fill) <= 0.02f * std::fabs(fill) + 1e-6f)) {
          CHECK_MSG(false, dtype_name(dtype) << ": constant " << fill << " came back as " << v);
          break;
        }
      }
    }
  }
}

TEST_CASE(tensor_views_address_whole_blocks) {
  const int64_t rows = 5, cols = 512;
  const std::vector<float> values = random_values(rows * cols, 3);
  for (DType dtype : kBlockFormats) {
    std::vector<unsigned char> blocks = quantized(values, dtype);
    const Tensor t = Tensor::contiguous(blocks.data(), dtype, {rows, cols});
    CHECK_EQ(t.nbytes(), blocks.size());
    const Tensor tail = t.rows(3, 5);
    CHECK_EQ(static_cast<const unsigned char*>(tail.data) - blocks.data(),
             static_cast<std::ptrdiff_t>(dtype_bytes(dtype, 3 * cols)));
    // Row 4 read through the view equals row 4 of the whole dequantised array.
    const std::vector<float> all = dequantized(blocks, dtype, rows * cols);
    std::vector<float> row(static_cast<size_t>(cols));
    dtype_traits(dtype).to_f32(tail.at({1}), row.data(), cols);
    CHECK(std::memcmp(row.data(), all.data() + 4 * cols, cols * sizeof(float)) == 0);
    CHECK_NEAR(load_as_f32(t.data, dtype, 4 * cols + 257), all[static_cast<size_t>(4 * cols + 257)], 0.0);
  }
}

// The oracle's quantised matmul and embedding equal its f32 ops on the dequantised weights.
TEST_CASE(cpu_oracle_dequantizes_quantized_weights) {
  ThreadPool pool(2);
  auto cpu = create_backend("cpu", {.pool = &pool});
  const int64_t n = 37, k = 512, tokens = 3;
  const std::vector<float> weights = random_values(n * k, 5, 0.1f);
  std::vector<float> x = random_values(tokens * k, 6);
  for (DType dtype : kBlockFormats) {
    std::vector<unsigned char> blocks = quantized(weights, dtype);
    std::vector<float> reference_weights = dequantized(blocks, dtype, n * k);
    const Tensor wq = Tensor::contiguous(blocks.data(), dtype, {n, k});
    const Tensor wf = Tensor::contiguous(reference_weights.data(), DType::F32, {n, k});
    const Tensor xt = Tensor::contiguous(x.data(), DType::F32, {tokens, k});
    std::vector<float> out_q(tokens * n), out_f(tokens * n);
    cpu->matmul(Tensor::contiguous(out_q.data(), DType::F32, {tokens, n}), xt, wq, nullptr);
    cpu->matmul(Tensor::contiguous(out_f.data(), DType::F32, {tokens, n}), xt, wf, nullptr);
    CHECK_MSG(out_q == out_f, dtype_name(dtype) << ": quantised matmul differs from its dequantised f32 matmul");

    const std::vector<int32_t> ids = {36, 0, 17};
    std::vector<float> emb_q(ids.size() * k), emb_f(ids.size() * k);
    cpu->embedding(Tensor::contiguous(emb_q.data(), DType::F32, {3, k}), wq, ids);
    cpu->embedding(Tensor::contiguous(emb_f.data(), DType::F32, {3, k}), wf, ids);
    CHECK_MSG(emb_q == emb_f, dtype_name(dtype) << ": quantised embedding rows differ");
  }
  // A row that is not whole blocks is refused with a message, not read past its end.
  std::vector<unsigned char> blocks(dtype_bytes(DType::Q8_0, 64));
  Tensor bad = Tensor::contiguous(blocks.data(), DType::Q8_0, {2, 32});
  bad.shape[1] = 31;
  std::vector<float> out(2), in(31);
  CHECK_THROWS_WITH(cpu->matmul(Tensor::contiguous(out.data(), DType::F32, {1, 2}),
                                Tensor::contiguous(in.data(), DType::F32, {1, 31}), bad, nullptr),
                    ErrorKind::InvalidArgument, "blocks of 32");
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
