"""Streaming text: whole UTF-8 characters only, and stop strings never partly shown."""
from __future__ import annotations

from pathlib import Path

import pytest

from opencamp.streaming import IncrementalDecoder, StopMatcher
from opencamp.tokenizer import Tokenizer

# Accents, CJK and emoji (one with zero-width joiners): byte-level BPE splits the CJK characters
# and emoji over several tokens.
MULTIBYTE_TEXT = "Café naïve — 東京で寿司を食べた 🦀🎉👨‍👩‍👧 über straße 😀!"


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_tokenizer_dir)


def stream(decoder: IncrementalDecoder, ids: list[int]) -> tuple[list[str], str]:
    return [decoder.push(token_id) for token_id in ids], decoder.flush()


def byte_token(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the byte-level BPE token for one raw byte (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        char = chr(byte)
    else:
        char = chr(256 + [b for b in range(256) if b not in printable].index(byte))
    token_id = tokenizer.token_to_id(char)
    assert token_id is not None
    return token_id


def test_multibyte_characters_are_never_split(smollm2: Tokenizer) -> None:
    ids = smollm2.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # The text really exercises split characters: some tokens hold only part of one.
    assert any("\ufffd" in smollm2.decode([token_id]) for token_id in ids)

    pieces, rest = stream(IncrementalDecoder(smollm2), ids)
    for piece in pieces + [rest]:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # valid UTF-8: no lone surrogates either
    assert "".join(pieces) + rest == smollm2.decode(ids) == MULTIBYTE_TEXT
    assert rest == ""
    # Characters come out as soon as they are complete, not at the end.
    assert pieces[-1] == "!" and "😀" in pieces[-2]


def test_special_tokens_in_stream(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nSalut 👋<|im_end|>", add_special_tokens=False)
    pieces, rest = stream(IncrementalDecoder(smollm2), ids)
    assert "".join(pieces) + rest == "<|im_start|>assistant\nSalut 👋<|im_end|>"
    pieces, rest = stream(IncrementalDecoder(smollm2, skip_special_tokens=True), ids)
    assert "".join(pieces) + rest == smollm2.decode(ids, skip_special_tokens=True) == "assistant\nSalut 👋"


def test_long_stream(smollm2: Tokenizer) -> None:
    ids = (smollm2.encode(MULTIBYTE_TEXT + " Some plain English text follows. ", add_special_tokens=False)
           * 60)[:2000]
    assert len(ids) == 2000
    decoder = IncrementalDecoder(smollm2)
    pieces, rest = stream(decoder, ids)
    assert "".join(pieces) + rest == smollm2.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(decoder._window) == 0  # nothing kept after flush
    # Memory and per-token work stay bounded: the window never holds more than a few tokens.
    decoder = IncrementalDecoder(smollm2)
    longest_window = 0
    for token_id in ids:
        decoder.push(token_id)
        longest_window = max(longest_window, len(decoder._window))
    assert longest_window <= 8


def test_stream_ending_mid_character(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("ok 🦀", add_special_tokens=False)
    cut = ids[:-1]  # the crab's last byte never arrives
    assert smollm2.decode(cut).endswith("\ufffd")
    pieces, rest = stream(IncrementalDecoder(smollm2), cut)
    assert "".join(pieces) == "ok"
    assert rest.endswith("\ufffd")
    assert "".join(pieces) + rest == smollm2.decode(cut)


def test_invalid_bytes_do_not_stall_the_stream(smollm2: Tokenizer) -> None:
    # A model can emit bytes that never form a character; their U+FFFD must not hold back
    # everything after them until the end.
    stray = byte_token(smollm2, 0x80)
    ids = [stray] * 40 + smollm2.encode(" then text 東京", add_special_tokens=False)
    pieces, rest = stream(IncrementalDecoder(smollm2), ids)
    assert "".join(pieces) + rest == smollm2.decode(ids)
    assert sum(1 for piece in pieces[:40] if piece) > 1
    assert rest == ""


def test_stop_inside_one_piece() -> None:
    matcher = StopMatcher(["Paris"])
    assert matcher.push("The capital is Paris. More") == ("The capital is ", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_stop_split_across_pieces() -> None:
    matcher = StopMatcher(["Paris"])
    assert matcher.push("It is Par") == ("It is ", False)
    assert matcher.push("is.") == ("", True)


def test_stop_split_over_many_pieces() -> None:
    matcher = StopMatcher(["<END>"])
    emitted = []
    for piece in ["a", "<", "E", "N", "D", ">", "b"]:
        text, hit = matcher.push(piece)
        emitted.append(text)
        if hit:
            break
    assert "".join(emitted) == "a" and hit


def test_near_miss_is_released() -> None:
    matcher = StopMatcher(["Paris"])
    assert matcher.push("A Par") == ("A ", False)
    assert matcher.push("ty") == ("Party", False)
    assert matcher.push(" Pa") == (" ", False)
    assert matcher.push("Pari") == ("Pa", False)  # "PaPari": only "Pari" can still start "Paris"
    assert matcher.push("s!") == ("", True)


def test_earliest_stop_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)
    matcher = StopMatcher(["xyz", "b"])
    assert matcher.push("a") == ("a", False)
    assert matcher.push("xy") == ("", False)
    assert matcher.push("zb") == ("", True)


def test_flush_at_end_releases_held_text() -> None:
    matcher = StopMatcher(["Paris"])
    assert matcher.push("Visit Pa") == ("Visit ", False)
    assert matcher.flush() == "Pa"
    assert not matcher.stopped


def test_no_stops_pass_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything <|im_end|>") == ("anything <|im_end|>", False)
    assert matcher.flush() == ""
    assert StopMatcher(None).push("x") == ("x", False)


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_decoder_and_stop_matcher_together(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("The capital of France is Paris. It is lovely.", add_special_tokens=False)
    decoder, matcher = IncrementalDecoder(smollm2), StopMatcher([" is Paris", "lovely"])
    shown = []
    for token_id in ids:
        text, hit = matcher.push(decoder.push(token_id))
        shown.append(text)
        if hit:
            break
    assert hit and "".join(shown) == "The capital of France"
