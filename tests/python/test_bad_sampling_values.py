"""Values that do not fit what C++ holds (issue 9: top_k 2**31 killed the server with SIGSEGV,
through pybind11's keep_alive after a failed conversion) are clear errors naming the field on
every surface: the Python API (ValueError), the bindings called directly (ValueError /
TypeError), the server (400 invalid_request_error) and the CLI (exit 1, no traceback).

Each surface runs in a subprocess, so a crash fails these tests instead of killing pytest.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serverkit import opencamp_executable

HERE = Path(__file__).resolve().parent
INT32_OVER = 2**31

# (keyword arguments, the field the error must name), as source for the subprocess
BAD_API_VALUES = """[
    ({"top_k": 2**31}, "top_k"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"temperature": "x"}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"),
]"""


def run_script(script: str, *args: str, timeout: float = 120) -> list:
    """Runs `script` in a fresh interpreter; returns the JSON list it printed last."""
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=HERE,
                               capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, (
        f"the subprocess died (return code {completed.returncode}; -11 is SIGSEGV):\n"
        f"{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_python_api_refuses_each_value_with_a_value_error(smollm2_dir):
    script = f"""
        import json, sys, opencamp
        llm = opencamp.LLM({str(smollm2_dir)!r}, threads=2)
        out = []
        for kwargs, field in eval(sys.argv[1]):
            try:
                llm.generate("hi", **kwargs)
                out.append([field, None, None, None])
            except Exception as e:
                out.append([field, type(e).__name__, isinstance(e, ValueError), str(e)])
        out.append(["after", llm.generate("hi", max_tokens=3), None, None])  # still serving
        print(json.dumps(out))
    """
    results = run_script(script, BAD_API_VALUES)
    for field, kind, is_value_error, message in results[:-1]:
        assert kind is not None, f"{field}: no error"
        assert is_value_error, f"{field}: {kind} {message}"
        assert field in message
    assert results[-1][0] == "after" and isinstance(results[-1][1], str)


def test_bindings_called_directly_refuse_each_value(smollm2_dir):
    script = f"""
        import json, opencamp
        from opencamp import _core
        llm = opencamp.LLM({str(smollm2_dir)!r}, threads=2)
        scheduler = llm.scheduler
        calls = [
            ("top_k", lambda: _core.SamplingParams(top_k={INT32_OVER})),
            ("seed", lambda: _core.SamplingParams(seed=-1)),
            ("temperature", lambda: _core.SamplingParams(temperature="x")),
            ("repetition_penalty", lambda: _core.SamplingParams(repetition_penalty=1e300)),
            ("max_tokens", lambda: scheduler.submit([1, 2], max_tokens={INT32_OVER})),
            ("stop_token_ids", lambda: scheduler.submit([1, 2], stop_token_ids=[2**70])),
            ("prompt", lambda: scheduler.submit([1, 2**40])),
            ("seq", lambda: scheduler.submit([1, 2], seq="a")),
            ("sampling", lambda: scheduler.submit([1, 2], sampling={{"top_k": 1}})),
            ("ignore_eos", lambda: scheduler.submit([1, 2], ignore_eos="yes")),
        ]
        out = []
        for field, call in calls:
            try:
                call()
                out.append([field, None, ""])
            except Exception as e:
                out.append([field, type(e).__name__, str(e)])
        # pybind11's own conversions elsewhere (no keep_alive on a returned object): a TypeError
        for field, call in [
            ("max_running", lambda: _core.Scheduler(llm.engine, max_running=2**40)),
            ("engine", lambda: _core.Scheduler("not an engine")),
            ("seq", lambda: llm.engine.prefill(10**12, [1])),
            ("length", lambda: llm.engine.truncate_sequence(0, 2**40)),
        ]:
            try:
                call()
                out.append(["pybind11:" + field, None, ""])
            except Exception as e:
                out.append(["pybind11:" + field, type(e).__name__, str(e)])
        # the same engine still answers: the SamplingParams object goes through whole
        handle = scheduler.submit([1, 2, 3], max_tokens=2, sampling=_core.SamplingParams(top_k=1))
        out.append(["after", handle.wait()["finish_reason"], ""])
        print(json.dumps(out))
    """
    results = run_script(script)
    for field, kind, message in results[:-1]:
        if field.startswith("pybind11:"):  # pybind11's message lists the signature instead
            assert kind == "TypeError" and "incompatible" in message, f"{field}: {kind} {message}"
            continue
        assert kind in ("ValueError", "TypeError"), f"{field}: {kind} {message}"
        assert field in message
    assert results[-1][:2] == ["after", "length"]


BAD_BODIES = [
    ({"top_k": INT32_OVER}, "top_k"),
    ({"max_tokens": INT32_OVER}, "max_tokens"),
    ({"temperature": "x"}, "temperature"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),  # (a JSON parser may refuse 2**70 itself)
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
]


def test_server_answers_400_for_each_value(smollm2_tokenizer_dir, tmp_path):
    script = f"""
        import json
        from pathlib import Path
        from starlette.testclient import TestClient
        import opencamp
        from opencamp.server import ServerOptions, create_app
        from serverkit import TINY_CONTEXT, make_tiny_chat_model
        folder = make_tiny_chat_model(Path({str(tmp_path)!r}), Path({str(smollm2_tokenizer_dir)!r}))
        llm = opencamp.LLM(folder, threads=2, max_context=TINY_CONTEXT)
        out = []
        with TestClient(create_app(llm, ServerOptions(model_name="tiny"))) as client:
            for body, field in {BAD_BODIES!r}:
                for route, extra in [("/v1/chat/completions", {{"messages": [{{"role": "user", "content": "hi"}}]}}),
                                     ("/v1/completions", {{"prompt": "hi"}})]:
                    for stream in (False, True):
                        r = client.post(route, json={{"model": "tiny", "stream": stream, **extra, **body}})
                        out.append([field, route, stream, r.status_code, r.json()])
            ok = client.post("/v1/completions", json={{"model": "tiny", "prompt": "hi", "max_tokens": 2}})
            out.append(["after", ok.status_code])
        print(json.dumps(out))
    """
    results = run_script(script)
    for field, route, stream, status, body in results[:-1]:
        where = f"{field} on {route} (stream={stream})"
        assert status == 400, f"{where}: {status} {body}"
        assert body["error"]["type"] == "invalid_request_error", where
        assert body["error"]["param"] == field, where
        assert field in body["error"]["message"], where
    assert results[-1] == ["after", 200]


@pytest.mark.parametrize("flag, value, field", [
    ("--top-k", str(INT32_OVER), "top_k"),
    ("--max-tokens", str(INT32_OVER), "max_tokens"),
    ("--seed", "-1", "seed"),
    ("--repetition-penalty", "1e300", "repetition_penalty"),
])
def test_cli_refuses_each_value(smollm2_dir, flag, value, field):
    completed = subprocess.run([opencamp_executable(), "generate", "--model", str(smollm2_dir),
                                "--threads", "2", flag, value, "hi"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1, (completed.returncode, completed.stderr[-2000:])
    assert field in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("flag, value, field", [
    ("--top-k", str(INT32_OVER), "top_k"),
    ("--repetition-penalty", "1e-300", "repetition_penalty"),
])
def test_serve_refuses_each_default_before_serving(smollm2_dir, flag, value, field):
    completed = subprocess.run([opencamp_executable(), "serve", "--port", "0", "--model",
                                str(smollm2_dir), flag, value],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1, (completed.returncode, completed.stderr[-2000:])
    assert field in completed.stderr
    assert "Traceback" not in completed.stderr
