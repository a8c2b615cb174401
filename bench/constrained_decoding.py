"""Constrained decoding under load: 8 streams held to a JSON schema by their grammars next to 8
free streams, in one continuous batch, on SmolLM2-135M-Instruct (the shared Q4_1 GGUF).

    python bench/constrained_decoding.py [--model PATH] [--threads 2] [--rounds 2]

Three runs, each read by one thread per stream (as the server's readers do):

  free8        the 8 free streams alone
  free8+free8  the 8 free streams next to 8 more free ones as long as the constrained answers
               (the same batch size as below, without masks): the baseline for the mask cost
  free8+json8  the 8 free streams next to the 8 constrained ones

It checks every constrained answer against the schema (pydantic) and reports the free streams'
mean decode speed (tokens/s per stream) in each run and the ratios; the masks are computed on
the scheduler's worker during the forward pass, so free8+json8 should be within a few percent
of free8+free8. Timing only (never pass/fail); compare ratios from one run, machines are noisy.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import pydantic

import opencamp
from opencamp import Grammar

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FREE_TOKENS = 96


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population_millions: float = pydantic.Field(ge=0, le=40)


class Cities(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    cities: list[City] = pydantic.Field(min_length=3, max_length=4)


QUESTIONS = ["Name some big cities in Europe.", "Name some big cities in Asia.",
             "Name some cities in France.", "Name some cities with ports.",
             "Name some capital cities.", "Name some cities in America.",
             "Name some old cities.", "Name some cities near mountains."]


def run(llm: opencamp.LLM, free: int, extra_free_tokens: int = 0, constrained: int = 0):
    """Start every stream at once; returns (free streams' tokens/s each, constrained texts,
    constrained lengths)."""
    free_prompts = [llm.chat_prompt_ids([{"role": "user", "content": f"Tell me a story {i}."}])
                    for i in range(free)]
    streams = [llm.stream(p, max_tokens=FREE_TOKENS, ignore_eos=True, temperature=0.0)
               for p in free_prompts]
    if extra_free_tokens:
        streams += [llm.stream(free_prompts[i], max_tokens=extra_free_tokens, ignore_eos=True)
                    for i in range(free)]
    schema = Grammar.json_schema(Cities.model_json_schema())
    constrained_streams = [
        llm.stream(llm.chat_prompt_ids([{"role": "user", "content": QUESTIONS[i % 8]}]),
                   grammar=schema, max_tokens=400, temperature=0.7, seed=i)
        for i in range(constrained)]
    texts: dict[int, str] = {}
    everything = streams + constrained_streams

    def read(index: int, stream) -> None:
        texts[index] = stream.text()

    threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(everything)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    free_rates = [s.completion.decode_tokens_per_second for s in streams[:free]]
    answers = [texts[len(streams) + i] for i in range(constrained)]
    lengths = [len(s.completion.token_ids) for s in constrained_streams]
    return free_rates, answers, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind; best kept")
    args = parser.parse_args()
    llm = opencamp.LLM(args.model, threads=args.threads, max_context=1024,
                       kv_cache_tokens=16 * 1024, max_running=16)
    run(llm, 2, constrained=1)  # warm up: the llguidance tokenizer, the caches

    best = {"free8": 0.0, "free8+free8": 0.0, "free8+json8": 0.0}
    valid = total = 0
    mask_lengths: list[int] = []
    for _ in range(args.rounds):
        rates, answers, lengths = run(llm, 8, constrained=8)
        for text in answers:
            total += 1
            Cities.model_validate_json(text)  # raises if any answer breaks the schema
            valid += 1
        mask_lengths += lengths
        best["free8+json8"] = max(best["free8+json8"], statistics.mean(rates))
        rates, _, _ = run(llm, 8, extra_free_tokens=round(statistics.mean(lengths)))
        best["free8+free8"] = max(best["free8+free8"], statistics.mean(rates))
        rates, _, _ = run(llm, 8)
        best["free8"] = max(best["free8"], statistics.mean(rates))
    print(f"constrained answers valid for the schema: {valid}/{total} "
          f"(mean {statistics.mean(mask_lengths):.0f} tokens each)")
    for name, rate in best.items():
        print(f"{name:12s} free streams decode {rate:6.1f} tokens/s each")
    print(f"free8+json8 / free8+free8 = {best['free8+json8'] / best['free8+free8']:.3f}  "
          "(the masks' cost at the same batch size)")
    print(f"free8+json8 / free8       = {best['free8+json8'] / best['free8']:.3f}  "
          "(also a batch twice as large)")


if __name__ == "__main__":
    main()
