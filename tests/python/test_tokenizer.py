"""Tokenizer and chat templates: ids must match what transformers 5.24 produces."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SMOLLM2_ANSWER_IDS, SMOLLM2_ANSWER_TEXT, SMOLLM2_PROMPT_IDS, SMOLLM2_QUESTION

from opencamp.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

SMOLLM2_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n")


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_tokenizer_dir)


@pytest.fixture
def model_copy(smollm2_tokenizer_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of SmolLM2's tokenizer folder (the shared one is read-only)."""
    folder = tmp_path / "model"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def set_config_template(folder: Path, template: str | list | None) -> None:
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config))


def test_chat_prompt_ids_match_reference(smollm2: Tokenizer) -> None:
    messages = [{"role": "user", "content": SMOLLM2_QUESTION}]
    rendered = smollm2.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (SMOLLM2_DEFAULT_SYSTEM + f"<|im_start|>user\n{SMOLLM2_QUESTION}<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert smollm2.encode(rendered, add_special_tokens=False) == SMOLLM2_PROMPT_IDS
    assert smollm2.encode_chat(messages) == SMOLLM2_PROMPT_IDS


def test_encode_chat_adds_no_extra_bos(smollm2: Tokenizer) -> None:
    # The template writes <|im_start|> (also SmolLM2's BOS) itself; encoding must not add another.
    ids = smollm2.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == smollm2.bos_token_id == 1
    assert ids[1] != 1


def test_generation_prompt_is_optional(smollm2: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    without = smollm2.apply_chat_template(messages, add_generation_prompt=False)
    assert without.endswith("<|im_start|>user\nhi<|im_end|>\n")
    assert smollm2.apply_chat_template(messages) == without + "<|im_start|>assistant\n"


def test_decode_reference_answer(smollm2: Tokenizer) -> None:
    assert smollm2.decode(SMOLLM2_ANSWER_IDS) == SMOLLM2_ANSWER_TEXT
    assert smollm2.decode(SMOLLM2_ANSWER_IDS, skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.parametrize("text", [
    "Hello, world!", " leading space", "tabs\tand\nnewlines\n\n", "Café naïve über straße",
    "東京で寿司を食べた", "emoji 🦀🎉👨‍👩‍👧", "<|im_start|>user\nliteral special tokens<|im_end|>", "",
])
def test_encode_decode_round_trip(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text)) == text


def test_special_tokens(smollm2: Tokenizer) -> None:
    assert smollm2.bos_token == "<|im_start|>"
    assert smollm2.eos_token == "<|im_end|>"
    assert smollm2.eos_token_id == 2
    assert smollm2.token_to_id("<|im_end|>") == 2
    assert smollm2.token_to_id("no such token, surely") is None
    assert {0, 1, 2} <= smollm2.special_token_ids
    assert smollm2.vocab_size == 49152
    assert smollm2.special_tokens["unk_token"] == "<|endoftext|>"
    # Special tokens in text are recognised as single ids.
    assert smollm2.encode("<|im_end|>") == [2]


def test_system_message_replaces_default(smollm2: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Bonjour"},
                {"role": "user", "content": "Again"}]
    rendered = smollm2.apply_chat_template(messages)
    assert rendered == ("<|im_start|>system\nAnswer in French.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nBonjour<|im_end|>\n"
                        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" not in rendered


def test_extra_variables_reach_the_template(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text(
        "{{ greeting }}|{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ messages[0] | tojson }}")
    tokenizer = Tokenizer.from_model_dir(model_copy)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<é & ü>", "name": None}], greeting="hello",
        eos_token="OVERRIDE")
    # tojson keeps non-ASCII and HTML characters as they are (transformers' filter, not jinja2's),
    # and keys whose value is None are dropped before rendering.
    assert rendered == 'hello|<|im_start|>|OVERRIDE|None|{"role": "user", "content": "<é & ü>"}'


def test_template_globals(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text(
        "{% set ns = namespace(count=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% set ns.count = ns.count + 1 %}{% endfor %}{{ ns.count }}|"
        "{{ strftime_now('%Y') | length }}|{{ dict(a=1) | tojson(sort_keys=true) }}")
    tokenizer = Tokenizer.from_model_dir(model_copy)
    messages = [{"role": "user", "content": str(i)} for i in range(5)]
    assert tokenizer.apply_chat_template(messages) == '2|4|{"a": 1}'


def test_chat_template_jinja_takes_precedence(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer = Tokenizer.from_model_dir(model_copy)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"


def test_template_list_in_config_uses_default(model_copy: Path) -> None:
    set_config_template(model_copy, [{"name": "tool_use", "template": "TOOLS"},
                                     {"name": "default", "template": "DEFAULT"}])
    tokenizer = Tokenizer.from_model_dir(model_copy)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "DEFAULT"
    assert tokenizer.apply_chat_template(messages, tools=[{"name": "f"}]) == "TOOLS"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json") as caught:
        Tokenizer.from_model_dir(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_raise_exception_becomes_chat_template_error(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('Conversations must start with a system message') }}{% endif %}")
    tokenizer = Tokenizer.from_model_dir(model_copy)
    with pytest.raises(ChatTemplateError, match="Conversations must start with a system message"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_syntax_error(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    tokenizer = Tokenizer.from_model_dir(model_copy)  # templates compile on first use, as in transformers
    with pytest.raises(ChatTemplateError, match="syntax error"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("escape", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
])
def test_sandbox_blocks_escapes(model_copy: Path, escape: str) -> None:
    (model_copy / "chat_template.jinja").write_text(escape)
    tokenizer = Tokenizer.from_model_dir(model_copy)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="unsafe|underscore"):
        tokenizer.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("messages, problem", [
    ("hello", "list"),
    ([], "empty"),
    (["hello"], r"messages\[0\]"),
    ([{"content": "no role"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 42}], "content"),
    ([{"role": "user", "content": "ok"}, {"role": None, "content": "x"}], r"messages\[1\].*role"),
])
def test_malformed_messages(smollm2: Tokenizer, messages, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        smollm2.apply_chat_template(messages)


def test_model_without_template(model_copy: Path) -> None:
    set_config_template(model_copy, None)
    tokenizer = Tokenizer.from_model_dir(model_copy)
    assert not tokenizer.has_chat_template
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    # Plain tokenization still works.
    assert tokenizer.decode(tokenizer.encode("plain text")) == "plain text"


def test_folder_without_tokenizer_config(model_copy: Path) -> None:
    (model_copy / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer.from_model_dir(model_copy)
    assert tokenizer.bos_token is None and not tokenizer.has_chat_template
    assert tokenizer.encode("Paris") == tokenizer.encode("Paris", add_special_tokens=False)
