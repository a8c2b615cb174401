"""opencamp: fast, correct LLM inference on a C++ engine.

    import opencamp
    llm = opencamp.LLM("path/to/model")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]))
"""
from ._core import OpencampError
from ._core import version as _core_version
from .grammar import Grammar, GrammarError, GrammarUnavailable
from .hub import ModelNotFoundError, resolve_model
from .llm import LLM, Completion, SamplingOptions, Session, Stream
from .tokenizer import Tokenizer

__version__ = _core_version()


def backends() -> list[dict]:
    """The backends compiled in: name, score (higher wins for "auto"), usable here, description."""
    from . import _core

    return _core.backends()


def architectures() -> list[tuple[str, str]]:
    """The supported config.json model types and what they cover."""
    from . import _core

    return _core.architectures()


__all__ = [
    "LLM", "Session", "Stream", "Completion", "SamplingOptions", "Tokenizer", "OpencampError",
    "ModelNotFoundError", "resolve_model", "Grammar", "GrammarError", "GrammarUnavailable", "backends", "architectures", "__version__",
]
