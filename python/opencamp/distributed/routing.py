"""Prefix-aware routing of requests to engine replicas, on Ray Serve's request-router interface.

A conversation's next turn sends the whole conversation again: its prompt starts with the last
turn's prompt. The replica that served the last turn still holds that prefix in its KV cache
(kept conversations, the engine's prefix cache), so sending the turn there skips recomputing
it. The router remembers which replica each prompt went to, as a chain of hashes of blocks of
the prompt's text (the request's shape, not its tokens: the gateway never tokenises; each chat
message ends a block), and prefers the replica holding the longest run of leading blocks,
unless that replica has `imbalance_threshold` more requests in flight than the least-loaded
one. Prompts nobody has
seen go to the least-loaded replica, ties to the one holding the fewest remembered blocks
(where new conversations take cache from nobody).

Ray's own PrefixCacheAffinityRouter (ray.serve.llm) needs the `ray[llm]` stack (pyarrow, ...)
and a separate prefix-tree actor queried with blocking calls; this one is a few dozen lines on
the public `ray.serve.request_router.RequestRouter` interface, and also routes the gateway's
per-replica requests (/metrics of each replica) to the replica they name.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_CHARS = 64  # prompt characters per remembered block (about 16 tokens of English)
MESSAGE_START = "\x1e"  # before each chat message in prompt_text


@dataclass
class ForwardedRequest:
    """One HTTP request as the gateway hands it to an engine replica (pickled by Ray)."""
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    server: tuple[str, int] | None = None
    scheme: str = "http"
    prefix_text: str = ""  # what the router matches on: the prompt, normalised (prompt_text)
    replica: str | None = None  # route to this replica (unique id) rather than by prefix


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(_text_of(part.get("text", "")) if isinstance(part, dict) else _text_of(part)
                       for part in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def prompt_text(path: str, body: bytes) -> str:
    """The text a request's prompt starts with, for routing: a chat's messages (role and
    content, in order), or a completion's prompt. Anything unreadable is "" (the replica
    then answers it with the app's own 4xx)."""
    if path not in ("/v1/chat/completions", "/v1/completions") or not body:
        return ""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    messages = request.get("messages")
    if isinstance(messages, list):
        return "".join(f"{MESSAGE_START}{m.get('role', '')}\x1f{_text_of(m.get('content'))}"
                       for m in messages if isinstance(m, dict))
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, list):  # token ids
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of the text's blocks: hash i stands for everything up to block i. A
    chat's messages each end a block (a later turn repeats the earlier messages exactly, so
    their blocks match even when a message is shorter than a block); within a message, and
    in a completion's prompt, blocks are `block_chars` long."""
    hashes, previous = [], b""
    for piece in text.split(MESSAGE_START):
        for start in range(0, len(piece), block_chars):
            previous = hashlib.blake2b(previous + piece[start:start + block_chars].encode(),
                                       digest_size=12).digest()
            hashes.append(previous)
    return hashes


class PrefixTable:
    """Block hash -> the replicas that were sent a prompt with that prefix; least recently
    used entries go first beyond `capacity` blocks. Thread-safe (the gateway reads it for
    /metrics while the router's loop writes it)."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()
        self._blocks_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def longest_match(self, hashes: list[bytes], candidates: set[str]) -> tuple[int, set[str]]:
        """(blocks matched, the candidates holding that many), by binary search: a replica
        holding block i was sent a prompt with every block before it as well."""
        with self._lock:
            def holders(i):
                return self._holders.get(hashes[i], set()) & candidates
            lo, hi = 0, len(hashes)  # invariant: the first lo blocks are held by someone
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if holders(mid - 1):
                    lo = mid
                else:
                    hi = mid - 1
            return lo, (holders(lo - 1) if lo else set())

    def remember(self, hashes: list[bytes], replica: str) -> None:
        with self._lock:
            for h in hashes:
                holders = self._holders.get(h)
                if holders is None:
                    holders = self._holders[h] = set()
                else:
                    self._holders.move_to_end(h)
                if replica not in holders:
                    holders.add(replica)
                    self._blocks_of[replica] = self._blocks_of.get(replica, 0) + 1
            while len(self._holders) > self.capacity:
                _, dropped = self._holders.popitem(last=False)
                for r in dropped:
                    self._blocks_of[r] -= 1

    def forget(self, replica: str) -> None:
        with self._lock:
            for h in [h for h, holders in self._holders.items() if replica in holders]:
                holders = self._holders[h]
                holders.discard(replica)
                if not holders:
                    del self._holders[h]
            self._blocks_of.pop(replica, None)

    def blocks_of(self, replica: str) -> int:
        with self._lock:
            return self._blocks_of.get(replica, 0)


# The routers living in this process (the gateway's), by deployment name: the gateway asks
# them which replicas exist, to collect each one's /metrics.
ROUTERS: dict[str, "PrefixAffinityRouter"] = {}


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: a request goes to the replica that holds its prompt's longest
    known prefix unless that replica is `imbalance_threshold` requests busier than the least
    loaded; otherwise (or when `prefix_routing` is off: random routing, for comparison) to the
    least-loaded replica. Ray's base class then picks, within each returned rank, the replica
    with the shortest queue that still has room (max_ongoing_requests)."""

    def initialize_state(self, imbalance_threshold: int = 4, block_chars: int = BLOCK_CHARS,
                         min_match_blocks: int = 1, prefix_routing: bool = True,
                         capacity_blocks: int = 200_000):
        self.imbalance_threshold = imbalance_threshold
        self.block_chars = block_chars
        self.min_match_blocks = min_match_blocks
        self.prefix_routing = prefix_routing
        self.table = PrefixTable(capacity_blocks)
        # How requests were routed (the gateway's /metrics: opencamp_routing_decisions_total).
        self.decisions = {"prefix": 0, "least_loaded": 0, "pinned": 0, "random": 0}
        if self._deployment_id is not None:
            # Ray ships this class to the gateway by value, a copy whose globals are its own:
            # register in the module the gateway imports.
            registry = importlib.import_module("opencamp.distributed.routing").ROUTERS
            registry[self._deployment_id.name] = self

    def replica_ids(self) -> list[str]:
        return sorted(r.unique_id for r in self.curr_replicas)

    def _queue_len(self, replica: RunningReplica) -> int:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queue_len is None else queue_len

    @staticmethod
    def _request(pending_request: PendingRequest | None) -> ForwardedRequest | None:
        if pending_request is None:
            return None
        for arg in pending_request.args:  # by shape: Ray may hand a copy of another class object
            if hasattr(arg, "prefix_text") and hasattr(arg, "replica"):
                return arg
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # when every replica we name is full: back off, retry
            pending_request.routing_context.should_backoff = True
        request = self._request(pending_request)
        if request is not None and request.replica is not None:
            named = [r for r in candidate_replicas if r.replica_id.unique_id == request.replica]
            if named:  # gone: any replica answers, and says which it is
                self.decisions["pinned"] += 1
                return [named]
        if not self.prefix_routing:
            self.decisions["random"] += 1
            return [[random.choice(candidate_replicas)]]
        # Least loaded first; equal loads: the replica remembering the fewest blocks, then any.
        by_load = sorted(candidate_replicas, key=lambda r: (
            self._queue_len(r), self.table.blocks_of(r.replica_id.unique_id), random.random()))
        if request is not None and request.prefix_text:
            hashes = block_hashes(request.prefix_text, self.block_chars)
            ids = {r.replica_id.unique_id: r for r in candidate_replicas}
            matched, holders = self.table.longest_match(hashes, set(ids))
            if matched >= self.min_match_blocks:
                lightest = self._queue_len(by_load[0])
                near = [ids[h] for h in holders
                        if self._queue_len(ids[h]) - lightest <= self.imbalance_threshold]
                if near:
                    self.decisions["prefix"] += 1
                    return [near, by_load]
        self.decisions["least_loaded"] += 1
        return [by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        request = self._request(pending_request)
        if request is not None and request.prefix_text:
            self.table.remember(block_hashes(request.prefix_text, self.block_chars),
                                replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]):
        before = {r.unique_id for r in self.curr_replicas}
        super().update_replicas(replicas)
        for gone in before - {r.unique_id for r in self.curr_replicas}:
            self.table.forget(gone)
