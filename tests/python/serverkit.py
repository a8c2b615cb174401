"""Helpers for the server tests: a tiny random chat model with SmolLM2's tokenizer, an app run by
uvicorn on a loopback port inside the test process, `opencamp serve` run as a real command, and
an SSE reader.

Every server started here listens on 127.0.0.1 only and is stopped by the test that started it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

TINY_CONTEXT = 4096
MODEL = "tiny-chat"  # the name the tiny chat apps serve
HELLO = [{"role": "user", "content": "Hello there"}]
JSON_TYPE = {"content-type": "application/json"}  # POST routes take nothing else (415)


def assert_openai_error(response, status, *, param=..., code=..., match=None) -> dict:
    """The response is `status` with a body in OpenAI's error shape; returns its error object.
    `match`: a regular expression the message must contain."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    if param is not ...:
        assert error["param"] == param
    if code is not ...:
        assert error["code"] == code, error
    if match is not None:
        assert re.search(match, error["message"]), error["message"]
    return error


def make_app(llm, **options):
    """An app serving `llm` as MODEL, greedy unless `defaults` says otherwise."""
    from opencamp.server import ServerOptions, create_app
    options.setdefault("defaults", {"temperature": 0.0})
    return create_app(llm, ServerOptions(model_name=MODEL, **options))


def make_tiny_chat_model(folder: Path, tokenizer_dir: Path, context: int = TINY_CONTEXT) -> Path:
    """A 2-layer random llama with SmolLM2's vocabulary, tokenizer and chat template, whose
    context is `context` positions.

    Fast enough (hundreds of tokens/s on the reference backend) to exercise the server's
    protocol, queueing and cancellation without waiting on a real model. Its special tokens
    have zero rows in lm_head, so greedy decoding never ends by itself: max_tokens decides.
    """
    from safetensors.numpy import save_file

    config = json.loads((tokenizer_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    hidden, layers, heads, kv_heads, head_dim, ffn = 64, 2, 4, 2, 16, 128
    config.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=context, tie_word_embeddings=False,
                  torch_dtype="float32")
    rng = np.random.default_rng(1234)

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0),
               "model.norm.weight": np.ones(hidden, np.float32)}
    head = w(vocab, hidden)
    head[:17] = 0.0  # <|endoftext|>, <|im_start|>, <|im_end|>, ...: never the argmax
    tensors["lm_head.weight"] = head
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(ffn, hidden),
            p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
        })
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
        (folder / name).chmod(0o644)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_app(app, timeout: float = 30.0, http_timeout: float = 30.0,
             shutdown_timeout: float = 0.0):
    """Run an ASGI app on 127.0.0.1 in a thread, with the server `opencamp serve` runs
    (opencamp.server.runner.make_server); yields its base URL."""
    from opencamp.server.runner import make_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, http_timeout=http_timeout, log_level="warning",
                         shutdown_timeout=shutdown_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class HeldStream:
    """A generation the server started, whose reader stops after `after` pieces until the server
    cancels (or closes) it. Unread, the request soon sits out the engine's steps (the scheduler
    pauses a request with max_unread_tokens unread), so it keeps running, holding its place in
    the batch, for as long as a test needs, however fast this machine generates. `holding` is
    set when the reader stops."""

    def __init__(self, stream, after: int):
        self.inner, self.after, self.pieces = stream, after, 0
        self.holding = threading.Event()
        self._released = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        if self.pieces == self.after:
            self.holding.set()
            # Only guards against a hang: a correct server cancels within the test's steps.
            if not self._released.wait(120):
                raise AssertionError("the server never cancelled a held generation")
        self.pieces += 1
        return next(self.inner)

    def release(self):
        """Let it go on to its end."""
        self._released.set()

    def cancel(self):
        self._released.set()
        self.inner.cancel()

    def close(self):
        self._released.set()
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def hold_streams(llm, monkeypatch, after: int) -> list[HeldStream]:
    """From here on every generation `llm` starts is a HeldStream (held after `after` pieces);
    returns the list of them, in the order they started."""
    real_stream = llm.stream
    held: list[HeldStream] = []

    def stream(*args, **kwargs):
        held.append(HeldStream(real_stream(*args, **kwargs), after=after))
        return held[-1]

    monkeypatch.setattr(llm, "stream", stream)
    return held


def opencamp_executable() -> str:
    return shutil.which("opencamp") or str(Path(sys.executable).parent / "opencamp")


class ServeProcess:
    """`opencamp serve ...` as a child process on a free loopback port."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.args = [opencamp_executable(), "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.url: str | None = None
        self._url_seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line)
            if match and self.url is None:
                self.url = match.group(1)
                self._url_seen.set()
        self._url_seen.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait for /health to say ok; returns the base URL."""
        deadline = time.monotonic() + timeout
        self._url_seen.wait(timeout)
        if self.url is None:
            raise AssertionError(f"opencamp serve printed no URL:\n{self.output}")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"opencamp serve exited with {self.process.returncode}:\n"
                                     f"{self.output}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"opencamp serve was not ready in {timeout} s:\n{self.output}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)
        return self.process.returncode


def sse_events(lines) -> list:
    """The `data:` payloads of an SSE body: dicts, and the string "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def parse_sse(text: str) -> list:
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    return sse_events(text[:-2].split("\n"))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text. A series that is not there is an error: a
    misspelt or removed metric must fail the test, not read as 0."""
    value = _series(text, name, labels)
    if value is None:
        present = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines()
                          if line and not line.startswith("#")})
        raise AssertionError(f"no series {name}{labels or ''} in /metrics; the metrics there: "
                             f"{', '.join(present)}")
    return value


def count(text: str, name: str, **labels: str) -> float:
    """A labelled counter's value: 0 while that label set has not been counted (Prometheus shows
    a labelled series only once it exists), but the counter itself must be declared."""
    if f"# TYPE {name} counter" not in text.splitlines():
        raise AssertionError(f"/metrics declares no counter {name}")
    value = _series(text, name, labels)
    return 0.0 if value is None else value


def _series(text: str, name: str, labels: dict) -> float | None:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        if series == wanted:
            return float(value)
    return None


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
