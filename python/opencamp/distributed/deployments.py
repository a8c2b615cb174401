"""The two Ray Serve deployments: engine replicas, each running the server's own app, and the
gateway in front of them.

    client -> Ray Serve's HTTP proxy -> Gateway (reads the body, routes) -> EngineReplica x N

An EngineReplica is one LLM (its own KV cache and threads) behind `create_app`, the very app
`opencamp serve` runs: every route, error and metric is that code, called here through ASGI with
the request the gateway forwards. The gateway reads each request's body first (Ray's proxy
routes before a body arrives, so only the gateway can see the prompt), then sends it through a
deployment handle whose router is the prefix-aware one (routing.py).

Faults: the gateway holds a response back until it has begun for real (the first token of a
stream, the whole body otherwise), so a request whose replica dies before that is sent again to
another replica, out of sight of the client. A stream that had begun ends with an OpenAI-shaped
error event and `data: [DONE]`. Ray Serve's controller starts a new replica in the dead one's
place.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import anyio
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..server.protocol import SSE_DONE, APIError, sse
from . import metrics as replica_metrics
from .routing import ROUTERS, ForwardedRequest, prompt_text

log = logging.getLogger("opencamp.distributed")

REPLICA_HEADER = "x-opencamp-replica"  # which replica answered (tests, debugging)
REPLICA_GONE = (RayActorError, ActorUnavailableError)  # ActorDiedError is a RayActorError
METRICS_TIMEOUT = 10.0  # seconds a replica's /metrics may take before it is left out
DROPPED_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


class EngineReplica:
    """One engine replica: loads the model, then serves the app's routes to forwarded requests."""

    async def __init__(self, model_path: str, llm_options: dict[str, Any], server_options):
        from ..llm import LLM
        from ..server import create_app

        # Loaded before the replica reports ready, so Ray routes nothing to a loading replica.
        llm = await anyio.to_thread.run_sync(lambda: LLM(model_path, **llm_options))
        self.app = create_app(llm, server_options)
        # The app's startup and shutdown, as an ASGI server would run them.
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def __del__(self):  # Ray Serve's graceful shutdown of this replica
        lifespan, self._lifespan = getattr(self, "_lifespan", None), None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    def process(self) -> dict:
        """Which replica this is, in which process (for tests and operators)."""
        return {"replica": self.replica_id, "pid": os.getpid()}

    async def handle_http(self, request: ForwardedRequest):
        """Runs the app on `request`; yields (status, headers) once, then the body's chunks."""
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": request.method, "scheme": request.scheme,
            "path": request.path, "raw_path": request.path.encode(), "root_path": "",
            "query_string": request.query_string, "headers": request.headers,
            "client": request.client, "server": request.server,
        }
        messages: asyncio.Queue = asyncio.Queue(maxsize=16)  # a slow reader holds the app back
        gone = asyncio.Event()
        body_given = False

        async def receive():
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()  # the gateway cancelled (its client went away), or we are done
            return {"type": "http.disconnect"}

        async def send(message):
            await messages.put(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put(None)

        task = asyncio.ensure_future(run())
        try:
            while True:
                message = await messages.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() not in DROPPED_HEADERS]
                    headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
                    yield message["status"], headers
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
        finally:
            gone.set()
            if not task.done():
                task.cancel()  # the app's own finally blocks cancel the generation
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


class _Gateway:
    """The HTTP ingress: forwards every request to an engine replica chosen by the prefix-aware
    router, retrying requests whose replica died before their response began; answers
    /metrics (summed over replicas) and /metrics/replicas (each replica's, labelled) itself."""

    def __init__(self, engine, engine_name: str, max_request_bytes: int = 1 << 20,
                 body_timeout: float = 30.0, attempts: int = 5):
        self.engine = engine.options(stream=True)
        self.engine_name = engine_name
        self.max_request_bytes = max_request_bytes
        self.body_timeout = body_timeout
        self.attempts = attempts

    def __serve_build_asgi_app__(self):
        return _ASGI(self)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD") and path in ("/metrics", "/metrics/replicas"):
            response = await self._metrics(scope, per_replica=path == "/metrics/replicas")
        else:
            response = await self._forward(scope, receive)
        await response(scope, receive, send)

    # ---- forwarding ------------------------------------------------------------------------

    async def _read_body(self, receive) -> bytes:
        """At most max_request_bytes + 1 bytes: a replica answers a longer one with its 413."""
        chunks, size = [], 0
        with anyio.move_on_after(self.body_timeout) as waited:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise APIError(499, "the client went away")
                chunk = message.get("body", b"")
                if size <= self.max_request_bytes:
                    chunks.append(chunk[: self.max_request_bytes + 1 - size])
                size += len(chunk)
                if not message.get("more_body", False):
                    break
        if waited.cancelled_caught:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s "
                           "(opencamp serve --http-timeout)", code="request_timeout")
        return b"".join(chunks)

    def _request(self, scope, body: bytes, replica: str | None = None) -> ForwardedRequest:
        return ForwardedRequest(
            method=scope["method"], path=scope["path"],
            query_string=scope.get("query_string", b""), headers=list(scope["headers"]),
            body=body, client=tuple(scope["client"]) if scope.get("client") else None,
            server=tuple(scope["server"]) if scope.get("server") else None,
            scheme=scope.get("scheme", "http"), prefix_text=prompt_text(scope["path"], body),
            replica=replica)

    async def _begin(self, request: ForwardedRequest):
        """Sends `request` until a replica begins answering it: (status, headers, the chunks
        so far, the generator for the rest or None). A replica dying before that is not seen
        by the client: the request goes to another one."""
        error: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            stream = self.engine.handle_http.remote(request)
            try:
                status, headers = await stream.__anext__()
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in headers)
                chunks = []
                # A stream has begun once something follows its first (role) chunk.
                async for chunk in stream:
                    chunks.append(chunk)
                    if streaming and len(chunks) >= 2:
                        return status, headers, chunks, stream
                return status, headers, chunks, None
            except REPLICA_GONE as gone:
                stream.cancel()
                error = gone
                log.warning("a replica failed before answering %s %s (attempt %d of %d): %s",
                            request.method, request.path, attempt + 1, self.attempts,
                            type(gone).__name__)
            except StopAsyncIteration:  # the replica's generator ended without a response
                stream.cancel()
                error = RuntimeError("the replica sent no response")
            except BaseException:
                stream.cancel()
                raise
        raise APIError(503, f"no replica could serve this request after {self.attempts} "
                       f"attempts ({type(error).__name__})", type="server_error",
                       code="replica_unavailable")

    async def _forward(self, scope, receive) -> Response:
        try:
            body = await self._read_body(receive)
            status, headers, chunks, rest = await self._begin(self._request(scope, body))
        except APIError as error:
            return JSONResponse(error.to_dict(), status_code=error.status)
        except BackPressureError:
            error = APIError(429, "the server is busy (every replica's queue is full); retry "
                             "later", type="server_error", code="server_busy")
            return JSONResponse(error.to_dict(), status_code=429)
        header_dict = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        if rest is None:
            return Response(b"".join(chunks), status_code=status, headers=header_dict)
        return StreamingResponse(_relay(chunks, rest), status_code=status, headers=header_dict)

    # ---- metrics ---------------------------------------------------------------------------

    async def _ask_replica(self, scope, replica: str | None):
        request = self._request(scope, b"", replica=replica)
        request.path, request.query_string = "/metrics", b""
        status, headers, chunks, _ = await self._begin(request)
        answered = next((v.decode() for k, v in headers if k == REPLICA_HEADER.encode()), "?")
        return status, headers, b"".join(chunks), answered

    async def _metrics(self, scope, per_replica: bool) -> Response:
        try:
            router = ROUTERS.get(self.engine_name)
            ids = router.replica_ids() if router is not None else []
            # One after the other: Ray gives the calls made while serving one request the
            # same internal request id, and its router matches replicas to requests by it.
            answers = []
            for replica in ids or [None]:  # None: any replica
                try:
                    answers.append(await asyncio.wait_for(self._ask_replica(scope, replica),
                                                          METRICS_TIMEOUT))
                except (asyncio.TimeoutError, *REPLICA_GONE) as error:
                    log.warning("replica %s left out of /metrics: %s", replica,
                                type(error).__name__)
        except APIError as error:
            return JSONResponse(error.to_dict(), status_code=error.status)
        texts = {}
        for status, headers, body, replica in answers:
            if status != 200:  # e.g. 401 without the API key: the replica's own answer
                return Response(body, status_code=status,
                                headers={k.decode("latin-1"): v.decode("latin-1")
                                         for k, v in headers})
            texts[replica] = body.decode()
        text = (replica_metrics.per_replica if per_replica else replica_metrics.aggregate)(texts)
        if router is not None and not per_replica:
            text += replica_metrics.routing(router.decisions)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


class _ASGI:
    """The gateway as an ASGI 3 app (uvicorn, inside Serve, tells ASGI 2 from 3 by __call__)."""

    def __init__(self, gateway: _Gateway):
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        await self.gateway.asgi(scope, receive, send)


# Serve's HTTP proxy hands the gateway's ASGI app (built per replica) every request.
Gateway = serve.ingress()(_Gateway)


async def _relay(chunks: list[bytes], rest):
    """The rest of a stream that has begun; a replica dying now ends it with an error event."""
    try:
        for chunk in chunks:
            yield chunk
        async for chunk in rest:
            yield chunk
    except REPLICA_GONE as error:
        log.warning("a replica failed mid-stream: %s", type(error).__name__)
        yield sse(APIError(503, "the replica serving this stream stopped before it finished; "
                           "send the request again", type="server_error",
                           code="replica_failed").to_dict())
        yield SSE_DONE
    finally:
        rest.cancel()  # the client went away: the replica stops generating
