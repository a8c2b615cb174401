"""`opencamp bench`: one JSON object with the speeds, decode timed on its own for exactly the
requested number of steps (never cut short by an end-of-sequence token)."""
import json
import shutil

from click.testing import CliRunner

from opencamp.bench import prefill_flops, synthetic_prompt
from opencamp.cli import main
from conftest import FIXTURES


def test_bench_json_reports_prefill_and_decode(tmp_path):
    model = FIXTURES / "tiny-qwen2"
    result = CliRunner().invoke(main, ["bench", "--model", str(model), "--backend", "cpu",
                                       "--dtype", "f32", "--threads", "1", "--prompt-tokens", "9",
                                       "--gen-tokens", "5", "--repeat", "1", "--no-bandwidth",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_gb_per_s",
                "prefill_gflop_per_s", "weight_bytes"):
        assert report[key] > 0, key
    assert report["backend"] == "cpu" and report["dtype"] == "f32" and report["threads"] == 1
    assert report["prompt_tokens"] == 9 and report["gen_tokens"] == 5 and report["decode_steps"] == 5
    # GB/s is the weights read per decoded token times tokens/s.
    assert abs(report["decode_gb_per_s"] - report["decode_tokens_per_s"] * report["weight_bytes"] / 1e9) < 1e-9


def test_bench_decode_never_stops_at_eos(tmp_path):
    """On a model whose first greedy token after bench's prompt is its EOS, bench still takes
    and times exactly the requested decode steps."""
    import opencamp
    from opencamp import bench

    model = tmp_path / "eos-first"
    shutil.copytree(FIXTURES / "tiny-qwen2", model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompt = synthetic_prompt(4, vocab)
    first = int(opencamp.LLM(model, backend="cpu", threads=1).logits(prompt)[-1].argmax())
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, "eos_token_id": first}))
    llm = opencamp.LLM(model, backend="cpu", threads=1)
    # Left alone, generation ends at once.
    alone = llm.complete(prompt, max_tokens=13)
    assert alone.token_ids == [first] and alone.finish_reason == "stop"
    report = bench.run(str(model), prompt_tokens=4, gen_tokens=12, repeat=1, llm=llm)
    assert report["decode_steps"] == 12 and report["gen_tokens"] == 12


def test_bench_refuses_more_tokens_than_the_context():
    result = CliRunner().invoke(main, ["bench", "--model", str(FIXTURES / "tiny-llama"),
                                       "--prompt-tokens", "100", "--gen-tokens", "100",
                                       "--no-bandwidth"])
    assert result.exit_code == 1
    assert "max_context" in result.stderr or "context" in result.stderr


def test_prefill_flops_counts_every_projection():
    config = {"hidden_size": 4, "intermediate_size": 8, "num_layers": 1, "num_heads": 2,
              "num_kv_heads": 1, "head_dim": 2, "vocab_size": 10}
    # per token: q 4x4 + k,v 2x(4x2) + o 4x4 + mlp 3x(4x8) = 16 + 16 + 16 + 96 = 144 MACs
    # attention: 2 x q_dim(4) x (1 + 2) causal pairs = 24 MACs; head: 10 x 4 = 40 MACs
    assert prefill_flops(config, 2) == 2 * (144 * 2 + 24 + 40)
    assert synthetic_prompt(3, 5) == [13 % 5, (7919 + 13) % 5, (2 * 7919 + 13) % 5]
