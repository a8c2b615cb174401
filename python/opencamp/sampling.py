"""Every sampling option, once. The Python API (SamplingOptions), the request parser
(server/protocol.py), the server's defaults and the chat page's /defaults, and the CLI flags are
generated from OPTIONS; tests/python/test_sampling_table.py checks it against the C++ struct
(`_core.SamplingParams`, generated from OPENCAMP_SAMPLING_PARAMS in include/opencamp/sampler.h)
and its ranges against the engine's own checks.

A value is checked as C++ will hold it: ints must fit int32 (seed: uint64), floats are checked
after rounding to float32, so 1e300 (inf) and 1e-300 (0) are refused like any out-of-range value,
with a ValueError naming the option and its range, before anything reaches the bindings.

Adding an option: a line in OPENCAMP_SAMPLING_PARAMS and its stage in Sampler::sample (C++), an
Option here, a test, and the README's Sampling section.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from ._core import OpencampError

INT32_MAX = 2**31 - 1


class SamplingValueError(OpencampError, ValueError):
    """A sampling option (or max_tokens / stop_token_ids) out of what the engine takes: an
    OpencampError of kind invalid_argument, as the engine raises, and a ValueError; `param`
    names it (the server answers 400 with it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.kind = "invalid_argument"


@dataclass(frozen=True)
class Option:
    name: str
    kind: type          # float or int
    default: Any        # the engine's default (C++ SamplingParams); None: unset (seed)
    low: float | None   # the engine's range; None: unbounded on that side
    high: float | None
    low_open: bool      # low itself is refused
    rule: str           # the range as error messages state it
    help: str           # CLI flag help
    # The OpenAI API's own variants (server requests and defaults):
    server_default: Any = None
    wire_low: float | None = None   # None: the engine's
    wire_high: float | None = None
    wire_rule: str | None = None
    cli_short: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("temperature", float, 0.0, 0.0, None, False, ">= 0", "0 means greedy.",
           server_default=1.0, wire_high=2.0, wire_rule="between 0 and 2"),
    Option("top_k", int, 0, 0, INT32_MAX, False, f"between 0 and {INT32_MAX} (0 turns it off)",
           "Keep the k most likely tokens (0: off).", server_default=0,
           wire_low=-1, wire_rule=f"between -1 and {INT32_MAX} (-1 and 0 turn it off)"),
    Option("top_p", float, 1.0, 0.0, 1.0, True, "in (0, 1]", "Nucleus sampling threshold (1: off).",
           server_default=1.0),
    Option("min_p", float, 0.0, 0.0, 1.0, False, "in [0, 1]",
           "Drop tokens below min-p x the top probability.", server_default=0.0),
    Option("repetition_penalty", float, 1.0, 0.0, None, True, "> 0 (1 turns it off)", "1 is off.",
           server_default=1.0),
    Option("presence_penalty", float, 0.0, -2.0, 2.0, False, "between -2 and 2",
           "Subtract this from the logit of every token already present (0: off).",
           server_default=0.0),
    Option("frequency_penalty", float, 0.0, -2.0, 2.0, False, "between -2 and 2",
           "Subtract this x each token's count so far (0: off).", server_default=0.0),
    Option("seed", int, None, 0, 2**64 - 1, False, "an integer in [0, 2**64)", "Same seed, same output.",
           wire_low=None, wire_rule="an integer"),
)
BY_NAME = {o.name: o for o in OPTIONS}
NAMES = tuple(o.name for o in OPTIONS)


def _float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: C++ would hold inf
        return math.inf if value > 0 else -math.inf


def check(name: str, value: Any, *, wire: bool = False) -> Any:
    """`value` as the engine will hold it, or SamplingValueError naming `name` and its range.
    wire: the OpenAI API's variant (temperature <= 2, top_k -1 for off, any integer seed)."""
    option = BY_NAME[name]
    rule = (option.wire_rule or option.rule) if wire else option.rule
    low = option.wire_low if wire and option.wire_low is not None else option.low
    high = option.wire_high if wire and option.wire_high is not None else option.high
    bad = SamplingValueError(name, f"{name} must be {rule}, got {value!r}")
    if option.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SamplingValueError(name, f"{name} must be an integer, got {value!r}")
        if name == "seed" and wire:
            return value % 2**64  # OpenAI takes any 64-bit integer, negative ones too
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad
        return max(value, 0) if name == "top_k" else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingValueError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise bad
    held = _float32(float(value))  # what the C++ float holds
    as_float32 = SamplingValueError(name, f"{name} must be {rule} as a 32-bit float (what the "
                                          f"engine holds), got {value!r}")
    if not math.isfinite(held):
        raise as_float32
    if low is not None and (held < low or (option.low_open and held == low)):
        raise as_float32 if value > low else bad
    if high is not None and held > high:
        raise bad
    return float(value)


def check_max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT32_MAX:
        raise SamplingValueError("max_tokens", f"max_tokens must be an integer between 1 and "
                                               f"{INT32_MAX}, got {value!r}")
    return value


def check_token_ids(name: str, values: Any) -> list[int]:
    ids = list(values)
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INT32_MAX:
            raise SamplingValueError(name, f"{name} must hold token ids (integers in [0, "
                                           f"{INT32_MAX}]), got {v!r}")
    return ids


def check_logit_bias(values: Any) -> dict[int, float]:
    """{token id: bias}, OpenAI's range -100..100 (ids may come as strings, as JSON keys do)."""
    if not isinstance(values, dict):
        raise SamplingValueError("logit_bias", "logit_bias must map token ids to numbers")
    out: dict[int, float] = {}
    for key, bias in values.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if isinstance(key, bool) or token < 0 or token > INT32_MAX or (
                isinstance(key, str) and not key.strip().isdigit()):
            raise SamplingValueError("logit_bias", f"logit_bias keys must be token ids, got "
                                                   f"{key!r}")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                or not -100.0 <= bias <= 100.0):
            raise SamplingValueError("logit_bias", f"logit_bias values must be numbers between "
                                                   f"-100 and 100, got {bias!r} for {key!r}")
        out[token] = float(bias)
    return out


def engine_defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def server_defaults() -> dict[str, Any]:
    return {o.name: o.server_default for o in OPTIONS}


def to_core(values: dict[str, Any]):
    """The one C++ object the bindings take (`_core.SamplingParams`)."""
    from . import _core

    return _core.SamplingParams(**{o.name: values[o.name] for o in OPTIONS if o.name in values})
