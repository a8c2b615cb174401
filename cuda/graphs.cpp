// CUDA graph capture and replay, and the pass that brackets them (see graphs.h).
#include "backend_impl.h"

namespace opencamp::cuda {

void CudaBackend::Impl::drop_graphs() {
  for (auto& [k, entry] : graphs) cudaGraphExecDestroy(entry.exec);
  graphs.clear();
  seen.clear();
  replay = nullptr;
}

void CudaBackend::Impl::bump_generation() {
  ++generation;
  if (mode == Mode::Replay && !launched) {
    fail(ErrorKind::Internal, "cuda backend: device buffers moved during a replayed pass");
  }
  drop_graphs();
}

void CudaBackend::Impl::graph_contract_broken(const char* op, const char* why) {
  if (mode == Mode::Replay) {
    auto it = graphs.find(key);
    if (it != graphs.end()) {
      cudaGraphExecDestroy(it->second.exec);
      graphs.erase(it);
    }
    replay = nullptr;
  }
  seen.erase(key);  // the next pass of this shape starts over, eagerly
  fail(ErrorKind::Internal, "cuda backend, op ", op, " (op #", mode == Mode::Replay ? op_index : recorded.size(),
       " of the pass): ", why, ". Passes of one batch shape must repeat the same ops on the same "
       "tensors to be replayed as a CUDA graph; set OPENCAMP_CUDA_GRAPHS=0 to run without graphs");
}

bool CudaBackend::Impl::enter(const char* op, uint64_t fingerprint, bool uses_pass_data) {
  if (!graph_mode()) return true;
  if (!uses_pass_data) {
    graph_contract_broken(op, "it was given token ids, positions or KV slots other than the pass's");
  }
  if (mode == Mode::Capture) {
    recorded.push_back(fingerprint);
    return true;
  }
  if (op_index >= replay->ops.size() || replay->ops[op_index] != fingerprint) {
    graph_contract_broken(op, "its tensors or arguments differ from the pass captured for this batch shape");
  }
  ++op_index;
  return false;
}

void CudaBackend::Impl::abandon_capture() noexcept {
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(stream(), &graph);
  if (graph != nullptr) cudaGraphDestroy(graph);
  cudaGetLastError();
  context->capture_ended();
}

void CudaBackend::Impl::launch_graph() {
  if (mode == Mode::Capture) {
    flush_pending();
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream(), &graph);
    context->capture_ended();
    launched = true;  // capture is over either way
    check(ended, "cudaStreamEndCapture(stream, &graph)", __FILE__, __LINE__);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = cudaGraphInstantiateWithFlags(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(made, "cudaGraphInstantiateWithFlags(&exec, graph, 0)", __FILE__, __LINE__);
    if (graphs.size() >= kMaxGraphs) {
      auto oldest = std::min_element(graphs.begin(), graphs.end(), [](const auto& a, const auto& b) {
        return a.second.last_use < b.second.last_use;
      });
      cudaGraphExecDestroy(oldest->second.exec);
      graphs.erase(oldest);
    }
    graphs[key] = GraphEntry{exec, std::move(recorded), ++use_clock};
    recorded.clear();
    ++stats.captured_passes;
    OPENCAMP_CUDA_CHECK(cudaGraphLaunch(exec, stream()));
  } else {
    if (op_index != replay->ops.size()) {
      graph_contract_broken("(end of the graph)", "the pass has fewer ops than the one captured for this batch shape");
    }
    launched = true;
    ++stats.replayed_passes;
    OPENCAMP_CUDA_CHECK(cudaGraphLaunch(replay->exec, stream()));
  }
  replay = nullptr;
}

void CudaBackend::Impl::finish_graphed_part(const char* op, uint64_t fingerprint) {
  if (!graph_mode()) {
    flush_pending();
    return;
  }
  if (mode == Mode::Capture) {
    recorded.push_back(fingerprint);
  } else {
    if (op_index >= replay->ops.size() || replay->ops[op_index] != fingerprint) {
      graph_contract_broken(op, "it reads other data than the pass captured for this batch shape");
    }
    ++op_index;
  }
  launch_graph();
}

void CudaBackend::Impl::begin_forward(const ForwardInfo& batch) {
  context->activate();
  rethrow_deferred();
  if (in_pass) fail(ErrorKind::Internal, "cuda backend: begin_forward while a pass is open");
  const size_t T = batch.tokens.size();
  if (batch.positions.size() != T || batch.group_slots.empty()) {
    fail(ErrorKind::InvalidArgument, "cuda backend: a forward pass needs one position and one KV slot per token");
  }
  int64_t max_keys = 0;
  for (const auto& slots : batch.group_slots) {
    if (slots.size() != T) {
      fail(ErrorKind::InvalidArgument, "cuda backend: a forward pass needs one KV slot per token in each layer group");
    }
    for (size_t t = 0; t < T; ++t) {
      if (batch.positions[t] < 0 || slots[t].position < 0 || slots[t].block_table == nullptr) {
        fail(ErrorKind::InvalidArgument, "cuda backend: token ", t, " of the pass has a negative position or no block table");
      }
      max_keys = std::max<int64_t>(max_keys, slots[t].position + 1);
    }
  }
  flush_pending();
  if (pass_batch.upload(batch.tokens, batch.positions, batch.group_slots, last_block_size)) bump_generation();

  pass_tokens = batch.tokens;
  pass_positions = batch.positions;
  pass_slots.assign(batch.group_slots.begin(), batch.group_slots.end());
  uncaught_at_begin = std::uncaught_exceptions();
  mode = Mode::Eager;
  launched = false;
  recorded.clear();
  replay = nullptr;
  op_index = 0;
  graph_shaped = T >= 1 && static_cast<int64_t>(T) <= kMaxGraphTokens && batch.n_logit_rows == static_cast<int64_t>(T);
  pass_key_bound = key_bound(max_keys);
  if (graph_shaped && graphs_enabled && last_block_size > 0) {
    key = GraphKey{static_cast<int64_t>(T), pass_key_bound, last_block_size, generation};
    auto it = graphs.find(key);
    if (it != graphs.end()) {
      mode = Mode::Replay;
      replay = &it->second;
      replay->last_use = ++use_clock;
    } else if (seen.count(key)) {
      OPENCAMP_CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
      mode = Mode::Capture;
    } else {
      if (seen.size() > 4096) seen.clear();
      seen.insert(key);
    }
  }
  if (mode == Mode::Eager) ++stats.eager_passes;
  in_pass = true;
}

void CudaBackend::Impl::end_forward() noexcept {
  if (!in_pass) return;
  const bool failing = std::uncaught_exceptions() > uncaught_at_begin;
  try {
    context->activate();
    if (failing) {
      discard_pending();
      if (mode == Mode::Capture && !launched) abandon_capture();
    } else {
      if (graph_mode()) launch_graph();  // a pass without logits
      flush_pending();
    }
  } catch (...) {
    discard_pending();
    if (mode == Mode::Capture && !launched) abandon_capture();
    if (!deferred_error) deferred_error = std::current_exception();
  }
  in_pass = false;
  mode = Mode::Eager;
  launched = false;
  replay = nullptr;
  recorded.clear();
  pass_tokens = {};
  pass_positions = {};
  pass_slots.clear();
}

}  // namespace opencamp::cuda
