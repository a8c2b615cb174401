#include "models/decoder.h"

#include <algorithm>
#include <cmath>

#include "opencamp/error.h"

namespace opencamp {
namespace {

const Tensor* optional(const Tensor& t) { return t.empty() ? nullptr : &t; }

}  // namespace

DecoderScratch::DecoderScratch(Backend& backend, const ModelConfig& c, int max_tokens_,
                               int max_logit_rows_)
    : max_tokens(max_tokens_), max_logit_rows(max_logit_rows_) {
  const int64_t T = max_tokens, D = c.hidden_size, F = c.intermediate_size;
  const int64_t q_dim = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t sizes[] = {T * D, T * D, T * (q_dim + 2 * kv_dim), T * q_dim, T * 2 * F,
                           static_cast<int64_t>(max_logit_rows) * c.vocab_size};
  int64_t total = 0;
  for (int64_t n : sizes) total += (n + 15) / 16 * 16;  // keep each tensor 64-byte aligned
  memory = backend.allocate(static_cast<size_t>(total) * sizeof(float));
  float* next = static_cast<float*>(memory->data());
  auto take = [&](std::initializer_list<int64_t> shape) {
    Tensor t = Tensor::contiguous(next, DType::F32, shape, backend.device());
    next += (t.numel() + 15) / 16 * 16;
    return t;
  };
  x = take({T, D});
  h = take({T, D});
  qkv = take({T, q_dim + 2 * kv_dim});
  attn = take({T, q_dim});
  gate_up = take({T, 2 * F});
  logits = take({static_cast<int64_t>(max_logit_rows), c.vocab_size});
}

void decoder_forward(const Model& model, Backend& backend, std::span<const KVLayerView> kv_layers,
                     const ForwardBatch& batch, DecoderScratch& s, std::span<float> logits_host) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  if (T == 0 || T > s.max_tokens) {
    fail(ErrorKind::Internal, "forward batch of ", T, " tokens (scratch holds ", s.max_tokens, ")");
  }
  const int64_t n_logit_rows = static_cast<int64_t>(batch.logit_rows.size());
  if (static_cast<int64_t>(logits_host.size()) != n_logit_rows * c.vocab_size) {
    fail(ErrorKind::Internal, "logits buffer has ", logits_host.size(), " floats, need ",
         n_logit_rows * c.vocab_size);
  }
  for (int64_t i = 0; i < n_logit_rows; ++i) {
    if (batch.logit_rows[i] < 0 || batch.logit_rows[i] >= T || (i > 0 && batch.logit_rows[i] <= batch.logit_rows[i - 1])) {
      fail(ErrorKind::Internal, "logit rows must be ascending indices into the batch");
    }
  }
  const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, hd = c.head_dim, F = c.intermediate_size;
  const Tensor x = s.x.rows(0, T), h = s.h.rows(0, T), attn = s.attn.rows(0, T);
  const Tensor qkv = s.qkv.rows(0, T), gate_up = s.gate_up.rows(0, T);
  const Tensor q = qkv.columns(0, Hq * hd), k = qkv.columns(Hq * hd, Hkv * hd);
  const Tensor v = qkv.columns((Hq + Hkv) * hd, Hkv * hd);
  const Tensor q_heads = q.split_last(hd), k_heads = k.split_last(hd), v_heads = v.split_last(hd);
  const Tensor attn_heads = attn.split_last(hd);
  const Tensor gate = gate_up.columns(0, F), up = gate_up.columns(F, F);
  const bool gelu = c.hidden_act == "gelu_pytorch_tanh";

  if (static_cast<int>(batch.layer_groups.size()) != c.num_layers) {
    fail(ErrorKind::Internal, "forward batch: ", batch.layer_groups.size(), " layer groups for ", c.num_layers, " layers");
  }
  for (int group : batch.layer_groups) {
    if (group < 0 || group >= static_cast<int>(batch.group_slots.size()) ||
        static_cast<int64_t>(batch.group_slots[static_cast<size_t>(group)].size()) != T) {
      fail(ErrorKind::Internal, "forward batch: a layer group without one KV slot per token");
    }
  }
  backend.begin_forward({batch.tokens, batch.positions, batch.group_slots, n_logit_rows, batch.logit_rows});
  struct EndForward {  // also when an op throws, so a device backend never stays mid-pass
    Backend& backend;
    ~EndForward() { backend.end_forward(); }
  } end_forward{backend};

  backend.embedding(x, w.embed, batch.tokens);
  if (w.embedding_scale != 1.0f) backend.scale(x, x, w.embedding_scale);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& L = w.layers[static_cast<size_t>(layer)];
    const KVLayerView& kv = kv_layers[static_cast<size_t>(layer)];
    const int32_t window = c.layer_window(layer);  // 0: a global layer
    const std::span<const KVSlot> slots = batch.group_slots[static_cast<size_t>(batch.layer_groups[static_cast<size_t>(layer)])];
    const Tensor& inv_freq = window > 0 && !w.rope_inv_freq_local.empty() ? w.rope_inv_freq_local : w.rope_inv_freq;

    backend.rmsnorm(h, x, L.attn_norm, c.rms_norm_eps);
    if (!L.wqkv.empty()) {  // one pass over h for q, k and v
      backend.matmul(qkv, h, L.wqkv, optional(L.bqkv));
    } else {
      backend.matmul(q, h, L.wq, optional(L.bq));
      backend.matmul(k, h, L.wk, optional(L.bk));
      backend.matmul(v, h, L.wv, optional(L.bv));
    }
    if (!L.q_norm.empty()) {  // per-head RMSNorm (qwen3, gemma3), before rope
      backend.rmsnorm(q_heads, q_heads, L.q_norm, c.rms_norm_eps);
      backend.rmsnorm(k_heads, k_heads, L.k_norm, c.rms_norm_eps);
    }
    backend.rope(q_heads, batch.positions, inv_freq);
    backend.rope(k_heads, batch.positions, inv_freq);
    backend.kv_store(kv, k_heads, v_heads, slots);
    backend.attention(attn_heads, q_heads, kv, slots, w.attention_scale, window);
    backend.matmul(h, attn, L.wo, optional(L.bo));
    if (!L.post_attn_norm.empty()) backend.rmsnorm(h, h, L.post_attn_norm, c.rms_norm_eps);
    backend.add(x, x, h);

    backend.rmsnorm(h, x, L.ffn_norm, c.rms_norm_eps);
    if (!L.w_gate_up.empty()) {  // one pass over h for gate and up
      backend.matmul(gate_up, h, L.w_gate_up, optional(L.b_gate_up));
    } else {
      backend.matmul(gate, h, L.w_gate, optional(L.b_gate));
      backend.matmul(up, h, L.w_up, optional(L.b_up));
    }
    if (gelu) {
      backend.gelu_tanh_mul(gate, gate, up);
    } else {
      backend.silu_mul(gate, gate, up);
    }
    backend.matmul(h, gate, L.w_down, optional(L.b_down));
    if (!L.post_ffn_norm.empty()) backend.rmsnorm(h, h, L.post_ffn_norm, c.rms_norm_eps);
    backend.add(x, x, h);
  }

  // Only the rows that need logits go through the final norm and the (large) output matrix:
  // the norm gathers them, a run of consecutive rows at a time, to the front of h.
  if (n_logit_rows == 0) return;
  for (int64_t i = 0; i < n_logit_rows;) {
    int64_t run = 1;
    while (i + run < n_logit_rows && batch.logit_rows[i + run] == batch.logit_rows[i] + run) ++run;
    const int64_t first = batch.logit_rows[i];
    backend.rmsnorm(h.rows(i, i + run), x.rows(first, first + run), w.final_norm, c.rms_norm_eps);
    i += run;
  }
  const Tensor h_out = h.rows(0, n_logit_rows);
  for (int64_t begin = 0; begin < n_logit_rows; begin += s.max_logit_rows) {
    const int64_t end = std::min<int64_t>(n_logit_rows, begin + s.max_logit_rows);
    const Tensor logits = s.logits.rows(0, end - begin);
    backend.matmul(logits, h_out.rows(begin, end), w.lm_head, nullptr);
    backend.to_host(logits_host.data() + begin * c.vocab_size, logits);
  }
}

}  // namespace opencamp
