"""Bad model files through the Python API: every loader error is an OpencampError (kind
invalid_model) naming the file and what is wrong, never a UnicodeDecodeError, a bare
RuntimeError, a MemoryError or a hang; chat templates render within time and size limits.

(The C++ side of each case: tests/cpp/test_loader.cpp; the mutation fuzzing:
tests/cpp/test_fuzz_loaders.cpp.)
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from conftest import FIXTURES

import opencamp
import opencamp.tokenizer as tokenizer_module
from opencamp import OpencampError, _core
from opencamp.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

MESSAGES = [{"role": "user", "content": "hi"}]


def tiny_copy(tmp_path: Path, name: str = "tiny-llama") -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def assert_invalid_model(error: pytest.ExceptionInfo, *parts: str) -> None:
    assert type(error.value) is OpencampError or isinstance(error.value, TokenizerError), type(error.value)
    assert error.value.kind == "invalid_model"
    for part in parts:
        assert part in str(error.value), (part, str(error.value))


def rename_tensor(path: Path, old: str, new: bytes) -> None:
    """Rewrite a safetensors header with tensor `old` renamed to the raw bytes `new`."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].replace(f'"{old}"'.encode(), b'"' + new + b'"')
    header += b" " * ((8 - len(header) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])


# ---- names and text that are not UTF-8 --------------------------------------------------------

def test_non_utf8_tensor_name_is_an_opencamp_error(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path)
    rename_tensor(model / "model.safetensors", "model.norm.weight", b"model.norm.\xff\xfe")
    with pytest.raises(OpencampError) as error:
        opencamp.LLM(model, threads=1)
    assert_invalid_model(error, "model.safetensors", "UTF-8")


def test_non_utf8_model_type_is_an_opencamp_error(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path)
    text = (model / "config.json").read_bytes().replace(b'"llama"', b'"lla\xe9ma"')
    (model / "config.json").write_bytes(text)
    for load in (lambda: _core.load_config(str(model)), lambda: opencamp.LLM(model, threads=1)):
        with pytest.raises(OpencampError) as error:
            load()
        assert_invalid_model(error, "config.json", "UTF-8")


def test_non_utf8_chat_template_is_a_tokenizer_error(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_bytes(b"{{ messages }}\xc3\x28")
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_model_dir(folder)
    assert isinstance(error.value, OpencampError) and isinstance(error.value, ValueError)
    assert_invalid_model(error, "chat_template.jinja", "not valid UTF-8")
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_bytes(b'{"chat_template": "\xff"}')
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_model_dir(folder)
    assert_invalid_model(error, "tokenizer_config.json", "not valid UTF-8")


# ---- files that are not regular files ----------------------------------------------------------

def test_symlink_loop_is_an_opencamp_error(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(model / "other")
    (model / "other").symlink_to(model / "model.safetensors")
    with pytest.raises(OpencampError) as error:
        opencamp.LLM(model, threads=1)
    assert_invalid_model(error, "model.safetensors", "symlink loop")


def test_load_config_on_a_symlink_loop_is_an_opencamp_error(tmp_path: Path) -> None:
    # The model path itself loops (load_config once asked std::filesystem, which threw a bare
    # RuntimeError), and a folder whose config.json loops.
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    with pytest.raises(OpencampError) as error:
        _core.load_config(str(loop))
    assert_invalid_model(error, str(loop), "symlink loop")
    with pytest.raises(opencamp.ModelNotFoundError, match="symlink loop"):  # not a repo id
        opencamp.LLM(loop, threads=1)
    model = tiny_copy(tmp_path)
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(model / "other.json")
    (model / "other.json").symlink_to(model / "config.json")
    with pytest.raises(OpencampError) as error:
        _core.load_config(str(model))
    assert_invalid_model(error, "config.json", "symlink loop")


def test_fifos_are_refused_without_blocking(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    # In a child process with a timeout: a regression would block open() forever.
    model = tiny_copy(tmp_path)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    os.mkfifo(folder / "chat_template.jinja")
    script = (
        "import sys, opencamp\n"
        "from opencamp.tokenizer import Tokenizer\n"
        "for load in (lambda: opencamp.LLM(sys.argv[1], threads=1), lambda: Tokenizer.from_model_dir(sys.argv[2])):\n"
        "    try:\n"
        "        load()\n"
        "    except opencamp.OpencampError as error:\n"
        "        print(error.kind, error)\n")
    result = subprocess.run([sys.executable, "-c", script, str(model), str(folder)],
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("invalid_model") and "model.safetensors" in lines[0] and "FIFO" in lines[0]
    assert lines[1].startswith("invalid_model") and "chat_template.jinja" in lines[1]
    assert "not a regular file" in lines[1]


# ---- hyper-parameters and weights that do not fit --------------------------------------------

def test_huge_layer_count_is_refused_at_once(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path)
    edit_config(model, num_hidden_layers=3_000_000)
    with pytest.raises(OpencampError) as error:  # was: 26 s and 5.6 GB, then an error
        opencamp.LLM(model, threads=1)
    assert_invalid_model(error, "config.json", "num_hidden_layers", "3000000")


@pytest.mark.parametrize("field,value", [("rms_norm_eps", -1.0), ("rms_norm_eps", float("nan")),
                                         ("rope_theta", 0.0), ("rope_theta", -1.0),
                                         ("rope_theta", float("nan"))])
def test_non_finite_or_negative_config_values_are_refused(tmp_path: Path, field: str, value: float) -> None:
    model = tiny_copy(tmp_path, "tiny-qwen3")
    if field == "rope_theta":  # where transformers 5 writes it (it wins over a top-level one)
        edit_config(model, rope_parameters={"rope_type": "default", "rope_theta": value})
    else:
        edit_config(model, **{field: value})
    with pytest.raises(OpencampError) as error:
        _core.load_config(str(model))
    assert_invalid_model(error, "config.json", field, "finite positive")


def test_rope_scaling_type_and_factor_are_checked(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path, "tiny-qwen2")  # rope_scaling {"type": "linear", "factor": 2}
    config = json.loads((model / "config.json").read_text())
    edit_config(model, rope_scaling={**config["rope_scaling"], "type": 7})
    with pytest.raises(OpencampError) as error:
        _core.load_config(str(model))
    assert_invalid_model(error, "'type'", "expected a string")
    edit_config(model, rope_scaling={**config["rope_scaling"], "factor": float("inf")})
    with pytest.raises(OpencampError) as error:
        _core.load_config(str(model))
    assert_invalid_model(error, "factor", "finite positive")


def test_qwen2_weights_under_llama_are_refused(tmp_path: Path) -> None:
    model = tiny_copy(tmp_path, "tiny-qwen2")
    edit_config(model, model_type="llama")
    with pytest.raises(OpencampError) as error:  # the q/k/v biases were silently dropped
        opencamp.LLM(model, threads=1)
    assert_invalid_model(error, "model.layers.0.self_attn.q_proj.bias", "'llama'", "attention_bias")


def test_wrapped_tensor_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    header = b'{"big":{"dtype":"F32","shape":[2147483648,2147483648],"data_offsets":[0,0]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    model = tiny_copy(tmp_path)
    shutil.copy(path, model / "model.safetensors")
    with pytest.raises(OpencampError) as error:
        opencamp.LLM(model, threads=1)
    assert_invalid_model(error, "'big'", "2147483648")


# ---- chat template limits ---------------------------------------------------------------------

def word_tokenizer(template: str) -> Tokenizer:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    return Tokenizer(backend, chat_template=template, name="test-model")


@pytest.mark.parametrize("template", [
    "{{ 'a' * 1000000000 }}",
    "{{ [0] * 1000000000 }}",
    "{{ 'a'|center(1000000000) }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 9 ** 100000000 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ ('a' * 10000000).join(['x'] * 10000) }}",
    "{{ ('a' * 1000000)|replace('a', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb') }}",
    "{% for i in range(100000) %}{{ 'x' * 200 }}{% endfor %}",
    # Doubling a string by formatting it into itself, in a loop.
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '%s%s' % (ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '{}{}'.format(ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '%s%s'|format(ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
    "{{ ('\\n' * 10000000)|indent(100) }}",
])
def test_template_output_limit(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="output limit"):
        word_tokenizer(template).apply_chat_template(MESSAGES)


def test_template_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_TIME_LIMIT_S", 0.5)
    looping = word_tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="longer than 0.5 s"):
        looping.apply_chat_template(MESSAGES)
    # The interrupt is spent: later code in this thread and later renders run normally.
    total = sum(range(2_000_000))
    assert total == 1999999000000
    fine = word_tokenizer("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    for _ in range(200):
        assert fine.apply_chat_template(MESSAGES) == "[user] hi"


def test_template_limits_keep_ordinary_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    template = ("{{ '%s-%05d' % ('id', 7) }}|{{ 'x'|center(7) }}|{{ 12345678901234567890 }}|"
                "{{ 2 ** 64 }}|{{ '-' * 3 }}|{{ ', '.join(['a', 'b']) }}|{{ 'a' ~ 1 }}|{{ [1] + [2] }}")
    assert word_tokenizer(template).apply_chat_template(MESSAGES) == (
        "id-00007|   x   |12345678901234567890|18446744073709551616|---|a, b|a1|[1, 2]")
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_OUTPUT_LIMIT", 100)
    with pytest.raises(ChatTemplateError, match="output limit"):
        word_tokenizer("{% for i in range(30) %}{{ i }}, {% endfor %}").apply_chat_template(MESSAGES)
