// The one decoder block every supported architecture runs, and the activations it needs.
#pragma once

#include <memory>
#include <span>

#include "opencamp/backend.h"
#include "opencamp/model.h"

namespace opencamp {

// Activation memory for up to `max_tokens` tokens per forward pass, allocated once.
struct DecoderScratch {
  DecoderScratch(Backend& backend, const ModelConfig& config, int max_tokens, int max_logit_rows);

  int max_tokens;
  int max_logit_rows;
  std::shared_ptr<Buffer> memory;
  Tensor x;       // [max_tokens, D] the residual stream
  Tensor h;       // [max_tokens, D] normed input / projection output
  Tensor qkv;     // [max_tokens, (Hq + 2 Hkv) * hd]: q, k and v side by side
  Tensor attn;    // [max_tokens, Hq * hd]
  Tensor gate_up; // [max_tokens, 2F]: gate, then up
  Tensor logits;  // [max_logit_rows, V]
};

struct ForwardBatch {
  std::span<const int32_t> tokens;     // [T]
  std::span<const int32_t> positions;  // [T]
  // [n_groups][T] each token's slot in each layer group's block table (KVCache groups).
  std::span<const std::span<const KVSlot>> group_slots;
  std::span<const int> layer_groups;   // [n_layers] the group of each layer's cache
  std::span<const int32_t> logit_rows; // ascending indices of the tokens that need logits
};

// Runs the batch through every layer, writing each token's K/V into the cache, and copies the
// logits of the tokens listed in logit_rows to `logits_host`: [logit_rows.size(), V]. A batch may
// mix tokens of several sequences (prefill chunks and decode tokens).
// kv_layers: the KV cache as the model sees it, one view per layer (KVCache::layers()).
void decoder_forward(const Model& model, Backend& backend, std::span<const KVLayerView> kv_layers,
                     const ForwardBatch& batch, DecoderScratch& scratch,
                     std::span<float> logits_host);

}  // namespace opencamp
