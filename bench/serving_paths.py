#!/usr/bin/env python3
"""What a user gets from each way into the engine, in one run: the scheduler itself, Python
threads, and `opencamp serve` (non-streamed and streamed), for 1, 4, 8 and 16 concurrent streams,
with `opencamp bench` decode beside them. Not pass/fail (timing never is): ratios from the same
run, best of --repeat, because the machines are shared and noisy.

    python bench/serving_paths.py --threads 2            # pip install ".[test]" (httpx)

Every stream gets its own synthetic prompt of --prompt-tokens (+ its index, so no two share a
prefix) and generates exactly --tokens tokens (ignore_eos), greedy:

  * scheduler: `llm.scheduler.submit(...)` for every stream, then `wait()` (no Python per token);
  * complete:  one Python thread per stream calling `llm.complete(...)`;
  * threads:   one Python thread per stream iterating `llm.stream(...)` (pieces as they come);
  * serve:     one `opencamp serve` process (--parallel 16), one HTTP client per stream on
               /v1/completions (token-id prompts), non-streamed JSON and streamed SSE;
  * bench:     `opencamp bench --prompt-tokens P --gen-tokens T` decode tokens/s (one stream,
               decode steps only).

Aggregate = generated tokens of all streams / wall time from the first submit to the last token
(prefills included, as a burst of users has them). For one SSE stream also its decode rate (tokens
after the first / time from the first chunk to the last), the one to hold against `opencamp bench`;
TTFT is the mean time from sending a request to its first content chunk. A second table gives
the CPU time the serving process used per generated token (engine and Python together), which a
busy machine disturbs less than tokens/s: what the Python and HTTP layers add is the difference
from the scheduler's row.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPENCAMP_SHARED_MODELS", REPO.parent / "shared" / "models"))
CACHE = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
SMOLLM2 = "SmolLM2-135M-Instruct"


def default_model() -> Path:
    """The bf16 SmolLM2 folder the tests materialise (tests/python/conftest.py, smollm2_dir)."""
    target = CACHE / SMOLLM2
    if not (target / "model.safetensors").exists():
        sys.path.insert(0, str(REPO / "tests" / "python"))
        import conftest  # noqa: E402 - the one place that knows how to make it

        return conftest.smollm2_dir.__wrapped__()
    return target


def prompts(streams: int, prompt_tokens: int, vocab: int) -> list[list[int]]:
    from opencamp.bench import synthetic_prompt

    return [synthetic_prompt(prompt_tokens + i, vocab) for i in range(streams)]


# ---- in-process paths ------------------------------------------------------------------------

def run_scheduler(llm, batch: list[list[int]], tokens: int) -> dict:
    start = time.perf_counter()
    requests = [llm.scheduler.submit(p, max_tokens=tokens, ignore_eos=True) for p in batch]
    generated = sum(len(r.wait()["tokens"]) for r in requests)
    return {"aggregate": generated / (time.perf_counter() - start)}


def run_complete(llm, batch: list[list[int]], tokens: int) -> dict:
    """One Python thread per stream calling llm.complete (the whole answer)."""
    generated = [0] * len(batch)
    start = time.perf_counter()

    def one(i: int) -> None:
        generated[i] = llm.complete(batch[i], max_tokens=tokens, ignore_eos=True).completion_tokens

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"aggregate": sum(generated) / (time.perf_counter() - start)}


def run_threads(llm, batch: list[list[int]], tokens: int) -> dict:
    """One Python thread per stream iterating llm.stream (text pieces as they come)."""
    generated, first = [0] * len(batch), [0.0] * len(batch)
    start = time.perf_counter()

    def one(i: int) -> None:
        stream = llm.stream(batch[i], max_tokens=tokens, ignore_eos=True)
        for _ in stream:
            if not first[i]:
                first[i] = time.perf_counter() - start
        generated[i] = stream.completion.completion_tokens

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"aggregate": sum(generated) / (time.perf_counter() - start),
            "ttft": sum(first) / len(first)}


# ---- opencamp serve --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, threads: int, parallel: int, context: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opencamp.cli", "serve", "--model", str(model),
             "--threads", str(threads), "--parallel", str(parallel), "--max-context", str(context),
             "--port", str(self.port), "--served-model-name", "m", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("opencamp serve exited:\n" + self.process.stderr.read().decode())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("opencamp serve did not come up")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (all its threads), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def _one_http(client: httpx.AsyncClient, url: str, prompt: list[int], tokens: int,
                    stream: bool, start: float) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    sent = time.perf_counter()
    if not stream:
        response = await client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        return {"tokens": response.json()["usage"]["completion_tokens"]}
    body["stream_options"] = {"include_usage": True}
    first = last = None
    used = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                if first is None:
                    first = last
    return {"tokens": used, "ttft": first - sent, "decode_seconds": last - first}


def run_http(url: str, batch: list[list[int]], tokens: int, stream: bool) -> dict:
    async def main():
        limits = httpx.Limits(max_connections=len(batch) + 1)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(_one_http(client, url, p, tokens, stream, start)
                                             for p in batch))
            return results, time.perf_counter() - start

    results, wall = asyncio.run(main())
    out = {"aggregate": sum(r["tokens"] for r in results) / wall}
    if stream:
        out["ttft"] = sum(r["ttft"] for r in results) / len(results)
        out["decode"] = max((r["tokens"] - 1) / r["decode_seconds"] for r in results)
    return out


def best(runs: list[dict]) -> dict:
    """The run with the best aggregate (its TTFT with it); the best decode rate and the least
    CPU per token of any."""
    top = dict(max(runs, key=lambda r: r["aggregate"]))
    if "decode" in top:
        top["decode"] = max(r["decode"] for r in runs)
    if "cpu_ms_per_token" in top:
        top["cpu_ms_per_token"] = min(r["cpu_ms_per_token"] for r in runs)
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: bf16 SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", default="scheduler,complete,threads,http,sse,bench",
                        help="which rows to measure")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    model = args.model or default_model()
    counts = [int(n) for n in args.streams.split(",")]
    paths = set(args.paths.split(","))
    parallel, context = max(counts), 2048

    import opencamp
    from opencamp import bench

    # Both engines stay loaded for the whole run (the idle one sleeps), and every repetition
    # measures every cell once, so a quiet or busy moment of the machine falls on all rows.
    server = Server(model, args.threads, parallel, context) if paths & {"http", "sse"} else None
    llm = opencamp.LLM(model, threads=args.threads, max_context=context, max_running=parallel)
    try:
        vocab = llm.config["vocab_size"]
        loads = {n: prompts(n, args.prompt_tokens, vocab) for n in counts}
        run_scheduler(llm, loads[counts[0]], 8)  # warm-up
        if server:
            run_http(server.url, loads[counts[0]], 8, True)
        runs: dict[str, dict[int, list]] = {}
        in_process = {"scheduler": run_scheduler, "complete": run_complete, "threads": run_threads}
        for _ in range(args.repeat):
            for n in counts:
                for name in ("scheduler", "complete", "threads", "http", "sse"):
                    if name not in paths:
                        continue
                    if name in in_process:
                        cpu = time.process_time()
                        result = in_process[name](llm, loads[n], args.tokens)
                        cpu = time.process_time() - cpu
                    else:
                        cpu = server.cpu_seconds()
                        result = run_http(server.url, loads[n], args.tokens, name == "sse")
                        cpu = server.cpu_seconds() - cpu
                    result["cpu_ms_per_token"] = 1e3 * cpu / (n * args.tokens)
                    runs.setdefault(name, {}).setdefault(n, []).append(result)
            if "bench" in paths:
                result = bench.run(str(model), llm=llm, prompt_tokens=args.prompt_tokens,
                                   gen_tokens=args.tokens, repeat=1)
                runs.setdefault("bench", {}).setdefault(1, []).append(
                    {"aggregate": result["decode_tokens_per_s"]})
        table = {name: {n: best(r) for n, r in row.items()} for name, row in runs.items()}
    finally:
        if server:
            server.close()

    labels = {"scheduler": "`llm.scheduler.submit(...)` then `wait()`",
              "complete": "`llm.complete(...)` from N Python threads",
              "threads": "`llm.stream(...)` iterated from N Python threads",
              "http": "`opencamp serve`, N clients, non-streamed",
              "sse": "`opencamp serve`, N clients, streamed (SSE)",
              "bench": "`opencamp bench` decode (one stream)"}
    print(f"\nSmolLM2 bf16 ({model.name}), {args.threads} threads, {args.prompt_tokens}-token "
          f"prompts, {args.tokens} tokens per stream, best of {args.repeat}; aggregate tokens/s\n")
    print("| path | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in counts)
          + " | 8 vs 1 |")
    print("|---|" + "---|" * (len(counts) + 1))
    for name, label in labels.items():
        if name not in table:
            continue
        row = table[name]
        cells = [f"{row[n]['aggregate']:.0f}" if n in row else "" for n in counts]
        ratio = f"{row[8]['aggregate'] / row[1]['aggregate']:.1f}x" if 8 in row and 1 in row else ""
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    print("\nCPU time per generated token (ms; the process serving it, all its threads: engine "
          "and Python; the HTTP client's not included)\n")
    print("| path | " + " | ".join(str(n) for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, label in labels.items():
        row = table.get(name, {})
        if name == "bench" or not row:
            continue
        print(f"| {label} | " + " | ".join(f"{row[n]['cpu_ms_per_token']:.1f}" if n in row else ""
                                         for n in counts) + " |")
    print()
    sched, sse = table.get("scheduler", {}), table.get("sse", {})
    if 8 in sched and 8 in sse:
        print(f"8 SSE streams / scheduler at 8: {sse[8]['aggregate'] / sched[8]['aggregate']:.2f}x "
              "(target >= 0.85)")
    if 8 in sse and 1 in sse:
        print(f"8 SSE streams / one SSE stream: {sse[8]['aggregate'] / sse[1]['aggregate']:.2f}x "
              "(target >= 4)")
    if 1 in sse and "bench" in table:
        print(f"one SSE stream's decode {sse[1]['decode']:.0f} tok/s / opencamp bench decode "
              f"{table['bench'][1]['aggregate']:.0f} tok/s: "
              f"{sse[1]['decode'] / table['bench'][1]['aggregate']:.2f}x (target >= 0.95)")
    for name in ("threads", "sse"):
        if 8 in table.get(name, {}):
            print(f"time to first token at 8 clients ({name}): {1e3 * table[name][8]['ttft']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
