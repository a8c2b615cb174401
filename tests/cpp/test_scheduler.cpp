// Continuous batching: many requests in one loop give exactly the tokens each gives alone;
// chunked prompts, preemption, cancellation and hundreds of random requests leave no request
// hanging and every KV block free.
#include <chrono>
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

int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
