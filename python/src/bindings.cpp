// opencamp._core: thin pybind11 bindings. Every call that computes releases the GIL; streamed
// generation runs on a C++ thread and hands tokens over through a queue.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>

#include "opencamp/opencamp.h"

namespace py = pybind11;
using namespace opencamp;

namespace {

py::array_t<float> new_logits(int64_t rows, int64_t vocab, bool squeeze) {
  if (squeeze) return py::array_t<float>({vocab});
  return py::array_t<float>({rows, vocab});
}

std::vector<int32_t> as_ids(const std::vector<int64_t>& ids) {
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    if (id < INT32_MIN || id > INT32_MAX) {
      throw Error(ErrorKind::InvalidArgument, "token id " + std::to_string(id) + " is out of range");
    }
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

py::dict config_dict(const ModelConfig& c) {
  py::dict d;
  d["model_type"] = c.model_type;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_layers"] = c.num_layers;
  d["num_heads"] = c.num_heads;
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  d["rope_type"] = rope_type_name(c.rope.type);
  d["rope_theta"] = c.rope.theta;
  // Per layer: the sliding window (0: a global layer); the local layers' rope base, or None.
  std::vector<int> windows = c.layer_windows;
  if (windows.empty()) windows.assign(static_cast<size_t>(c.num_layers), 0);
  d["layer_windows"] = windows;
  d["local_rope_theta"] = c.has_local_rope ? py::object(py::float_(c.local_rope.theta)) : py::object(py::none());
  d["bos_token_id"] = c.bos_token_id;
  d["eos_token_ids"] = c.eos_token_ids;
  d["torch_dtype"] = c.torch_dtype;
  return d;
}

// Arguments that reach C++ are taken as Python objects and converted here, so a value that
// does not fit what C++ holds is a ValueError / TypeError naming it, never a failed pybind11
// overload (whose keep_alive would then run on nothing: pybind11 #6154, a SIGSEGV).
int64_t int_argument(py::handle value, const char* name, int64_t low, int64_t high) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be an integer, got " +
                         std::string(py::str(py::type::of(value).attr("__name__"))));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < low || v > high) {
    throw py::value_error(std::string(name) + " must be an integer in [" + std::to_string(low) + ", " +
                          std::to_string(high) + "], got " + std::string(py::str(value)));
  }
  return v;
}

uint64_t seed_argument(py::handle value) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error("seed must be an integer or None");
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("seed must be an integer in [0, 2**64), got " + std::string(py::str(value)));
  }
  return v;
}

// A float parameter: a real number whose float32 value is finite (1e300 is not).
float float_argument(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyIndex_Check(value.ptr()))) {
    throw py::type_error(std::string(name) + " must be a number, got " +
                         std::string(py::str(py::type::of(value).attr("__name__"))));
  }
  const double v = PyFloat_AsDouble(value.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + " is too large, got " + std::string(py::str(value)));
  }
  if (!std::isfinite(static_cast<float>(v))) {
    throw py::value_error(std::string(name) + " must be a finite number within float32's range, got " +
                          std::string(py::str(value)));
  }
  return static_cast<float>(v);
}

template <class T>
T param_argument(py::handle value, const char* name) {
  if constexpr (std::is_same_v<T, float>) {
    return float_argument(value, name);
  } else {
    return static_cast<T>(int_argument(value, name, std::numeric_limits<T>::min(), std::numeric_limits<T>::max()));
  }
}

// Token ids: any iterable of integers in int32's range (the engine checks the vocabulary).
std::vector<int32_t> ids_argument(py::handle value, const char* name) {
  if (PyUnicode_Check(value.ptr()) || PyBytes_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be a list of token ids");
  }
  std::vector<int32_t> out;
  for (py::handle item : py::iter(value)) {
    out.push_back(static_cast<int32_t>(int_argument(item, name, INT32_MIN, INT32_MAX)));
  }
  return out;
}

// Sets one field by name, converted and range-checked to its C++ type.
void set_sampling_field(SamplingParams& params, const std::string& name, py::handle value) {
#define OPENCAMP_SET_SAMPLING(type, field, default_value)      \
  if (name == #field) {                                        \
    params.field = param_argument<type>(value, #field);         \
    return;                                                    \
  }
  OPENCAMP_SAMPLING_PARAMS(OPENCAMP_SET_SAMPLING)
#undef OPENCAMP_SET_SAMPLING
  if (name == "seed") {
    params.seed = value.is_none() ? std::nullopt : std::optional<uint64_t>(seed_argument(value));
    return;
  }
  throw py::type_error("SamplingParams has no field '" + name + "'");
}

SamplingParams sampling_argument(py::handle value) {
  if (value.is_none()) return {};
  if (!py::isinstance<SamplingParams>(value)) {
    throw py::type_error("sampling must be an opencamp._core.SamplingParams or None");
  }
  return value.cast<SamplingParams>();
}

// A token constraint written in Python (opencamp.grammar's matcher): any object with
// fill_mask(words) (words: a writable uint32 numpy view of the mask, zeroed) and
// accept(token). The scheduler calls it on its mask worker thread, taking the GIL for the call.
class PythonConstraint final : public TokenConstraint {
 public:
  explicit PythonConstraint(py::object target) : target_(std::move(target)) {}
  ~PythonConstraint() override {
    // At interpreter exit the GIL can no longer be taken: the object is left to the exit.
#if PY_VERSION_HEX >= 0x030D0000
    const bool finalizing = Py_IsFinalizing() != 0;
#else
    const bool finalizing = _Py_IsFinalizing() != 0;
#endif
    if (!Py_IsInitialized() || finalizing) {
      target_.release();
      return;
    }
    py::gil_scoped_acquire gil;
    target_ = py::object();
  }
  void fill_mask(std::span<uint32_t> allowed) override {
    py::gil_scoped_acquire gil;
    // A view of the scheduler's buffer (no copy), valid during the call only.
    py::array_t<uint32_t> view({static_cast<py::ssize_t>(allowed.size())},
                               {static_cast<py::ssize_t>(sizeof(uint32_t))}, allowed.data(), py::none());
    call("fill_mask", view);
  }
  void accept(int32_t token) override {
    py::gil_scoped_acquire gil;
    call("accept", py::int_(token));
  }

 private:
  void call(const char* method, py::handle argument) {
    try {
      target_.attr(method)(argument);
    } catch (py::error_already_set& e) {
      // Python's error becomes the engine's (it crosses to another thread without the GIL).
      throw Error(ErrorKind::InvalidArgument, std::string("the token constraint failed: ") + e.what());
    }
  }
  py::object target_;
};

// Destroys a Scheduler without the GIL: its loop thread may be waiting for it (a constraint).
struct DeleteWithoutGil {
  void operator()(Scheduler* scheduler) const {
    py::gil_scoped_release release;
    delete scheduler;
  }
};

// allowed_token_ids / logit_bias ({id: bias} or [(id, bias)], ids as int or str) for stage 0.
TokenRules token_rules_argument(py::handle allowed, py::handle bias) {
  TokenRules rules;
  if (!allowed.is_none()) rules.allowed_token_ids = ids_argument(allowed, "allowed_token_ids");
  if (!bias.is_none()) {
    py::object items = py::isinstance<py::dict>(bias) ? py::reinterpret_borrow<py::dict>(bias).attr("items")()
                                                     : py::reinterpret_borrow<py::object>(bias);
    for (py::handle item : py::iter(items)) {
      py::tuple pair = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
      if (pair.size() != 2) throw py::value_error("logit_bias items must be (token id, bias) pairs");
      rules.logit_bias.emplace_back(static_cast<int32_t>(int_argument(pair[0], "logit_bias token id", INT32_MIN, INT32_MAX)),
                                    float_argument(pair[1], "logit_bias"));
    }
  }
  return rules;
}

// The handle Python holds: the request, and its scheduler, kept alive as long as the handle
// (instead of keep_alive, see int_argument).
struct RequestHandle {
  std::shared_ptr<ScheduledRequest> request;
  py::object scheduler;
};

// (logprob, [(id, logprob), ...]): one token's log-probability and its top alternatives.
py::tuple logprobs_tuple(const TokenLogprobs& lp) {
  py::list top(lp.top.size());
  for (size_t i = 0; i < lp.top.size(); ++i) top[i] = py::make_tuple(lp.top[i].id, lp.top[i].logprob);
  return py::make_tuple(lp.logprob, std::move(top));
}

// (token, is_stop), or (token, is_stop, (logprob, top)) when the request asked for
// log-probabilities; None at the end / on timeout.
py::object event_or_none(const std::optional<TokenEvent>& event) {
  if (!event) return py::none();
  if (event->logprobs) return py::make_tuple(event->token, event->is_stop, logprobs_tuple(*event->logprobs));
  return py::make_tuple(event->token, event->is_stop);
}

// A batch of token events as (ids, ends_with_stop, logprobs): only a request's last token can
// be a stop token (it ends the request), so one flag says it; logprobs is None, or each
// token's (logprob, top) when the request asked for log-probabilities.
py::tuple token_batch(const std::vector<TokenEvent>& events) {
  py::list ids(events.size());
  for (size_t i = 0; i < events.size(); ++i) ids[i] = py::int_(events[i].token);
  py::object logprobs = py::none();
  if (!events.empty() && events.front().logprobs) {
    py::list records(events.size());
    for (size_t i = 0; i < events.size(); ++i) {
      records[i] = events[i].logprobs ? py::object(logprobs_tuple(*events[i].logprobs)) : py::none();
    }
    logprobs = std::move(records);
  }
  return py::make_tuple(std::move(ids), !events.empty() && events.back().is_stop, std::move(logprobs));
}

py::dict result_dict(const GenerationResult& r) {
  py::dict d;
  d["tokens"] = r.tokens;
  d["finish_reason"] = finish_reason_name(r.finish_reason);
  d["prompt_tokens"] = r.prompt_tokens;
  d["cached_tokens"] = r.cached_tokens;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  return d;
}

// A GGUF string as str, or as bytes when it is not valid UTF-8 (never altered).
py::object gguf_string(std::string_view s) {
  PyObject* text = PyUnicode_DecodeUTF8(s.data(), static_cast<py::ssize_t>(s.size()), "strict");
  if (text) return py::reinterpret_steal<py::object>(text);
  PyErr_Clear();
  return py::bytes(s.data(), s.size());
}

template <class T>
py::object gguf_numeric_array(const GgufValue& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.count));
  if (v.bytes > 0) std::memcpy(out.mutable_data(), v.data, static_cast<size_t>(v.bytes));
  return std::move(out);
}

// A metadata value as Python: int, float, bool, str; arrays of strings as lists, numeric and
// bool arrays as numpy arrays of the matching dtype.
py::object gguf_value(const GgufValue& v) {
  if (v.is_array()) {
    switch (v.element_type) {
      case GgufType::U8: return gguf_numeric_array<uint8_t>(v);
      case GgufType::I8: return gguf_numeric_array<int8_t>(v);
      case GgufType::U16: return gguf_numeric_array<uint16_t>(v);
      case GgufType::I16: return gguf_numeric_array<int16_t>(v);
      case GgufType::U32: return gguf_numeric_array<uint32_t>(v);
      case GgufType::I32: return gguf_numeric_array<int32_t>(v);
      case GgufType::U64: return gguf_numeric_array<uint64_t>(v);
      case GgufType::I64: return gguf_numeric_array<int64_t>(v);
      case GgufType::F32: return gguf_numeric_array<float>(v);
      case GgufType::F64: return gguf_numeric_array<double>(v);
      case GgufType::Bool: return gguf_numeric_array<bool>(v);
      case GgufType::String: {
        py::list out(v.strings.size());
        for (size_t i = 0; i < v.strings.size(); ++i) out[i] = gguf_string(v.strings[i]);
        return std::move(out);
      }
      case GgufType::Array: break;  // refused by the reader
    }
    throw Error(ErrorKind::Internal, "nested GGUF array");
  }
  switch (v.type) {
    case GgufType::Bool: return py::bool_(v.boolean());
    case GgufType::F32: case GgufType::F64: return py::float_(v.number());
    case GgufType::String: return gguf_string(v.string());
    case GgufType::U64: {
      uint64_t value;
      std::memcpy(&value, v.data, sizeof value);
      return py::int_(value);
    }
    default: return py::int_(*v.integer());
  }
}

std::shared_ptr<GgufFile> open_gguf(const std::filesystem::path& path) {
  py::gil_scoped_release release;
  return GgufFile::open(path);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "opencamp C++ engine (internal; use the opencamp package)";

  // opencamp::Error becomes OpencampError(RuntimeError) with a `kind` attribute
  // ("invalid_argument", "invalid_model", "unsupported", "capacity_exceeded", "queue_full",
  // "internal").
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> error_type;
  error_type.call_once_and_store_result([&]() -> py::object {
    return py::exception<Error>(m, "OpencampError", PyExc_RuntimeError);
  });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      const py::object& type = error_type.get_stored();
      py::object exc = type(e.what());
      exc.attr("kind") = error_kind_name(e.kind());
      PyErr_SetObject(type.ptr(), exc.ptr());
    }
  });

  m.def("version", [] { return std::string(OPENCAMP_VERSION); });
  m.def("build_type", [] { return std::string(OPENCAMP_BUILD_TYPE); });
  m.def("default_threads", &ThreadPool::default_threads);
  m.def("measure_read_bandwidth",
        [](int threads, size_t bytes, int passes) {
          py::gil_scoped_release release;
          ThreadPool pool(threads);
          return measure_read_bandwidth(pool, bytes, passes);
        },
        py::arg("threads") = 0, py::arg("bytes") = size_t{1} << 30, py::arg("passes") = 3,
        "GB/s of a read-only pass over a buffer larger than the caches (the decode speed limit).");
  m.def("backends", [] {
    py::list out;
    for (const auto& info : registered_backends()) {
      py::dict d;
      d["name"] = info.name;
      d["score"] = info.score;
      d["usable"] = info.usable();
      d["description"] = info.description;
      out.append(d);
    }
    return out;
  });
  m.def("architectures", [] {
    py::list out;
    for (const auto& a : registered_architectures()) out.append(py::make_tuple(a.model_type, a.description));
    return out;
  });
  m.def("kv_sliding_pool_blocks", &kv_sliding_pool_blocks, py::arg("window"), py::arg("sequences"),
        py::arg("prefill_chunk") = EngineOptions{}.prefill_chunk,
        "Blocks of kv_block_size positions an engine gives each sliding-window layer of a model with "
        "global layers too, for `sequences` at once (kv_window_sequences); at most the global pool's.");
  m.attr("kv_block_size") = kKVBlockSize;
  m.def("kv_bytes_per_position",
        [](int num_layers, int num_kv_heads, int head_dim, const std::string& kv_cache_dtype) {
          const std::optional<DType> dtype = dtype_from_name(kv_cache_dtype);
          if (!dtype || !is_kv_dtype(*dtype)) {
            fail(ErrorKind::InvalidArgument, "kv_cache_dtype '", kv_cache_dtype, "' is not one of f32, bf16, f16, q8_0");
          }
          return KVCache::bytes_per_position(num_layers, num_kv_heads, head_dim, *dtype);
        },
        py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("kv_cache_dtype") = "f32",
        "Bytes one token position takes in a KV cache of this type in `num_layers` layers of this "
        "shape (keys and values, q8_0's scales): what an engine's cache_stats()['bytes_per_position'] "
        "will say for every layer of a model without sliding windows, or for the global layers of "
        "one with them (each of cache_stats()['groups'] has its own).");
  m.def("load_config",
        [](const std::filesystem::path& path) {
          // A file is a GGUF model (its metadata), as the engine takes one; a folder config.json.
          // The non-throwing query: what it cannot tell (a symlink loop, no permission) goes on
          // to load_model_config, whose error (InvalidModel) names the path.
          std::error_code unknown;
          if (std::filesystem::is_regular_file(path, unknown)) {
            return config_dict(gguf_model_config(*open_gguf(path)));
          }
          return config_dict(load_model_config(path));
        },
        py::arg("model_path"),
        "The hyper-parameters of a Hugging Face folder (config.json) or a GGUF file (metadata).");

  // The weight formats' reference conversions (the definitions every kernel is tested against).
  m.def("dtypes", [] {
    py::list out;
    for (int i = 0; i < kDTypeCount; ++i) {
      const DTypeTraits& t = dtype_traits(static_cast<DType>(i));
      py::dict d;
      d["name"] = t.name;
      d["block_elements"] = t.block_elements;
      d["block_bytes"] = t.block_bytes;
      d["can_quantize"] = t.from_f32 != nullptr;
      out.append(d);
    }
    return out;
  }, "Every element type and block format: name, values per block, bytes per block.");
  auto parse_dtype_name = [](const std::string& name) {
    const std::optional<DType> dtype = dtype_from_name(name);
    if (!dtype) throw Error(ErrorKind::InvalidArgument, "unknown dtype '" + name + "'");
    return *dtype;
  };
  m.def("dequantize",
        [parse_dtype_name](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> data,
                           const std::string& dtype_name) {
          const DType dtype = parse_dtype_name(dtype_name);
          const DTypeTraits& t = dtype_traits(dtype);
          if (t.to_f32 == nullptr) throw Error(ErrorKind::InvalidArgument, dtype_name + " values are not numbers");
          if (static_cast<size_t>(data.size()) % t.block_bytes != 0) {
            throw Error(ErrorKind::InvalidArgument, std::to_string(data.size()) + " bytes are not whole " +
                                                        dtype_name + " blocks of " + std::to_string(t.block_bytes));
          }
          const int64_t count = static_cast<int64_t>(data.size() / t.block_bytes) * t.block_elements;
          py::array_t<float> out(count);
          const uint8_t* in = data.data();
          float* values = out.mutable_data();
          {
            py::gil_scoped_release release;
            t.to_f32(in, values, count);
          }
          return out;
        },
        py::arg("data"), py::arg("dtype"), "Raw blocks (uint8) of `dtype` -> float32 values.");
  m.def("quantize",
        [parse_dtype_name](py::array_t<float, py::array::c_style | py::array::forcecast> values,
                           const std::string& dtype_name) {
          const DType dtype = parse_dtype_name(dtype_name);
          const DTypeTraits& t = dtype_traits(dtype);
          if (t.from_f32 == nullptr) throw Error(ErrorKind::Unsupported, "cannot write " + dtype_name);
          const size_t bytes = dtype_bytes(dtype, values.size());
          py::array_t<uint8_t> out(static_cast<py::ssize_t>(bytes));
          const float* in = values.data();
          uint8_t* blocks = out.mutable_data();
          {
            py::gil_scoped_release release;
            t.from_f32(in, blocks, values.size());
          }
          return out;
        },
        py::arg("values"), py::arg("dtype"), "float32 values -> raw blocks (uint8) of `dtype`.");

  // GGUF files, read by the C++ reader (the same validation and errors as model loading).
  m.def("read_gguf_metadata",
        [](const std::filesystem::path& path) {
          const std::shared_ptr<GgufFile> file = open_gguf(path);
          py::dict out;
          for (const auto& [key, value] : file->metadata()) out[py::str(key)] = gguf_value(value);
          return out;
        },
        py::arg("path"),
        "Every metadata key of a GGUF file -> int, float, bool, str (bytes where a string is not "
        "UTF-8), list of str, or a numpy array for numeric and bool arrays (token scores, types).");
  m.def("gguf_tensors",
        [](const std::filesystem::path& path) {
          const std::shared_ptr<GgufFile> file = open_gguf(path);
          py::list out;
          for (const GgufTensor& t : file->tensors()) {
            std::vector<int64_t> shape(t.shape.begin(), t.shape.begin() + t.ndim);
            out.append(py::make_tuple(t.name, ggml_type_name(t.ggml_type), shape));
          }
          return out;
        },
        py::arg("path"),
        "The tensors of a GGUF file: (name, ggml type name such as \"Q4_K\", shape in numpy "
        "order, i.e. [rows, row length] for a matrix).");

  // The sampling parameters, one object, generated from OPENCAMP_SAMPLING_PARAMS: each
  // attribute refuses (ValueError / TypeError) what its C++ type cannot hold.
  py::class_<SamplingParams> sampling_class(m, "SamplingParams");
  sampling_class.def(py::init([](const py::kwargs& kwargs) {
                 SamplingParams params;
                 for (const auto& [key, value] : kwargs) set_sampling_field(params, py::str(key), value);
                 return params;
               }),
               "SamplingParams(**fields): the engine's defaults, with the fields given.")
      .def("validate", &SamplingParams::validate,
           "Raise OpencampError(invalid_argument) naming the first parameter out of range.")
      .def_property("seed", [](const SamplingParams& p) -> py::object {
                      return p.seed ? py::object(py::int_(*p.seed)) : py::object(py::none());
                    },
                    [](SamplingParams& p, py::handle value) { set_sampling_field(p, "seed", value); })
      .def("__repr__", [](py::object self) {
        std::string out = "SamplingParams(";
        for (py::handle name : self.attr("fields")) {
          out += std::string(py::str(name)) + "=" + std::string(py::repr(self.attr(name))) + ", ";
        }
        return out + "seed=" + std::string(py::repr(self.attr("seed"))) + ")";
      });
  py::list sampling_fields;
#define OPENCAMP_BIND_SAMPLING(type, name, default_value)                                         \
  sampling_class.def_property(#name, [](const SamplingParams& p) { return p.name; },                     \
                        [](SamplingParams& p, py::handle value) { set_sampling_field(p, #name, value); }); \
  sampling_fields.append(#name);
  OPENCAMP_SAMPLING_PARAMS(OPENCAMP_BIND_SAMPLING)
#undef OPENCAMP_BIND_SAMPLING
  sampling_class.attr("fields") = py::tuple(sampling_fields);  // in struct order; seed besides

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::filesystem::path& model_dir, const std::string& backend,
                       const std::string& dtype, int threads, int max_context,
                       int kv_cache_tokens, int prefill_chunk, const std::string& kv_cache_dtype,
                       int kv_window_sequences) {
             EngineOptions options;
             options.backend = backend;
             options.dtype = dtype;
             options.threads = threads;
             options.max_context = max_context;
             options.kv_cache_tokens = kv_cache_tokens;
             options.prefill_chunk = prefill_chunk;
             options.kv_cache_dtype = kv_cache_dtype;
             options.kv_window_sequences = kv_window_sequences;
             py::gil_scoped_release release;
             return std::make_unique<Engine>(model_dir, options);
           }),
           py::arg("model_dir"), py::arg("backend") = "auto", py::arg("dtype") = "auto",
           py::arg("threads") = 0, py::arg("max_context") = 0, py::arg("kv_cache_tokens") = 0,
           py::arg("prefill_chunk") = EngineOptions{}.prefill_chunk, py::arg("kv_cache_dtype") = "auto",
           py::arg("kv_window_sequences") = 0)
      .def_property_readonly("config", [](const Engine& e) { return config_dict(e.config()); })
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("dtype", [](const Engine& e) { return e.model().weight_format(); },
                             "The weights' format: \"bf16\", or for a mixed file the main one with the "
                             "count of matrices per format, e.g. \"q4_k (mixed: 169 q4_k, 43 q6_k)\".")
      .def_property_readonly("weight_types",
                             [](const Engine& e) {
                               py::dict d;
                               for (const auto& [dtype, use] : e.model().weight_types()) {
                                 d[py::str(dtype_name(dtype))] = py::make_tuple(use.tensors, use.bytes);
                               }
                               return d;
                             },
                             "{format: (matrices, bytes)} over the weight matrices, embedding included.")
      .def_property_readonly("matmul_activation_dtype",
                             [](const Engine& e) { return std::string(dtype_name(e.matmul_activation_dtype())); },
                             "What matmuls round activations to: f32 (exact products) or bf16 (bf16 dot "
                             "products, with bf16 weights on CPUs with AVX512_BF16).")
      .def_property_readonly("kv_cache_dtype", [](const Engine& e) { return std::string(dtype_name(e.kv_cache_dtype())); },
                             "What the KV cache holds: f32, bf16, f16 or q8_0 (\"auto\" resolved).")
      .def_property_readonly("threads", &Engine::threads)
      .def_property_readonly("max_context", &Engine::max_context)
      .def_property_readonly("weight_bytes", [](const Engine& e) { return e.model().weight_bytes(); })
      .def("create_sequence", &Engine::create_sequence)
      .def("free_sequence", &Engine::free_sequence, py::arg("seq"))
      .def("sequence_tokens", &Engine::sequence_tokens, py::arg("seq"))
      .def("truncate_sequence", &Engine::truncate_sequence, py::arg("seq"), py::arg("length"),
           "Drops positions from the end; returns the new length (shorter than asked when the "
           "cut falls in a block shared with another sequence, 0 when a sliding-window layer has "
           "released keys the window at that length needs).")
      .def("reuse_prefix",
           [](Engine& e, int seq, const std::vector<int64_t>& prompt) {
             const std::vector<int32_t> ids = as_ids(prompt);
             py::gil_scoped_release release;
             return e.reuse_prefix(seq, ids);
           },
           py::arg("seq"), py::arg("prompt"),
           "Keep the longest prefix of `prompt` the sequence holds (or map one from the prefix "
           "cache); returns the positions reused.")
      .def("cache_stats",
           [](const Engine& e) {
             const auto s = e.cache_stats();
             py::dict d;
             d["used_blocks"] = s.used_blocks;
             d["total_blocks"] = s.total_blocks;
             d["block_size"] = s.block_size;
             d["sequences"] = s.sequences;
             d["cached_blocks"] = s.cached_blocks;
             d["prefix_hit_blocks"] = s.prefix_hit_blocks;
             d["prefix_miss_blocks"] = s.prefix_miss_blocks;
             d["evictions"] = s.evictions;
             d["bytes_per_position"] = s.bytes_per_position;
             d["kept_sequences"] = s.kept_sequences;
             d["kept_blocks"] = s.kept_blocks;
             d["bytes"] = s.bytes;
             py::list groups;  // the layer groups' pools; the counts above are the first's
             for (const auto& g : s.groups) {
               py::dict gd;
               gd["window"] = g.window;
               gd["layers"] = g.layers;
               gd["used_blocks"] = g.used_blocks;
               gd["total_blocks"] = g.total_blocks;
               gd["cached_blocks"] = g.cached_blocks;
               gd["kept_blocks"] = g.kept_blocks;
               gd["bytes_per_position"] = g.bytes_per_position;
               groups.append(gd);
             }
             d["groups"] = groups;
             return d;
           })
      .def("prefill",
           [](Engine& e, int seq, const std::vector<int64_t>& tokens, bool all_positions) {
             const std::vector<int32_t> ids = as_ids(tokens);
             const int64_t vocab = e.config().vocab_size;
             auto logits = new_logits(static_cast<int64_t>(ids.size()), vocab, !all_positions);
             std::span<float> out(logits.mutable_data(), static_cast<size_t>(logits.size()));
             py::gil_scoped_release release;
             e.prefill(seq, ids, out, all_positions);
             return logits;
           },
           py::arg("seq"), py::arg("tokens"), py::arg("all_positions") = false,
           "Append tokens to a sequence; logits of the last token [vocab], or [n, vocab] for all.")
      .def("decode",
           [](Engine& e, const std::vector<int> seqs, const std::vector<int64_t>& tokens) {
             const std::vector<int32_t> ids = as_ids(tokens);
             auto logits = new_logits(static_cast<int64_t>(seqs.size()), e.config().vocab_size, false);
             std::span<float> out(logits.mutable_data(), static_cast<size_t>(logits.size()));
             py::gil_scoped_release release;
             e.decode(seqs, ids, out);
             return logits;
           },
           py::arg("seqs"), py::arg("tokens"), "One token per sequence; logits [n_seqs, vocab].")
      .def("logits",
           [](Engine& e, const std::vector<int64_t>& tokens) {
             const std::vector<int32_t> ids = as_ids(tokens);
             auto logits = new_logits(static_cast<int64_t>(ids.size()), e.config().vocab_size, false);
             std::span<float> out(logits.mutable_data(), static_cast<size_t>(logits.size()));
             py::gil_scoped_release release;
             const int seq = e.create_sequence();
             try {
               e.prefill(seq, ids, out, true);
             } catch (...) {
               e.free_sequence(seq);
               throw;
             }
             e.free_sequence(seq);
             return logits;
           },
           py::arg("tokens"), "Logits of every position of a fresh sequence: [n, vocab].")
      .def("prompt_logprobs",
           [](Engine& e, py::object tokens, py::object top_n) {
             const std::vector<int32_t> ids = ids_argument(tokens, "tokens");
             const int n = static_cast<int>(int_argument(top_n, "top_n", 0, kMaxTopLogprobs));
             const size_t vocab = static_cast<size_t>(e.config().vocab_size);
             std::vector<TokenLogprobs> found;
             {
               py::gil_scoped_release release;
               std::vector<float> logits(ids.size() * vocab);
               const int seq = e.create_sequence();
               try {
                 e.prefill(seq, ids, logits, true);
               } catch (...) {
                 e.free_sequence(seq);
                 throw;
               }
               e.free_sequence(seq);
               // Position i's logits predict token i + 1: the first token has no log-probability.
               for (size_t i = 0; i + 1 < ids.size(); ++i) {
                 found.push_back(token_logprobs(std::span<const float>(logits).subspan(i * vocab, vocab),
                                                ids[i + 1], n));
               }
             }
             py::list out(found.size());
             for (size_t i = 0; i < found.size(); ++i) out[i] = logprobs_tuple(found[i]);
             return out;
           },
           py::arg("tokens"), py::arg("top_n") = 0,
           "Log-probabilities of each prompt token after the first given the ones before it, on "
           "a fresh sequence (the same log-softmax as generated tokens, no penalties): a list of "
           "(logprob, [(id, logprob), ...top_n]) for tokens[1:].");

  py::class_<RequestHandle>(m, "ScheduledRequest")
      .def("next",
           [](RequestHandle& h, py::object timeout) -> py::object {
             const double seconds = timeout.is_none() ? -1.0 : timeout.cast<double>();
             std::optional<TokenEvent> event;
             {
               py::gil_scoped_release release;
               event = h.request->next(seconds);
             }
             return event_or_none(event);
           },
           py::arg("timeout") = py::none(),
           "Next (token, is_stop), or None when finished (or when `timeout` seconds passed: "
           "check timed_out).")
      .def("next_batch",
           [](RequestHandle& h, py::object timeout) -> py::object {
             const double seconds = timeout.is_none() ? -1.0 : timeout.cast<double>();
             std::vector<TokenEvent> events;
             {
               py::gil_scoped_release release;
               events = h.request->next_batch(seconds);
             }
             if (events.empty()) return py::none();
             return token_batch(events);
           },
           py::arg("timeout") = py::none(),
           "Every token queued (waiting for at least one) as (ids, ends_with_stop, logprobs), or None when "
           "finished (or when `timeout` seconds passed: check timed_out).")
      .def("acknowledge", [](RequestHandle& h, size_t tokens) { h.request->acknowledge(tokens); },
           py::arg("tokens"),
           "A collected request's client took `tokens` more (what pauses it is what it has not).")
      .def_property_readonly("id", [](const RequestHandle& h) { return h.request->id(); })
      .def_property_readonly("timed_out", [](const RequestHandle& h) { return h.request->timed_out(); })
      .def("wait_first_token",
           [](RequestHandle& h, py::object timeout) {
             const double seconds = timeout.is_none() ? -1.0 : timeout.cast<double>();
             py::gil_scoped_release release;
             return h.request->wait_first_token(seconds);
           },
           py::arg("timeout") = py::none(),
           "Wait until the first token was sampled (the prompt is cached) or the request ended; "
           "False on timeout.")
      .def("cancel", [](RequestHandle& h) { h.request->cancel(); })
      .def_property_readonly("finished", [](const RequestHandle& h) { return h.request->finished(); })
      .def_property_readonly("queue_seconds", [](const RequestHandle& h) { return h.request->queue_seconds(); })
      .def("wait",
           [](RequestHandle& h) {
             GenerationResult result;
             double queued;
             {
               py::gil_scoped_release release;
               result = h.request->wait();
               queued = h.request->queue_seconds();
             }
             py::dict d = result_dict(result);
             d["queue_seconds"] = queued;
             return d;
           },
           "Wait for the end; returns tokens, finish_reason, prompt_tokens, cached_tokens, "
           "queue_seconds, prefill_seconds, decode_seconds.");

  py::class_<Scheduler, std::unique_ptr<Scheduler, DeleteWithoutGil>>(m, "Scheduler")
      .def(py::init([](Engine& engine, int max_running, int step_tokens, size_t max_waiting,
                       size_t max_unread_tokens, double stream_idle_timeout) {
             SchedulerOptions options;
             options.max_running = max_running;
             options.step_tokens = step_tokens;
             options.max_waiting = max_waiting;
             options.max_unread_tokens = max_unread_tokens;
             options.stream_idle_timeout_seconds = stream_idle_timeout;
             return std::unique_ptr<Scheduler, DeleteWithoutGil>(new Scheduler(engine, options));
           }),
           py::keep_alive<1, 2>(),  // the engine outlives its scheduler
           py::arg("engine"), py::arg("max_running") = SchedulerOptions{}.max_running,
           py::arg("step_tokens") = SchedulerOptions{}.step_tokens,
           py::arg("max_waiting") = SchedulerOptions{}.max_waiting,
           py::arg("max_unread_tokens") = SchedulerOptions{}.max_unread_tokens,
           py::arg("stream_idle_timeout") = SchedulerOptions{}.stream_idle_timeout_seconds,
           "max_unread_tokens: a stream with this many tokens unread is paused off the batch "
           "(its cache kept) until its reader takes one; stream_idle_timeout: seconds a paused "
           "stream's reader may read nothing before it is ended (OpencampError kind 'timeout') "
           "and its blocks freed, 0 for never.")
      .def("submit",
           [](py::object self, py::object prompt, py::object seq, py::object max_tokens,
              py::object sampling, py::object stop_token_ids, py::object ignore_eos,
              py::object logprobs, py::object allowed_token_ids, py::object logit_bias,
              py::object constraint, py::object collected) {
             GenerationRequest request;
             request.prompt = ids_argument(prompt, "prompt");
             request.max_tokens = static_cast<int>(int_argument(max_tokens, "max_tokens", INT32_MIN, INT32_MAX));
             request.sampling = sampling_argument(sampling);
             request.stop_token_ids = ids_argument(stop_token_ids, "stop_token_ids");
             if (!PyBool_Check(ignore_eos.ptr())) throw py::type_error("ignore_eos must be True or False");
             request.ignore_eos = ignore_eos.ptr() == Py_True;
             request.token_rules = token_rules_argument(allowed_token_ids, logit_bias);
             if (!constraint.is_none()) {
               if (!py::hasattr(constraint, "fill_mask") || !py::hasattr(constraint, "accept")) {
                 throw py::type_error("constraint must have fill_mask(words) and accept(token)");
               }
               request.constraint = std::make_shared<PythonConstraint>(constraint);
             }
             request.logprobs = logprobs.is_none()
                                    ? -1
                                    : static_cast<int>(int_argument(logprobs, "logprobs", 0, kMaxTopLogprobs));
             const int sequence = static_cast<int>(int_argument(seq, "seq", -1, INT32_MAX));
             if (!PyBool_Check(collected.ptr())) throw py::type_error("collected must be True or False");
             Scheduler& scheduler = self.cast<Scheduler&>();
             return RequestHandle{scheduler.submit(std::move(request), sequence, {},
                                                   collected.ptr() == Py_True),
                                  self};
           },
           py::arg("prompt"), py::kw_only(), py::arg("seq") = -1, py::arg("max_tokens") = 256,
           py::arg("sampling") = py::none(), py::arg("stop_token_ids") = py::tuple(),
           py::arg("ignore_eos") = false, py::arg("logprobs") = py::none(),
           py::arg("allowed_token_ids") = py::none(), py::arg("logit_bias") = py::none(),
           py::arg("constraint") = py::none(), py::arg("collected") = false,
           "Queue a request (seq: a caller-owned sequence to continue, or -1 for a new one; "
           "sampling: a SamplingParams, None for the engine's defaults; logprobs: None, or "
           "0-20 for each token's log-probability and that many alternatives in its events; "
           "allowed_token_ids, logit_bias ({id: bias}) and constraint (an object with "
           "fill_mask(words: uint32 numpy array, bit t of words[t // 32] allows token t) and "
           "accept(token), called on the scheduler's mask worker) are sampling's stage 0; "
           "collected: its tokens come through collect(), not its own next()); returns a "
           "ScheduledRequest, which keeps this scheduler alive.")
      .def("collect",
           [](Scheduler& scheduler, py::object timeout) {
             const double seconds = timeout.is_none() ? -1.0 : timeout.cast<double>();
             std::vector<Scheduler::Collected> collected;
             {
               py::gil_scoped_release release;
               collected = scheduler.collect(seconds);
             }
             py::list out(collected.size());
             for (size_t i = 0; i < collected.size(); ++i) {
               const auto& c = collected[i];
               py::tuple batch = token_batch(c.tokens);
               out[i] = py::make_tuple(c.request->id(), batch[0], batch[1], c.ended, batch[2]);
             }
             return out;
           },
           py::arg("timeout") = py::none(),
           "The news of every collected request since the last call, one wake-up per step: a "
           "list of (id, token ids, ends_with_stop, ended, logprobs), waiting for some at most `timeout` "
           "seconds (None: until there is some or the scheduler shuts down).")
      .def("stats",
           [](const Scheduler& scheduler) {
             const auto s = scheduler.stats();
             py::dict d;
             d["running"] = s.running;
             d["waiting"] = s.waiting;
             d["idle"] = s.idle;
             d["paused"] = s.paused;
             d["pauses"] = s.pauses;
             d["stream_timeouts"] = s.stream_timeouts;
             d["steps"] = s.steps;
             d["preemptions"] = s.preemptions;
             d["prompt_tokens"] = s.prompt_tokens;
             d["cached_tokens"] = s.cached_tokens;
             d["generated_tokens"] = s.generated_tokens;
             d["batch_tokens"] = s.batch_tokens;
             return d;
           })
      .def("shutdown", &Scheduler::shutdown, py::call_guard<py::gil_scoped_release>(),
           "End every request, stop the loop, free the idle sequences.")
      .def_property_readonly("max_running", [](const Scheduler& s) { return s.options().max_running; })
      .def_property_readonly("step_tokens", [](const Scheduler& s) { return s.options().step_tokens; });
}
