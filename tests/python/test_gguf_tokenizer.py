"""Tokenizers built from GGUF metadata: the real SmolLM2 file against its own tokenizer.json, the
real Gemma 3 file against transformers' ids (tests/fixtures/gguf-tokenizer, made by
tests/fixtures/make_gguf_tokenizer_reference.py), and small synthetic vocabularies for each
pre-tokenizer, flag and error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, SMOLLM2_PROMPT_IDS, SMOLLM2_QUESTION

from opencamp.gguf_file import read_metadata
from opencamp.gguf_tokenizer import PRE_TOKENIZERS, derive_merges
from opencamp.tokenizer import Tokenizer, TokenizerError

GEMMA3_REFERENCE = json.loads((FIXTURES / "gguf-tokenizer" / "gemma3-270m.json").read_text("utf-8"))
# The reference corpus (English, code, emoji, CJK and other scripts, whitespace runs, byte
# fallback, Gemma's special tokens) plus SmolLM2's own special tokens.
CORPUS = [case["text"] for case in GEMMA3_REFERENCE["cases"]] + [
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>after end of text<|im_end|><|im_start|>",
    "not quite special: <|im_start and im_end|>",
    "digits 0 12 345 6789 ²³ ½ x² and a long number 31415926535897932384626433",
]


# ---- SmolLM2: the GGUF's vocabulary against the model's tokenizer.json ---------------------------

@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_gguf: Path) -> dict:
    return read_metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def from_gguf(smollm2_gguf: Path, smollm2_metadata: dict) -> Tokenizer:
    assert not (smollm2_gguf.parent / "tokenizer.json").exists()  # so it is built from metadata
    return Tokenizer.from_gguf(smollm2_gguf, metadata=smollm2_metadata)


@pytest.fixture(scope="module")
def from_json(smollm2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_tokenizer_dir)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_gguf_ids_equal_tokenizer_json(from_gguf: Tokenizer, from_json: Tokenizer,
                                               text: str) -> None:
    for add_special_tokens in (True, False):
        assert from_gguf.encode(text, add_special_tokens) == from_json.encode(text, add_special_tokens)
    ids = from_gguf.encode(text)
    assert from_gguf.decode(ids) == text
    assert from_gguf.decode(ids, skip_special_tokens=True) == \
        from_json.decode(ids, skip_special_tokens=True)


def test_smollm2_gguf_special_tokens_and_template(from_gguf: Tokenizer, from_json: Tokenizer) -> None:
    assert from_gguf.vocab_size == from_json.vocab_size == 49152
    assert from_gguf.special_token_ids == from_json.special_token_ids
    assert (from_gguf.bos_token_id, from_gguf.eos_token_id) == (1, 2)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert from_gguf.special_tokens[name] == from_json.special_tokens[name]
    # tokenizer.chat_template from the file renders exactly as tokenizer_config.json's.
    assert from_gguf.chat_template == from_json.chat_template
    messages = [{"role": "user", "content": SMOLLM2_QUESTION}]
    assert from_gguf.encode_chat(messages) == SMOLLM2_PROMPT_IDS
    assert from_gguf.encode("<|im_start|>") == [1]  # add_bos_token is false in this file


def _gguf_folder(tmp_path: Path, smollm2_gguf: Path) -> Path:
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    return folder / smollm2_gguf.name


def test_tokenizer_json_next_to_the_gguf_wins(tmp_path: Path, smollm2_gguf: Path,
                                              smollm2_tokenizer_dir: Path, smollm2_metadata) -> None:
    gguf = _gguf_folder(tmp_path, smollm2_gguf)
    shutil.copy(smollm2_tokenizer_dir / "tokenizer.json", gguf.parent)
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (gguf.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_gguf(gguf, metadata=smollm2_metadata)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"
    assert tokenizer.encode("Hello") == [19556]

    # Without a template in the folder, the file's template is used.
    (gguf.parent / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer.from_gguf(gguf, metadata=smollm2_metadata)
    assert tokenizer.chat_template == smollm2_metadata["tokenizer.chat_template"]


def test_a_foreign_tokenizer_json_is_refused(tmp_path: Path, smollm2_gguf: Path,
                                             smollm2_tokenizer_dir: Path, smollm2_metadata) -> None:
    gguf = _gguf_folder(tmp_path, smollm2_gguf)
    # Another model's tokenizer: the same size, other special tokens.
    foreign = (smollm2_tokenizer_dir / "tokenizer.json").read_text().replace("<|im_", "<|xx_")
    (gguf.parent / "tokenizer.json").write_text(foreign)
    with pytest.raises(TokenizerError, match="does not belong to") as caught:
        Tokenizer.from_gguf(gguf, metadata=smollm2_metadata)
    assert "bos_token 1 is '<|im_start|>', but '<|xx_start|>' there" in str(caught.value)


# ---- Gemma 3: SentencePiece vocabulary against transformers ---------------------------------------

@pytest.fixture(scope="module")
def gemma3(gemma3_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_gguf)


@pytest.mark.parametrize("case", GEMMA3_REFERENCE["cases"], ids=lambda case: repr(case["text"][:30]))
def test_gemma3_ids_equal_transformers(gemma3: Tokenizer, case: dict) -> None:
    assert gemma3.encode(case["text"]) == case["ids"]
    assert gemma3.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert gemma3.decode(case["ids_no_special"]) == case["decoded"] == case["text"]


def test_gemma3_special_tokens(gemma3: Tokenizer) -> None:
    assert gemma3.bos_token_id == GEMMA3_REFERENCE["bos_token_id"] == 2
    assert gemma3.eos_token_id == GEMMA3_REFERENCE["eos_token_id"] == 1
    assert gemma3.vocab_size == GEMMA3_REFERENCE["vocab_size"]
    assert gemma3.token_to_id("<start_of_turn>") in gemma3.special_token_ids
    assert not gemma3.has_chat_template  # a base model: the file has none
    # User-defined tokens (runs of newlines) stay whole but are not special.
    assert gemma3.encode("\n\n\n", add_special_tokens=False) == [gemma3.token_to_id("\n\n\n")]
    assert gemma3.decode(gemma3.encode("a\n\n\nb"), skip_special_tokens=True) == "a\n\n\nb"


# ---- synthetic vocabularies ----------------------------------------------------------------------

def _bytes_alphabet() -> list[str]:
    from opencamp.gguf_tokenizer import _byte_alphabet

    return [_byte_alphabet()[0][byte] for byte in range(256)]


def byte_level_metadata(pre: str | None, extra: list[str] = (), merges: list[str] = (),
                        **keys) -> dict:
    """A gpt2-style vocabulary: three control tokens, every byte, then `extra` tokens."""
    tokens = ["<s>", "</s>", "<|user|>"] + _bytes_alphabet() + list(extra)
    metadata = {
        "general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.token_type": [3, 3, 4] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    metadata.update(keys)
    return metadata


def pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    backend = tokenizer.backend
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    spelling = dict(zip(_bytes_alphabet(), range(256)))
    return [bytes(spelling[c] for c in piece).decode() for piece, _ in
            backend.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre, expected", [
    # GPT-2: case-sensitive contractions, numbers whole.
    ("gpt-2", ["Hello", ",", " world", " 12345", " it", "'s", " I", "'", "M", "  ", " x"]),
    ("smollm", ["Hello", ",", " world", " 12345", " it", "'s", " I", "'", "M", "  ", " x"]),
    ("default", ["Hello", ",", " world", " 12345", " it", "'s", " I", "'", "M", "  ", " x"]),
    # Llama 3: numbers in threes, contractions in any case, a non-letter joins the next word.
    ("llama-bpe", ["Hello", ",", " world", " ", "123", "45", " it", "'s", " I", "'M", "  ", " x"]),
    ("llama3", ["Hello", ",", " world", " ", "123", "45", " it", "'s", " I", "'M", "  ", " x"]),
    # Qwen2: the same, but every digit alone.
    ("qwen2", ["Hello", ",", " world", " ", "1", "2", "3", "4", "5", " it", "'s", " I", "'M", "  ",
               " x"]),
])
def test_pre_tokenizers_split_as_their_models_do(pre: str, expected: list[str]) -> None:
    tokenizer = built(byte_level_metadata(pre))
    assert pieces(tokenizer, "Hello, world 12345 it's I'M   x") == expected


def built(metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata, "test.gguf")


def test_every_listed_pre_tokenizer_builds() -> None:
    for pre in PRE_TOKENIZERS:
        tokenizer = built(byte_level_metadata(pre))
        ids = tokenizer.encode("héllo 🦀 12", add_special_tokens=False)
        assert tokenizer.decode(ids) == "héllo 🦀 12"


def test_missing_pre_tokenizer_means_default() -> None:
    assert pieces(built(byte_level_metadata(None)), "a 123") == ["a", " 123"]


def test_unknown_pre_tokenizer_is_refused() -> None:
    with pytest.raises(TokenizerError, match="'mystery-bpe' pre-tokenizer") as caught:
        built(byte_level_metadata("mystery-bpe"))
    message = str(caught.value)
    assert "test.gguf" in message and "llama-bpe" in message and "tokenizer.json" in message


def test_qwen2_normalises_to_nfc() -> None:
    tokenizer = built(byte_level_metadata("qwen2"))
    assert tokenizer.encode("e\u0301") == tokenizer.encode("\u00e9")
    plain = built(byte_level_metadata("gpt-2"))
    assert plain.encode("e\u0301") != plain.encode("\u00e9")


def test_llama3_keeps_whole_vocabulary_words_without_merges() -> None:
    # "abc" is a token no merge reaches: tiktoken-style vocabularies (Llama 3) still emit it.
    metadata = dict(extra=["ab", "abc"], merges=["a b"])
    llama3 = built(byte_level_metadata("llama-bpe", **metadata))
    gpt2 = built(byte_level_metadata("gpt-2", **metadata))
    abc = llama3.token_to_id("abc")
    assert llama3.encode("abc", add_special_tokens=False) == [abc]
    assert gpt2.encode("abc", add_special_tokens=False) == [gpt2.token_to_id("ab"),
                                                            gpt2.token_to_id("c")]


@pytest.mark.parametrize("pre, keys, bos", [
    ("gpt-2", {}, False), ("llama-bpe", {}, True), ("qwen2", {}, False),
    ("gpt-2", {"tokenizer.ggml.add_bos_token": True}, True),
    ("llama-bpe", {"tokenizer.ggml.add_bos_token": False}, False),
])
def test_add_bos_follows_the_file_then_llama_cpp(pre: str, keys: dict, bos: bool) -> None:
    tokenizer = built(byte_level_metadata(pre, **keys))
    hi = tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.encode("hi") == ([0] if bos else []) + hi


def test_add_eos() -> None:
    tokenizer = built(byte_level_metadata("gpt-2", **{
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}))
    assert tokenizer.encode("hi") == [0] + tokenizer.encode("hi", add_special_tokens=False) + [1]


def test_control_and_user_defined_tokens_stay_whole() -> None:
    tokenizer = built(byte_level_metadata("gpt-2"))
    ids = tokenizer.encode("a</s>b<|user|>c", add_special_tokens=False)
    assert ids[1] == 1 and ids[3] == 2 and len(ids) == 5
    assert tokenizer.special_token_ids == {0, 1}  # control tokens; <|user|> is user-defined
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<|user|>c"
    assert tokenizer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


def test_raw_utf8_spellings_become_byte_level() -> None:
    # Some converters store an ordinary token as plain UTF-8 ("中") instead of GPT-2's byte
    # spelling ("ä¸Ń"); it must still be the token for those bytes.
    from opencamp.gguf_tokenizer import _byte_level_spelling

    spelled = _byte_level_spelling("中")
    assert spelled == "ä¸Ń"
    tokenizer = built(byte_level_metadata("gpt-2", extra=[spelled[:2], "中"],
                                          merges=[f"{spelled[0]} {spelled[1]}",
                                                  f"{spelled[:2]} {spelled[2]}"]))
    assert tokenizer.encode("中", add_special_tokens=False) == [3 + 256 + 1]
    assert tokenizer.decode([3 + 256 + 1]) == "中"


@pytest.mark.parametrize("change, problem", [
    ({"tokenizer.ggml.model": "t5"}, "'t5' tokenizer"),
    ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "token_type has 2 entries"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id = 1000000 is outside"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "'a b c' is not two tokens"),
    ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
    ({"tokenizer.ggml.tokens": ["<s>", b"\xff\xfe"]}, r"tokens\[1\] is not a UTF-8 string"),
])
def test_malformed_metadata_is_a_clear_error(change: dict, problem: str) -> None:
    metadata = byte_level_metadata("gpt-2")
    metadata.update(change)
    metadata = {key: value for key, value in metadata.items() if value is not None}
    with pytest.raises(TokenizerError, match=problem) as caught:
        built(metadata)
    assert "test.gguf" in str(caught.value)


def test_named_chat_templates() -> None:
    tokenizer = built(byte_level_metadata("gpt-2", **{
        "tokenizer.chat_template": "DEFAULT", "tokenizer.chat_templates": ["tool_use"],
        "tokenizer.chat_template.tool_use": "TOOLS"}))
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "DEFAULT"
    assert tokenizer.apply_chat_template(messages, tools=[{"name": "f"}]) == "TOOLS"


def sentencepiece_metadata(**keys) -> dict:
    """A Llama-2-style vocabulary: <unk> <s> </s>, byte tokens, then scored pieces."""
    pieces_and_scores = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("ab", -1.5), ("▁ab", -0.5),
                         ("▁a", -4.0), ("ba", -6.0), ("aba", -5.0)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + \
        [piece for piece, _ in pieces_and_scores]
    metadata = {
        "general.architecture": "llama", "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [score for _, score in pieces_and_scores],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces_and_scores),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(keys)
    return metadata


def test_sentencepiece_merges_by_score() -> None:
    tokenizer = built(sentencepiece_metadata())
    token = tokenizer.id_to_token
    # "▁ab" (-0.5) beats "▁a" (-4): the best-scoring piece is formed first, as SentencePiece does.
    assert [token(i) for i in tokenizer.encode("ab")] == ["<s>", "▁ab"]
    # "ab" (-1.5) forms before "ba" (-6), so "bab" is b + ab, not ba + b.
    assert [token(i) for i in tokenizer.encode("bab", add_special_tokens=False)] == \
        ["▁", "b", "ab"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert [token(i) for i in tokenizer.encode("é", add_special_tokens=False)] == \
        ["▁", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(tokenizer.encode("ab é ba", add_special_tokens=False)) == "ab é ba"
    assert tokenizer.decode(tokenizer.encode("ab é ba"), skip_special_tokens=True) == "ab é ba"


def test_sentencepiece_without_space_prefix() -> None:
    tokenizer = built(sentencepiece_metadata(**{
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False}))
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("ab")] == ["ab"]
    assert tokenizer.decode(tokenizer.encode(" ab")) == " ab"


def test_derive_merges_orders_by_score_then_longer_left_piece() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    assert derive_merges(vocab, {"ab": -1.0, "bc": -2.0, "abc": -0.5}) == \
        [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]
