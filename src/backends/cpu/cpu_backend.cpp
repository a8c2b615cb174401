// The reference backend: plain scalar loops that honour every stride. It is the oracle every
// other backend is tested against, so it favours obviously-correct code over speed; work is
// still split over the thread pool so tests on real models finish in reasonable time.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "core/builtin.h"
#include "opencamp/backend.h"
#include "opencamp/error.h"
#include "opencamp/thread_pool.h"

namespace opencamp {
namespace {

// Element (i, j) of a 2-d view, or (i, j, k) of a 3-d view, read as f32.
float get2(const Tensor& t, int64_t i, int64_t j) {
  return load_as_f32(t.data, t.dtype, i * t.stride[0] + j * t.stride[1]);
}
float& f32_at2(const Tensor& t, int64_t i, int64_t j) {
  return t.ptr<float>()[i * t.stride[0] + j * t.stride[1]];
}
float& f32_at3(const Tensor& t, int64_t i, int64_t j, int64_t k) {
  return t.ptr<float>()[i * t.stride[0] + j * t.stride[1] + k * t.stride[2]];
}
float get1(const Tensor& t, int64_t i) { return load_as_f32(t.data, t.dtype, i * t.stride[0]); }

// The same sum as the strided loop, with typed loads instead of a dtype switch per element.
float dot_contiguous(const float* x, const float* w, int64_t n) {
  float sum = 0.0f;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * w[k];
  return sum;
}
float dot_contiguous(const float* x, const uint16_t* w, int64_t n) {
  float sum = 0.0f;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * bf16_to_f32(w[k]);
  return sum;
}

void expect(bool ok, const char* op, const char* what) {
  if (!ok) fail(ErrorKind::InvalidArgument, "cpu backend, op ", op, ": ", what);
}

void expect_f32(const Tensor& t, int ndim, const char* op, const char* name) {
  if (t.dtype != DType::F32 || t.ndim != ndim) {
    fail(ErrorKind::InvalidArgument, "cpu backend, op ", op, ": ", name, " must be f32 with ",
         ndim, " dims, got ", dtype_name(t.dtype), " ", shape_string(t));
  }
}

}  // namespace

CpuBackend::CpuBackend(ThreadPool* pool) : pool_(pool) {
  if (pool_ == nullptr) {
    owned_pool_ = std::make_unique<ThreadPool>(1);
    pool_ = owned_pool_.get();
  }
}


void CpuBackend::embedding(const Tensor& out, const Tensor& table, std::span<const int32_t> ids) {
  expect_f32(out, 2, "embedding", "out");
  expect(table.ndim == 2 && out.shape[1] == table.shape[1] &&
             out.shape[0] == static_cast<int64_t>(ids.size()),
         "embedding", "shapes disagree");
  for (size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] < 0 || ids[t] >= table.shape[0]) {
      fail(ErrorKind::InvalidArgument, "token id ", ids[t], " is outside the vocabulary [0, ",
           table.shape[0], ")");
    }
  }
  const bool dequantize_rows = is_block_format(table.dtype);
  expect(!dequantize_rows || table.stride[1] == 1, "embedding", "a quantised table must have contiguous rows");
  if (dequantize_rows) dtype_bytes(table.dtype, table.shape[1]);  // throws unless rows are whole blocks
  pool_->parallel_for(static_cast<int64_t>(ids.size()), [&](int64_t begin, int64_t end) {
    std::vector<float> row(dequantize_rows ? static_cast<size_t>(table.shape[1]) : 0);
    for (int64_t t = begin; t < end; ++t) {
      if (dequantize_rows) {
        dtype_traits(table.dtype).to_f32(table.at({ids[t]}), row.data(), table.shape[1]);
        for (int64_t d = 0; d < out.shape[1]; ++d) f32_at2(out, t, d) = row[static_cast<size_t>(d)];
      } else {
        for (int64_t d = 0; d < out.shape[1]; ++d) f32_at2(out, t, d) = get2(table, ids[t], d);
      }
    }
  });
}

void CpuBackend::rmsnorm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) {
  expect((x.ndim == 2 || x.ndim == 3) && x.dtype == DType::F32 && out.dtype == DType::F32 &&
             out.ndim == x.ndim && out.shape == x.shape,
         "rmsnorm", "out and x must be f32 [R, D] or [T, H, D] of the same shape");
  const int64_t dim = x.shape[x.ndim - 1];
  expect(weight.ndim == 1 && weight.shape[0] == dim, "rmsnorm", "weight must be [D]");
  // A 2-d tensor is one head per row; a 3-d one has shape[1] heads per row.
  const int64_t heads = x.ndim == 3 ? x.shape[1] : 1;
  const int64_t x_head_stride = x.ndim == 3 ? x.stride[1] : 0, x_inner = x.stride[x.ndim - 1];
  const int64_t o_head_stride = out.ndim == 3 ? out.stride[1] : 0, o_inner = out.stride[out.ndim - 1];
  pool_->parallel_for(x.shape[0] * heads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / heads, h = item % heads;
      const float* in = x.ptr<float>() + r * x.stride[0] + h * x_head_stride;
      float* result = out.ptr<float>() + r * out.stride[0] + h * o_head_stride;
      float sum_squares = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum_squares += in[d * x_inner] * in[d * x_inner];
      const float inverse_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(dim) + eps);
      for (int64_t d = 0; d < dim; ++d) {
        result[d * o_inner] = in[d * x_inner] * inverse_rms * get1(weight, d);
      }
    }
  });
}

void CpuBackend::matmul(const Tensor& out, const Tensor& x, const Tensor& weight,
            const Tensor* bias) {
  expect_f32(out, 2, "matmul", "out");
  expect_f32(x, 2, "matmul", "x");
  expect(weight.ndim == 2 && weight.shape[1] == x.shape[1] && out.shape[0] == x.shape[0] &&
             out.shape[1] == weight.shape[0],
         "matmul", "shapes disagree (out [T, N], x [T, K], weight [N, K])");
  expect(bias == nullptr || (bias->ndim == 1 && bias->shape[0] == weight.shape[0]), "matmul",
         "bias must be [N]");
  expect(weight.layout == Layout::Strided, "matmul",
         "the weight was packed for another backend; prepare it with this backend");
  const int64_t n_tokens = x.shape[0], n_out = weight.shape[0], n_in = x.shape[1];
  const bool unit_strides = x.stride[1] == 1 && weight.stride[1] == 1;
  // Block formats (and f16) are dequantised one weight row at a time, then multiplied in f32:
  // the definition every quantised kernel is tested against.
  const bool dequantize_rows = weight.dtype != DType::F32 && weight.dtype != DType::BF16;
  expect(!dequantize_rows || weight.stride[1] == 1, "matmul", "a quantised weight must have contiguous rows");
  if (dequantize_rows) dtype_bytes(weight.dtype, n_in);  // throws unless rows are whole blocks
  // Split over output features: each weight row is read once for all tokens. One sequential
  // f32 accumulator per output keeps the oracle's rounding simple to reason about.
  pool_->parallel_for(n_out, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dequantize_rows ? static_cast<size_t>(n_in) : 0);
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? get1(*bias, n) : 0.0f;
      if (dequantize_rows) dtype_traits(weight.dtype).to_f32(weight.at({n}), row.data(), n_in);
      for (int64_t t = 0; t < n_tokens; ++t) {
        float sum = 0.0f;
        if (dequantize_rows) {
          for (int64_t k = 0; k < n_in; ++k) sum += f32_at2(x, t, k) * row[static_cast<size_t>(k)];
        } else if (unit_strides && weight.dtype == DType::F32) {
          sum = dot_contiguous(&f32_at2(x, t, 0), static_cast<const float*>(weight.at({n})), n_in);
        } else if (unit_strides && weight.dtype == DType::BF16) {
          sum = dot_contiguous(&f32_at2(x, t, 0), static_cast<const uint16_t*>(weight.at({n})), n_in);
        } else {
          for (int64_t k = 0; k < n_in; ++k) sum += f32_at2(x, t, k) * get2(weight, n, k);
        }
        f32_at2(out, t, n) = sum + b;
      }
    }
  });
}

void CpuBackend::rope(const Tensor& x, std::span<const int32_t> positions, const Tensor& inv_freq) {
  expect_f32(x, 3, "rope", "x");
  expect(static_cast<int64_t>(positions.size()) == x.shape[0] && x.shape[2] % 2 == 0 &&
             inv_freq.ndim == 1 && inv_freq.shape[0] * 2 == x.shape[2],
         "rope", "shapes disagree (x [T, H, head_dim], inv_freq [head_dim / 2])");
  const int64_t half = x.shape[2] / 2;
  pool_->parallel_for(x.shape[0], [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        // f32 angle, as transformers computes it, so long positions round the same way.
        const float angle = static_cast<float>(positions[t]) * get1(inv_freq, i);
        const float c = std::cos(angle), s = std::sin(angle);
        for (int64_t h = 0; h < x.shape[1]; ++h) {
          float& a = f32_at3(x, t, h, i);
          float& b = f32_at3(x, t, h, i + half);
          const float a0 = a, b0 = b;
          a = a0 * c - b0 * s;
          b = b0 * c + a0 * s;
        }
      }
    }
  });
}

namespace {

// The stored type and layout a KV view promises (what KVCache builds).
void expect_kv_view(const KVLayerView& cache, const char* op) {
  const bool quantised = cache.dtype == DType::Q8_0;
  const DType element = quantised ? DType::I8 : cache.dtype;
  const Tensor& k = cache.keys;
  expect(is_kv_dtype(cache.dtype) && k.ndim == 4 && cache.values.ndim == 4 && k.shape == cache.values.shape &&
             k.dtype == element && cache.values.dtype == element,
         op, "the cache must be keys and values [n_blocks, block_size, n_kv_heads, head_dim] of its KV type");
  if (quantised) {
    for (const Tensor* s : {&cache.key_scales, &cache.value_scales}) {
      expect(s->dtype == DType::F16 && s->ndim == 4 && s->shape[0] == k.shape[0] && s->shape[1] == k.shape[1] &&
                 s->shape[2] == k.shape[2] && s->shape[3] * kKVQuantGroup == k.shape[3],
             op, "a q8_0 cache needs f16 scales [n_blocks, block_size, n_kv_heads, head_dim / 32]");
    }
  }
}

}  // namespace

void CpuBackend::kv_store(const KVLayerView& cache, const Tensor& keys, const Tensor& values,
              std::span<const KVSlot> slots) {
  expect_f32(keys, 3, "kv_store", "keys");
  expect_f32(values, 3, "kv_store", "values");
  expect_kv_view(cache, "kv_store");
  const Tensor& k_pool = cache.keys;
  const int64_t block_size = k_pool.shape[1];
  expect(keys.shape[0] == static_cast<int64_t>(slots.size()) && keys.shape[1] == k_pool.shape[2] &&
             keys.shape[2] == k_pool.shape[3] && values.shape == keys.shape,
         "kv_store", "shapes disagree with the cache");
  pool_->parallel_for(keys.shape[0], [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(keys.shape[2]));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t].block_table[slots[t].position / block_size];
      const int64_t offset = slots[t].position % block_size;
      for (int64_t h = 0; h < keys.shape[1]; ++h) {
        for (int64_t d = 0; d < keys.shape[2]; ++d) row[static_cast<size_t>(d)] = f32_at3(keys, t, h, d);
        kv_store_row(cache, KVPart::Keys, block, offset, h, row.data());
        for (int64_t d = 0; d < keys.shape[2]; ++d) row[static_cast<size_t>(d)] = f32_at3(values, t, h, d);
        kv_store_row(cache, KVPart::Values, block, offset, h, row.data());
      }
    }
  });
}

void CpuBackend::attention(const Tensor& out, const Tensor& queries, const KVLayerView& cache,
               std::span<const KVSlot> slots, float scale, int32_t window) {
  expect_f32(out, 3, "attention", "out");
  expect_f32(queries, 3, "attention", "queries");
  expect_kv_view(cache, "attention");
  const int64_t n_tokens = queries.shape[0], n_heads = queries.shape[1];
  const int64_t head_dim = queries.shape[2], n_kv_heads = cache.keys.shape[2];
  const int64_t block_size = cache.keys.shape[1];
  expect(out.shape == queries.shape && n_tokens == static_cast<int64_t>(slots.size()) &&
             head_dim == cache.keys.shape[3] && n_heads % n_kv_heads == 0,
         "attention", "shapes disagree (queries [T, H, hd], cache [.., .., Hkv, hd], H % Hkv == 0)");
  expect(window >= 0, "attention", "window must be >= 0 (0: no window)");
  const int64_t group = n_heads / n_kv_heads;
  pool_->parallel_for(n_tokens * n_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / n_heads, h = item % n_heads, kv_head = h / group;
      // Keys [first_key, position]: the whole prefix, or the last `window` positions.
      const int64_t last_key = slots[t].position;
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, last_key - window + 1) : 0;
      const int64_t n_keys = last_key - first_key + 1;
      scores.assign(static_cast<size_t>(n_keys), 0.0f);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n_keys; ++i) {
        const int64_t j = first_key + i;
        const int64_t block = slots[t].block_table[j / block_size], offset = j % block_size;
        float dot = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) {
          dot += f32_at3(queries, t, h, d) * kv_load(cache, KVPart::Keys, block, offset, kv_head, d);
        }
        scores[i] = dot * scale;
        max_score = std::max(max_score, scores[i]);
      }
      float total = 0.0f;
      for (float& s : scores) total += (s = std::exp(s - max_score));
      for (int64_t d = 0; d < head_dim; ++d) f32_at3(out, t, h, d) = 0.0f;
      for (int64_t i = 0; i < n_keys; ++i) {
        const int64_t j = first_key + i;
        const int64_t block = slots[t].block_table[j / block_size], offset = j % block_size;
        const float weight = scores[i] / total;
        for (int64_t d = 0; d < head_dim; ++d) {
          f32_at3(out, t, h, d) += weight * kv_load(cache, KVPart::Values, block, offset, kv_head, d);
        }
      }
    }
  });
}

void CpuBackend::silu_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  expect_f32(out, 2, "silu_mul", "out");
  expect_f32(gate, 2, "silu_mul", "gate");
  expect_f32(up, 2, "silu_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "silu_mul", "shapes disagree");
  pool_->parallel_for(out.shape[0], [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t f = 0; f < out.shape[1]; ++f) {
        const float g = f32_at2(gate, t, f);
        f32_at2(out, t, f) = g / (1.0f + std::exp(-g)) * f32_at2(up, t, f);
      }
    }
  });
}

void CpuBackend::gelu_tanh_mul(const Tensor& out, const Tensor& gate, const Tensor& up) {
  expect_f32(out, 2, "gelu_tanh_mul", "out");
  expect_f32(gate, 2, "gelu_tanh_mul", "gate");
  expect_f32(up, 2, "gelu_tanh_mul", "up");
  expect(out.shape == gate.shape && gate.shape == up.shape, "gelu_tanh_mul", "shapes disagree");
  const float sqrt_2_over_pi = 0.7978845608028654f;
  pool_->parallel_for(out.shape[0], [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t f = 0; f < out.shape[1]; ++f) {
        const float g = f32_at2(gate, t, f);
        const float inner = sqrt_2_over_pi * (g + 0.044715f * g * g * g);
        f32_at2(out, t, f) = 0.5f * g * (1.0f + std::tanh(inner)) * f32_at2(up, t, f);
      }
    }
  });
}

void CpuBackend::scale(const Tensor& out, const Tensor& x, float factor) {
  expect_f32(out, 2, "scale", "out");
  expect_f32(x, 2, "scale", "x");
  expect(out.shape == x.shape, "scale", "shapes disagree");
  pool_->parallel_for(out.shape[0], [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t d = 0; d < out.shape[1]; ++d) f32_at2(out, t, d) = f32_at2(x, t, d) * factor;
    }
  });
}

void CpuBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  expect_f32(out, 2, "add", "out");
  expect_f32(a, 2, "add", "a");
  expect_f32(b, 2, "add", "b");
  expect(out.shape == a.shape && a.shape == b.shape, "add", "shapes disagree");
  pool_->parallel_for(out.shape[0], [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t d = 0; d < out.shape[1]; ++d) {
        f32_at2(out, t, d) = f32_at2(a, t, d) + f32_at2(b, t, d);
      }
    }
  });
}


BackendInfo cpu_backend_info() {
  BackendInfo info;
  info.name = "cpu";
  info.score = 10;
  info.description = "scalar reference kernels, any CPU";
  info.usable = [] { return true; };
  info.create = [](const BackendOptions& options) -> std::unique_ptr<Backend> {
    return std::make_unique<CpuBackend>(options.pool);
  };
  return info;
}

}  // namespace opencamp
