// Every op of include/opencamp/backend.h, on every usable backend, against the "cpu" oracle
// (as llama.cpp's test-backend-ops): random inputs with odd shapes, strided views, T = 1 and
// T = many, compared by normalised error  sum((out - ref)^2) / sum(ref^2)  with a bound per
// weight dtype. The oracle itself is checked against plain double-precision implementations
// written here, so a wrong oracle cannot make every backend "pass".
//
// Adding a backend needs no change here: the cases loop over opencamp::usable_backends().
// A usable backend that throws Unsupported for an op fails the case, naming the op.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "opencamp/opencamp.h"

using namespace opencamp;

namespace {

// ---- tolerances (normalised squared error) ---------------------------------------------------

// The oracle against double-precision math: f32 rounding only.
constexpr double kOracleBound = 1e-10;
// Another backend against the oracle: f32 math in another order (FMA, SIMD, GPU reductions).
constexpr double kF32Bound = 1e-8;
// With bf16 weights a backend may also round activations to bf16 for its dot products.
constexpr double kBF16Bound = 1e-4;
constexpr float kSentinel = 1.0e30f;  // fills padding between strided rows

// ---- host tensors with padding ---------------------------------------------------------------

// A host-side tensor: `storage` is the whole allocation; the view (shape, stride) may leave
// padding between rows (stride[0] > product of the inner dims), filled with kSentinel so a
// kernel that reads it produces garbage and one that writes it is caught.
struct HostTensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;
  std::vector<unsigned char> storage;

  int64_t numel() const {
    return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  }
  size_t elements() const { return storage.size() / dtype_size(dtype); }
  // Storage index of the logical (row-major) element `flat`.
  int64_t offset(int64_t flat) const {
    int64_t off = 0;
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      off += (flat % shape[d]) * stride[d];
      flat /= shape[d];
    }
    return off;
  }
  float get(int64_t flat) const { return load_as_f32(storage.data(), dtype, offset(flat)); }
  void set(int64_t flat, float value) { set_raw(offset(flat), value); }
  void set_raw(int64_t index, float value) {
    if (dtype == DType::F32) {
      std::memcpy(storage.data() + 4 * index, &value, 4);
    } else if (dtype == DType::BF16) {
      const uint16_t bits = f32_to_bf16(value);
      std::memcpy(storage.data() + 2 * index, &bits, 2);
    } else {
      throw std::runtime_error("test HostTensor: only f32 / bf16");
    }
  }
  std::vector<float> values() const {
    std::vector<float> out(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = get(i);
    return out;
  }
  float sentinel() const { return dtype == DType::BF16 ? bf16_to_f32(f32_to_bf16(kSentinel)) : kSentinel; }
  // True when every storage element outside the view still holds the sentinel.
  bool padding_intact() const {
    std::vector<bool> in_view(elements(), false);
    for (int64_t i = 0; i < numel(); ++i) in_view[static_cast<size_t>(offset(i))] = true;
    for (size_t i = 0; i < elements(); ++i) {
      if (!in_view[i] && load_as_f32(storage.data(), dtype, static_cast<int64_t>(i)) != sentinel()) {
        return false;
      }
    }
    return true;
  }
  std::string describe() const {
    std::ostringstream out;
    out << dtype_name(dtype) << "[";
    for (size_t d = 0; d < shape.size(); ++d) out << (d ? "," : "") << shape[d];
    out << "]";
    int64_t expected = 1;
    bool contiguous = true;
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      contiguous = contiguous && (shape[d] == 1 || stride[d] == expected);
      expected *= shape[d];
    }
    if (!contiguous) {
      out << " strides(";
      for (size_t d = 0; d < stride.size(); ++d) out << (d ? "," : "") << stride[d];
      out << ")";
    }
    return out.str();
  }
};

// A row-major tensor whose outermost stride is padded by `pad` elements.
HostTensor make_tensor(DType dtype, std::vector<int64_t> shape, int64_t pad = 0) {
  HostTensor t;
  t.dtype = dtype;
  t.shape = shape;
  t.stride.assign(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) t.stride[d] = t.stride[d + 1] * shape[d + 1];
  if (!shape.empty()) t.stride[0] += shape.size() == 1 ? 0 : pad;
  const int64_t span = shape.empty() ? 0 : (shape[0] - 1) * t.stride[0] + (shape.size() == 1 ? 1 : t.stride[0] - pad);
  t.storage.assign(static_cast<size_t>(std::max<int64_t>(span, 1)) * dtype_size(dtype), 0);
  for (size_t i = 0; i < t.elements(); ++i) t.set_raw(static_cast<int64_t>(i), kSentinel);
  return t;
}

// A 2-d view that is the transpose of a contiguous [cols, rows] buffer (stride (1, rows)).
HostTensor make_transposed(std::vector<int64_t> shape) {
  HostTensor t;
  t.shape = shape;
  t.stride = {1, shape[0]};
  t.storage.assign(static_cast<size_t>(shape[0] * shape[1]) * 4, 0);
  return t;
}

void fill_random(HostTensor& t, std::mt19937& rng, float low = -1.0f, float high = 1.0f) {
  std::uniform_real_distribution<float> dist(low, high);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, dist(rng));
}

// ---- moving host tensors to a backend and back ---------------------------------------------

// A host tensor's whole storage on a backend's device, and the view into it.
struct DeviceTensor {
  std::shared_ptr<Buffer> buffer;
  Tensor view;
};

// A view of host memory (what Backend::prepare_weight takes: weights come from host files).
Tensor host_view(const HostTensor& host) {
  Tensor t;
  t.dtype = host.dtype;
  t.ndim = static_cast<int>(host.shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = host.shape[i];
    t.stride[i] = host.stride[i];
  }
  t.data = const_cast<unsigned char*>(host.storage.data());
  return t;
}

DeviceTensor upload(Backend& backend, const HostTensor& host) {
  DeviceTensor d;
  d.buffer = backend.allocate(host.storage.size());
  const Tensor whole = Tensor::contiguous(d.buffer->data(), host.dtype,
                                          {static_cast<int64_t>(host.elements())}, backend.device());
  backend.from_host(whole, host.storage.data());
  d.view.dtype = host.dtype;
  d.view.ndim = static_cast<int>(host.shape.size());
  for (int i = 0; i < d.view.ndim; ++i) {
    d.view.shape[i] = host.shape[i];
    d.view.stride[i] = host.stride[i];
  }
  d.view.data = d.buffer->data();
  d.view.device = backend.device();
  return d;
}

void download(Backend& backend, const DeviceTensor& device, HostTensor& host) {
  const Tensor whole = Tensor::contiguous(device.buffer->data(), host.dtype,
                                          {static_cast<int64_t>(host.elements())}, backend.device());
  backend.to_host(host.storage.data(), whole);
}

// ---- cases -----------------------------------------------------------------------------------

struct Output {
  std::vector<float> values;
  bool padding_intact = true;
};

struct OpCase {
  std::string op;
  std::string shape;            // what the inputs look like, for the report
  DType weight_dtype = DType::F32;
  bool oracle_only = false;     // layouts only the strided cpu oracle promises to handle
  std::function<Output(Backend&)> run;       // the same inputs on every backend
  std::function<std::vector<double>()> reference;  // double-precision truth
};

double normalised_error(const std::vector<float>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double diff = static_cast<double>(out[i]) - ref[i];
    num += diff * diff;
    den += ref[i] * ref[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? num / den : num;
}

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

std::string fmt(const char* format, auto... args) {
  char buffer[256];
  std::snprintf(buffer, sizeof buffer, format, args...);
  return buffer;
}

std::vector<OpCase> embedding_cases() {
  std::vector<OpCase> cases;
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (int64_t T : {1, 29}) {
      for (int64_t pad : {0, 3}) {
        const int64_t V = 53, D = 37;
        std::mt19937 rng(static_cast<unsigned>(100 + T + pad));
        auto table = std::make_shared<HostTensor>(make_tensor(dtype, {V, D}));
        fill_random(*table, rng);
        auto ids = std::make_shared<std::vector<int32_t>>();
        for (int64_t t = 0; t < T; ++t) ids->push_back(static_cast<int32_t>(rng() % V));
        if (T > 2) {
          (*ids)[0] = 0;
          (*ids)[1] = static_cast<int32_t>(V - 1);
          (*ids)[2] = (*ids)[0];  // repeats
        }
        OpCase c;
        c.op = "embedding";
        c.weight_dtype = dtype;
        c.shape = fmt("T=%lld table=%s out-pad=%lld", (long long)T, table->describe().c_str(), (long long)pad);
        c.run = [=](Backend& b) {
          HostTensor out = make_tensor(DType::F32, {T, D}, pad);
          DeviceTensor d_table = upload(b, *table), d_out = upload(b, out);
          b.embedding(d_out.view, d_table.view, *ids);
          download(b, d_out, out);
          return Output{out.values(), out.padding_intact()};
        };
        c.reference = [=] {
          std::vector<double> ref;
          for (int32_t id : *ids) {
            for (int64_t d = 0; d < D; ++d) ref.push_back(table->get(id * D + d));
          }
          return ref;
        };
        cases.push_back(c);
        // The same rows read from the table prepared as a matmul weight (a tied output layer),
        // where the backend says it can; from its own table layout otherwise.
        OpCase tied = c;
        tied.op = "embedding";
        tied.shape = "from a prepared matrix, " + c.shape;
        tied.run = [=](Backend& b) {
          std::vector<std::shared_ptr<Buffer>> owned;
          const Tensor matrix = b.prepare_weight(host_view(*table), dtype, WeightUse::Matrix, owned);
          const Tensor rows = b.embeds_from(matrix)
                                  ? matrix
                                  : b.prepare_weight(host_view(*table), dtype, WeightUse::Table, owned);
          HostTensor out = make_tensor(DType::F32, {T, D}, pad);
          DeviceTensor d_out = upload(b, out);
          b.embedding(d_out.view, rows, *ids);
          download(b, d_out, out);
          return Output{out.values(), out.padding_intact()};
        };
        cases.push_back(tied);
      }
    }
  }
  return cases;
}

// Rows of block-format tables (an untied GGUF embedding, or a tied output layer read as its
// embedding): from the table as prepared for lookups and from the matrix as prepared for matmuls
// (tiled where the backend tiles), against the format's dequantiser. 37 rows: the last of them
// in a partial 16-row tile.
std::vector<OpCase> block_embedding_cases() {
  std::vector<OpCase> cases;
  for (DType dtype : {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4_K, DType::Q5_K,
                      DType::Q6_K}) {
    const int64_t V = 37, D = 2 * dtype_traits(dtype).block_elements;
    std::mt19937 rng(static_cast<unsigned>(300 + static_cast<int>(dtype)));
    std::vector<float> values(static_cast<size_t>(V * D));
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& v : values) v = dist(rng);
    auto blocks = std::make_shared<std::vector<unsigned char>>(dtype_bytes(dtype, V * D));
    convert_dtype(values.data(), DType::F32, blocks->data(), dtype, V * D);
    auto dequantised = std::make_shared<std::vector<float>>(static_cast<size_t>(V * D));
    dtype_traits(dtype).to_f32(blocks->data(), dequantised->data(), V * D);
    auto ids = std::make_shared<std::vector<int32_t>>(std::vector<int32_t>{0, static_cast<int32_t>(V - 1), 17, 16, 0, 35});
    for (WeightUse use : {WeightUse::Table, WeightUse::Matrix}) {
      OpCase c;
      c.op = "embedding";
      c.weight_dtype = dtype;
      c.shape = fmt("%s table [%lld,%lld], prepared as a %s", dtype_name(dtype), (long long)V, (long long)D,
                    use == WeightUse::Table ? "table" : "matrix");
      c.run = [=](Backend& b) {
        std::vector<std::shared_ptr<Buffer>> owned;
        const Tensor host = Tensor::contiguous(blocks->data(), dtype, {V, D});
        Tensor rows = b.prepare_weight(host, dtype, use, owned);
        if (!b.embeds_from(rows)) rows = b.prepare_weight(host, dtype, WeightUse::Table, owned);
        HostTensor out = make_tensor(DType::F32, {static_cast<int64_t>(ids->size()), D}, 2);
        DeviceTensor d_out = upload(b, out);
        b.embedding(d_out.view, rows, *ids);
        download(b, d_out, out);
        return Output{out.values(), out.padding_intact()};
      };
      c.reference = [=] {
        std::vector<double> ref;
        for (int32_t id : *ids) {
          for (int64_t d = 0; d < D; ++d) ref.push_back((*dequantised)[static_cast<size_t>(id * D + d)]);
        }
        return ref;
      };
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<OpCase> rmsnorm_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t R, D, pad;
    bool in_place;
    float eps;
  };
  for (const Shape& s : {Shape{1, 37, 0, false, 1e-5f}, Shape{13, 131, 5, false, 1e-6f},
                         Shape{7, 37, 0, true, 1e-5f}, Shape{4, 19, 3, true, 1e-6f}}) {
    std::mt19937 rng(static_cast<unsigned>(200 + s.R + s.D));
    auto x = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.R, s.D}, s.pad));
    fill_random(*x, rng, -3.0f, 3.0f);
    auto weight = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.D}));
    fill_random(*weight, rng, 0.5f, 1.5f);
    OpCase c;
    c.op = "rmsnorm";
    c.shape = fmt("x=%s eps=%g%s", x->describe().c_str(), s.eps, s.in_place ? " in-place" : "");
    c.run = [=](Backend& b) {
      HostTensor in = *x;
      HostTensor out = make_tensor(DType::F32, {s.R, s.D}, s.pad);
      DeviceTensor d_x = upload(b, in), d_w = upload(b, *weight), d_out = upload(b, out);
      if (s.in_place) {
        b.rmsnorm(d_x.view, d_x.view, d_w.view, s.eps);
        download(b, d_x, in);
        return Output{in.values(), in.padding_intact()};
      }
      b.rmsnorm(d_out.view, d_x.view, d_w.view, s.eps);
      download(b, d_out, out);
      download(b, d_x, in);
      return Output{out.values(), out.padding_intact() && in.values() == x->values()};
    };
    c.reference = [=] {
      std::vector<double> ref;
      for (int64_t r = 0; r < s.R; ++r) {
        double sum = 0;
        for (int64_t d = 0; d < s.D; ++d) sum += double(x->get(r * s.D + d)) * x->get(r * s.D + d);
        const double inv = 1.0 / std::sqrt(sum / double(s.D) + double(s.eps));
        for (int64_t d = 0; d < s.D; ++d) ref.push_back(x->get(r * s.D + d) * inv * weight->get(d));
      }
      return ref;
    };
    cases.push_back(c);
  }
  return cases;
}

std::vector<OpCase> matmul_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t T, K, N, x_pad, out_pad;
  };
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (bool with_bias : {false, true}) {
      // Odd sizes everywhere; also enough tokens and outputs for several full tiles of the
      // SIMD kernels plus remainders (T=97 crosses a token block, N=100 leaves a partial panel).
      for (const Shape& s : {Shape{1, 37, 13, 0, 0}, Shape{7, 67, 75, 5, 3}, Shape{33, 131, 29, 0, 0},
                             Shape{1, 64, 17, 11, 0}, Shape{19, 9, 41, 2, 7}, Shape{40, 200, 100, 0, 0},
                             Shape{97, 33, 35, 1, 2}, Shape{1, 301, 70, 0, 0},
                             // K a multiple of 32 and T >= 16: the AMX tiles, with a partial
                             // 32-token block, a lone last panel and a partial one.
                             Shape{45, 96, 50, 3, 1}, Shape{16, 64, 16, 0, 0}}) {
        std::mt19937 rng(static_cast<unsigned>(300 + s.T * 7 + s.K + s.N + with_bias));
        auto x = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.T, s.K}, s.x_pad));
        fill_random(*x, rng);
        auto w = std::make_shared<HostTensor>(make_tensor(dtype, {s.N, s.K}));
        fill_random(*w, rng);
        auto bias = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.N}));
        fill_random(*bias, rng);
        OpCase c;
        c.op = "matmul";
        c.weight_dtype = dtype;
        c.shape = fmt("x=%s w=%s%s out-pad=%lld", x->describe().c_str(), w->describe().c_str(),
                      with_bias ? " +bias" : "", (long long)s.out_pad);
        c.run = [=](Backend& b) {
          HostTensor out = make_tensor(DType::F32, {s.T, s.N}, s.out_pad);
          DeviceTensor d_x = upload(b, *x), d_b = upload(b, *bias);
          DeviceTensor d_out = upload(b, out);
          // The weight in the backend's own matmul layout, as a model loads it.
          std::vector<std::shared_ptr<Buffer>> owned;
          const Tensor prepared = b.prepare_weight(host_view(*w), dtype, WeightUse::Matrix, owned);
          b.matmul(d_out.view, d_x.view, prepared, with_bias ? &d_b.view : nullptr);
          download(b, d_out, out);
          return Output{out.values(), out.padding_intact()};
        };
        c.reference = [=] {
          std::vector<double> ref;
          for (int64_t t = 0; t < s.T; ++t) {
            for (int64_t n = 0; n < s.N; ++n) {
              double sum = with_bias ? bias->get(n) : 0.0;
              for (int64_t k = 0; k < s.K; ++k) sum += double(x->get(t * s.K + k)) * w->get(n * s.K + k);
              ref.push_back(sum);
            }
          }
          return ref;
        };
        cases.push_back(c);
      }
    }
  }
  // The oracle honours any stride: x as a transposed (column-major) view.
  {
    const int64_t T = 6, K = 23, N = 11;
    std::mt19937 rng(399);
    auto x = std::make_shared<HostTensor>(make_transposed({T, K}));
    fill_random(*x, rng);
    auto w = std::make_shared<HostTensor>(make_tensor(DType::BF16, {N, K}));
    fill_random(*w, rng);
    OpCase c;
    c.op = "matmul";
    c.weight_dtype = DType::BF16;
    c.oracle_only = true;
    c.shape = fmt("x=%s (transposed view) w=%s", x->describe().c_str(), w->describe().c_str());
    c.run = [=](Backend& b) {
      HostTensor out = make_tensor(DType::F32, {T, N});
      DeviceTensor d_x = upload(b, *x), d_w = upload(b, *w), d_out = upload(b, out);
      b.matmul(d_out.view, d_x.view, d_w.view, nullptr);
      download(b, d_out, out);
      return Output{out.values(), true};
    };
    c.reference = [=] {
      std::vector<double> ref;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t n = 0; n < N; ++n) {
          double sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += double(x->get(t * K + k)) * w->get(n * K + k);
          ref.push_back(sum);
        }
      }
      return ref;
    };
    cases.push_back(c);
  }
  return cases;
}

// Block-format weights (GGUF's quantised rows): random weights through opencamp's quantiser,
// the reference multiplies by their dequantised values (quants.cpp, itself checked against the
// gguf package). Rows not a multiple of the 16-row panel or of the rows decoded together, K of
// several blocks, T = 1 and a few (decode kernels) and enough for the prefill path (dequantised
// panels), with bias and padding.
std::vector<OpCase> quantised_matmul_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t T, blocks, N, x_pad, out_pad;
    bool with_bias;
  };
  for (DType dtype : {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4_K,
                      DType::Q5_K, DType::Q6_K}) {
    const int64_t block = dtype_traits(dtype).block_elements;
    for (const Shape& s : {Shape{1, 3, 37, 0, 0, false}, Shape{3, 2, 13, 5, 3, true}, Shape{6, 1, 70, 0, 1, false},
                           Shape{1, 5, 100, 2, 0, true}, Shape{17, 3, 35, 3, 2, true}, Shape{40, 2, 49, 0, 0, false},
                           Shape{2, 19, 21, 0, 0, true}}) {  // 19 blocks: a long row
      const int64_t K = s.blocks * block, N = s.N;
      std::mt19937 rng(static_cast<unsigned>(900 + static_cast<int>(dtype) * 31 + s.T * 7 + K + N));
      auto x = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.T, K}, s.x_pad));
      fill_random(*x, rng);
      auto bias = std::make_shared<HostTensor>(make_tensor(DType::F32, {N}));
      fill_random(*bias, rng);
      // Rows of different magnitudes and signs, so every level and scale gets used.
      std::vector<float> values(static_cast<size_t>(N * K));
      std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
      for (int64_t n = 0; n < N; ++n) {
        const float magnitude = 0.05f + 0.2f * static_cast<float>(n % 7);
        for (int64_t k = 0; k < K; ++k) values[static_cast<size_t>(n * K + k)] = magnitude * dist(rng) + 0.1f * magnitude;
      }
      auto blocks = std::make_shared<std::vector<unsigned char>>(dtype_bytes(dtype, N * K));
      convert_dtype(values.data(), DType::F32, blocks->data(), dtype, N * K);
      auto dequantised = std::make_shared<std::vector<float>>(static_cast<size_t>(N * K));
      dtype_traits(dtype).to_f32(blocks->data(), dequantised->data(), N * K);
      OpCase c;
      c.op = "matmul";
      c.weight_dtype = dtype;
      c.shape = fmt("x=%s w=%s[%lld,%lld]%s out-pad=%lld", x->describe().c_str(), dtype_name(dtype),
                    (long long)N, (long long)K, s.with_bias ? " +bias" : "", (long long)s.out_pad);
      c.run = [=](Backend& b) {
        HostTensor out = make_tensor(DType::F32, {s.T, N}, s.out_pad);
        DeviceTensor d_x = upload(b, *x), d_b = upload(b, *bias), d_out = upload(b, out);
        std::vector<std::shared_ptr<Buffer>> owned;
        const Tensor host = Tensor::contiguous(blocks->data(), dtype, {N, K});
        const Tensor prepared = b.prepare_weight(host, dtype, WeightUse::Matrix, owned);
        b.matmul(d_out.view, d_x.view, prepared, s.with_bias ? &d_b.view : nullptr);
        download(b, d_out, out);
        return Output{out.values(), out.padding_intact()};
      };
      c.reference = [=] {
        std::vector<double> ref;
        for (int64_t t = 0; t < s.T; ++t) {
          for (int64_t n = 0; n < N; ++n) {
            double sum = s.with_bias ? bias->get(n) : 0.0;
            for (int64_t k = 0; k < K; ++k) sum += double(x->get(t * K + k)) * (*dequantised)[static_cast<size_t>(n * K + k)];
            ref.push_back(sum);
          }
        }
        return ref;
      };
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<OpCase> rope_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t T, H, hd, pad;
    bool llama3;
  };
  for (const Shape& s : {Shape{1, 3, 6, 0, false}, Shape{11, 5, 18, 0, true}, Shape{4, 2, 64, 7, false},
                         Shape{23, 1, 10, 0, true}}) {
    std::mt19937 rng(static_cast<unsigned>(400 + s.T + s.H + s.hd));
    auto x = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.T, s.H, s.hd}, s.pad));
    fill_random(*x, rng, -2.0f, 2.0f);
    auto positions = std::make_shared<std::vector<int32_t>>();
    for (int64_t t = 0; t < s.T; ++t) positions->push_back(static_cast<int32_t>(rng() % 3000));
    (*positions)[0] = s.T > 1 ? 0 : 2047;  // position 0 is the identity
    RopeConfig rope;
    rope.theta = 10000.0;
    if (s.llama3) {
      rope.type = RopeType::Llama3;
      rope.factor = 8.0;
      rope.original_max_position = 64;
    }
    auto inv = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.hd / 2}));
    const std::vector<float> freqs = rope_inverse_frequencies(rope, static_cast<int>(s.hd));
    for (int64_t i = 0; i < s.hd / 2; ++i) inv->set(i, freqs[static_cast<size_t>(i)]);
    OpCase c;
    c.op = "rope";
    c.shape = fmt("x=%s%s", x->describe().c_str(), s.llama3 ? " llama3 freqs" : "");
    c.run = [=](Backend& b) {
      HostTensor in_place = *x;
      DeviceTensor d_x = upload(b, in_place), d_inv = upload(b, *inv);
      b.rope(d_x.view, *positions, d_inv.view);
      download(b, d_x, in_place);
      return Output{in_place.values(), in_place.padding_intact()};
    };
    // Rotate-half: pairs (i, i + hd/2) turn by angle = position * inv_freq[i]. The angle is the
    // f32 product, as transformers computes it; everything after it in double.
    c.reference = [=] {
      std::vector<double> ref(static_cast<size_t>(x->numel()));
      const int64_t half = s.hd / 2;
      for (int64_t t = 0; t < s.T; ++t) {
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t base = (t * s.H + h) * s.hd;
          for (int64_t i = 0; i < half; ++i) {
            const double angle = static_cast<float>((*positions)[t]) * inv->get(i);
            const double a = x->get(base + i), bb = x->get(base + i + half);
            ref[base + i] = a * std::cos(angle) - bb * std::sin(angle);
            ref[base + i + half] = bb * std::cos(angle) + a * std::sin(angle);
          }
        }
      }
      return ref;
    };
    cases.push_back(c);
  }
  return cases;
}

// A paged cache and a batch of tokens from several sequences, each with its own block table
// (blocks shuffled so a sequence's blocks are not adjacent in the pool).
struct PagedSetup {
  int64_t n_blocks, block_size, Hkv, hd;
  std::vector<std::vector<int32_t>> tables;  // per sequence
  std::vector<int> seq_of_token;             // [T]
  std::vector<int32_t> position_of_token;    // [T]
  HostTensor keys, values;                   // the pools, [n_blocks, bs, Hkv, hd]
  std::vector<std::vector<float>> flat_k, flat_v;  // per sequence: [len, Hkv, hd]

  std::vector<KVSlot> slots() const {
    std::vector<KVSlot> out;
    for (size_t t = 0; t < seq_of_token.size(); ++t) {
      out.push_back({tables[static_cast<size_t>(seq_of_token[t])].data(), position_of_token[t]});
    }
    return out;
  }
};

// A KV pool of one of the cache's types on a backend, in the layout the backend keeps its
// cache in (keys [head][dim][position] per block when it asks for transposed keys, as KVCache
// builds them), and the host bytes of each part.
struct DeviceKV {
  KVLayerView view;
  std::vector<DeviceTensor> parts;                // keys, values (, key scales, value scales)
  std::vector<std::vector<unsigned char>> host;   // the same parts' bytes on the host
};

KVLayerView kv_view_over(DType dtype, const std::vector<void*>& data, int64_t n_blocks, int64_t bs, int64_t heads,
                         int64_t hd, bool transposed, Device device) {
  KVLayerView v;
  v.dtype = dtype;
  const DType element = dtype == DType::Q8_0 ? DType::I8 : dtype;
  v.keys = Tensor::contiguous(data[0], element, {n_blocks, bs, heads, hd}, device);
  v.values = Tensor::contiguous(data[1], element, {n_blocks, bs, heads, hd}, device);
  if (transposed) v.keys.stride = {bs * heads * hd, 1, hd * bs, bs};
  if (dtype == DType::Q8_0) {
    const int64_t groups = hd / kKVQuantGroup;
    v.key_scales = Tensor::contiguous(data[2], DType::F16, {n_blocks, bs, heads, groups}, device);
    v.value_scales = Tensor::contiguous(data[3], DType::F16, {n_blocks, bs, heads, groups}, device);
    if (transposed) v.key_scales.stride = {bs * heads * groups, 1, groups * bs, bs};
  }
  return v;
}

// Stores the f32 pools `keys` / `values` [n_blocks, bs, Hkv, hd] (rounded to `dtype` by the
// reference kv_store_row) on `backend`.
DeviceKV upload_kv(Backend& backend, DType dtype, const HostTensor& keys, const HostTensor& values) {
  const int64_t n_blocks = keys.shape[0], bs = keys.shape[1], heads = keys.shape[2], hd = keys.shape[3];
  const int64_t elements = n_blocks * bs * heads * hd;
  const DType element = dtype == DType::Q8_0 ? DType::I8 : dtype;
  DeviceKV kv;
  kv.host.assign(2, std::vector<unsigned char>(dtype_bytes(element, elements)));
  if (dtype == DType::Q8_0) kv.host.resize(4, std::vector<unsigned char>(2 * static_cast<size_t>(elements / kKVQuantGroup)));
  std::vector<void*> data;
  for (auto& h : kv.host) data.push_back(h.data());
  const KVLayerView host_view = kv_view_over(dtype, data, n_blocks, bs, heads, hd, backend.transposed_keys(), Device::CPU);
  std::vector<float> row(static_cast<size_t>(hd));
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int64_t slot = 0; slot < bs; ++slot) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = ((b * bs + slot) * heads + h) * hd;
        for (int64_t d = 0; d < hd; ++d) row[static_cast<size_t>(d)] = keys.get(base + d);
        kv_store_row(host_view, KVPart::Keys, b, slot, h, row.data());
        for (int64_t d = 0; d < hd; ++d) row[static_cast<size_t>(d)] = values.get(base + d);
        kv_store_row(host_view, KVPart::Values, b, slot, h, row.data());
      }
    }
  }
  std::vector<void*> device_data;
  for (auto& h : kv.host) {
    DeviceTensor d;
    d.buffer = backend.allocate(h.size());
    d.view = Tensor::contiguous(d.buffer->data(), DType::I8, {static_cast<int64_t>(h.size())}, backend.device());
    backend.from_host(d.view, h.data());
    device_data.push_back(d.buffer->data());
    kv.parts.push_back(d);
  }
  kv.view = kv_view_over(dtype, device_data, n_blocks, bs, heads, hd, backend.transposed_keys(), backend.device());
  return kv;
}

// The pools a backend holds, read back as f32 [keys..., values...] in logical order.
std::vector<float> download_kv(Backend& backend, DeviceKV& kv) {
  for (size_t i = 0; i < kv.parts.size(); ++i) backend.to_host(kv.host[i].data(), kv.parts[i].view);
  std::vector<void*> data;
  for (auto& h : kv.host) data.push_back(h.data());
  const Tensor& k = kv.view.keys;
  const KVLayerView host_view =
      kv_view_over(kv.view.dtype, data, k.shape[0], k.shape[1], k.shape[2], k.shape[3], backend.transposed_keys(), Device::CPU);
  std::vector<float> out;
  for (KVPart part : {KVPart::Keys, KVPart::Values}) {
    for (int64_t b = 0; b < k.shape[0]; ++b)
      for (int64_t slot = 0; slot < k.shape[1]; ++slot)
        for (int64_t h = 0; h < k.shape[2]; ++h)
          for (int64_t d = 0; d < k.shape[3]; ++d) out.push_back(kv_load(host_view, part, b, slot, h, d));
  }
  return out;
}

// x rounded to a KV type as a cache stores it, by the dtype conversions (not kv_store_row):
// bf16 / f16 per element, q8_0 per 32 values through GGUF's Q8_0 blocks.
void round_kv_row(DType dtype, float* x, int64_t n) {
  if (dtype == DType::F32) return;
  const int64_t chunk = dtype == DType::Q8_0 ? kKVQuantGroup : n;
  std::vector<unsigned char> stored(dtype_bytes(dtype, chunk));
  for (int64_t i = 0; i < n; i += chunk) {
    convert_dtype(x + i, DType::F32, stored.data(), dtype, chunk);
    convert_dtype(stored.data(), dtype, x + i, DType::F32, chunk);
  }
}

const char* kv_name(DType dtype) { return dtype_name(dtype); }

// Sequences of the given lengths; the batch holds tokens (seq, pos) listed in `batch`. Their
// keys and values are rounded to `kv_dtype` per head row, so a cache of that type holds them
// exactly and the double-precision reference sees what every backend reads.
std::shared_ptr<PagedSetup> make_paged(std::mt19937& rng, int64_t block_size, int64_t Hkv, int64_t hd,
                                       const std::vector<int>& lengths,
                                       const std::vector<std::pair<int, int>>& batch, DType kv_dtype = DType::F32) {
  auto p = std::make_shared<PagedSetup>();
  p->block_size = block_size;
  p->Hkv = Hkv;
  p->hd = hd;
  int64_t needed = 0;
  for (int len : lengths) needed += (len + block_size - 1) / block_size;
  p->n_blocks = needed + 3;  // spare blocks hold unrelated data
  std::vector<int32_t> pool(static_cast<size_t>(p->n_blocks));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  size_t next = 0;
  for (int len : lengths) {
    std::vector<int32_t> table;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) table.push_back(pool[next++]);
    p->tables.push_back(table);
  }
  p->keys = make_tensor(DType::F32, {p->n_blocks, block_size, Hkv, hd});
  p->values = make_tensor(DType::F32, {p->n_blocks, block_size, Hkv, hd});
  fill_random(p->keys, rng, -2.0f, 2.0f);  // unrelated entries: random, never to be read
  fill_random(p->values, rng, -50.0f, 50.0f);
  for (size_t s = 0; s < lengths.size(); ++s) {
    std::vector<float> k(static_cast<size_t>(lengths[s] * Hkv * hd)), v(k.size());
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (auto& e : k) e = dist(rng);
    for (auto& e : v) e = dist(rng);
    for (size_t row = 0; row < k.size(); row += static_cast<size_t>(hd)) {
      round_kv_row(kv_dtype, k.data() + row, hd);
      round_kv_row(kv_dtype, v.data() + row, hd);
    }
    for (int pos = 0; pos < lengths[s]; ++pos) {
      const int64_t block = p->tables[s][static_cast<size_t>(pos / block_size)], offset = pos % block_size;
      for (int64_t i = 0; i < Hkv * hd; ++i) {
        const int64_t at = ((block * block_size + offset) * Hkv) * hd + i;
        p->keys.set(at, k[static_cast<size_t>(pos * Hkv * hd + i)]);
        p->values.set(at, v[static_cast<size_t>(pos * Hkv * hd + i)]);
      }
    }
    p->flat_k.push_back(k);
    p->flat_v.push_back(v);
  }
  for (const auto& [seq, pos] : batch) {
    p->seq_of_token.push_back(seq);
    p->position_of_token.push_back(pos);
  }
  return p;
}

// Every row of f32 pools [n_blocks, bs, Hkv, hd], rounded to a KV type, as doubles.
std::vector<double> rounded_pool(DType dtype, const HostTensor& pool) {
  std::vector<float> values = pool.values();
  const int64_t hd = pool.shape[3];
  for (size_t row = 0; row < values.size(); row += static_cast<size_t>(hd)) round_kv_row(dtype, values.data() + row, hd);
  return widen(values);
}

std::vector<OpCase> kv_store_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t block_size, Hkv, hd;
  };
  for (DType kv_dtype : {DType::F32, DType::BF16, DType::F16, DType::Q8_0}) {
    for (const Shape& s : {Shape{16, 1, 16}, Shape{5, 3, 7}, Shape{3, 2, 13}, Shape{16, 2, 64}, Shape{5, 1, 32}}) {
      if (kv_dtype == DType::Q8_0 && s.hd % kKVQuantGroup != 0) continue;  // q8_0 needs whole groups
      if (kv_dtype == DType::F32 && s.hd >= 32) continue;                  // the cases f32 always had
      std::mt19937 rng(static_cast<unsigned>(500 + s.block_size + s.Hkv + s.hd));
      // Prefill of 9 tokens into sequence 0 (positions 2..10), one decode token for sequence 1.
      std::vector<std::pair<int, int>> batch;
      for (int pos = 2; pos < 11; ++pos) batch.push_back({0, pos});
      batch.push_back({1, 17});
      auto p = make_paged(rng, s.block_size, s.Hkv, s.hd, {11, 18}, batch);
      const int64_t T = static_cast<int64_t>(batch.size());
      auto k = std::make_shared<HostTensor>(make_tensor(DType::F32, {T, s.Hkv, s.hd}));
      auto v = std::make_shared<HostTensor>(make_tensor(DType::F32, {T, s.Hkv, s.hd}));
      fill_random(*k, rng, -3.0f, 3.0f);
      fill_random(*v, rng, -3.0f, 3.0f);
      OpCase c;
      c.op = "kv_store";
      c.shape = fmt("%s T=%lld Hkv=%lld hd=%lld block=%lld", kv_name(kv_dtype), (long long)T, (long long)s.Hkv,
                    (long long)s.hd, (long long)s.block_size);
      c.run = [=](Backend& b) {
        DeviceKV kv = upload_kv(b, kv_dtype, p->keys, p->values);
        DeviceTensor d_k = upload(b, *k), d_v = upload(b, *v);
        const std::vector<KVSlot> slots = p->slots();
        b.kv_store(kv.view, d_k.view, d_v.view, slots);
        return Output{download_kv(b, kv), true};
      };
      c.reference = [=] {
        HostTensor keys = p->keys, values = p->values;
        for (int64_t t = 0; t < T; ++t) {
          const auto& table = p->tables[static_cast<size_t>(p->seq_of_token[t])];
          const int pos = p->position_of_token[t];
          const int64_t block = table[static_cast<size_t>(pos / s.block_size)], offset = pos % s.block_size;
          for (int64_t i = 0; i < s.Hkv * s.hd; ++i) {
            keys.set((block * s.block_size + offset) * s.Hkv * s.hd + i, k->get(t * s.Hkv * s.hd + i));
            values.set((block * s.block_size + offset) * s.Hkv * s.hd + i, v->get(t * s.Hkv * s.hd + i));
          }
        }
        std::vector<double> ref = rounded_pool(kv_dtype, keys);
        const auto vals = rounded_pool(kv_dtype, values);
        ref.insert(ref.end(), vals.begin(), vals.end());
        return ref;
      };
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<OpCase> attention_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t H, Hkv, hd, block_size;
    std::vector<int> lengths;                  // per sequence
    std::vector<std::pair<int, int>> batch;    // (sequence, position) per token
    const char* what;
    int32_t window = 0;                        // > 0: the last `window` keys only
  };
  auto prefill = [](int seq, int from, int to) {
    std::vector<std::pair<int, int>> b;
    for (int pos = from; pos < to; ++pos) b.push_back({seq, pos});
    return b;
  };
  auto concat = [](std::vector<std::pair<int, int>> a, const std::vector<std::pair<int, int>>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const std::vector<Shape> shapes = {
      // GQA ratio 1: MHA, one decode token.
      {3, 3, 8, 16, {21}, {{0, 20}}, "decode"},
      // ratio 3: a mixed batch, prefill of one sequence plus decode tokens of two others.
      {6, 2, 13, 3, {9, 40, 1}, concat(prefill(0, 2, 9), {{1, 39}, {2, 0}}), "mixed"},
      // ratio 8: MQA-like, a long causal prefill from position 0 over many small blocks.
      {8, 1, 24, 5, {37}, prefill(0, 0, 37), "prefill"},
      // ratio 1 again with T = many decode tokens of different lengths.
      {2, 2, 10, 4, {1, 2, 7, 16, 33}, {{0, 0}, {1, 1}, {2, 6}, {3, 15}, {4, 32}}, "batched decode"},
      // Long contexts with few query groups: backends split the keys over threads and merge.
      {6, 2, 64, 16, {901}, {{0, 900}}, "long decode"},
      {9, 3, 32, 16, {1200, 40, 700}, {{0, 1199}, {1, 39}, {2, 699}}, "long batched decode"},
      // Decode shapes of real models (blocks of 16, head_dim 64 / 128 / 16): few rows per KV
      // head, partial last blocks; ratio 8 has more rows than a register tile holds.
      {9, 3, 64, 16, {37, 5}, {{0, 36}, {1, 4}}, "decode hd 64"},
      {16, 2, 128, 16, {50}, {{0, 49}}, "decode gqa 8 hd 128"},
      {4, 1, 16, 16, {17, 33, 16}, {{0, 16}, {1, 32}, {2, 15}}, "decode mqa hd 16"},
      {12, 4, 64, 16, {300}, prefill(0, 260, 300), "prefill tail hd 64"},
      // Sliding windows: a prefill longer than the window from position 0 (rows whose window
      // starts mid-block and mid-group), decode tokens far past it (split keys), a window
      // wider than the prefix, and Gemma 3's shape (MQA, head_dim 256).
      {8, 1, 24, 5, {37}, prefill(0, 0, 37), "window prefill", 6},
      {6, 2, 13, 3, {9, 40, 1}, concat(prefill(0, 2, 9), {{1, 39}, {2, 0}}), "window mixed", 4},
      {9, 3, 32, 16, {1200, 40, 700}, {{0, 1199}, {1, 39}, {2, 699}}, "window long batched decode", 100},
      {4, 1, 16, 16, {17, 33, 16}, {{0, 16}, {1, 32}, {2, 15}}, "window decode mqa hd 16", 17},
      {4, 1, 256, 16, {70, 9}, concat(prefill(0, 40, 70), {{1, 8}}), "window prefill gemma3 hd 256", 20},
      {4, 1, 256, 16, {1500}, {{0, 1499}}, "window long decode gemma3 hd 256", 512},
  };
  for (DType kv_dtype : {DType::F32, DType::BF16, DType::F16, DType::Q8_0})
  for (const Shape& s : shapes) {
    // Each narrower type on the shapes of real models (q8_0 needs head_dim a multiple of 32),
    // bf16 / f16 also on two odd ones (scalar tails, chunks across blocks).
    const bool odd_shape = std::string(s.what) == "mixed" || std::string(s.what) == "window prefill";
    if (kv_dtype != DType::F32 && s.hd % kKVQuantGroup != 0 && !(odd_shape && kv_dtype != DType::Q8_0)) continue;
    std::mt19937 rng(static_cast<unsigned>(600 + s.H * 10 + s.hd));
    auto p = make_paged(rng, s.block_size, s.Hkv, s.hd, s.lengths, s.batch, kv_dtype);
    const int64_t T = static_cast<int64_t>(s.batch.size());
    auto q = std::make_shared<HostTensor>(make_tensor(DType::F32, {T, s.H, s.hd}));
    fill_random(*q, rng, -1.5f, 1.5f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.hd));
    OpCase c;
    c.op = "attention";
    c.shape = fmt("%s %s T=%lld H=%lld Hkv=%lld (gqa %lld) hd=%lld block=%lld seqs=%zu window=%d", kv_name(kv_dtype), s.what,
                  (long long)T, (long long)s.H, (long long)s.Hkv, (long long)(s.H / s.Hkv), (long long)s.hd,
                  (long long)s.block_size, s.lengths.size(), s.window);
    c.run = [=](Backend& b) {
      HostTensor out = make_tensor(DType::F32, {T, s.H, s.hd});
      DeviceKV kv = upload_kv(b, kv_dtype, p->keys, p->values);
      DeviceTensor d_q = upload(b, *q), d_out = upload(b, out);
      const std::vector<KVSlot> slots = p->slots();
      b.attention(d_out.view, d_q.view, kv.view, slots, scale, s.window);
      download(b, d_out, out);
      return Output{out.values(), true};
    };
    // Naive softmax(q k^T * scale) v over keys [0, position] of the token's own sequence (the
    // last `window` of them with a window), from the flat per-sequence K/V arrays (no blocks
    // involved), in double.
    c.reference = [=] {
      std::vector<double> ref;
      const int64_t group = s.H / s.Hkv;
      for (int64_t t = 0; t < T; ++t) {
        const auto& K = p->flat_k[static_cast<size_t>(p->seq_of_token[t])];
        const auto& V = p->flat_v[static_cast<size_t>(p->seq_of_token[t])];
        const int n_keys = p->position_of_token[t] + 1;
        const int first = s.window > 0 ? std::max(0, n_keys - s.window) : 0;
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t kv = h / group;
          std::vector<double> scores(static_cast<size_t>(n_keys), -INFINITY);  // exp: 0 outside the window
          double max_score = -INFINITY;
          for (int j = first; j < n_keys; ++j) {
            double dot = 0;
            for (int64_t d = 0; d < s.hd; ++d) {
              dot += double(q->get((t * s.H + h) * s.hd + d)) * K[static_cast<size_t>((j * s.Hkv + kv) * s.hd + d)];
            }
            scores[static_cast<size_t>(j)] = dot * double(scale);
            max_score = std::max(max_score, scores[static_cast<size_t>(j)]);
          }
          double total = 0;
          for (double& sc : scores) total += (sc = std::exp(sc - max_score));
          for (int64_t d = 0; d < s.hd; ++d) {
            double acc = 0;
            for (int j = first; j < n_keys; ++j) {
              acc += scores[static_cast<size_t>(j)] / total * V[static_cast<size_t>((j * s.Hkv + kv) * s.hd + d)];
            }
            ref.push_back(acc);
          }
        }
      }
      return ref;
    };
    cases.push_back(c);
  }
  return cases;
}

std::vector<OpCase> elementwise_cases() {
  std::vector<OpCase> cases;
  struct Shape {
    int64_t T, F, pad;
    int alias;  // 0: separate output, 1: out aliases the first input, 2: the second
  };
  for (const Shape& s : {Shape{1, 37, 0, 0}, Shape{9, 131, 4, 0}, Shape{5, 67, 0, 1}, Shape{3, 29, 2, 2}}) {
    for (const char* op : {"silu_mul", "gelu_tanh_mul", "scale", "add"}) {
      const std::string name = op;
      const bool silu = name == "silu_mul", gelu = name == "gelu_tanh_mul", scale = name == "scale";
      if ((silu || gelu || scale) && s.alias == 2) continue;  // they promise only out == first input
      std::mt19937 rng(static_cast<unsigned>(700 + s.T + s.F + silu + 2 * gelu + 3 * scale));
      const float factor = 25.25f;  // Gemma 3 270M's bf16 sqrt(640)
      auto a = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.T, s.F}, s.pad));
      auto bb = std::make_shared<HostTensor>(make_tensor(DType::F32, {s.T, s.F}, s.pad));
      fill_random(*a, rng, -12.0f, 12.0f);  // silu's tails: ~0 and ~x
      fill_random(*bb, rng, -2.0f, 2.0f);
      OpCase c;
      c.op = op;
      c.shape = fmt("%s%s", a->describe().c_str(),
                    s.alias == 1 ? " out=first" : s.alias == 2 ? " out=second" : "");
      c.run = [=](Backend& b) {
        HostTensor x = *a, y = *bb, out = make_tensor(DType::F32, {s.T, s.F}, s.pad);
        DeviceTensor d_x = upload(b, x), d_y = upload(b, y), d_out = upload(b, out);
        const Tensor& target = s.alias == 1 ? d_x.view : s.alias == 2 ? d_y.view : d_out.view;
        if (silu) b.silu_mul(target, d_x.view, d_y.view);
        else if (gelu) b.gelu_tanh_mul(target, d_x.view, d_y.view);
        else if (scale) b.scale(target, d_x.view, factor);
        else b.add(target, d_x.view, d_y.view);
        HostTensor& result = s.alias == 1 ? x : s.alias == 2 ? y : out;
        download(b, s.alias == 1 ? d_x : s.alias == 2 ? d_y : d_out, result);
        return Output{result.values(), result.padding_intact()};
      };
      c.reference = [=] {
        std::vector<double> ref;
        for (int64_t i = 0; i < a->numel(); ++i) {
          const double g = a->get(i), u = bb->get(i);
          // PyTorch's gelu(approximate="tanh") in double.
          const double gelu_g = 0.5 * g * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g)));
          ref.push_back(silu ? g / (1.0 + std::exp(-g)) * u : gelu ? gelu_g * u : scale ? g * double(factor) : g + u);
        }
        return ref;
      };
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<OpCase> all_cases() {
  std::vector<OpCase> cases;
  for (auto&& group : {embedding_cases(), block_embedding_cases(), rmsnorm_cases(), matmul_cases(), quantised_matmul_cases(), rope_cases(),
                       kv_store_cases(), attention_cases(), elementwise_cases()}) {
    cases.insert(cases.end(), group.begin(), group.end());
  }
  return cases;
}

// The pool the backends under test run on: 3 threads, so work splits unevenly over threads.
ThreadPool& test_pool() {
  static ThreadPool pool(3);
  return pool;
}

}  // namespace

// The oracle (cpu, one thread) against double-precision implementations of the ops.
TEST_CASE(cpu_oracle_matches_double_reference) {
  auto oracle = create_backend("cpu", {});
  std::set<std::string> ops;
  for (const OpCase& c : all_cases()) {
    const Output out = c.run(*oracle);
    const double err = normalised_error(out.values, c.reference());
    std::printf("  %-10s %-62s %-4s err %.2e\n", c.op.c_str(), c.shape.c_str(), "cpu", err);
    CHECK_MSG(err <= kOracleBound, c.op << " " << c.shape << ": oracle error " << err << " > " << kOracleBound);
    CHECK_MSG(out.padding_intact, c.op << " " << c.shape << ": wrote outside its view (or changed an input)");
    ops.insert(c.op);
  }
  CHECK_EQ(ops.size(), size_t(10));  // every op of backend.h is covered
}

namespace {

// What is wrong with `backend` against the oracle's `expected` outputs of `cases`, one line per
// case at fault: an error over its bound, a write outside its view, or an op the backend does
// not implement (Unsupported) or fails on. Empty when it matches everywhere.
std::vector<std::string> problems_against_oracle(Backend& backend, const std::vector<OpCase>& cases,
                                                 const std::vector<Output>& expected) {
  const std::string name = backend.name();
  std::vector<std::string> problems;
  for (size_t i = 0; i < cases.size(); ++i) {
    const OpCase& c = cases[i];
    if (c.oracle_only && name != "cpu") continue;
    const std::string what = name + " " + c.op + " " + c.shape;
    Output out;
    try {
      out = c.run(backend);
    } catch (const Error& e) {
      // A usable backend implements every op of backend.h: an op it leaves Unsupported would
      // make the engine fail on it, so it is a failure here, naming the op.
      problems.push_back(what + ": " + (e.kind() == ErrorKind::Unsupported ? "not implemented: " : "error: ") +
                         e.what());
      continue;
    }
    // bf16 weights, or a backend that rounds this weight format's activations to bf16.
    const bool bf16_math = c.weight_dtype == DType::BF16 || backend.matmul_activation_dtype(c.weight_dtype) == DType::BF16;
    const double bound = bf16_math ? kBF16Bound : kF32Bound;
    const double err = normalised_error(out.values, widen(expected[i].values));
    std::printf("  %-10s %-62s %-6s err %.2e (bound %.0e)\n", c.op.c_str(), c.shape.c_str(), name.c_str(),
                err, bound);
    if (!(err <= bound)) problems.push_back(what + ": error " + std::to_string(err) + " > " + std::to_string(bound));
    if (!out.padding_intact) problems.push_back(what + ": wrote outside its view");
  }
  return problems;
}

std::vector<Output> oracle_outputs(const std::vector<OpCase>& cases) {
  auto oracle = create_backend("cpu", {});
  std::vector<Output> expected;
  for (const OpCase& c : cases) expected.push_back(c.run(*oracle));
  return expected;
}

}  // namespace

// Every usable backend (the oracle itself included, on a 3-thread pool) against the oracle.
TEST_CASE(every_usable_backend_matches_cpu_oracle) {
  const std::vector<OpCase> cases = all_cases();
  const std::vector<Output> expected = oracle_outputs(cases);
  const std::vector<std::string> names = usable_backends();
  CHECK(std::find(names.begin(), names.end(), "cpu") != names.end());
  for (const std::string& name : names) {
    BackendOptions options;
    options.pool = &test_pool();
    auto backend = create_backend(name, options);
    CHECK_EQ(backend->name(), name);
    for (const std::string& problem : problems_against_oracle(*backend, cases, expected)) {
      CHECK_MSG(false, problem);
    }
  }
}

// The comparison above cannot pass a backend that implements nothing: every op of backend.h is
// reported as not implemented, by name.
TEST_CASE(a_backend_that_implements_nothing_fails_the_oracle_comparison) {
  struct Bare final : Backend {
    std::string name() const override { return "bare"; }
  };
  Bare bare;
  const std::vector<OpCase> cases = all_cases();
  const std::vector<std::string> problems = problems_against_oracle(bare, cases, oracle_outputs(cases));
  std::set<std::string> ops;
  for (const OpCase& c : cases) {
    if (!c.oracle_only) ops.insert(c.op);
  }
  CHECK_EQ(ops.size(), size_t(10));
  for (const std::string& op : ops) {
    const bool named = std::any_of(problems.begin(), problems.end(), [&](const std::string& p) {
      return p.find("bare " + op + " ") == 0 && p.find("not implemented") != std::string::npos &&
             p.find("'" + op + "'") != std::string::npos;
    });
    CHECK_MSG(named, "op " << op << " is not reported as not implemented");
  }
}

// The framework a new backend plugs into: every op defaults to Unsupported (naming the op),
// registration by score, "auto", and errors for unknown or unusable names.
TEST_CASE(backend_registry_and_unsupported_defaults) {
  struct Bare final : Backend {
    std::string name() const override { return "bare"; }
  };
  Bare bare;
  float scratch[8] = {};
  const Tensor t = Tensor::contiguous(scratch, DType::F32, {2, 4});
  const Tensor t3 = Tensor::contiguous(scratch, DType::F32, {1, 2, 4});
  const int32_t ids[] = {0, 1};
  const KVSlot slots[] = {{ids, 0}};
  const KVLayerView cache{t, t};
  using K = ErrorKind;
  CHECK_THROWS_WITH(bare.embedding(t, t, ids), K::Unsupported, "bare", "embedding");
  CHECK_THROWS_WITH(bare.rmsnorm(t, t, t, 1e-5f), K::Unsupported, "bare", "rmsnorm");
  CHECK_THROWS_WITH(bare.matmul(t, t, t, nullptr), K::Unsupported, "bare", "matmul");
  CHECK_THROWS_WITH(bare.rope(t3, std::span<const int32_t>(ids, 1), t), K::Unsupported, "rope");
  CHECK_THROWS_WITH(bare.kv_store(cache, t3, t3, slots), K::Unsupported, "kv_store");
  CHECK_THROWS_WITH(bare.attention(t3, t3, cache, slots, 1.0f, 0), K::Unsupported, "attention");
  CHECK_THROWS_WITH(bare.silu_mul(t, t, t), K::Unsupported, "silu_mul");
  CHECK_THROWS_WITH(bare.gelu_tanh_mul(t, t, t), K::Unsupported, "gelu_tanh_mul");
  CHECK_THROWS_WITH(bare.scale(t, t, 2.0f), K::Unsupported, "scale");
  CHECK_THROWS_WITH(bare.add(t, t, t), K::Unsupported, "'add'");

  CHECK_THROWS_WITH(create_backend("no-such-backend", {}), K::InvalidArgument, "no-such-backend", "cpu");
  BackendInfo unusable;
  unusable.name = "test-unusable";
  unusable.score = 1000;
  unusable.description = "needs hardware this machine lacks";
  unusable.usable = [] { return false; };
  unusable.create = [](const BackendOptions&) -> std::unique_ptr<Backend> { return std::make_unique<Bare>(); };
  register_backend(unusable);
  CHECK_THROWS_WITH(create_backend("test-unusable", {}), K::Unsupported, "test-unusable", "cannot run here");
  const auto names = usable_backends();
  CHECK(std::find(names.begin(), names.end(), "test-unusable") == names.end());
  CHECK_EQ(create_backend("auto", {})->name(), names.front());  // the best usable one
  // Registered names are sorted best first.
  const auto& all = registered_backends();
  for (size_t i = 1; i < all.size(); ++i) CHECK(all[i - 1].score >= all[i].score);
}

// Shape disagreements are argument errors, not crashes (the oracle checks what it is given).
TEST_CASE(cpu_rejects_mismatched_shapes) {
  auto cpu = create_backend("cpu", {});
  std::vector<float> a(64), b(64), c(64);
  const Tensor x = Tensor::contiguous(a.data(), DType::F32, {2, 8});
  const Tensor w = Tensor::contiguous(b.data(), DType::F32, {4, 7});
  const Tensor out = Tensor::contiguous(c.data(), DType::F32, {2, 4});
  CHECK_THROWS_WITH(cpu->matmul(out, x, w, nullptr), ErrorKind::InvalidArgument, "matmul");
  const Tensor y = Tensor::contiguous(b.data(), DType::F32, {2, 7});
  CHECK_THROWS_WITH(cpu->add(x, x, y), ErrorKind::InvalidArgument, "add");
  const Tensor table = Tensor::contiguous(b.data(), DType::F32, {8, 8});
  const int32_t bad_ids[] = {3, 8};
  CHECK_THROWS_WITH(cpu->embedding(x, table, bad_ids), ErrorKind::InvalidArgument, "8");
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
