"""Constrained decoding: the answer follows a grammar (a JSON schema, any JSON object, a regular
expression, one of a list of strings, a Lark or GBNF grammar).

The engine's sampler has a mask stage before every other (include/opencamp/sampler.h): tokens
the mask forbids get -infinity. A constrained request carries a `GrammarConstraint`, an
llguidance matcher for its grammar, which the C++ scheduler calls on its mask worker thread:
`fill_mask` for the token about to be sampled (while the forward pass that makes its logits
runs, with the GIL dropped inside llguidance) and `accept` with each token sampled. Each request
has its own matcher, so constrained and free requests share the batch; a request without a
grammar costs nothing.

llguidance (PyPI, no dependencies, Rust) is an optional extra: `pip install 'opencamp[grammar]'`.
Without it, asking for a grammar raises `GrammarUnavailable` (the server answers 400).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._core import OpencampError

KINDS = ("json_schema", "json_object", "regex", "choice", "lark", "gbnf")


class GrammarError(OpencampError, ValueError):
    """A grammar llguidance cannot compile (its message says why), or a matcher error."""

    kind = "invalid_argument"


class GrammarUnavailable(GrammarError):
    """Constrained decoding needs llguidance, which is not installed."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarUnavailable(
            "constrained decoding (response_format json_object / json_schema, guided_*, "
            "structured_outputs, forced tool calls) needs llguidance, which is not installed: "
            "pip install 'opencamp[grammar]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the answer must match. `value`: the JSON schema (a dict), the regex, the list of
    choices, or the grammar text; None for json_object (any JSON object)."""

    kind: str
    value: Any = None
    # JSON kinds: the whitespace allowed between tokens (vLLM's guided_whitespace_pattern, a
    # regex). None: none but one space after "," and ":", so even a model that would pad
    # forever with newlines must get on with the answer.
    whitespace_pattern: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str, whitespace_pattern: str | None = None) -> "Grammar":
        return cls("json_schema", json.loads(schema) if isinstance(schema, str) else schema,
                   whitespace_pattern)

    @classmethod
    def json_object(cls, whitespace_pattern: str | None = None) -> "Grammar":
        return cls("json_object", None, whitespace_pattern)

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "Grammar":
        return cls("choice", tuple(choices))

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text)

    def to_llguidance(self) -> str:
        """The grammar in llguidance's own form (what LLMatcher takes)."""
        llg = _llguidance()
        matcher = llg.LLMatcher
        if self.whitespace_pattern is None:
            layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        else:
            layout = {"whitespace_pattern": self.whitespace_pattern}
        try:
            if self.kind == "json_schema":
                return matcher.grammar_from_json_schema(self.value, defaults=layout)
            if self.kind == "json_object":
                return matcher.grammar_from_json_schema({"type": "object"}, defaults=layout)
            if self.kind == "regex":
                return matcher.grammar_from_regex(self.value)
            if self.kind == "choice":
                return llg.grammar_from("choice", list(self.value))
            if self.kind == "gbnf":
                return llg.grammar_from("grammar", self.value)
            return matcher.grammar_from_lark(self.value)
        except (ValueError, TypeError) as error:
            raise GrammarError(f"the {self.kind} grammar is not valid: {error}") from None


class GrammarConstraint:
    """One request's matcher, called by the C++ scheduler (the `constraint` of
    _core.Scheduler.submit): fill_mask(words) writes the allowed next tokens into a uint32
    bitmask (bit t % 32 of words[t // 32]); accept(token) advances the matcher."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self.tokens: list[int] = []  # accepted so far

    def fill_mask(self, words: np.ndarray) -> None:
        if words.dtype != np.uint32 or not words.flags["C_CONTIGUOUS"]:
            raise TypeError("the mask must be a contiguous uint32 array")
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)  # drops the GIL
        if self._matcher.is_error():
            raise GrammarError(f"the grammar matcher failed: {self._matcher.get_error()}")

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} does not continue the grammar: "
                               f"{self._matcher.get_error()}")
        self.tokens.append(int(token))

    def allowed(self) -> set[int]:
        """The token ids allowed next (for tests and debugging; computes a mask)."""
        words = np.zeros((self._vocab_size + 31) // 32, dtype=np.uint32)
        self.fill_mask(words)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self._vocab_size]
        return set(np.flatnonzero(bits).tolist())

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match (the grammar allows EOS now)."""
        return self._matcher.is_accepting()


class GrammarCompiler:
    """Makes matchers for one model: the llguidance view of its tokenizer is built once (about
    a second for a 50k vocabulary) on first use. `eos_token_ids` end a complete match."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = [int(t) for t in eos_token_ids]
        self._llg_tokenizer = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        llg = _llguidance()
        with self._lock:
            if self._llg_tokenizer is None:
                if not self._eos:
                    raise GrammarError("this model names no EOS token, so a grammar could "
                                       "never say where the answer ends")
                self._llg_tokenizer = llg.LLTokenizer(self._tokenizer_json,
                                                      n_vocab=self.vocab_size,
                                                      eos_token=self._eos)
            return self._llg_tokenizer

    def constraint(self, grammar: Grammar) -> GrammarConstraint:
        """A fresh matcher for `grammar`, or GrammarError saying what is wrong with it."""
        llg = _llguidance()
        tokenizer = self._tokenizer()
        compiled = grammar.to_llguidance()
        error = llg.LLMatcher.validate_grammar(compiled, tokenizer)
        if error:
            raise GrammarError(f"the {grammar.kind} grammar is not valid: {error}")
        matcher = llg.LLMatcher(tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {grammar.kind} grammar is not valid: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.vocab_size)
