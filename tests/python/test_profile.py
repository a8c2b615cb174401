"""OPENCAMP_PROFILE=1 wraps the backend in src/runtime/profiling_backend.cpp, which forwards every
op by hand. An op it does not forward falls to Backend's default (which refuses it), so a
generation with the variable set must give the same tokens as without, and list every op the
decoder calls. Runs in a subprocess: the variable is read when an engine is made."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

OPS = ("embedding", "rmsnorm", "matmul", "rope", "kv_store", "attention", "silu_mul", "add",
       "begin_forward", "end_forward")


def _generate(model_dir, profile: bool) -> tuple[list, str]:
    script = textwrap.dedent(f"""
        import json, opencamp
        llm = opencamp.LLM({str(model_dir)!r}, threads=2)
        c = llm.complete([1, 5, 9, 14], max_tokens=6, ignore_eos=True)
        print(json.dumps(c.token_ids))
        del llm, c
    """)
    env = dict(os.environ)
    env.pop("OPENCAMP_PROFILE", None)
    if profile:
        env["OPENCAMP_PROFILE"] = "1"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_profiled_generation_gives_the_same_tokens_and_lists_every_op(tiny_model_dir):
    plain, plain_err = _generate(tiny_model_dir, profile=False)
    profiled, report = _generate(tiny_model_dir, profile=True)
    assert profiled == plain and len(plain) == 6
    assert "opencamp profile" not in plain_err
    assert "opencamp profile" in report
    rows = {line.split()[0] for line in report.splitlines() if line.startswith("  ")}
    for op in OPS:
        assert op in rows, f"{op} missing from the profile:\n{report}"
