"""The one table of sampling options (opencamp/sampling.py) agrees with the C++ struct it
describes, and every surface is generated from it: a new option missing from one of them fails
here. Runs without a model."""
from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner

import opencamp
from opencamp import _core, sampling
from opencamp.cli import main
from opencamp.server import app, protocol


def test_table_lists_the_cxx_struct_fields_with_its_defaults():
    assert tuple(o.name for o in sampling.OPTIONS if o.name != "seed") == _core.SamplingParams.fields
    core = _core.SamplingParams()
    for o in sampling.OPTIONS:
        assert getattr(core, o.name) == o.default, o.name
        assert isinstance(getattr(core, o.name) if o.default is not None else 0, o.kind)


def _probe(value: float, option: sampling.Option) -> float:
    return value if option.kind is float else int(value)


def _edges(option: sampling.Option):
    """(value, accepted) pairs at both ends of the engine's range."""
    step = 1e-3 if option.kind is float else 1
    if option.low is not None:
        yield option.low, not option.low_open
        yield option.low - step, False
        yield option.low + step, True
    if option.high is not None:
        yield option.high, True
        yield option.high + step if option.kind is float else option.high + 1, False


@pytest.mark.parametrize("option", [o for o in sampling.OPTIONS if o.name != "seed"], ids=lambda o: o.name)
def test_table_ranges_are_the_engines(option):
    for value, accepted in _edges(option):
        value = _probe(value, option)
        try:
            sampling.check(option.name, value)
            table_ok = True
        except sampling.SamplingValueError as error:
            table_ok = False
            assert option.name in str(error) and error.param == option.name
        assert table_ok == accepted, (option.name, value)
        if not table_ok and option.kind is int and not -2**31 <= value < 2**31:
            continue  # not even representable: the binding refuses it (test_bad_sampling_values)
        try:
            _core.SamplingParams(**{option.name: value}).validate()
            engine_ok = True
        except (opencamp.OpencampError, ValueError):
            engine_ok = False
        assert engine_ok == table_ok, (option.name, value)


def test_floats_are_checked_as_float32():
    for name, value in [("repetition_penalty", 1e300), ("repetition_penalty", 1e-300),
                        ("temperature", math.inf), ("top_p", math.nan)]:
        with pytest.raises(sampling.SamplingValueError, match=name) as info:
            sampling.check(name, value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, opencamp.OpencampError)
        assert info.value.kind == "invalid_argument"


def test_every_surface_is_generated_from_the_table():
    names = [o.name for o in sampling.OPTIONS]
    assert list(protocol.SAMPLING_FIELDS) == names
    assert set(app.DEFAULT_SAMPLING) == set(names) | {"max_tokens"}
    assert app.DEFAULT_SAMPLING["temperature"] == 1.0  # OpenAI's, not the engine's
    fields = {f.name: f for f in dataclasses.fields(opencamp.SamplingOptions)}
    for o in sampling.OPTIONS:
        assert fields[o.name].default == o.default
    for command, wanted in [("generate", names), ("chat", names),
                            ("serve", [o.name for o in sampling.OPTIONS if o.default is not None])]:
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        for name in wanted:
            assert "--" + name.replace("_", "-") in help_text, (command, name)


def test_the_server_parses_with_the_tables_openai_variant():
    body = {"temperature": 2, "top_k": -1, "seed": -1, "presence_penalty": -2}
    assert protocol._sampling(body) == {"temperature": 2.0, "top_k": 0, "seed": 2**64 - 1,
                                        "presence_penalty": -2.0}
    with pytest.raises(protocol.APIError) as info:
        protocol._sampling({"temperature": 2.5})
    assert info.value.param == "temperature" and info.value.status == 400
