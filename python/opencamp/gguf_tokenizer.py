"""A `tokenizers` tokenizer built from the vocabulary a GGUF file carries in its metadata.

A GGUF has no tokenizer.json: llama.cpp's converter stores the vocabulary, the merges, the token
types, the special token ids and the chat template under `tokenizer.*` keys. This module turns
those back into the tokenizer the model was trained with:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges, splitting text with
  the pre-tokenizer named by `tokenizer.ggml.pre` (PRE_TOKENIZERS; an unknown name is an error,
  never a guess).
* `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Llama 2, TinyLlama, Mistral, Gemma), with
  byte fallback; merges are rebuilt from the scores, as SentencePiece merges by score. Gemma files
  get Gemma's own layout (GEMMA_ARCHITECTURES).

Control (and unknown) tokens become special added tokens and user-defined ones plain added
tokens, so both stay whole in text as llama.cpp keeps them. Where llama.cpp and transformers
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) disagree, this follows the model's own
tokenizer.json where it is known, else transformers; each such choice is commented where it is
made.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, NamedTuple, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .tokenizer import TokenizerError

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # (5 unused and 6 byte tokens: never whole)

# Named special tokens: the chat-template variable and the metadata key of its id.
SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

# Architectures whose SentencePiece vocabulary is Gemma's (spaces as "▁" by a normalizer, no
# prefix space, merges in vocabulary order).
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


# ---- pre-tokenizers of byte-level BPE vocabularies ---------------------------------------------

# Llama 3's split (its tokenizer.json): case-insensitive contractions, letters with one leading
# non-letter, numbers in groups of up to three.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (its tokenizer.json): the same, but every digit alone.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class PreTokenizer(NamedTuple):
    """How one `tokenizer.ggml.pre` splits text before BPE, as that model's tokenizer.json does."""

    split: str | None  # a regex whose matches are the pieces; None: GPT-2's, built into ByteLevel
    nfc: bool = False  # NFC-normalise first (Qwen2's tokenizer.json does)
    ignore_merges: bool = False  # a piece that is a whole vocabulary token stays one (tiktoken style)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_GPT2 = PreTokenizer(split=None)
_LLAMA3 = PreTokenizer(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(split=_QWEN2_SPLIT, nfc=True)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": _GPT2,
    # SmolLM/SmolLM2: their tokenizer.json splits as GPT-2 does. (llama.cpp also isolates every
    # digit here; the vocabulary has no multi-digit token, so ids agree.)
    "smollm": _GPT2,
    # "default" is what files converted before llama.cpp recorded pre-tokenizers say. llama.cpp
    # splits those on punctuation first and warns that quality is degraded; GPT-2's split is what
    # such byte-level vocabularies were trained with, and what transformers uses for them.
    "default": _GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


# ---- byte-level spelling -----------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], frozenset[str]]:
    """GPT-2's reversible byte -> printable character map, and its 256 characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    spelling = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(256 + shifted)
            shifted += 1
    return spelling, frozenset(spelling.values())


def _byte_level_spelling(token: str) -> str:
    spelling, alphabet = _byte_alphabet()
    if set(token) <= alphabet:
        return token
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


# ---- reading the metadata ----------------------------------------------------------------------

def _strings(metadata: Mapping[str, Any], key: str, name: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise TokenizerError(f"{name} has no {key}, so it carries no tokenizer")
    if isinstance(value, (str, bytes)):
        raise TokenizerError(f"{name}: {key} must be an array of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):  # the reader gives bytes for a string that is not UTF-8
            raise TokenizerError(f"{name}: {key}[{index}] is not a UTF-8 string ({item!r:.60})")
    return list(value)


def _numbers(metadata: Mapping[str, Any], key: str, count: int, name: str, kind: type) -> list | None:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        numbers = [kind(item) for item in value]
    except (TypeError, ValueError) as error:
        raise TokenizerError(f"{name}: {key} must be an array of numbers ({error})") from None
    if len(numbers) != count:
        raise TokenizerError(
            f"{name}: {key} has {len(numbers)} entries for {count} tokens")
    return numbers


def _token_id(metadata: Mapping[str, Any], key: str, count: int, name: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"{name}: {key} must be an integer, not {value!r}")
    if not 0 <= value < count:
        # llama.cpp writes -1 / 2**32-1 for "none" in some files; any other value is damage.
        if value in (-1, 2**32 - 1):
            return None
        raise TokenizerError(f"{name}: {key} = {value} is outside the {count} tokens")
    return value


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key)
    return default if value is None else bool(value)


def chat_templates(metadata: Mapping[str, Any]) -> str | dict[str, str] | None:
    """tokenizer.chat_template, plus any named ones (tokenizer.chat_template.NAME, listed in
    tokenizer.chat_templates) as a name -> template dict, as the Tokenizer class takes them."""
    default = metadata.get("tokenizer.chat_template")
    named = {}
    for template_name in metadata.get("tokenizer.chat_templates") or ():
        template = metadata.get(f"tokenizer.chat_template.{template_name}")
        if isinstance(template, str):
            named[template_name] = template
    if not named:
        return default if isinstance(default, str) else None
    if isinstance(default, str):
        named["default"] = default
    return named


# ---- building ----------------------------------------------------------------------------------

class GGUFTokenizer(NamedTuple):
    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]  # bos_token, eos_token, ... -> token text
    chat_template: str | dict[str, str] | None


def derive_merges(vocab: Mapping[str, int], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's BPE encoding of a vocabulary without merges.

    SentencePiece repeatedly joins the adjacent pair whose joined piece scores best; a BPE model
    joins the pair of lowest merge rank. So every way a token splits into two vocabulary pieces
    becomes a merge, ranked by the token's score (best first; for equal scores the longer left,
    then right, piece first; then the vocabulary's order), the order transformers gives them too.
    """
    candidates = []  # (score, len left, len right, -order, left, right): sorted, best first
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left = token[:cut]
            if left in vocab:
                right = token[cut:]
                if right in vocab:
                    candidates.append((rank, cut, len(token) - cut, -len(candidates), left, right))
    candidates.sort(reverse=True)
    return [(left, right) for *_, left, right in candidates]


def _template_processor(tokens: Sequence[str], bos: int | None, eos: int | None,
                        add_bos: bool, add_eos: bool):
    """What encode(add_special_tokens=True) adds around the text: BOS and EOS as the file says."""
    specials = []
    single = "$A:0"
    pair = "$B:1"
    if add_bos and bos is not None:
        single, pair = f"{tokens[bos]}:0 {single}", f"{tokens[bos]}:1 {pair}"
        specials.append((tokens[bos], bos))
    if add_eos and eos is not None:
        single, pair = f"{single} {tokens[eos]}:0", f"{pair} {tokens[eos]}:1"
        specials.append((tokens[eos], eos))
    return processors.TemplateProcessing(single=single, pair=f"{single} {pair}",
                                         special_tokens=list(dict.fromkeys(specials)))


def build(metadata: Mapping[str, Any], name: str = "the GGUF file") -> GGUFTokenizer:
    """The tokenizer a GGUF file's metadata describes. `name` (the file) appears in errors."""
    model_kind = metadata.get("tokenizer.ggml.model")
    tokens = _strings(metadata, "tokenizer.ggml.tokens", name)
    count = len(tokens)
    # An empty token cannot be looked up; llama.cpp renames it the same way.
    tokens = [token or f"[EMPTY_{index}]" for index, token in enumerate(tokens)]
    types = _numbers(metadata, "tokenizer.ggml.token_type", count, name, int) or [NORMAL] * count
    special_ids = {key: _token_id(metadata, id_key, count, name)
                   for key, id_key in SPECIAL_TOKEN_KEYS.items()}
    # Tokens that text matches whole: control and unknown ones (special), user-defined ones
    # (not special), and the named specials whatever their type.
    whole = {index: types[index] in (CONTROL, UNKNOWN) for index in range(count)
             if types[index] in (CONTROL, UNKNOWN, USER_DEFINED)}
    whole.update({index: True for index in special_ids.values() if index is not None})

    architecture = metadata.get("general.architecture")
    if model_kind == "gpt2":
        backend, vocab, add_bos_default = _byte_level_bpe(metadata, tokens, whole, name)
    elif model_kind == "llama":
        backend, vocab = _sentencepiece_bpe(metadata, tokens, special_ids["unk_token"],
                                     gemma=architecture in GEMMA_ARCHITECTURES, name=name)
        add_bos_default = True  # llama.cpp's and transformers' default for SentencePiece files
    else:
        raise TokenizerError(
            f"{name} has a {model_kind!r} tokenizer (tokenizer.ggml.model); opencamp builds "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) ones. Put the model's "
            "tokenizer.json (and tokenizer_config.json) next to the GGUF file to use it instead")

    added = []
    for index, special in sorted(whole.items()):
        token = tokens[index]
        if vocab.get(token) == index:  # not a token the vocabulary spells differently (Gemma's "  ")
            added.append(AddedToken(token, special=special, normalized=False))
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])

    backend.post_processor = _template_processor(
        tokens, special_ids["bos_token"], special_ids["eos_token"],
        add_bos=_flag(metadata, "tokenizer.ggml.add_bos_token", add_bos_default),
        add_eos=_flag(metadata, "tokenizer.ggml.add_eos_token", False))
    special_tokens = {key: tokens[index] for key, index in special_ids.items() if index is not None}
    return GGUFTokenizer(backend, special_tokens, chat_templates(metadata))


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], whole: Mapping[int, bool],
                    name: str) -> tuple[tokenizers.Tokenizer, dict[str, int], bool]:
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise TokenizerError(
            f"{name} splits text with the {pre_name!r} pre-tokenizer (tokenizer.ggml.pre), which "
            f"opencamp does not know (it knows {', '.join(sorted(PRE_TOKENIZERS))}); guessing "
            "would silently give the model other tokens than it was trained on. Put the model's "
            "tokenizer.json (and tokenizer_config.json) next to the GGUF file to use it instead")
    merges = []
    for merge in _strings(metadata, "tokenizer.ggml.merges", name):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{name}: the merge {merge!r} is not two tokens joined by a space")
        merges.append((parts[0], parts[1]))
    # Tokens matched whole keep the file's spelling (the added token must find its own id); an
    # ordinary token outside GPT-2's byte alphabet is a raw UTF-8 spelling, turned into bytes.
    vocab = {token if index in whole else _byte_level_spelling(token): index
             for index, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                       byte_fallback=False, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    if pre.split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, pre.add_bos


def _sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str], unk: int | None, *,
                       gemma: bool, name: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    count = len(tokens)
    if gemma:
        # Gemma files store tokens of two or more spaces as spaces, but Gemma's normalizer turns
        # spaces into "▁" before BPE; and Gemma's scores do not follow its merge order, the file's
        # order does (as transformers builds Gemma from a GGUF).
        tokens = ["▁" * len(token) if " " in token and not token.strip() else token
                  for token in tokens]
        ranks = [-index for index in range(count)]
    else:
        ranks = _numbers(metadata, "tokenizer.ggml.scores", count, name, float)
        if ranks is None:
            raise TokenizerError(f"{name}: a SentencePiece vocabulary needs tokenizer.ggml.scores")
    vocab = {token: index for index, token in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges") is not None:
        merges = [tuple(merge.split(" ", 1)) for merge in
                  _strings(metadata, "tokenizer.ggml.merges", name)]
    else:
        merges = derive_merges(vocab, dict(zip(tokens, ranks)))
    backend = tokenizers.Tokenizer(BPE(
        vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
        unk_token=tokens[unk] if unk is not None else None))
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        # SentencePiece prefixes the text with a space unless the file says not to; only the
        # text's start gets it, not text after a special token (transformers' non-legacy
        # behaviour; llama.cpp also prefixes after every special token).
        prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    return backend, vocab



def check_same_vocabulary(backend: tokenizers.Tokenizer, metadata: Mapping[str, Any],
                          tokenizer_name: str, gguf_name: str) -> None:
    """Refuse a tokenizer.json that is not the GGUF model's own: its size, and the BOS/EOS/UNK/PAD
    ids the file names, must agree (a wrong tokenizer would silently feed the model other ids)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    count = len(tokens)
    size = backend.get_vocab_size(with_added_tokens=True)
    problems = []
    if size > count:
        problems.append(f"it has {size} tokens, the model {count}")
    for key, id_key in SPECIAL_TOKEN_KEYS.items():
        index = _token_id(metadata, id_key, count, gguf_name)
        if index is not None and backend.id_to_token(index) != tokens[index]:
            problems.append(f"the GGUF's {key} {index} is {tokens[index]!r}, "
                            f"but {backend.id_to_token(index)!r} there")
    if problems:
        raise TokenizerError(
            f"{tokenizer_name} does not belong to {gguf_name}: {'; '.join(problems)}. Remove it "
            "(the GGUF file carries its own tokenizer) or put the model's own tokenizer.json there")
