"""The relay between the C++ scheduler and asyncio (it schedules nothing itself).

Admission, batching and the KV cache are the engine's business: every request goes to one
`_core.Scheduler` (continuous batching, first come first served, at most `parallel` sequences
decoding together, prefix caching across requests, preemption when the cache is full). Here
one dispatcher thread takes every request's new tokens once per scheduler step
(`Scheduler.collect`: one wake-up per step, not a thread per request woken per token), turns
them into text pieces (each request's Stream: no split UTF-8, no partial stop string) and hands
all of the step's pieces to the event loop in one call. Cancelling stops the request at the
engine's next step.

Back-pressure is the engine's one policy (SchedulerOptions::max_unread_tokens): a token counts
as unread until the response has taken the piece it is in (`acknowledge`), so the stream of a
client that stops reading is paused (off the batch, KV cache kept) at `stream_buffer_tokens`
and ended after `stream_idle_timeout` seconds; a client that reads is never held back by the
dispatcher or the event loop being busy for a moment.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from ..llm import LLM, Completion, SamplingOptions, Stream

log = logging.getLogger("opencamp.server")


class QueueFull(Exception):
    """Too many requests are already waiting."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    options: dict[str, Any]  # sampling options for LLM.stream
    endpoint: str = "chat"  # for metrics
    arrived: float = field(default_factory=time.perf_counter)


# How often the dispatcher, with nothing to hand over, looks whether the relay was closed.
_DISPATCH_POLL_SECONDS = 0.5


class Generation:
    """One request, seen from the event loop: an asyncio queue of events

        ("text", piece)  ("done", Completion)  ("error", exception)

    and cancel(), which any thread may call; the request then stops at the engine's next step
    and its blocks are freed (full ones stay cached for later prompts).
    """

    def __init__(self, job: Job):
        self.job = job
        # (kind, value, tokens): tokens, for a text piece, is how many tokens it holds.
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_text_at: float | None = None  # perf_counter of the first text piece
        self._stream: Stream | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    async def next_event(self) -> tuple:
        """The next event, for the response: taking a piece tells the engine its client read
        those tokens (a client that does not read soon has its stream paused)."""
        kind, value, tokens = await self.events.get()
        if tokens:
            self._stream._generation.acknowledge(tokens)
        return kind, value

    def _attach(self, stream: Stream) -> None:
        with self._lock:
            self._stream = stream
            cancelled = self._cancelled
        if cancelled:
            stream.cancel()

    def wait_first_token(self) -> None:
        """Blocks (a worker thread) until the first token was sampled, so the prompt's full KV
        blocks are in the prefix cache for the request's other choices, or the generation ended."""
        self._stream.wait_first_token()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def end_with(self, error: BaseException) -> None:
        """End it now with `error` as its last event (on the event loop): the reader's own
        events that follow are never read."""
        self.events.put_nowait(("error", error, 0))
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class RequestRelay:
    """Hands each request to the engine's scheduler (`_core.Scheduler`, which decides what runs)
    and relays every request's text pieces to the event loop from one dispatcher thread."""

    def __init__(self, llm: LLM, parallel: int = 4, max_waiting: int = 256,
                 stream_buffer_tokens: int = 64, stream_idle_timeout: float = 60.0):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.llm = llm
        self.parallel = parallel
        self.max_waiting = max_waiting
        # The server's own batching loop on the shared engine, with the server's limits (and
        # its policy for clients that stop reading).
        self.engine_scheduler = _core.Scheduler(llm.engine, max_running=parallel,
                                                max_waiting=max_waiting,
                                                max_unread_tokens=stream_buffer_tokens,
                                                stream_idle_timeout=stream_idle_timeout)
        stats = llm.engine.cache_stats()
        self.block_size: int = stats["block_size"]
        self.total_blocks: int = stats["total_blocks"]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._scheduler_stopped = False
        self._live: dict[int, Generation] = {}  # by request id, until its end is handed over
        self._live_lock = threading.Lock()  # _live: start() and the dispatcher
        self._dispatcher: threading.Thread | None = None
        # Called on the event loop when a generation ends: (generation, completion), completion
        # None when it failed.
        self.on_finish = None

    # ---- state, for /metrics -------------------------------------------------------------

    def stats(self) -> dict:
        return self.engine_scheduler.stats()

    def generations(self) -> list[Generation]:
        """The generations started and not yet finished."""
        with self._live_lock:
            return list(self._live.values())

    @property
    def running(self) -> int:
        return self.stats()["running"]

    @property
    def waiting(self) -> int:
        return self.stats()["waiting"]

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    # ---- requests ------------------------------------------------------------------------

    def check_room(self) -> None:
        """Raise QueueFull when a new request would have to wait and the queue is full."""
        stats = self.stats()
        if stats["waiting"] >= self.max_waiting and stats["running"] >= self.parallel:
            raise QueueFull(f"{stats['waiting']} requests are already waiting for one of "
                            f"{self.parallel} slots")

    async def start(self, prompt_ids: list[int], max_tokens: int, options: dict[str, Any],
                    endpoint: str = "chat", arrived: float | None = None) -> Generation:
        """Queue the request with the engine's scheduler; the dispatcher relays its pieces."""
        self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the server is shutting down")
        job = Job(prompt_ids, max_tokens, options, endpoint=endpoint,
                  arrived=time.perf_counter() if arrived is None else arrived)
        if len(prompt_ids) + max_tokens > self.capacity_tokens:  # could never fit
            raise ValueError(f"the request needs {len(prompt_ids) + max_tokens} KV-cache "
                             f"positions but the cache holds {self.capacity_tokens}")
        sampling = SamplingOptions.build(**options)
        generation = Generation(job)
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="opencamp-dispatch",
                                                daemon=True)
            self._dispatcher.start()
        with self._live_lock:  # listed before the dispatcher can collect its first tokens
            try:
                stream = Stream(self.llm, list(prompt_ids), sampling,
                                scheduler=self.engine_scheduler, collected=True)
            except _core.OpencampError as error:
                if getattr(error, "kind", None) == "queue_full":
                    raise QueueFull(str(error)) from None
                raise
            generation._attach(stream)
            self._live[stream._generation.id] = generation
        return generation

    def _dispatch(self) -> None:
        """The dispatcher thread: each step's tokens of every request, as text pieces, to the
        event loop in one hand-off."""
        while True:
            try:
                news = self.engine_scheduler.collect(_DISPATCH_POLL_SECONDS)
            except Exception:  # noqa: BLE001 - never happens; if it did, every stream would hang
                log.exception("collecting tokens failed")
                time.sleep(_DISPATCH_POLL_SECONDS)
                continue
            if not news:
                if self._scheduler_stopped:
                    return
                continue
            with self._live_lock:
                targets = [self._live.get(request_id) for request_id, *_ in news]
            handoff: list[tuple[Generation, tuple]] = []
            for generation, (request_id, ids, ends_with_stop, ended, logprobs) in zip(targets, news):
                if generation is not None:  # None: its end was handed over already
                    self._advance(request_id, generation, ids, ends_with_stop, ended, logprobs,
                                  handoff)
            if handoff:
                self._post(self._deliver, handoff)

    def _advance(self, request_id: int, generation: Generation, ids: list[int],
                 ends_with_stop: bool, ended: bool, logprobs: list | None, handoff: list) -> None:
        """One request's news: its pieces (and its end) onto `handoff`."""
        stream = generation._stream
        try:
            piece = stream.feed(ids, ends_with_stop, logprobs) if ids else ""
            if piece:
                if generation.first_text_at is None:
                    generation.first_text_at = time.perf_counter()
                handoff.append((generation, ("text", piece, len(ids))))
            elif ids:  # held back (part of a character or of a stop string): not the client's
                stream._generation.acknowledge(len(ids))
            if not ended:
                return
            piece = stream.end()  # raises the engine's error, if one ended it
            if piece:
                handoff.append((generation, ("text", piece, 0)))
            handoff.append((generation, ("done", stream.completion, 0)))
        except BaseException as error:  # the engine refused or failed it: report it
            if not isinstance(error, _core.OpencampError) or error.kind == "internal":
                log.exception("generation failed")
            try:
                stream.cancel()  # a failure on this side: the engine stops it and frees its cache
            except BaseException:
                pass
            handoff.append((generation, ("error", error, 0)))
        with self._live_lock:
            self._live.pop(request_id, None)

    def _deliver(self, handoff: list) -> None:
        """On the event loop: one dispatch's events into their generations' queues."""
        for generation, event in handoff:
            if event[0] == "done":
                self._finished(generation, event[1])
            elif event[0] == "error":
                self._finished(generation, None)
            generation.events.put_nowait(event)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _finished(self, generation: Generation, completion: Completion | None) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(generation, completion)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_finish failed")

    def close(self, timeout: float = 30.0) -> None:
        """At shutdown: stop every request (each at the engine's next step), let the dispatcher
        hand over their ends, then stop the scheduler and the dispatcher."""
        self._closed = True
        for generation in self.generations():
            generation.cancel()
        deadline = time.monotonic() + timeout
        while self._dispatcher is not None and self._dispatcher.is_alive():
            with self._live_lock:
                if not self._live:
                    break
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self.engine_scheduler.shutdown()  # the kept conversations go too
        self._scheduler_stopped = True  # the dispatcher takes what is left, then returns
        if self._dispatcher is not None:
            self._dispatcher.join(max(0.0, deadline - time.monotonic()) + 1.0)
