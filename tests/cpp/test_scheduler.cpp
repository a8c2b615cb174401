// Continuous batching: many requests in one loop give exactly the tokens each gives alone;
// chunked prompts, preemption, cancellation and hundreds of random requests leave no request
// hanging and every KV block free.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "opencamp/opencamp.h"

using namespace opencamp;

namespace {

std::filesystem::path fixture(const std::string& name) {
  return std::filesystem::path(OPENCAMP_FIXTURES) / name;
}

EngineOptions options(int kv_cache_tokens = 0) {
  EngineOptions o;
  o.threads = 2;
  o.kv_cache_tokens = kv_cache_tokens;
  return o;
}

GenerationRequest greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

std::vector<int32_t> prompt_of(int length, int salt, int vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < length; ++i) p.push_back((i * 31 + salt * 17 + 3) % vocab);
  return p;
}

// What one request gives on an engine of its own, through the plain generate() path.
std::vector<int32_t> alone(const std::string& model, const GenerationRequest& request) {
  Engine engine(fixture(model), options());
  return engine.generate(engine.create_sequence(), request).tokens;
}

const GenerationResult& wait_for(ScheduledRequest& r) {
  // Never hang a test run: a request that does not end within a minute is a failure.
  for (int i = 0; i < 6000 && !r.finished(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK_MSG(r.finished(), "request still running after a minute");
  return r.wait();
}

}  // namespace

TEST_CASE(concurrent_requests_give_exactly_what_each_gives_alone) {
  for (const std::string model : {"tiny-llama", "tiny-qwen2", "tiny-qwen3"}) {
    Engine engine(fixture(model), options());
    const int vocab = engine.config().vocab_size;
    SchedulerOptions so;
    so.max_running = 4;
    so.step_tokens = 7;  // long prompts arrive in chunks, between other requests' decode steps
    Scheduler scheduler(engine, so);
    std::vector<GenerationRequest> requests;
    for (int i = 0; i < 6; ++i) requests.push_back(greedy(prompt_of(3 + 5 * i, i, vocab), 6 + 3 * i));
    std::vector<std::shared_ptr<ScheduledRequest>> handles;
    for (const auto& r : requests) handles.push_back(scheduler.submit(r));
    for (size_t i = 0; i < requests.size(); ++i) {
      std::vector<int32_t> streamed;
      while (auto event = handles[i]->next(60.0)) streamed.push_back(event->token);
      const GenerationResult& result = wait_for(*handles[i]);
      CHECK_MSG(result.tokens == alone(model, requests[i]), model << " request " << i << " differs from alone");
      CHECK(streamed == result.tokens);
      CHECK(result.finish_reason == FinishReason::Length);
      CHECK_EQ(result.prompt_tokens, static_cast<int>(requests[i].prompt.size()));
    }
    const auto stats = scheduler.stats();
    CHECK(stats.steps > 0);
    CHECK(stats.batch_tokens > stats.steps);  // steps really held several tokens
    CHECK_EQ(stats.idle, static_cast<int>(engine.cache_stats().sequences));  // kept for reuse
    // Nothing runs: every block in use is a kept conversation's.
    CHECK_EQ(engine.cache_stats().used_blocks, engine.cache_stats().kept_blocks);
  }
}

TEST_CASE(a_shared_prefix_is_reused_by_later_requests) {
  const int vocab = 256;
  const auto system = prompt_of(40, 1, vocab);  // 2 full blocks of 16, and 8 more tokens
  auto first = system;
  first.push_back(7);
  auto second = system;
  second.push_back(9);
  for (size_t idle : {size_t{32}, size_t{0}}) {
    Engine engine(fixture("tiny-llama"), options());
    SchedulerOptions so;
    so.max_idle_sequences = idle;
    Scheduler scheduler(engine, so);
    wait_for(*scheduler.submit(greedy(first, 3)));
    const auto handle = scheduler.submit(greedy(second, 5));
    const GenerationResult& result = wait_for(*handle);
    // With the first conversation kept, every shared token; without, its cached whole blocks.
    const int expected = idle ? 40 : 32;
    CHECK_EQ(result.cached_tokens, expected);
    CHECK(result.tokens == alone("tiny-llama", greedy(second, 5)));
    CHECK_EQ(scheduler.stats().cached_tokens, expected);
  }
}

TEST_CASE(idle_conversations_give_their_blocks_back_when_needed) {
  Engine engine(fixture("tiny-llama"), options(96));  // 6 blocks
  Scheduler scheduler(engine);
  const int vocab = engine.config().vocab_size;
  for (int i = 0; i < 4; ++i) wait_for(*scheduler.submit(greedy(prompt_of(30, 20 + i, vocab), 10)));
  CHECK(scheduler.stats().idle >= 1);
  // A request needing the whole cache still runs: idle conversations make room.
  const auto handle = scheduler.submit(greedy(prompt_of(80, 99, vocab), 10));
  const GenerationResult& big = wait_for(*handle);
  CHECK_EQ(big.tokens.size(), size_t(10));
  CHECK(big.tokens == alone("tiny-llama", greedy(prompt_of(80, 99, vocab), 10)));
}

TEST_CASE(a_session_sequence_continues_and_stays_alive) {
  Engine engine(fixture("tiny-qwen3"), options());
  Scheduler scheduler(engine);
  const int vocab = engine.config().vocab_size;
  const int session = engine.create_sequence();
  const auto turn1 = prompt_of(11, 2, vocab);
  const GenerationResult first = wait_for(*scheduler.submit(greedy(turn1, 4), session));  // a copy
  CHECK_EQ(first.cached_tokens, 0);
  auto turn2 = turn1;
  turn2.insert(turn2.end(), first.tokens.begin(), first.tokens.end());
  turn2.push_back(5);
  const GenerationResult second = wait_for(*scheduler.submit(greedy(turn2, 4), session));
  // Everything the sequence held: the first prompt and the answer's fed tokens.
  CHECK_EQ(second.cached_tokens, static_cast<int>(turn1.size() + first.tokens.size() - 1));
  CHECK(second.tokens == alone("tiny-qwen3", greedy(turn2, 4)));
  CHECK(engine.sequence_tokens(session).size() > turn2.size());  // still alive, still holding
  engine.free_sequence(session);
}

TEST_CASE(cancelling_stops_a_request_and_frees_its_blocks) {
  Engine engine(fixture("tiny-llama"), options());
  SchedulerOptions so;
  so.max_unread_tokens = 4;  // the long request waits for this reader, so it is still running
  Scheduler scheduler(engine, so);
  auto long_request = scheduler.submit(greedy(prompt_of(5, 3, engine.config().vocab_size), 100));
  auto short_request = scheduler.submit(greedy(prompt_of(6, 4, engine.config().vocab_size), 3));
  CHECK(long_request->next(60.0).has_value());
  long_request->cancel();
  const GenerationResult& cancelled = wait_for(*long_request);
  CHECK(cancelled.finish_reason == FinishReason::Cancelled);
  CHECK(cancelled.tokens.size() < 100);
  CHECK(wait_for(*short_request).finish_reason == FinishReason::Length);
  // The cancelled request's sequence is gone; only the finished one is kept for reuse.
  CHECK_EQ(engine.cache_stats().sequences, 1);
  CHECK_EQ(scheduler.stats().idle, 1);
  CHECK(scheduler.stats().generated_tokens < 100);  // it sat out instead of running ahead
  // A request cancelled before it ever ran ends without tokens.
  SchedulerOptions one;
  one.max_running = 1;
  Scheduler narrow(engine, one);
  auto first = narrow.submit(greedy(prompt_of(5, 5, engine.config().vocab_size), 30));
  auto queued = narrow.submit(greedy(prompt_of(5, 6, engine.config().vocab_size), 30));
  queued->cancel();
  CHECK(wait_for(*queued).tokens.empty());
  CHECK(wait_for(*queued).finish_reason == FinishReason::Cancelled);
  wait_for(*first);
}

TEST_CASE(a_full_kv_cache_preempts_the_newest_and_recomputes_it_later) {
  // 6 blocks of 16 positions; four requests of 30 + 40 positions cannot all fit at once.
  Engine engine(fixture("tiny-llama"), options(96));
  SchedulerOptions so;
  so.max_running = 4;
  Scheduler scheduler(engine, so);
  const int vocab = engine.config().vocab_size;
  std::vector<GenerationRequest> requests;
  std::vector<std::shared_ptr<ScheduledRequest>> handles;
  for (int i = 0; i < 4; ++i) {
    requests.push_back(greedy(prompt_of(30, 10 + i, vocab), 40));
    handles.push_back(scheduler.submit(requests.back()));
  }
  for (size_t i = 0; i < handles.size(); ++i) {
    const GenerationResult& result = wait_for(*handles[i]);
    CHECK_MSG(result.tokens == alone("tiny-llama", requests[i]), "request " << i << " differs after preemption");
  }
  CHECK(scheduler.stats().preemptions > 0);
  CHECK_EQ(static_cast<int>(engine.cache_stats().sequences), scheduler.stats().idle);
}

TEST_CASE(requests_that_can_never_run_fail_clearly) {
  Engine engine(fixture("tiny-llama"), options(32));  // 2 blocks
  Scheduler scheduler(engine);
  CHECK_THROWS_WITH(scheduler.submit(greedy({}, 3)), ErrorKind::InvalidArgument, "empty");
  CHECK_THROWS_WITH(scheduler.submit(greedy({1, 2}, 0)), ErrorKind::InvalidArgument, "max_tokens");
  auto too_long = scheduler.submit(greedy(prompt_of(50, 1, engine.config().vocab_size), 3));
  CHECK_THROWS_WITH(too_long->wait(), ErrorKind::CapacityExceeded, "KV cache");
  // ...and the scheduler goes on serving.
  CHECK(wait_for(*scheduler.submit(greedy({1, 2, 3}, 3))).tokens.size() == 3);
}

TEST_CASE(hundreds_of_random_requests_with_cancellations_all_end_and_free_everything) {
  Engine engine(fixture("tiny-qwen2"), options(512));
  SchedulerOptions so;
  so.max_running = 8;
  so.step_tokens = 24;
  Scheduler scheduler(engine, so);
  const int vocab = engine.config().vocab_size;
  std::mt19937 rng(11);
  std::vector<std::shared_ptr<ScheduledRequest>> handles;
  std::vector<bool> to_cancel;
  for (int i = 0; i < 300; ++i) {
    GenerationRequest r = greedy(prompt_of(1 + static_cast<int>(rng() % 60), static_cast<int>(rng() % 7), vocab),
                                 1 + static_cast<int>(rng() % 30));
    if (rng() % 3 == 0) {  // some sample, some stop at EOS
      r.sampling.temperature = 0.8f;
      r.sampling.seed = rng();
      r.ignore_eos = false;
    }
    handles.push_back(scheduler.submit(r));
    to_cancel.push_back(rng() % 5 == 0);
    if (to_cancel.back() && rng() % 2) handles.back()->cancel();  // some before they run
  }
  for (size_t i = 0; i < handles.size(); ++i) {
    if (to_cancel[i]) {
      handles[i]->next(60.0);  // some after a token
      handles[i]->cancel();
    }
  }
  int ended = 0;
  for (auto& h : handles) {
    const GenerationResult& result = wait_for(*h);
    ended += h->finished() ? 1 : 0;
    CHECK(result.tokens.size() <= 30);
  }
  CHECK_EQ(ended, 300);
  const auto stats = scheduler.stats();
  CHECK_EQ(stats.running, 0);
  CHECK_EQ(stats.waiting, 0);
  CHECK_EQ(static_cast<int>(engine.cache_stats().sequences), stats.idle);
}

TEST_CASE(after_the_scheduler_every_block_is_free) {
  Engine engine(fixture("tiny-qwen2"), options(512));
  {
    Scheduler scheduler(engine);
    for (int i = 0; i < 20; ++i) scheduler.submit(greedy(prompt_of(10 + i, i, 200), 5));
    wait_for(*scheduler.submit(greedy(prompt_of(7, 1, 200), 5)));
  }
  CHECK_EQ(engine.cache_stats().used_blocks, 0);
  CHECK_EQ(engine.cache_stats().sequences, 0);
}

TEST_CASE(wait_without_reading_never_stalls_on_the_unread_limit) {
  Engine engine(fixture("tiny-llama"), options());
  SchedulerOptions so;
  so.max_unread_tokens = 2;
  Scheduler scheduler(engine, so);
  auto handle = scheduler.submit(greedy(prompt_of(4, 1, 256), 20));
  // Nobody reads a single token; wait() alone must see the request through.
  auto tokens = std::async(std::launch::async, [&] { return handle->wait().tokens.size(); });
  CHECK(tokens.wait_for(std::chrono::seconds(60)) == std::future_status::ready);
  CHECK_EQ(tokens.get(), size_t(20));
}

TEST_CASE(destroying_the_scheduler_ends_every_request) {
  Engine engine(fixture("tiny-llama"), options());
  std::vector<std::shared_ptr<ScheduledRequest>> handles;
  {
    Scheduler scheduler(engine);
    for (int i = 0; i < 10; ++i) handles.push_back(scheduler.submit(greedy(prompt_of(20, i, 200), 100)));
  }
  for (auto& h : handles) CHECK(h->finished());
  CHECK_EQ(engine.cache_stats().used_blocks, 0);
  handles.front()->cancel();  // harmless after the scheduler is gone
}

// Once wait() returns, stats() no longer counts the request as running and counts its tokens
// (a server's "nothing running" check right after an answer relies on it).
TEST_CASE(stats_count_a_request_as_ended_once_wait_returns) {
  Engine engine(fixture("tiny-llama"), options());
  Scheduler scheduler(engine);
  for (int i = 0; i < 200; ++i) {
    scheduler.submit(greedy(prompt_of(6, i, 200), 2))->wait();
    const Scheduler::Stats stats = scheduler.stats();
    CHECK_EQ(stats.running, 0);
    CHECK_EQ(stats.generated_tokens, int64_t{2} * (i + 1));
  }
}

// A full waiting queue is its own kind of error (the server answers 429 for it, and a 4xx
// for a KV cache too small for the request): told apart by kind, not by its message.
TEST_CASE(a_full_queue_is_queue_full_not_capacity_exceeded) {
  Engine engine(fixture("tiny-llama"), options());
  SchedulerOptions no_queue;
  no_queue.max_waiting = 0;
  Scheduler scheduler(engine, no_queue);
  CHECK_THROWS_WITH(scheduler.submit(greedy(prompt_of(8, 1, 200), 4)), ErrorKind::QueueFull, "waiting");
  CHECK_EQ(std::string(error_kind_name(ErrorKind::QueueFull)), std::string("queue_full"));
}

// Waits (at most a minute) until `condition` holds; a test never hangs on a missed event.
template <class Condition>
void wait_until(Condition condition, const char* what) {
  for (int i = 0; i < 6000 && !condition(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK_MSG(condition(), "timed out waiting for " << what);
}

TEST_CASE(the_engine_refuses_outside_changes_to_sequences_a_generation_owns) {
  Engine engine(fixture("tiny-llama"), options());
  const int vocab = engine.config().vocab_size;
  SchedulerOptions so;
  so.max_unread_tokens = 2;  // the requests wait for their readers: they stay alive meanwhile
  Scheduler scheduler(engine, so);
  const GenerationRequest request = greedy(prompt_of(9, 1, vocab), 12);
  // A caller's sequence, continued by a stream: the caller may not change it while it streams.
  const int mine = engine.create_sequence();
  auto on_mine = scheduler.submit(request, mine);
  std::vector<int32_t> streamed{on_mine->next(60.0)->token};
  std::vector<float> logits(static_cast<size_t>(vocab));
  const std::vector<int32_t> more{1, 2};
  CHECK_THROWS_WITH(engine.free_sequence(mine), ErrorKind::InvalidArgument, "sequence", "owned by a generation");
  CHECK_THROWS_WITH(engine.truncate_sequence(mine, 1), ErrorKind::InvalidArgument, "owned by a generation");
  CHECK_THROWS_WITH(engine.prefill(mine, more, logits), ErrorKind::InvalidArgument, "owned by a generation");
  CHECK_THROWS_WITH(engine.reuse_prefix(mine, more), ErrorKind::InvalidArgument, "owned by a generation");
  const int seqs[] = {mine};
  CHECK_THROWS_WITH(engine.decode(seqs, std::span(more).first(1), logits), ErrorKind::InvalidArgument,
                    "owned by a generation");
  // One stream at a time per sequence.
  CHECK_THROWS_WITH(scheduler.submit(request, mine), ErrorKind::InvalidArgument, "already held");
  // A sequence the scheduler made for a request (the first one of a fresh engine is 0 here,
  // `mine` aside) is refused the same way, and the batch goes on unharmed.
  auto fresh = scheduler.submit(greedy(prompt_of(7, 2, vocab), 12));
  const int scheduler_seq = mine == 0 ? 1 : 0;
  CHECK(fresh->next(60.0).has_value());
  CHECK_THROWS_WITH(engine.free_sequence(scheduler_seq), ErrorKind::InvalidArgument, "owned by a generation");
  while (auto event = on_mine->next(60.0)) streamed.push_back(event->token);
  CHECK(wait_for(*on_mine).tokens == alone("tiny-llama", request));
  CHECK(streamed == on_mine->wait().tokens);
  while (fresh->next(60.0)) {
  }
  CHECK(wait_for(*fresh).tokens == alone("tiny-llama", greedy(prompt_of(7, 2, vocab), 12)));
  // Kept for the next turn it is still the scheduler's; the caller's is the caller's again.
  CHECK_EQ(scheduler.stats().idle, 1);
  CHECK_THROWS_WITH(engine.free_sequence(scheduler_seq), ErrorKind::InvalidArgument, "keeps for the next turn");
  CHECK_EQ(engine.truncate_sequence(mine, 3), 3);
  engine.free_sequence(mine);
}

TEST_CASE(kept_conversations_give_way_to_any_caller_that_needs_blocks) {
  Engine engine(fixture("tiny-llama"), options(64));  // 4 blocks of 16
  const int vocab = engine.config().vocab_size;
  Scheduler scheduler(engine);
  wait_for(*scheduler.submit(greedy(prompt_of(30, 5, vocab), 30)));  // holds ~59 positions
  CHECK_EQ(scheduler.stats().idle, 1);
  CHECK_EQ(engine.cache_stats().kept_sequences, 1);
  CHECK_EQ(engine.cache_stats().kept_blocks, 4);  // 59 positions in blocks of 16
  // A plain prefill (what LLM.logits() does) on a fresh sequence takes the kept one's blocks.
  const int seq = engine.create_sequence();
  const std::vector<int32_t> prompt = prompt_of(60, 6, vocab);
  std::vector<float> logits(static_cast<size_t>(vocab) * prompt.size());
  engine.prefill(seq, prompt, logits, true);
  CHECK_EQ(scheduler.stats().idle, 0);
  CHECK_EQ(engine.cache_stats().kept_sequences, 0);
  // When sequences really hold everything it is still a clear CapacityExceeded.
  const int other = engine.create_sequence();
  const std::vector<int32_t> ten = prompt_of(10, 7, vocab);
  std::vector<float> last(static_cast<size_t>(vocab));
  CHECK_THROWS_WITH(engine.prefill(other, ten, last), ErrorKind::CapacityExceeded, "KV cache is full");
  engine.free_sequence(seq);
  engine.free_sequence(other);
}

TEST_CASE(streams_whose_readers_stop_are_paused_off_the_batch_and_resume) {
  Engine engine(fixture("tiny-llama"), options());
  const int vocab = engine.config().vocab_size;
  SchedulerOptions so;
  so.max_running = 2;
  so.max_unread_tokens = 4;
  Scheduler scheduler(engine, so);
  const GenerationRequest slow_request = greedy(prompt_of(5, 8, vocab), 60);
  auto unread_a = scheduler.submit(slow_request);
  auto unread_b = scheduler.submit(greedy(prompt_of(6, 9, vocab), 60));
  wait_until([&] { return scheduler.stats().paused == 2; }, "both unread streams to pause");
  CHECK_EQ(scheduler.stats().running, 0);  // their slots are free
  // Every running slot was theirs; a third request now runs to its end while they wait.
  const GenerationRequest normal = greedy(prompt_of(7, 10, vocab), 8);
  auto third = scheduler.submit(normal);
  while (third->next(60.0)) {
  }
  CHECK(wait_for(*third).tokens == alone("tiny-llama", normal));
  CHECK(!unread_a->finished());
  CHECK(!unread_b->finished());
  CHECK_EQ(scheduler.stats().paused, 2);
  CHECK(scheduler.stats().pauses >= 2);
  // Reading again resumes a paused stream, from its kept cache, to the same tokens.
  std::vector<int32_t> streamed;
  while (auto event = unread_a->next(60.0)) streamed.push_back(event->token);
  CHECK(streamed == alone("tiny-llama", slow_request));
  unread_b->cancel();
  wait_for(*unread_b);
}

TEST_CASE(a_paused_stream_whose_reader_stays_idle_is_ended_and_frees_its_blocks) {
  Engine engine(fixture("tiny-llama"), options());
  SchedulerOptions so;
  so.max_unread_tokens = 3;
  so.stream_idle_timeout_seconds = 0.05;
  Scheduler scheduler(engine, so);
  auto unread = scheduler.submit(greedy(prompt_of(20, 11, engine.config().vocab_size), 80));
  wait_until([&] { return unread->finished(); }, "the idle stream to end");
  CHECK_THROWS_WITH(unread->wait(), ErrorKind::Timeout, "read nothing");
  CHECK_EQ(scheduler.stats().stream_timeouts, int64_t(1));
  CHECK_EQ(scheduler.stats().paused, 0);
  CHECK_EQ(engine.cache_stats().used_blocks, 0);  // its sequence is gone, not kept
  CHECK_EQ(engine.cache_stats().sequences, 0);
  CHECK_THROWS_WITH(Scheduler(engine, [] { SchedulerOptions o; o.stream_idle_timeout_seconds = -1; return o; }()),
                    ErrorKind::InvalidArgument, "stream_idle_timeout_seconds");
}

TEST_CASE(a_short_prompt_gets_its_first_token_during_a_long_prefill) {
  Engine engine(fixture("tiny-llama"), options(1024));  // room for all three at once
  const int vocab = engine.config().vocab_size;
  SchedulerOptions so;
  so.step_tokens = 4;  // one decode token + 3 prompt tokens a step: the long prompt takes 40
  Scheduler scheduler(engine, so);
  // A gate: a decoding request whose token callback (on the loop thread) waits for a permit,
  // so the test lets the loop run one step at a time and nothing depends on speed.
  std::mutex gate_mutex;
  std::condition_variable gate_changed;
  int permits = 0, entries = 0;
  bool open = false;
  auto gate = scheduler.submit(greedy(prompt_of(3, 14, vocab), 60), -1, [&](int32_t, bool) {
    std::unique_lock<std::mutex> lock(gate_mutex);
    ++entries;
    gate_changed.notify_all();
    gate_changed.wait(lock, [&] { return open || permits > 0; });
    if (!open) --permits;
    return true;
  });
  auto step_once = [&] {  // lets the blocked step finish and waits for the next one to block
    std::unique_lock<std::mutex> lock(gate_mutex);
    const int before = entries;
    ++permits;
    gate_changed.notify_all();
    CHECK(gate_changed.wait_for(lock, std::chrono::seconds(60), [&] { return entries > before; }));
  };
  {
    std::unique_lock<std::mutex> lock(gate_mutex);
    CHECK(gate_changed.wait_for(lock, std::chrono::seconds(60), [&] { return entries > 0; }));
  }
  std::atomic<bool> long_first{false};
  const GenerationRequest long_request = greedy(prompt_of(120, 12, vocab), 2);
  auto long_handle = scheduler.submit(long_request, -1, [&](int32_t, bool) {
    long_first = true;
    return true;
  });
  step_once();
  step_once();  // the long prompt has had a chunk or two
  CHECK(!long_first.load());
  const int64_t steps_at_short_submit = scheduler.stats().steps;
  std::atomic<int64_t> steps_at_short_first{-1};
  std::atomic<bool> short_before_long{false};
  const GenerationRequest short_request = greedy(prompt_of(3, 13, vocab), 2);
  auto short_handle = scheduler.submit(short_request, -1, [&](int32_t, bool) {
    if (steps_at_short_first.load() < 0) {
      steps_at_short_first = scheduler.stats().steps;
      short_before_long = !long_first.load();
    }
    return true;
  });
  for (int i = 0; i < 3; ++i) step_once();
  {
    std::lock_guard<std::mutex> lock(gate_mutex);
    open = true;
  }
  gate_changed.notify_all();
  CHECK(wait_for(*short_handle).tokens == alone("tiny-llama", short_request));
  CHECK(wait_for(*long_handle).tokens == alone("tiny-llama", long_request));
  wait_for(*gate);
  // The short prompt's first token came while the long prompt was still prefilling, in the
  // first step after the one running when it arrived.
  CHECK(short_before_long.load());
  CHECK(steps_at_short_first.load() >= 0);
  CHECK_MSG(steps_at_short_first.load() - steps_at_short_submit <= 1,
            "first token at step " << steps_at_short_first.load() << ", submitted at " << steps_at_short_submit);
}

namespace {

// A grammar in miniature: the answer must be `pattern` token by token, then EOS; EOS is
// forbidden until the pattern is complete. It counts its calls so the test sees the
// scheduler's protocol: one mask per sampled token, told each token before the next mask.
struct SpellOut : TokenConstraint {
  std::vector<int32_t> pattern;
  int32_t eos;
  size_t position = 0;
  int masks = 0, accepted = 0;
  SpellOut(std::vector<int32_t> p, int32_t e) : pattern(std::move(p)), eos(e) {}
  void fill_mask(std::span<uint32_t> allowed) override {
    ++masks;
    const int32_t next = position < pattern.size() ? pattern[position] : eos;
    allowed[static_cast<size_t>(next) / 32] |= 1u << (next % 32);
  }
  void accept(int32_t token) override {
    ++accepted;
    CHECK_MSG(position < pattern.size() && token == pattern[position], "accepted a token the mask forbade");
    ++position;
  }
};

}  // namespace

TEST_CASE(a_constraint_decides_every_token_and_eos_only_when_complete) {
  Engine engine(fixture("tiny-llama"), options());
  const int vocab = engine.config().vocab_size;
  const int32_t eos = 7;
  SchedulerOptions so;
  so.max_running = 4;
  so.step_tokens = 5;  // the prompt arrives in chunks: the mask is asked for only with logits
  Scheduler scheduler(engine, so);
  auto constraint = std::make_shared<SpellOut>(std::vector<int32_t>{11, 12, 13, 11, 200}, eos);
  GenerationRequest constrained = greedy(prompt_of(12, 1, vocab), 20);
  constrained.ignore_eos = false;
  constrained.stop_token_ids = {eos};
  constrained.constraint = constraint;
  constrained.sampling.temperature = 1.5f;  // any draw must still follow the pattern
  constrained.sampling.seed = 3;
  // Unconstrained neighbours in the same batch are untouched by it.
  const GenerationRequest free_running = greedy(prompt_of(9, 2, vocab), 8);
  auto a = scheduler.submit(constrained);
  auto b = scheduler.submit(free_running);
  const GenerationResult& result = wait_for(*a);
  CHECK(result.tokens == (std::vector<int32_t>{11, 12, 13, 11, 200, eos}));
  CHECK(result.finish_reason == FinishReason::Stop);
  CHECK_EQ(constraint->masks, 6);
  CHECK_EQ(constraint->accepted, 5);  // the stop token ends it: nobody needs it told
  CHECK(wait_for(*b).tokens == alone("tiny-llama", free_running));

  // A constraint that throws ends its own request with that error, not the others.
  struct Broken : TokenConstraint {
    void fill_mask(std::span<uint32_t>) override { throw Error(ErrorKind::InvalidArgument, "grammar broke"); }
    void accept(int32_t) override {}
  };
  GenerationRequest broken = greedy(prompt_of(6, 3, vocab), 5);
  broken.constraint = std::make_shared<Broken>();
  auto c = scheduler.submit(broken);
  auto d = scheduler.submit(free_running);
  CHECK_THROWS_WITH(wait_for(*c), ErrorKind::InvalidArgument, "grammar broke");
  CHECK(wait_for(*d).tokens == alone("tiny-llama", free_running));
}

TEST_CASE(a_constrained_request_keeps_its_place_in_the_grammar_across_a_preemption) {
  // As a_full_kv_cache_preempts_the_newest_and_recomputes_it_later, with every request held to
  // a 40-token pattern: the preempted ones recompute what they generated and go on with the
  // pattern where they left it (the constraint is told each token exactly once).
  Engine engine(fixture("tiny-llama"), options(96));
  SchedulerOptions so;
  so.max_running = 4;
  Scheduler scheduler(engine, so);
  const int vocab = engine.config().vocab_size;
  std::vector<std::shared_ptr<SpellOut>> constraints;
  std::vector<std::shared_ptr<ScheduledRequest>> handles;
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> pattern;
    for (int k = 0; k < 39; ++k) pattern.push_back((k * 7 + i * 13 + 20) % (vocab - 8) + 8);
    constraints.push_back(std::make_shared<SpellOut>(pattern, 7));
    GenerationRequest r = greedy(prompt_of(30, 10 + i, vocab), 40);
    r.ignore_eos = false;
    r.stop_token_ids = {7};
    r.constraint = constraints.back();
    handles.push_back(scheduler.submit(r));
  }
  for (size_t i = 0; i < handles.size(); ++i) {
    std::vector<int32_t> expected = constraints[i]->pattern;
    expected.push_back(7);
    CHECK_MSG(wait_for(*handles[i]).tokens == expected, "request " << i << " left its pattern");
    CHECK_EQ(constraints[i]->accepted, 39);
  }
  CHECK(scheduler.stats().preemptions > 0);
}

TEST_CASE(log_probabilities_come_only_to_requests_that_ask_and_match_the_logits) {
  Engine engine(fixture("tiny-llama"), options());
  const int vocab = engine.config().vocab_size;
  Scheduler scheduler(engine);
  const auto prompt = prompt_of(9, 3, vocab);
  GenerationRequest asking = greedy(prompt, 5);
  asking.logprobs = 3;
  const auto with = scheduler.submit(asking);
  const auto without = scheduler.submit(greedy(prompt, 5));
  std::vector<TokenEvent> events;
  while (auto event = with->next(60.0)) events.push_back(*event);
  while (auto event = without->next(60.0)) CHECK(event->logprobs == nullptr);
  CHECK_EQ(events.size(), size_t{5});
  // The reference: the logits of the prompt and the tokens, log-softmaxed here.
  std::vector<int32_t> all = prompt;
  for (const auto& e : events) all.push_back(e.token);
  all.pop_back();
  std::vector<float> logits(all.size() * static_cast<size_t>(vocab));
  const int seq = engine.create_sequence();
  engine.prefill(seq, all, logits, true);
  engine.free_sequence(seq);
  for (size_t i = 0; i < events.size(); ++i) {
    CHECK(events[i].logprobs != nullptr);
    if (!events[i].logprobs) continue;
    const auto& lp = *events[i].logprobs;
    const size_t row = prompt.size() - 1 + i;
    std::span<const float> row_logits(logits.data() + row * vocab, static_cast<size_t>(vocab));
    double total = 0;
    for (float x : row_logits) total += std::exp(static_cast<double>(x));
    CHECK_NEAR(lp.logprob, row_logits[static_cast<size_t>(events[i].token)] - std::log(total), 1e-4);
    CHECK_EQ(lp.top.size(), size_t{3});
    CHECK_EQ(lp.top[0].id, events[i].token);  // greedy: the chosen token is the most likely
    CHECK(lp.top[0].logprob >= lp.top[1].logprob && lp.top[1].logprob >= lp.top[2].logprob);
  }
  GenerationRequest bad = greedy(prompt, 5);
  bad.logprobs = 21;
  CHECK_THROWS_WITH(scheduler.submit(bad), ErrorKind::InvalidArgument, "logprobs");
}

TEST_CASE(after_the_first_token_a_same_prompt_request_shares_the_prompt_blocks) {
  // How n > 1 choices prefill the prompt once: the first choice's first token means its prompt
  // is in the cache (full blocks published), so the next ones map those blocks.
  Engine engine(fixture("tiny-llama"), options());
  SchedulerOptions so;
  so.max_unread_tokens = 2;  // the first stays unread, so it pauses alive (not kept, not done)
  Scheduler scheduler(engine, so);
  const auto prompt = prompt_of(40, 5, engine.config().vocab_size);  // 2 full blocks + 8
  // A kept conversation sharing only the first 20 tokens (a system prompt, say) must not be
  // taken over instead of mapping the 32 tokens the first choice's blocks hold.
  const auto first = scheduler.submit(greedy(prompt, 50));
  CHECK(first->wait_first_token(60.0));
  auto system_only = std::vector<int32_t>(prompt.begin(), prompt.begin() + 20);
  system_only.push_back(1);
  CHECK_EQ(scheduler.submit(greedy(system_only, 1))->wait().tokens.size(), size_t{1});
  CHECK_EQ(scheduler.stats().idle, 1);
  const auto second = scheduler.submit(greedy(prompt, 3));
  CHECK_EQ(second->wait().cached_tokens, 32);  // wait(): never paused for its unread tokens
  first->cancel();
  wait_for(*first);
  CHECK(first->wait_first_token(0.0));  // ended: returns at once
}

TEST_CASE(chunks_deep_into_a_long_prompt_are_smaller) {
  // tiny-llama: hidden 32, 4 heads of 8, 2 KV heads, ffn 64, so a token's attention costs as
  // much as its matrix products at position (32 * 96 + 3 * 32 * 64) / 64 = 144. A 120-token
  // prompt (its context is 128) in 16-token steps would take 8 steps unweighted; with
  // positions weighted the chunks shrink from 16 tokens at the start to 9 near position 100:
  // 11 steps.
  Engine engine(fixture("tiny-llama"), options(512));
  SchedulerOptions so;
  so.step_tokens = 16;
  Scheduler scheduler(engine, so);
  const GenerationRequest request = greedy(prompt_of(120, 3, engine.config().vocab_size), 1);
  CHECK(wait_for(*scheduler.submit(request)).tokens == alone("tiny-llama", request));
  const auto stats = scheduler.stats();
  CHECK_EQ(stats.batch_tokens, 120);
  CHECK_EQ(stats.steps, 11);
}

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
