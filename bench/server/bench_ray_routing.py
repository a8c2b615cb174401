#!/usr/bin/env python3
"""Multi-turn chats through opencamp on Ray Serve: 2 replicas x 1 thread with prefix routing,
the same with random routing, and one `opencamp serve` with 2 threads, in the same run (ratios,
not absolutes: the machines are shared and noisy). Not part of the pass/fail suite.

    pip install '.[ray]'
    python bench/server/bench_ray_routing.py            # SmolLM2-135M-Instruct bf16

Each of `--chats` conversations (all at once) has its own system prompt and `--turns` turns;
every turn streams `--max-tokens` greedy tokens with include_usage. Reported per setup: the
time to first token of turns 2.. (mean and median), the share of their prompt tokens served from
a KV cache (usage.prompt_tokens_details.cached_tokens / prompt_tokens), and the wall time.
On a machine with 2 cores two replicas cannot add compute over one server with 2 threads; what
routing decides is whether later turns find their history cached.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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
CACHE = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
TOPICS = ["lighthouses", "volcanoes", "bees", "glaciers", "trains", "coral reefs", "comets",
          "bridges", "owls", "deserts", "rivers", "castles"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opencamp() -> str:
    return str(Path(sys.executable).parent / "opencamp")


def start_server(model: Path, extra: list[str], timeout: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [opencamp(), "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--temperature", "0", "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in process.stdout],
                     daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("opencamp serve exited:\n" + "".join(lines))
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("opencamp serve was not ready:\n" + "".join(lines))


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def one_turn(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    pieces, usage = [], None
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(text)
    return {"ttft": (first or time.perf_counter()) - start, "text": "".join(pieces),
            "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"],
            "replica": response.headers.get("x-opencamp-replica")}


def conversation(url: str, index: int, turns: int, max_tokens: int, out: list) -> None:
    topic = TOPICS[index % len(TOPICS)]
    messages = [{"role": "system", "content":
                 f"You are guide number {index}, an expert on {topic}. Answer in plain, vivid "
                 f"sentences, with one concrete fact about {topic} in every answer, and never "
                 "repeat a fact you already gave in this conversation."},
                {"role": "user", "content": f"Tell me something surprising about {topic}."}]
    with httpx.Client(base_url=url, timeout=600) as client:
        for turn in range(turns):
            result = one_turn(client, messages, max_tokens)
            out.append({"chat": index, "turn": turn, **result})
            messages += [{"role": "assistant", "content": result["text"]},
                         {"role": "user", "content": "Interesting. And what else?"}]


def run_workload(url: str, chats: int, turns: int, max_tokens: int) -> dict:
    results: list[dict] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(url, i, turns, max_tokens, results))
               for i in range(chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    later = [r for r in results if r["turn"] > 0]
    sticky = sum(1 for r in later if r["replica"] == next(
        x["replica"] for x in results if x["chat"] == r["chat"] and x["turn"] == 0))
    return {
        "later_ttft_mean_s": statistics.mean(r["ttft"] for r in later),
        "later_ttft_median_s": statistics.median(r["ttft"] for r in later),
        "first_ttft_mean_s": statistics.mean(r["ttft"] for r in results if r["turn"] == 0),
        "later_cached_share": sum(r["cached"] for r in later) / sum(r["prompt"] for r in later),
        "later_on_first_replica": sticky / len(later),
        "replicas_used": len({r["replica"] for r in results}),
        "wall_s": wall, "requests": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "SmolLM2-135M-Instruct",
                        help="a model folder (default: the bf16 SmolLM2 the tests materialise)")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if not (args.model / "model.safetensors").exists() and not args.model.is_file():
        sys.exit(f"{args.model} has no weights: run the test suite once (it materialises "
                 "SmolLM2 into .cache/models), or pass --model")
    common = ["--max-context", "2048", "--max-running", str(args.chats)]
    setups = [
        ("Ray Serve, 2 replicas x 1 thread, prefix routing",
         ["--replicas", "2", "--threads", "1", "--routing", "prefix"]),
        ("Ray Serve, 2 replicas x 1 thread, random routing",
         ["--replicas", "2", "--threads", "1", "--routing", "random"]),
        ("one opencamp serve, 2 threads", ["--threads", "2"]),
    ]
    report = {}
    for name, extra in setups:
        process, url = start_server(args.model, common + extra)
        try:
            one_turn(httpx.Client(base_url=url, timeout=600),  # warm up every code path once
                     [{"role": "user", "content": "Hi"}], 4)
            report[name] = run_workload(url, args.chats, args.turns, args.max_tokens)
        finally:
            stop_server(process)
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    print(f"\n{args.chats} chats x {args.turns} turns x {args.max_tokens} tokens, {args.model.name}"
          f", {os.cpu_count()} CPUs\n")
    print("| setup | TTFT turns 2+ mean / median | cached share of turns 2+ | turns 2+ on "
          "turn 1's replica | wall |")
    print("|---|---|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['later_ttft_mean_s']:.2f} / {r['later_ttft_median_s']:.2f} s | "
              f"{r['later_cached_share']:.0%} | {r['later_on_first_replica']:.0%} | "
              f"{r['wall_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
