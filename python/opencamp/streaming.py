"""Turning a stream of generated token ids into text pieces that are safe to show.

Two problems: a byte-level BPE token can hold part of a UTF-8 character (an emoji is often
split over several tokens), and a stop string can arrive split over several pieces.
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"

# A UTF-8 character is at most 4 bytes and a token at least one, so once this many tokens follow
# a point, a character cut there has been completed or shown to be invalid: the text before it
# is final even though the stream is full of invalid bytes (U+FFFD).
_SETTLE_TOKENS = 4
# Held tokens past the read offset after which invalid bytes are released that way.
_STUCK_WINDOW_TOKENS = 8


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDecoder:
    """Decodes one token at a time, returning only text that is complete.

    Uses the prefix/read offset window of vLLM and TGI: the text of tokens[prefix:] is compared
    with the text of tokens[prefix:read], so each step decodes a few tokens, not the whole
    stream, and the context before `read` still shapes how the new tokens decode (leading
    spaces, byte fallback). Text whose decoding ends in U+FFFD is held back: more bytes of that
    character are probably in the next token.

    The pieces plus flush() add up to tokenizer.decode(all ids, skip_special_tokens).
    """

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the tokens from the prefix offset on are kept: earlier ones never decode again.
        self._window: list[int] = []
        self._read_offset = 0  # window index up to which the text has been returned
        self._prefix_text = ""  # decode(window[:read_offset]), cached

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._advance(len(self._window), text) if len(text) > len(self._prefix_text) else ""
        if len(self._window) - self._read_offset > _STUCK_WINDOW_TOKENS:
            return self._release_settled_text(text)
        return ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(token_id) for token_id in token_ids)

    def _advance(self, read_offset: int, text: str) -> str:
        """Return the text past the prefix and slide the window to start at the old read offset."""
        piece = text[len(self._prefix_text):]
        del self._window[:self._read_offset]
        self._read_offset = read_offset - self._read_offset
        self._prefix_text = self._decode(self._window[:self._read_offset])
        return piece

    def _release_settled_text(self, text: str) -> str:
        """The model produced invalid UTF-8, so the text keeps ending in U+FFFD: emit what is final.

        Without this, a stream of invalid bytes would be held (and re-decoded) until the end.
        The text up to _SETTLE_TOKENS before the end is final if the whole window's text still
        starts with it (a character cut there and completed later would have changed it).
        """
        end = len(self._window) - _SETTLE_TOKENS
        settled = self._decode(self._window[:end])
        if len(settled) > len(self._prefix_text) and text.startswith(settled):
            return self._advance(end, settled)
        return ""

    def flush(self) -> str:
        """The text still held at the end of the stream (a cut-off character comes out as U+FFFD)."""
        text = self._decode(self._window)
        piece = text[len(self._prefix_text):]
        self._window.clear()
        self._read_offset = 0
        self._prefix_text = ""
        return piece


class StopMatcher:
    """Cuts a stream of text at the first stop string, never showing any part of it.

    A tail of the text that could be the start of a stop string is held back until the next
    piece shows whether it is one.
    """

    def __init__(self, stops: Iterable[str] | None):
        stops = list(stops or [])
        for stop in stops:
            if not isinstance(stop, str):
                raise ValueError(f"stop strings must be strings, got {type(stop).__name__}")
            if stop == "":
                raise ValueError("stop strings must not be empty (an empty stop would match at once)")
        self._stops = stops
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def has_stops(self) -> bool:
        return bool(self._stops)

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop string was hit).

        After a hit, the text from the stop string on is dropped and later pushes return ("", True).
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        first_stop = min((index for index in (buffer.find(stop) for stop in self._stops) if index >= 0),
                         default=-1)
        if first_stop >= 0:
            self._held = ""
            self._stopped = True
            return buffer[:first_stop], True
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def flush(self) -> str:
        """The held text, when the stream ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self._stopped else held
