#!/usr/bin/env python3
"""Time to first token and tokens/s of `opencamp serve` against llama-cpp-python's OpenAI server,
on the same prompts, the same machine and thread count, in the same run (ratios, not absolutes:
the machines are shared and noisy). Not part of the pass/fail suite.

    python bench/server/bench_server.py --threads 2            # needs both servers installed:
    pip install . 'llama-cpp-python[server]'

By default both servers run SmolLM2-135M-Instruct with the same weights: opencamp the bf16
safetensors the tests materialise (.cache/models/SmolLM2-135M-Instruct), llama.cpp a BF16 GGUF
made here from the same Q4_1 GGUF (dequantised, so the numbers are equal). --llama-gguf runs
llama.cpp on another file (e.g. the original Q4_1, which reads ~4x fewer bytes per token).

Measured through each server's streaming chat API with a small OpenAI-style client (httpx):
  * cold TTFT: a fresh conversation each time (a unique system prompt defeats prefix caches);
  * decode tok/s: streamed chunks after the first / time from the first to the last;
  * 4 clients at once: total tokens / wall time, and the mean TTFT under that load.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("OPENCAMP_SHARED_MODELS", REPO.parent / "shared" / "models"))
CACHE = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather and the keeper's thoughts.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bf16_gguf(source: Path, target: Path) -> Path:
    """The GGUF's weights dequantised and rounded to bf16 (the values the safetensors hold)."""
    if target.exists():
        return target
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    staging = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(staging), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.MOSTLY_BF16)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32 and values.ndim == 1:
            writer.add_tensor(tensor.name, values)  # norms stay f32, as llama.cpp expects
        else:
            packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(tensor.name, packed, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(target)
    return target


class Server:
    def __init__(self, name: str, command: list[str], port: int, ready_path: str):
        self.name, self.port, self.ready_path = name, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(CACHE.parent / f"bench-{name.split()[0]}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=os.environ.copy())

    def wait(self, timeout=300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start in {timeout} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def stream_chat(url: str, system: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = last = None
    chunks = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    return {"ttft": (first or time.perf_counter()) - start, "tokens": chunks,
            "decode": (chunks - 1) / (last - first) if chunks > 1 and last > first else 0.0,
            "wall": time.perf_counter() - start}


def measure(server: Server, runs: int, max_tokens: int, clients: int) -> dict:
    stream_chat(server.url, "Warm-up.", 4)
    single = [stream_chat(server.url, f"Session {i}: you are a helpful assistant.", max_tokens)
              for i in range(runs)]
    results: list[dict] = []
    failures: list[str] = []

    def client(i):
        try:
            results.append(stream_chat(server.url, f"Client {i}: you are a helpful assistant.",
                                       max_tokens // 2))
        except httpx.HTTPError as error:  # e.g. a server that cuts one stream for another
            failures.append(f"{type(error).__name__}: {error}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        print(f"{server.name}: {len(failures)} of {clients} concurrent streams failed: "
              f"{failures[0]}", file=sys.stderr)
    config = httpx.get(server.url + "/config").json() if server.name.startswith("opencamp") else {}
    return {
        "backend": config.get("backend", "-"),
        "failed": len(failures),
        "ttft": statistics.median(r["ttft"] for r in single),
        "decode": statistics.median(r["decode"] for r in single),
        "tokens": statistics.median(r["tokens"] for r in single),
        "concurrent_tps": sum(r["tokens"] for r in results) / wall,
        "concurrent_ttft": statistics.mean(r["ttft"] for r in results) if results else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", type=Path, default=CACHE / "SmolLM2-135M-Instruct",
                        help="opencamp's model folder")
    parser.add_argument("--llama-gguf", type=Path, default=None,
                        help="llama.cpp's GGUF (default: a BF16 copy of the shared Q4_1 GGUF)")
    parser.add_argument("--backend", default="auto", help="opencamp's backend")
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()

    if not (args.model / "model.safetensors").exists():
        raise SystemExit(f"{args.model} has no weights: run the test suite once (it materialises "
                         "them) or pass --model")
    context = 1024
    servers = []
    oc_port = free_port()
    opencamp_cmd = [shutil.which("opencamp") or str(Path(sys.executable).parent / "opencamp"),
                    "serve", "--model", str(args.model), "--port", str(oc_port),
                    "--threads", str(args.threads), "--max-context", str(context),
                    "--parallel", str(args.clients), "--backend", args.backend,
                    "--log-level", "warning"]
    servers.append(Server("opencamp serve", opencamp_cmd, oc_port, "/health"))
    if not args.skip_llama:
        gguf_path = args.llama_gguf or make_bf16_gguf(
            SHARED / "SmolLM2-135M-Instruct.Q4_1.gguf", CACHE / "SmolLM2-135M-Instruct.bf16.gguf")
        ll_port = free_port()
        servers.append(Server(f"llama-cpp-python server ({gguf_path.name})",
                              [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
                               "--port", str(ll_port), "--n_threads", str(args.threads),
                               "--n_threads_batch", str(args.threads), "--n_ctx", str(context),
                               # queue concurrent requests (its default cuts the running stream
                               # off when another request arrives)
                               "--interrupt_requests", "False"],
                              ll_port, "/v1/models"))
    rows = []
    try:
        for server in servers:  # one at a time: they would fight over the cores
            server.wait()
            print(f"measuring {server.name} ...", file=sys.stderr)
            rows.append((server.name, measure(server, args.runs, args.max_tokens, args.clients)))
            server.stop()
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.stop()
    info = subprocess.run(opencamp_cmd[:1] + ["info", "--json"], capture_output=True, text=True)
    cpu = re.sub(r"\s+", " ", json.loads(info.stdout)["cpu"]["model"])
    print(f"\n{cpu}, {args.threads} threads; "
          f"{args.runs} runs of {args.max_tokens} tokens, greedy; {args.clients} clients at once "
          f"with {args.max_tokens // 2} tokens each\n")
    print(f"| server | backend | cold TTFT (s) | decode tok/s | {args.clients} clients: total "
          f"tok/s | {args.clients} clients: mean TTFT (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        failed = f" ({r['failed']} streams failed)" if r["failed"] else ""
        print(f"| {name} | {r['backend']} | {r['ttft']:.2f} | {r['decode']:.1f} | "
              f"{r['concurrent_tps']:.1f}{failed} | {r['concurrent_ttft']:.2f} |")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        print(f"\nopencamp / llama.cpp: TTFT x{a['ttft'] / b['ttft']:.2f} (lower is better), "
              f"decode x{a['decode'] / b['decode']:.2f}, {args.clients} clients x"
              f"{a['concurrent_tps'] / b['concurrent_tps']:.2f} (higher is better)")


if __name__ == "__main__":
    main()
