"""The relay between the C++ scheduler and asyncio (it schedules nothing itself).

Admission, batching and the KV cache are the engine's business: every request goes to one
`_core.Scheduler` (continuous batching, first come first served, at most `parallel` sequences
decoding together, prefix caching across requests, preemption when the cache is full). Here
each request gets a reader thread that turns its tokens into text pieces (the Python Stream)
and hands them to the event loop; cancelling stops the request at the engine's next step.

The reader never runs ahead of the client: it hands at most HANDOFF_WINDOW pieces to the event
loop that the response has not taken yet, so the undelivered tokens of a client that stops
reading pile up in the C++ scheduler's queue, which pauses the stream (off the batch, KV cache
kept) at `stream_buffer_tokens` and ends it after `stream_idle_timeout` seconds. That policy
lives there alone; this side only passes the client's pace through.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from ..llm import LLM, Completion, Stream

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


# Pieces handed to the event loop and not yet taken by the response.
HANDOFF_WINDOW = 4
# How often a reader waiting for its client looks whether the generation ended meanwhile.
_WINDOW_POLL_SECONDS = 0.25


class Generation:
    """One request, seen from the event loop: an asyncio queue of events

        ("text", piece)  ("done", Completion)  ("error", exception)

    and cancel(), which any thread may call; the request then stops at the engine's next step
    and its blocks are freed (full ones stay cached for later prompts).
    """

    def __init__(self, job: Job):
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_text_at: float | None = None  # perf_counter of the first text piece
        self._stream: Stream | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._window = threading.Semaphore(HANDOFF_WINDOW)  # released as the response takes

    async def next_event(self) -> tuple:
        """The next event, for the response: taking it makes room for the reader's next piece
        (so a client that does not read soon holds the generation back)."""
        event = await self.events.get()
        self._window.release()
        return event

    def _wait_for_room(self, stream: Stream) -> None:
        """On the reader thread: wait until the response has taken enough, or the generation
        ended (cancelled, timed out, finished: then what is left is bounded and drained)."""
        while not self._window.acquire(timeout=_WINDOW_POLL_SECONDS):
            if self._cancelled or stream.finished:
                return

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
        self.events.put_nowait(("error", error))
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class RequestRelay:
    """Hands each request to the engine's scheduler (`_core.Scheduler`, which decides what runs)
    and relays its text pieces to the event loop from a reader thread."""

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
        self._live: set[Generation] = set()
        # Called on the event loop when a generation ends: (generation, completion), completion
        # None when it failed.
        self.on_finish = None

    # ---- state, for /metrics -------------------------------------------------------------

    def stats(self) -> dict:
        return self.engine_scheduler.stats()

    def generations(self) -> list[Generation]:
        """The generations started and not yet finished."""
        return list(self._live)

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
        """Queue the request with the engine's scheduler and start its reader thread."""
        self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the server is shutting down")
        job = Job(prompt_ids, max_tokens, options, endpoint=endpoint,
                  arrived=time.perf_counter() if arrived is None else arrived)
        if len(prompt_ids) + max_tokens > self.capacity_tokens:  # could never fit
            raise ValueError(f"the request needs {len(prompt_ids) + max_tokens} KV-cache "
                             f"positions but the cache holds {self.capacity_tokens}")
        generation = Generation(job)
        try:
            stream = self.llm.stream(prompt_ids, scheduler=self.engine_scheduler, **options)
        except _core.OpencampError as error:
            if getattr(error, "kind", None) == "queue_full":
                raise QueueFull(str(error)) from None
            raise
        generation._attach(stream)
        generation._thread = threading.Thread(target=self._read, args=(generation, stream),
                                              name="opencamp-reader", daemon=True)
        self._live.add(generation)
        generation._thread.start()
        return generation

    def _read(self, generation: Generation, stream: Stream) -> None:
        """The request's reader thread: text pieces to the event loop, then the completion."""
        try:
            for piece in stream:
                if generation.first_text_at is None:
                    generation.first_text_at = time.perf_counter()
                generation._wait_for_room(stream)
                self._post(generation.events.put_nowait, ("text", piece))
            completion: Completion = stream.completion
            self._post(self._finished, generation, completion)
            self._post(generation.events.put_nowait, ("done", completion))
        except BaseException as error:  # the engine refused or failed it: report it
            if not isinstance(error, _core.OpencampError) or error.kind == "internal":
                log.exception("generation failed")
            try:
                stream.close()  # a failure on this side: the engine stops it and frees its cache
            except BaseException:
                pass
            self._post(self._finished, generation, None)
            self._post(generation.events.put_nowait, ("error", error))

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _finished(self, generation: Generation, completion: Completion | None) -> None:
        self._live.discard(generation)
        if self.on_finish is not None:
            try:
                self.on_finish(generation, completion)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_finish failed")

    def close(self, timeout: float = 30.0) -> None:
        """At shutdown: stop every request (each at the engine's next step) and wait for their
        reader threads."""
        self._closed = True
        live = list(self._live)
        for generation in live:
            generation.cancel()
        deadline = time.monotonic() + timeout
        for generation in live:
            if generation._thread is not None:
                generation._thread.join(max(0.0, deadline - time.monotonic()))
        self.engine_scheduler.shutdown()  # the kept conversations go too
