"""Load and faults against a real `opencamp serve` process (issue 9): 200 streams of which a
third disconnect mid-stream, 8 clients that never read their sockets, one 8,000-token prompt,
then a SIGTERM with streams running.

What must hold: nothing hangs (every wait below has a bound); every stream that was read ends
with `data: [DONE]` after its last chunk or an OpenAI-shaped error event; the clients that went
away are cancelled (not run on to max_tokens, not ended as unread by the idle timeout); the
unread ones, read at last, end with [DONE] too; once the load is over no KV-cache block is held
by anything but the conversations the server keeps for a next turn; and on SIGTERM the running
streams end with an error event and [DONE] and the process exits within its shutdown deadline.
(Pausing an unread stream off the batch is tested in-process in test_fair_service.py: here the
kernel's socket buffers may well take an unread stream's whole answer.)

The model is the tiny random chat model (serverkit) with an 8,192-position context, so the
whole test takes tens of seconds on 2 cores. Timing is never asserted, only bounded.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from serverkit import ServeProcess, count, make_tiny_chat_model, metric, sse_events, wait_until

CONTEXT = 8192
LONG_PROMPT_TOKENS = 8000
STREAMS = 200
UNREAD = 8
SHUTDOWN_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
# uvicorn's own grace period is shutdown_timeout + 5 s (runner.make_server); on top of it a
# margin for a loaded 2-core machine.
EXIT_DEADLINE = SHUTDOWN_TIMEOUT + 5.0 + 10.0
CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=30.0)  # a bound for every read, never reached


@pytest.fixture(scope="module")
def tiny_8k_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-8k"), smollm2_tokenizer_dir,
                                context=CONTEXT)


def chat(i: int, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Request {i}: say something"}],
            "stream": True, "max_tokens": max_tokens}


def has_text(line: str) -> bool:
    """Whether an SSE line is a chunk with generated text (a chat delta or a completion)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[len("data: "):]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content") or choices[0].get("text"))


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, *, path: str,
                      leave_after: int | None = None, started: asyncio.Event | None = None) -> dict:
    """One streamed request; returns its status, SSE events, and whether the connection was cut
    before the body ended. With `leave_after` it disconnects after that many content chunks."""
    lines, content = [], 0
    try:
        async with client.stream("POST", url + path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "body": response.json(), "cut": False}
            async for line in response.aiter_lines():
                lines.append(line)
                if has_text(line):
                    content += 1
                    if started is not None:
                        started.set()
                    if leave_after is not None and content >= leave_after:
                        return {"status": 200, "left": True}  # closes the connection
    except httpx.TransportError as error:  # the server cut the stream: what must not happen
        return {"status": 200, "events": sse_events(lines), "cut": repr(error)}
    return {"status": 200, "events": sse_events(lines), "cut": False}


def assert_error_event(event: dict, code: str | None = None) -> None:
    assert set(event) == {"error"}, event
    assert set(event["error"]) == {"message", "type", "param", "code"}, event
    assert event["error"]["message"]
    if code is not None:
        assert event["error"]["code"] == code, event


def assert_ended(result: dict, finish_reason: str | None = "length") -> None:
    """Read to the end: [DONE] after a last chunk with a finish reason, or after an error event."""
    assert result["status"] == 200 and not result["cut"], result
    events = result["events"]
    assert events and events[-1] == "[DONE]", events[-3:]
    last = events[-2]
    if "error" in last:
        assert_error_event(last)
    else:
        assert last["choices"][0]["finish_reason"] == finish_reason, last


def open_unread_stream(url: str, body: dict) -> socket.socket:
    """A streamed request on a socket that is then never read (a small receive buffer, so the
    server's writes soon back up)."""
    address = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((address.hostname, address.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n"
                 b"Host: " + address.netloc.encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def read_to_done(sock: socket.socket) -> list:
    """Everything the server sends on `sock` up to [DONE] (each recv bounded by the socket's
    timeout), as SSE events."""
    data = b""
    while b"data: [DONE]\n\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding: chunked" in head.lower(), head
    text = b""
    while body:  # HTTP/1.1 chunked: size line, chunk, CRLF
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text += rest[:size]
        body = rest[size + 2:]
    text = text.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    return sse_events(text[:-2].split("\n"))


def scrape(url: str) -> str:
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    return response.text


def test_200_streams_disconnects_unread_clients_a_long_prompt_and_sigterm(tiny_8k_dir):
    server = ServeProcess([
        "--model", str(tiny_8k_dir), "--threads", "2", "--max-running", "12",
        "--max-context", str(CONTEXT), "--kv-cache-tokens", str(2 * CONTEXT),
        "--max-waiting", "400", "--stream-buffer-tokens", "8",
        "--stream-idle-timeout", str(IDLE_TIMEOUT), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
        "--http-timeout", "30", "--temperature", "0", "--log-level", "info"])
    unread: list[socket.socket] = []
    try:
        url = server.wait_ready()
        leaving = [i for i in range(STREAMS) if i % 3 == 0]  # a third: 67
        read_whole = [i for i in range(STREAMS) if i % 3 != 0]

        async def load() -> tuple[dict, list[dict]]:
            limits = httpx.Limits(max_connections=STREAMS + 16, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
                long_prompt = [(i * 7919 + 13) % 40000 + 100 for i in range(LONG_PROMPT_TOKENS)]
                long_task = asyncio.ensure_future(read_stream(
                    client, url, {"prompt": long_prompt, "stream": True, "max_tokens": 8,
                                  "ignore_eos": True}, path="/v1/completions"))
                await asyncio.sleep(0.2)  # its prefill under way before the crowd arrives
                for i in range(UNREAD):  # never read, each holding a connection
                    unread.append(await asyncio.to_thread(open_unread_stream, url,
                                                          chat(1000 + i, 2000)))
                tasks = [asyncio.ensure_future(read_stream(
                    client, url, chat(i, 2000 if i in leaving else 16), path="/v1/chat/completions",
                    leave_after=2 if i in leaving else None)) for i in range(STREAMS)]
                results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
                return await asyncio.wait_for(long_task, 240), results

        started = time.monotonic()
        long_result, results = asyncio.run(load())
        load_seconds = time.monotonic() - started

        assert_ended(long_result)
        for i in leaving:
            assert results[i] == {"status": 200, "left": True}, (i, results[i])
        for i in read_whole:
            assert_ended(results[i])
            assert "error" not in results[i]["events"][-2], (i, results[i]["events"][-2])

        # The unread streams: either the kernel's socket buffers took their whole answer (on
        # Linux up to 4 MiB a connection, more than an 8k-context stream's SSE), or they backed
        # up into the engine, were paused off the batch and ended by the idle timeout. Either
        # way the engine goes idle with them still unread.
        def idle() -> bool:
            text = scrape(url)
            return all(metric(text, name) == 0 for name in (
                "opencamp_requests_running", "opencamp_requests_waiting",
                "opencamp_requests_paused"))
        wait_until(idle, timeout=120, interval=0.2, what="the engine to go idle")
        text = scrape(url)
        # The clients that left were cancelled (not run on to max_tokens, not ended by the
        # idle timeout as streams nobody reads).
        assert count(text, "opencamp_requests_total", endpoint="chat",
                     finish_reason="cancelled") == len(leaving)
        timed_out = metric(text, "opencamp_stream_idle_timeouts")
        assert timed_out <= UNREAD
        # Read at last, each ends with [DONE]: after its last chunk, or the timeout's error.
        ends = []
        for sock in unread:
            events = read_to_done(sock)
            assert events[-1] == "[DONE]"
            if "error" in events[-2]:
                assert_error_event(events[-2], "stream_idle_timeout")
                ends.append("timeout")
            else:
                assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]
                ends.append("length")
            sock.close()
        unread.clear()
        assert ends.count("timeout") == timed_out

        text = scrape(url)
        # Every other request ran to max_tokens or was ended by the idle timeout.
        assert count(text, "opencamp_requests_total", endpoint="chat",
                     finish_reason="length") == len(read_whole) + ends.count("length")
        assert count(text, "opencamp_requests_total", endpoint="completion",
                     finish_reason="length") == 1
        assert count(text, "opencamp_requests_total", endpoint="chat",
                     finish_reason="error") == timed_out
        # Every KV-cache block is back: none is held but by the conversations kept for a next
        # turn (with nothing running, all a leak could hide behind).
        sequences = metric(text, "opencamp_kv_cache_sequences")
        assert sequences == metric(text, "opencamp_kv_cache_kept_conversations") <= 32
        assert metric(text, "opencamp_kv_cache_blocks_used") == \
            metric(text, "opencamp_kv_cache_blocks_kept")

        # SIGTERM with streams running: they end with an error event and [DONE], and the
        # process exits within the deadline.
        async def shutdown() -> tuple[list[dict], float]:
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                running = [asyncio.Event() for _ in range(4)]
                tasks = [asyncio.ensure_future(read_stream(
                    client, url, chat(2000 + i, 6000), path="/v1/chat/completions",
                    started=running[i])) for i in range(4)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 120)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                ended = await asyncio.wait_for(asyncio.gather(*tasks), EXIT_DEADLINE)
                exit_code = await asyncio.to_thread(server.process.wait, EXIT_DEADLINE)
                return ended, exit_code, time.monotonic() - signalled

        ended, exit_code, exit_seconds = asyncio.run(shutdown())
        for result in ended:
            assert_ended(result)
            assert_error_event(result["events"][-2], "server_shutting_down")
        assert exit_code == -signal.SIGTERM  # uvicorn re-raises it once done
        assert exit_seconds < EXIT_DEADLINE
        print(f"\nload: {STREAMS} streams + {UNREAD} unread + a {LONG_PROMPT_TOKENS}-token "
              f"prompt in {load_seconds:.1f} s; exit {exit_seconds:.1f} s after SIGTERM")
    finally:
        for sock in unread:
            sock.close()
        server.stop()
