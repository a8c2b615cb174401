"""Admission, KV-cache bookkeeping and the bridge from C++ generation threads to asyncio.

Each admitted request generates on its own engine sequence, on a C++ thread (the engine
interleaves the running generations step by step). This module decides *when* a request may
start and *which* sequence it runs on:

* At most `parallel` generations run at once; the others wait in one FIFO queue, so every
  request is eventually served and none overtakes another.
* A request reserves the KV-cache blocks its prompt plus max_tokens can ever need, so a
  running generation never finds the cache full half-way.
* A finished conversation's sequence is kept (idle, least recently used last) with the tokens
  it holds. A new request whose prompt extends one of them (the next turn of a chat, or the
  same system prompt) runs on that sequence, and the engine prefills only the new tokens.
  Idle sequences are freed, oldest first, when a request needs their blocks.

Engine calls that may wait on the engine's lock (freeing, creating, starting) never run on the
event loop: they run in order on one "admin" thread, or on the request's reader thread.
Bookkeeping lives on the event loop alone.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..llm import LLM, Completion, Stream

log = logging.getLogger("opencamp.server")


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in slices first: most shared prefixes are long, and slice equality runs in C.
    step = 256
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class QueueFull(Exception):
    """Too many requests are already waiting."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    options: dict[str, Any]  # sampling options for LLM.stream
    need_blocks: int
    endpoint: str = "chat"  # for metrics
    arrived: float = field(default_factory=time.perf_counter)
    # Filled in at admission.
    seq: int | None = None  # an idle sequence to reuse, or None for a fresh one
    seq_tokens: list[int] = field(default_factory=list)  # what that sequence holds
    evict: list[int] = field(default_factory=list)  # idle sequences to free first


class Generation:
    """One running request, seen from the event loop: an asyncio queue of events

        ("text", piece)  ("done", Completion)  ("error", exception)

    and cancel(), which any thread may call; the generation then stops within one decode step
    and its sequence is freed.
    """

    def __init__(self, job: Job):
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_text_at: float | None = None  # perf_counter of the first text piece
        self.admitted_at = time.perf_counter()
        self._stream: Stream | None = None
        self._thread: threading.Thread | None = None  # the reader thread, once started
        self._cancelled = False
        self._lock = threading.Lock()

    def _attach(self, stream: Stream) -> None:
        with self._lock:
            self._stream = stream
            cancelled = self._cancelled
        if cancelled:
            stream.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            stream = self._stream
        if stream is not None:
            stream.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class Scheduler:
    def __init__(self, llm: LLM, parallel: int = 4, max_waiting: int = 256,
                 max_idle_sequences: int = 32):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.llm = llm
        self.parallel = parallel
        self.max_waiting = max_waiting
        self.max_idle_sequences = max_idle_sequences
        stats = llm.engine.cache_stats()
        self.block_size: int = stats["block_size"]
        self.total_blocks: int = stats["total_blocks"]
        self.running = 0
        self.reserved_blocks = 0  # by running requests
        self._idle: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._queue: collections.deque[tuple[Job, asyncio.Future]] = collections.deque()
        self._admin = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="opencamp-admin")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._live: set[Generation] = set()  # started and not yet finished
        # Called on the event loop when a started generation ends: (generation, completion),
        # completion None when it failed.
        self.on_finish = None

    # ---- state, for /metrics -----------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def idle_sequences(self) -> int:
        return len(self._idle)

    @property
    def idle_blocks(self) -> int:
        return sum(self.blocks(len(tokens)) for tokens in self._idle.values())

    def blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    # ---- admission -----------------------------------------------------------------------

    async def start(self, prompt_ids: list[int], max_tokens: int, options: dict[str, Any],
                    endpoint: str = "chat", arrived: float | None = None) -> Generation:
        """Wait for a turn (FIFO), then start generating. Cancelling the caller at any point
        gives back everything it held. `options` go to LLM.stream (max_tokens included)."""
        self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the server is shutting down")
        job = Job(prompt_ids, max_tokens, options, self.blocks(len(prompt_ids) + max_tokens),
                  endpoint=endpoint, arrived=time.perf_counter() if arrived is None else arrived)
        if job.need_blocks > self.total_blocks:  # callers check the context first; never wait
            raise ValueError(f"the request needs {len(prompt_ids) + max_tokens} KV-cache "
                             f"positions but the cache holds {self.capacity_tokens}")
        self.check_room()
        admitted = self._loop.create_future()
        self._queue.append((job, admitted))
        self._pump()
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled():
                self._give_back_unstarted(job)  # admitted just as the client left
            else:
                self._remove_waiter(admitted)
            raise

        generation = Generation(job)
        started = self._loop.run_in_executor(self._admin, self._start_blocking, generation)
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            generation.cancel()  # it stops at once when it does start; its thread cleans up
            raise
        return generation

    def check_room(self) -> None:
        """Raise QueueFull when a new request would have to wait and the queue is full."""
        if len(self._queue) >= self.max_waiting and self.running >= self.parallel:
            raise QueueFull(f"{len(self._queue)} requests are already waiting for one of "
                            f"{self.parallel} slots")

    def _remove_waiter(self, admitted: asyncio.Future) -> None:
        for i, (_, future) in enumerate(self._queue):
            if future is admitted:
                del self._queue[i]
                break
        self._pump()

    def _give_back_unstarted(self, job: Job) -> None:
        """Admitted, but the client left before it started: undo the plan."""
        self.running -= 1
        self.reserved_blocks -= job.need_blocks
        for seq in job.evict:  # already out of the pool's books; free them in order
            self._admin.submit(self.llm.engine.free_sequence, seq)
        if job.seq is not None:  # taken from the idle pool: it goes back unchanged
            self._idle[job.seq] = job.seq_tokens
        self._pump()

    def _pump(self) -> None:
        """Admit waiting requests, in order, while a slot and the KV cache allow."""
        while self._queue and self.running < self.parallel:
            job, admitted = self._queue[0]
            if admitted.done():  # cancelled while waiting
                self._queue.popleft()
                continue
            if not self._plan(job):
                break
            self._queue.popleft()
            self.running += 1
            self.reserved_blocks += job.need_blocks
            admitted.set_result(None)

    def _plan(self, job: Job) -> bool:
        """Pick the sequence for `job` and the idle ones to free so that it fits; False when it
        cannot fit until running requests finish."""
        best_seq, best_common = None, 0
        for seq, tokens in self._idle.items():
            common = common_prefix_length(tokens, job.prompt_ids)
            if common > best_common:
                best_seq, best_common = seq, common
        # Reuse a sequence when the prompt mostly continues it; a sequence that only shares a
        # short start (say, the system prompt) with the new prompt stays for its own chat.
        if best_seq is not None and 2 * best_common < len(self._idle[best_seq]):
            best_seq = None
        others = [seq for seq in self._idle if seq != best_seq]  # least recently used first
        held = sum(self.blocks(len(self._idle[seq])) for seq in others)
        budget = self.total_blocks - self.reserved_blocks - job.need_blocks
        evict = []
        for seq in others:
            if held <= budget:
                break
            evict.append(seq)
            held -= self.blocks(len(self._idle[seq]))
        if held > budget:
            return False
        for seq in evict:
            del self._idle[seq]
        if best_seq is not None:
            job.seq_tokens = self._idle.pop(best_seq)
        job.seq, job.evict = best_seq, evict
        return True

    # ---- threads -------------------------------------------------------------------------

    def _start_blocking(self, generation: Generation) -> None:
        """On the admin thread, in admission order: free what the plan evicted, then start."""
        job = generation.job
        engine = self.llm.engine
        seq = None
        try:
            for evicted in job.evict:
                engine.free_sequence(evicted)
            seq = job.seq if job.seq is not None else engine.create_sequence()
            stream = self.llm.stream(job.prompt_ids, sequence=seq, **job.options)
        except BaseException as error:  # refused by the engine: nothing runs, nothing is kept
            if seq is not None:
                try:
                    engine.free_sequence(seq)
                except BaseException:
                    log.exception("freeing sequence %d failed", seq)
            self._post(self._finished, generation, None, None, None)
            self._post(generation.events.put_nowait, ("error", error))
            return
        generation._attach(stream)
        generation._thread = threading.Thread(target=self._read, args=(generation, stream, seq),
                                              name=f"opencamp-seq{seq}", daemon=True)
        self._live.add(generation)
        generation._thread.start()

    def _read(self, generation: Generation, stream: Stream, seq: int) -> None:
        """The request's reader thread: pieces to the event loop, then the sequence back."""
        engine = self.llm.engine
        try:
            for piece in stream:
                if generation.first_text_at is None:
                    generation.first_text_at = time.perf_counter()
                self._post(generation.events.put_nowait, ("text", piece))
            completion: Completion = stream.completion
            if completion.finish_reason == "cancelled":
                engine.free_sequence(seq)  # the client left: its answer is not worth keeping
                self._post(self._finished, generation, None, None, completion)
            else:
                self._post(self._finished, generation, seq, engine.sequence_tokens(seq),
                           completion)
            self._post(generation.events.put_nowait, ("done", completion))
        except BaseException as error:  # the engine or the decoder failed: free, then report
            log.exception("generation on sequence %d failed", seq)
            try:
                stream.close()  # joins the C++ thread before its sequence goes away
            except BaseException:
                pass
            try:
                engine.free_sequence(seq)
            except BaseException:
                log.exception("freeing sequence %d failed", seq)
            self._post(self._finished, generation, None, None, None)
            self._post(generation.events.put_nowait, ("error", error))

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _finished(self, generation: Generation, seq: int | None, tokens: list[int] | None,
                  completion: Completion | None) -> None:
        """On the event loop: a generation ended; keep its sequence for reuse (or not)."""
        job = generation.job
        self._live.discard(generation)
        self.running -= 1
        self.reserved_blocks -= job.need_blocks
        if seq is not None:
            if self._closed:
                self._admin.submit(self.llm.engine.free_sequence, seq)
            else:
                self._idle[seq] = list(tokens or [])
                while len(self._idle) > self.max_idle_sequences:
                    oldest, _ = self._idle.popitem(last=False)
                    # Freed on the admin thread, so any later start sees the blocks free.
                    self._admin.submit(self.llm.engine.free_sequence, oldest)
        self._pump()
        if self.on_finish is not None:
            try:
                self.on_finish(generation, completion)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_finish failed")

    def close(self, timeout: float = 30.0) -> None:
        """At shutdown: stop every running generation (each within one decode step, after a
        prefill in progress), wait for their threads, and free the idle sequences."""
        self._closed = True
        live = list(self._live)
        for generation in live:
            generation.cancel()
        deadline = time.monotonic() + timeout
        for generation in live:
            if generation._thread is not None:
                generation._thread.join(max(0.0, deadline - time.monotonic()))
        idle, self._idle = list(self._idle), collections.OrderedDict()
        for seq in idle:
            self._admin.submit(self.llm.engine.free_sequence, seq)
        self._admin.shutdown(wait=True)
